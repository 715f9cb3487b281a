"""The memory planner (llm.memory_plan, `python -m llm.training plan`): its arithmetic on hand-computed
cases, its activation estimate against the measured CPU peak of a training step, and the command line."""

from __future__ import annotations

import pytest
import torch

from kernel.bench_utils import TensorMemoryTracker
from llm.config import ModelConfig
from llm.memory_plan import activation_bytes, parse_bytes, plan
from llm.parallel import apply_activation_checkpointing
from llm.training import main
from llm.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

# d 64, f 128, 2 layers, 4 heads, vocab 256: N = 2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64 + 2 * 256 * 64
SMALL = ModelConfig(vocab_size=256, context_length=128, d_model=64, num_layers=2, num_heads=4, d_ff=128)
N_SMALL = 2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64 + 2 * 256 * 64  # 114_752


def test_states_by_hand() -> None:
    assert SMALL.num_params() == N_SMALL
    ddp = plan(SMALL, world_size=4, parallel="ddp", ac_mode="none", batch=2)
    assert (ddp.params, ddp.grads, ddp.gathered) == (4 * N_SMALL, 4 * N_SMALL, 0)
    assert ddp.optimizer == 8 * N_SMALL + 4 * (9 * 2 + 3)  # m, v, and 21 float32 step counters
    fsdp = plan(SMALL, world_size=4, parallel="fsdp", ac_mode="none", batch=2)
    assert (fsdp.params, fsdp.grads, fsdp.optimizer) == (N_SMALL, N_SMALL, 2 * N_SMALL + 4 * 21)  # steps whole
    block = 4 * 64 * 64 + 3 * 64 * 128 + 2 * 64  # 41_088 parameters in one block
    root = N_SMALL - 2 * block  # embedding, final norm, lm_head
    assert fsdp.gathered == (root + 2 * block) * 2 + block * 4  # bf16 root + 2 blocks, fp32 block gradient
    assert fsdp.activations == ddp.activations


def test_activations_by_hand() -> None:
    """GPU (flash attention, bf16), B 2 x T 128 = 256 tokens. One block keeps per token 4d+2 (norms) + 3d
    (q k v) + 2d (attention output, merged) + 4f (SwiGLU) + d (output) + h (log-sum-exps) = 10*64 + 512 + 6
    = 1158 elements; outside the blocks 2d + 1 = 129; token ids 8 bytes each; lm_head gradient 256*64 fp32
    and one logits chunk of 256 tokens x 256 fp32."""
    head = 256 * 64 * 4 + 256 * 256 * 4
    none = activation_bytes(SMALL, 2, 128, "none", elem=2, gpu=True)
    assert none == 256 * (2 * 1158 + 129) * 2 + 256 * 8 + head
    # full: backward recomputes block 1 first (1158) while block 0 still keeps its input (64); the end of
    # the forward holds only the 2 inputs (128), the recompute of block 0 later 1158
    full = activation_bytes(SMALL, 2, 128, "full", elem=2, gpu=True)
    assert full == 256 * (64 + 1158 + 129) * 2 + 256 * 8 + head
    # every-2 on 2 blocks: block 0 checkpointed (keeps 64), block 1 plain (1158): the end of the forward is
    # the peak, 64 + 1158; the recompute of block 0 comes after block 1 freed its 1158
    assert activation_bytes(SMALL, 2, 128, "every-2", elem=2, gpu=True) == 256 * (64 + 1158 + 129) * 2 + 256 * 8 + head
    # the CPU path keeps attention's P: blocks of 64 query rows over 128 keys: (64*64 + 64*128) / 128 = 96 per head
    cpu = activation_bytes(SMALL, 2, 128, "none", elem=4, gpu=False)
    assert cpu == 256 * (2 * (1158 + 4 * 96) + 129) * 4 + 256 * 8 + head


def _measured_activations(mcfg: ModelConfig, batch: int, mode: str) -> int:
    """Peak of the tensors a training step (forward + backward) creates, less its gradients: what the
    activations took at their peak (the gradients have their own line in the plan)."""
    torch.manual_seed(0)
    model = Transformer.from_config(mcfg)
    apply_activation_checkpointing(model, mode)
    x, y = torch.randint(mcfg.vocab_size, (2, batch, mcfg.context_length))
    model.loss(x, y).backward()  # fills the caches (causal bias, RoPE tables) outside the measurement
    model.zero_grad(set_to_none=True)
    with TensorMemoryTracker() as tracker:
        model.loss(x, y).backward()
    return tracker.peak - sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())


@pytest.mark.parametrize("mode", ["none", "full"])
@pytest.mark.parametrize("mcfg, batch", [
    (SMALL, 8),
    (ModelConfig(vocab_size=512, context_length=64, d_model=96, num_layers=4, num_heads=6, d_ff=256), 8),
])
def test_activation_estimate_is_within_25_percent_of_the_measured_cpu_peak(mcfg: ModelConfig, batch: int,
                                                                           mode: str) -> None:
    measured = _measured_activations(mcfg, batch, mode)
    estimate = activation_bytes(mcfg, batch, mcfg.context_length, mode)
    assert abs(estimate - measured) <= 0.25 * measured, (estimate, measured)


def test_parse_bytes() -> None:
    assert parse_bytes("24GB") == 24e9 and parse_bytes("80 GiB") == 80 * 2**30 and parse_bytes("1e9") == 1e9
    with pytest.raises(ValueError, match="--gpu-memory must be a size"):
        parse_bytes("lots")


def test_cli_says_whether_it_fits(capsys) -> None:
    argv = ["plan", "--preset", "large", "--world-size", "8", "--parallel", "fsdp", "--activation-checkpointing",
            "full", "--batch-size", "8", "--context-length", "1024", "--gpu-memory", "24GB"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for word in ("parameters", "gradients", "optimizer state", "fsdp gathered", "activations", "total", "fits in"):
        assert word in out
    assert main(["plan", "--preset", "large", "--world-size", "8", "--batch-size", "8", "--gpu-memory", "24GB"]) == 0
    assert "does NOT fit" in capsys.readouterr().out  # ddp: every rank holds 16 bytes per parameter
    assert main(["plan", "--gpu-memory", "24XB"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --gpu-memory")
    assert main(["plan", "--activation-checkpointing", "some"]) == 2

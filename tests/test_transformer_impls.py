"""impl="reference" (only llm/ops) and impl="fast" (llm/fast) compute the same model: same loss, gradients,
logits and cached decoding for the same weights; and llm/ops stays the plain reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from llm.fast import decode_step
from llm.generating import iter_tokens
from llm.sampling import SamplingConfig
from llm.train_config import TrainConfig, merge, train_preset
from llm.training import main, train
from llm.transformer import MultiHeadAttention, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = dict(vocab_size=48, context_length=12, d_model=32, num_layers=2, num_heads=4, d_ff=40)
OPS = Path(__file__).resolve().parents[1] / "llm" / "ops"


def pair(**kw) -> tuple[Transformer, Transformer]:
    fast = Transformer(**CFG, **kw).double()
    ref = Transformer(**CFG, **kw, impl="reference").double()
    with torch.no_grad():  # RMSNorm gains start at ones: make them matter
        for p in fast.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.mark.parametrize("kw", [{}, {"num_kv_heads": 2, "tie_embeddings": True}], ids=["mha", "gqa-tied"])
def test_reference_and_fast_give_the_same_loss_and_gradients(kw) -> None:
    fast, ref = pair(**kw)
    assert fast.state_dict().keys() == ref.state_dict().keys()
    x, y = torch.randint(0, 48, (3, 12)), torch.randint(0, 48, (3, 12))
    losses = []
    for model in (fast, ref):
        loss = model.loss(x, y)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=1e-12)
    grads = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-10, atol=1e-12, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-12, atol=1e-12)


def test_reference_and_fast_decode_alike() -> None:
    """Cached (with window slides), left-padded and recomputed generation: the same logits at every step from
    the reference model (masked attention) and the fast one (causal kernel, decode step)."""
    fast, ref = pair(num_kv_heads=2)
    fast, ref = fast.eval(), ref.eval()
    greedy = SamplingConfig(temperature=0)
    for prompts in ([[1, 2, 3]], [[1, 2, 3], [4]]):
        for cache in (True, False):
            logits: dict[str, list[torch.Tensor]] = {"fast": [], "ref": []}
            for name, model in (("fast", fast), ("ref", ref)):
                gen = iter_tokens(model, prompts, greedy, max_new_tokens=14, use_cache=cache, on_logits=logits[name].append)
                list(gen)
            torch.testing.assert_close(torch.stack(logits["fast"]), torch.stack(logits["ref"]), rtol=1e-10, atol=1e-10)
    assert decode_step.weights(ref, ref.new_kv_cache(1)) is None  # the reference model decodes through forward
    assert decode_step.weights(fast, fast.new_kv_cache(1)) is not None


def test_impl_is_checked() -> None:
    with pytest.raises(ValueError, match="impl must be 'fast' or 'reference', got 'quick'"):
        Transformer(**CFG, impl="quick")
    with pytest.raises(ValueError, match="impl must be"):
        MultiHeadAttention(16, 4, impl="")
    with pytest.raises(ValueError, match="impl must be"):
        TrainConfig(impl="Reference").validate()
    assert TrainConfig.from_dict({"impl": "reference"}).impl == "reference"
    assert TrainConfig.from_dict({}).impl == "fast"  # configs saved before the field existed


def test_ops_stay_plain_reference_code() -> None:
    """llm/ops is the readable reference: each file fits on a screen and has no compile or dispatch machinery."""
    files = sorted(OPS.glob("*.py"))
    assert len(files) >= 9
    for f in files:
        text = f.read_text()
        assert len(text.splitlines()) <= 130, f"{f.name}: {len(text.splitlines())} lines"
        for word in ("torch.library", "custom_op", "is_compiling"):
            assert word not in text, f"{f.name} contains {word}"


def test_training_runs_the_chosen_implementation(tmp_path: Path, capsys) -> None:
    """--impl reaches the model; both implementations train to the same losses from the same seed."""
    tokens = (np.arange(3000) * 7 % 48).astype(np.uint16)
    np.save(tmp_path / "train.npy", tokens)
    np.save(tmp_path / "val.npy", tokens[:600])
    losses = {}
    for impl in ("fast", "reference"):
        cfg = merge(train_preset("demo"), dict(
            train_data=str(tmp_path / "train.npy"), val_data=str(tmp_path / "val.npy"), out_dir=str(tmp_path / impl),
            prepare_demo_data=False, max_steps=3, batch_size=2, warmup_steps=1, eval_interval=3, eval_batches=1,
            log_interval=1, checkpoint_interval=0, threads=1, sample_tokens=0, impl=impl,
            model={**CFG, "context_length": 8},
        ))
        losses[impl] = train(cfg, quiet=True).losses
    assert losses["fast"].keys() == losses["reference"].keys() == {1, 2, 3}
    for step, loss in losses["fast"].items():
        assert loss == pytest.approx(losses["reference"][step], rel=1e-4)
    assert main(["--impl", "faster", "--out-dir", str(tmp_path / "bad")]) == 2
    assert "impl must be 'fast' or 'reference', got 'faster'" in capsys.readouterr().err

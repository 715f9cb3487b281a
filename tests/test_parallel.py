"""Activation checkpointing (llm.parallel): same gradients as the plain model, only the block inputs kept
through the forward pass, the same state dict, and a paused+resumed checkpointed run equal to an
uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kernel.bench_utils import TensorMemoryTracker
from llm.parallel import apply_activation_checkpointing
from llm.train_config import checkpoint_every
from llm.training import train
from llm.transformer import Transformer, attn_inputs
from tests.test_training import _cfg, data_dir  # noqa: F401  (data_dir: the shared token-array fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = dict(vocab_size=48, context_length=32, d_model=32, num_layers=4, num_heads=4, d_ff=40)


def _grads(model: Transformer, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.loss(x, y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("mode", ["full", "every-2", "every-3"])
def test_checkpointed_gradients_equal_the_plain_ones(impl: str, mode: str) -> None:
    plain = Transformer(**CFG, impl=impl)
    ckpt = Transformer(**CFG, impl=impl)
    ckpt.load_state_dict(plain.state_dict())
    assert apply_activation_checkpointing(ckpt, mode) == len(range(0, CFG["num_layers"], checkpoint_every(mode)))
    assert ckpt.state_dict().keys() == plain.state_dict().keys()  # checkpoints stay interchangeable
    x, y = torch.randint(48, (3, 32)), torch.randint(48, (3, 32))
    want, got = _grads(plain, x, y), _grads(ckpt, x, y)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6, msg=name)


def _kept_storages(block, x: torch.Tensor, inputs) -> dict[int, int]:
    """{address: bytes} of the storages seen in block's forward, other than its output, that are alive
    after it: what autograd keeps, and views of weights and caches."""
    with TensorMemoryTracker() as tracker:
        out = block(x, inputs=inputs)
    kept = {key: n for key, (ref, n) in tracker.live.items() if not ref.expired()}
    kept.pop(out.untyped_storage().data_ptr(), None)
    if out.requires_grad:
        out.sum().backward()  # and the recompute runs
    return kept


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_a_checkpointed_block_keeps_only_its_inputs(impl: str) -> None:
    """What a block keeps for backward: the storages alive after its forward with grad that are not alive
    after the same forward without grad (weight views, the causal-mask cache). A plain block keeps its
    activations, attention's P or statistics, RoPE products; a checkpointed one keeps nothing it made
    (its inputs were there before)."""
    model = Transformer(**CFG, impl=impl)
    x = torch.randn(2, 32, 32, requires_grad=True)
    inputs = attn_inputs(model.layers[0].attn, 32, None, 0, None, x.device)
    block = model.layers[0]
    _kept_storages(block, x, inputs)  # fills the caches
    with torch.no_grad():
        baseline = _kept_storages(block, x, inputs)
    plain = sum(n for key, n in _kept_storages(block, x, inputs).items() if key not in baseline)
    apply_activation_checkpointing(model, "full")
    assert {key: n for key, n in _kept_storages(block, x, inputs).items() if key not in baseline} == {}
    assert plain > 10 * x.untyped_storage().nbytes(), plain


def test_no_grad_and_kv_cache_calls_run_the_plain_forward() -> None:
    """Generation after training (no grad, a KV cache) gives the plain model's logits."""
    plain = Transformer(**CFG)
    ckpt = Transformer(**CFG)
    ckpt.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(ckpt, "full")
    x = torch.randint(48, (2, 10))
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            caches = plain.new_kv_cache(2), ckpt.new_kv_cache(2)
            want = [plain(x[:, :6], kv_cache=caches[0]), plain(x[:, 6:], kv_cache=caches[0])]
            got = [ckpt(x[:, :6], kv_cache=caches[1]), ckpt(x[:, 6:], kv_cache=caches[1])]
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_unknown_modes_are_one_clear_error() -> None:
    assert [checkpoint_every(m) for m in ("none", "full", "every-1", "every-4")] == [0, 1, 1, 4]
    for bad in ("every-0", "every-", "every-x", "some", "every2"):
        with pytest.raises(ValueError, match="activation_checkpointing must be none | full | every-K"):
            checkpoint_every(bad)


def test_checkpointed_resume_is_bit_exact(data_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    """As test_training.test_resume_is_bit_exact, with every other block checkpointed."""
    full = train(_cfg(data_dir, tmp_path / "full", max_steps=10, activation_checkpointing="every-2"), quiet=True)
    cfg = _cfg(data_dir, tmp_path / "parts", max_steps=10, activation_checkpointing="every-2")
    first = train(cfg, quiet=True, stop_at=5)
    second = train(cfg, resume="auto", quiet=True)
    assert {**first.losses, **second.losses} == full.losses
    plain = train(_cfg(data_dir, tmp_path / "plain", max_steps=10), quiet=True)
    assert plain.losses == full.losses  # and checkpointing changes no number

"""The masked (per-position weighted) cross-entropy: the reference op and both fused loops against
torch.nn.functional.cross_entropy with ignore_index, gradcheck in float64, an all-zero mask, and the
model's loss entry point with padding at the end of rows."""

import pytest
import torch
import torch.nn.functional as F

import llm.fast.cross_entropy as ce_mod
from llm.fast.cross_entropy import linear_cross_entropy
from llm.ops.cross_entropy import cross_entropy
from llm.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def _masked_case(dtype=torch.float64):
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(2, 7, 12, dtype=dtype, generator=gen)
    w = torch.randn(30, 12, dtype=dtype, generator=gen)
    t = torch.randint(0, 30, (2, 7), generator=gen)
    mask = torch.rand(2, 7, generator=gen) < 0.5
    mask[0, 1] = mask[1, 5] = True
    mask[0, 2] = False
    t[0, 3] = t[1, 5]  # a repeated target
    return h, w, t, mask


def _ignore_index_ref(logits, t, mask):
    """F.cross_entropy with ignore_index = -100 at the positions the mask leaves out."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.masked_fill(~mask, -100).reshape(-1), ignore_index=-100)


def test_gradcheck_masked() -> None:
    h, w, t, mask = _masked_case()
    z = (h @ w.t()).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: 1.5 * cross_entropy(z, t, mask), (z,))
    weights = torch.rand(2, 7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: cross_entropy(z, t, weights), (z,))
    h.requires_grad_(), w.requires_grad_()
    assert torch.autograd.gradcheck(lambda h, w: 2.5 * linear_cross_entropy(h, w, t, mask), (h, w))
    assert torch.autograd.gradcheck(lambda h, w: linear_cross_entropy(h, w, t, weights), (h, w))


@pytest.mark.parametrize("chunk", [4, 512])
def test_masked_matches_ignore_index(monkeypatch, chunk) -> None:
    monkeypatch.setattr(ce_mod, "FUSED_CHUNK", chunk)
    h, w, t, mask = _masked_case()
    h.requires_grad_(), w.requires_grad_()
    ref = _ignore_index_ref(h @ w.t(), t, mask)
    ref_grads = torch.autograd.grad(ref, (h, w))
    z = (h @ w.t()).detach().requires_grad_()
    ref_z = _ignore_index_ref(z, t, mask)
    (dz_ref,) = torch.autograd.grad(ref_z, (z,))
    ours = cross_entropy(z, t, mask)
    (dz,) = torch.autograd.grad(ours, (z,))
    torch.testing.assert_close(ours, ref_z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dz, dz_ref, rtol=1e-12, atol=1e-12)
    for lw in (mask, mask.double()):  # a bool mask or 0/1 weights
        fused = linear_cross_entropy(h, w, t, lw)
        torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)
        for a, b in zip(torch.autograd.grad(fused, (h, w)), ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_weights_are_a_weighted_mean() -> None:
    """Non-0/1 weights: Σ w·loss / Σ w computed from F.cross_entropy(reduction='none')."""
    h, w, t, _ = _masked_case()
    weights = torch.rand(2, 7, dtype=torch.float64)
    per = F.cross_entropy((h @ w.t()).reshape(-1, 30), t.reshape(-1), reduction="none")
    want = (per * weights.reshape(-1)).sum() / weights.sum()
    torch.testing.assert_close(cross_entropy(h @ w.t(), t, weights), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(linear_cross_entropy(h, w, t, weights), want, rtol=1e-12, atol=1e-12)


def test_all_masked_is_zero() -> None:
    h, w, t, _ = _masked_case()
    none = torch.zeros(2, 7, dtype=torch.bool)
    h.requires_grad_(), w.requires_grad_()
    for loss in (cross_entropy(h @ w.t(), t, none), linear_cross_entropy(h, w, t, none)):
        assert loss.item() == 0.0
        assert all(g.abs().max() == 0 for g in torch.autograd.grad(loss, (h, w)))


def test_mixed_precision_loop_masked(monkeypatch) -> None:
    """The GPU autocast loop with a mask, against float64 math on the bf16-rounded h and W (bf16 tolerance)."""
    monkeypatch.setattr(ce_mod, "LOWP_CHUNK_ELEMS", 4 * 30)
    h, w, t, mask = _masked_case(torch.float32)
    hb, wb = (x.bfloat16().double().requires_grad_() for x in (h, w))
    ref = _ignore_index_ref(hb @ wb.t(), t, mask)
    want = torch.autograd.grad(ref, (hb, wb))
    loss, dh, dw = ce_mod._linear_cross_entropy_lowp(h.reshape(14, 12), w, t.reshape(-1), True, torch.bfloat16,
                                                     mask.reshape(-1))
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-3, atol=1e-3)
    for ours, ref_g in zip((dh.view(2, 7, 12), dw), want):
        torch.testing.assert_close(ours.double(), ref_g, rtol=2e-2, atol=2e-2 * ref_g.abs().max().item())


def test_compiled_path_custom_op_masked(monkeypatch) -> None:
    h, w, t, mask = _masked_case()
    h.requires_grad_(), w.requires_grad_()
    eager = linear_cross_entropy(h, w, t, mask)
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        assert torch.autograd.gradcheck(lambda h, w: 2.5 * linear_cross_entropy(h, w, t, mask), (h, w))
        torch.testing.assert_close(linear_cross_entropy(h, w, t, mask), eager, rtol=0, atol=0)
    h2, w2 = h.detach().reshape(14, 12).float().requires_grad_(), w.detach().float().requires_grad_()
    torch.library.opcheck(ce_mod._lce_op, (h2, w2, t.reshape(-1), True, mask.reshape(-1)))


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_model_loss_mask_pads_by_position(impl) -> None:
    """Two rows right-padded to one length: the masked batch loss equals F.cross_entropy over the real
    answer positions only, whatever ids the padding holds (pad ids equal to real ids included)."""
    model = Transformer(vocab_size=40, context_length=16, d_model=16, num_layers=2, num_heads=2, impl=impl).double()
    x = torch.randint(0, 40, (2, 10))
    y = torch.randint(0, 40, (2, 10))
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 3:10] = True
    mask[1, 2:6] = True  # row 1 is 6 long: positions 6.. are padding
    x[1, 6:] = y[1, 6:] = y[0, 4]  # padding with an id that is also a counted target
    loss = model.loss(x, y, mask)
    logits = model(x)
    want = F.cross_entropy(logits[mask], y[mask])
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="loss_mask shape"):
        model.loss(x, y, mask[:, :5])

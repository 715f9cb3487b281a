"""Cross-entropy (the reference, and the fast one fused with the output projection): gradcheck, loss/grads
against F.cross_entropy through torch autograd, and the fused loops against the reference ops."""

import pytest
import torch
import torch.nn.functional as F

import llm.fast.cross_entropy as ce_mod
from llm.fast.cross_entropy import linear_cross_entropy
from llm.ops.cross_entropy import cross_entropy
from llm.ops.linear import linear
from llm.transformer import CrossEntropyLoss


pytestmark = pytest.mark.usefixtures("one_thread")


def test_gradcheck() -> None:
    z = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 5, (2, 3))
    assert torch.autograd.gradcheck(lambda z: cross_entropy(z, t), (z,))
    h = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    # scaled by 2.5 so backward's "dloss != 1" path is the one checked
    assert torch.autograd.gradcheck(lambda h, w: 2.5 * linear_cross_entropy(h, w, t), (h, w))


def test_matches_f_cross_entropy(ref_snapshot, monkeypatch) -> None:
    z = (4 * torch.randn(3, 5, 50)).requires_grad_()
    z.data[0, 0, 7] = 200.0  # huge logit: log-sum-exp must stay finite
    t = torch.randint(0, 50, (3, 5))
    h = torch.randn(3, 5, 12, requires_grad=True)
    w = torch.randn(50, 12, requires_grad=True)
    loss_ref = F.cross_entropy(z.view(-1, 50), t.view(-1))
    (dz_ref,) = torch.autograd.grad(loss_ref, (z,))
    fused_ref = F.cross_entropy(F.linear(h, w).view(-1, 50), t.view(-1))
    dh_ref, dw_ref = torch.autograd.grad(fused_ref, (h, w))
    stored = ref_snapshot(
        {"loss": loss_ref, "dz": dz_ref, "fused": fused_ref, "dh": dh_ref, "dw": dw_ref}, rtol=1e-5, atol=1e-6
    )
    loss = CrossEntropyLoss()(z, t)
    (dz,) = torch.autograd.grad(loss, (z,))
    torch.testing.assert_close(loss, stored["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dz, stored["dz"], rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(ce_mod, "FUSED_CHUNK", 4)  # 15 tokens: chunks of 4 with a ragged last one
    fused = linear_cross_entropy(h, w, t)
    dh, dw = torch.autograd.grad(fused, (h, w))
    for name, ours in (("fused", fused), ("dh", dh), ("dw", dw)):
        torch.testing.assert_close(ours, stored[name], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # no gradient work when none is needed
        torch.testing.assert_close(linear_cross_entropy(h, w, t), stored["fused"], rtol=1e-5, atol=1e-6)


def test_compiled_path_custom_op(monkeypatch) -> None:
    """Under torch.compile linear_cross_entropy calls the llm::linear_cross_entropy custom op (the same
    chunked loop, registered autograd): gradcheck and equality with the Function in eager by pretending
    to compile, and opcheck (schema, fake tensors, autograd registration, AOT dispatch)."""
    monkeypatch.setattr(ce_mod, "FUSED_CHUNK", 4)  # 6 tokens: chunks of 4 and 2; repeated targets
    h = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[1, 1, 4], [0, 1, 1]])
    eager = (lambda loss: (loss, *torch.autograd.grad(2.5 * loss, (h, w))))(linear_cross_entropy(h, w, t))
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        assert torch.autograd.gradcheck(lambda h, w: 2.5 * linear_cross_entropy(h, w, t), (h, w))
        loss = linear_cross_entropy(h, w, t)
        compiled = (loss, *torch.autograd.grad(2.5 * loss, (h, w)))
        with torch.no_grad():
            torch.testing.assert_close(linear_cross_entropy(h, w, t), eager[0], rtol=0, atol=0)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    h2 = h.detach().reshape(6, 4).float().requires_grad_()
    w2 = w.detach().float().requires_grad_()
    torch.library.opcheck(ce_mod._lce_op, (h2, w2, t.reshape(-1), True))
    torch.library.opcheck(ce_mod._lce_op, (h2.detach(), w2.detach(), t.reshape(-1), False))


def test_mixed_precision_loop_matches_float64(monkeypatch) -> None:
    """The GPU autocast loop (chunk GEMMs in bf16, statistics and sums in fp32) against float64 math on
    the same bf16-rounded h and W, through F.linear + F.cross_entropy; bf16 tolerance."""
    monkeypatch.setattr(ce_mod, "LOWP_CHUNK_ELEMS", 4 * 50)  # 4 tokens per chunk: 15 = 4+4+4+3
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(15, 12, generator=gen)
    w = torch.randn(50, 12, generator=gen)
    t = torch.randint(0, 50, (15,), generator=gen)
    t[3] = t[4]  # a repeated target: the one-hot terms of dW must add up
    hd, wd = (x.bfloat16().double().requires_grad_() for x in (h, w))
    ref = F.cross_entropy(F.linear(hd, wd), t)
    dh_ref, dw_ref = torch.autograd.grad(ref, (hd, wd))
    loss, dh, dw = ce_mod._linear_cross_entropy_lowp(h, w, t, True, torch.bfloat16)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-3, atol=1e-3)
    for name, ours, want in (("dh", dh, dh_ref), ("dw", dw, dw_ref)):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item(), msg=name)
    loss_only, none_h, none_w = ce_mod._linear_cross_entropy_lowp(h, w, t, False, torch.bfloat16)
    assert loss_only == loss and none_h.numel() == none_w.numel() == 0
    # through the Function, with dloss != 1
    hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = ce_mod.LinearCrossEntropyFn.apply(hg, wg, t, True, torch.bfloat16)
    (2.5 * out).backward()
    torch.testing.assert_close(hg.grad, 2.5 * dh)
    torch.testing.assert_close(wg.grad, 2.5 * dw)


def test_fused_loops_match_the_reference_ops(monkeypatch) -> None:
    """Both chunk loops against cross_entropy(linear(h, W), t): fp32 in float64, mixed precision (bf16 GEMMs)
    on the bf16-rounded h and W with a bf16 tolerance."""
    monkeypatch.setattr(ce_mod, "FUSED_CHUNK", 4)
    monkeypatch.setattr(ce_mod, "LOWP_CHUNK_ELEMS", 4 * 30)
    h = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(30, 12, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 30, (2, 7))
    ref = cross_entropy(linear(h, w), t)
    ref_grads = torch.autograd.grad(ref, (h, w))
    fused = linear_cross_entropy(h, w, t)
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(fused, (h, w)), ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    hb, wb = (x.detach().bfloat16().double().requires_grad_() for x in (h, w))
    ref = cross_entropy(linear(hb, wb), t)
    h2, w2 = hb.detach().float().reshape(14, 12), wb.detach().float()
    loss, dh, dw = ce_mod._linear_cross_entropy_lowp(h2, w2, t.reshape(-1), True, torch.bfloat16)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-3, atol=1e-3)
    for ours, want in zip((dh.view(2, 7, 12), dw), torch.autograd.grad(ref, (hb, wb))):
        torch.testing.assert_close(ours.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_errors() -> None:
    with pytest.raises(ValueError, match="integer"):
        cross_entropy(torch.randn(3, 5), torch.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        cross_entropy(torch.randn(3, 5), torch.zeros(4, dtype=torch.long))

"""RoPE: gradcheck, and forward/grads against an independent float64 rotation of adjacent pairs; the fast
(complex, and real when compiling) rotation against the reference op."""

import pytest
import torch

from llm.fast.rope import fast_rope, layer_rotation
from llm.ops.rope import rope
from llm.transformer import RoPE


pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate (x[2k], x[2k+1]) by pos / theta^(2k/d), float64, via torch autograd."""
    d = x.shape[-1]
    k = torch.arange(d // 2, dtype=torch.float64)
    ang = pos.double()[..., None] / theta ** (2 * k / d)
    xe, xo = x.double()[..., 0::2], x.double()[..., 1::2]
    ye = xe * ang.cos() - xo * ang.sin()
    yo = xe * ang.sin() + xo * ang.cos()
    return torch.stack([ye, yo], -1).flatten(-2)


def test_gradcheck() -> None:
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    ang = torch.rand(3, 3, dtype=torch.float64) * 6
    assert torch.autograd.gradcheck(lambda x: rope(x, ang.cos(), ang.sin()), (x,))


def test_fast_rope_matches_the_reference(monkeypatch) -> None:
    """The complex multiply (and, when compiling, the reference itself, checked in eager by pretending to
    compile): the values and gradients of llm.ops.rope, with x broadcast against wider tables."""
    x = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    ang = torch.rand(2, 1, 5, 3, dtype=torch.float64) * 6
    dy = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    y = rope(x, ang.cos(), ang.sin())
    (dx,) = torch.autograd.grad(y, (x,), dy)
    for compiling in (False, True):
        with monkeypatch.context() as m:
            m.setattr(torch.compiler, "is_compiling", lambda: compiling)
            assert torch.autograd.gradcheck(lambda x: fast_rope(x, ang.cos(), ang.sin()), (x,))
            y_f = fast_rope(x, ang.cos(), ang.sin())
            (dx_f,) = torch.autograd.grad(y_f, (x,), dy)
            with torch.no_grad():
                y_ng = fast_rope(x, ang.cos(), ang.sin())
            assert (layer_rotation(ang.cos(), ang.sin()) is None) == compiling
        for a in (y_f, y_ng):
            torch.testing.assert_close(a, y, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dx_f, dx, rtol=1e-12, atol=1e-12)
    xb = x.detach().bfloat16()  # bf16 in, fp32 rotation, bf16 out
    torch.testing.assert_close(fast_rope(xb, ang.cos(), ang.sin()), rope(xb, ang.cos(), ang.sin()), rtol=1e-2, atol=1e-2)


def test_matches_reference(ref_snapshot) -> None:
    theta, d = 10000.0, 16
    x = torch.randn(2, 5, d, requires_grad=True)
    pos = torch.tensor([[0, 1, 2, 3, 4], [7, 3, 11, 0, 2]])
    dy = torch.randn(2, 5, d)
    y_ref = _reference(x, pos, theta)
    (dx_ref,) = torch.autograd.grad(y_ref, (x,), dy.double())
    stored = ref_snapshot({"y": y_ref, "dx": dx_ref}, rtol=1e-5, atol=1e-5)
    mod = RoPE(theta, d, max_seq_len=12)
    y = mod(x, pos)
    (dx,) = torch.autograd.grad(y, (x,), dy)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), stored["y"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, stored["dx"], rtol=1e-5, atol=1e-5)
    # default positions are 0..s-1, broadcast over extra leading dims (e.g. heads)
    xh = torch.randn(2, 3, 5, d)
    torch.testing.assert_close(mod(xh).double(), _reference(xh, torch.arange(5), theta), rtol=1e-5, atol=1e-5)
    assert "cos" not in mod.state_dict() and "sin" not in mod.state_dict()  # non-persistent buffers


def test_errors() -> None:
    with pytest.raises(ValueError, match="even"):
        RoPE(10000.0, 7, 4)
    mod = RoPE(10000.0, 4, 4)
    with pytest.raises(ValueError, match="max_seq_len"):
        mod(torch.randn(5, 4))
    with pytest.raises(ValueError, match="positions"):
        mod(torch.randn(2, 4), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="integers"):
        mod(torch.randn(2, 4), torch.tensor([0.0, 1.0]))

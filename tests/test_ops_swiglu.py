"""SiLU and the SwiGLU gate: gradcheck, forward/grads against F.silu; FFN against F.* reference."""

import pytest
import torch
import torch.nn.functional as F

from llm.config import default_d_ff
from llm.ops.swiglu import silu, swiglu
from llm.transformer import FFN, SiLU


pytestmark = pytest.mark.usefixtures("one_thread")


def test_gradcheck() -> None:
    a = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(silu, (a,))
    assert torch.autograd.gradcheck(swiglu, (a, b))


def test_matches_f_silu(ref_snapshot) -> None:
    a = (3 * torch.randn(4, 32)).requires_grad_()
    b = torch.randn(4, 32, requires_grad=True)
    dy = torch.randn(4, 32)
    s_ref = F.silu(a)
    (ds_ref,) = torch.autograd.grad(s_ref, (a,), dy)
    g_ref = F.silu(a) * b
    da_ref, db_ref = torch.autograd.grad(g_ref, (a, b), dy)
    stored = ref_snapshot(
        {"silu": s_ref, "dsilu": ds_ref, "gate": g_ref, "da": da_ref, "db": db_ref}, rtol=1e-5, atol=1e-6
    )
    s = silu(a)
    (ds,) = torch.autograd.grad(s, (a,), dy)
    g = swiglu(a, b)
    da, db = torch.autograd.grad(g, (a, b), dy)
    for name, ours in (("silu", s), ("dsilu", ds), ("gate", g), ("da", da), ("db", db)):
        torch.testing.assert_close(ours, stored[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(SiLU()(a), stored["silu"], rtol=1e-5, atol=1e-6)


def test_ffn_matches_reference(ref_snapshot) -> None:
    ffn = FFN(16, 48)
    x = torch.randn(2, 3, 16)
    w1, w2, w3 = ffn.w1.weight, ffn.w2.weight, ffn.w3.weight
    y_ref = F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)
    stored = ref_snapshot({"y": y_ref}, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ffn(x), stored["y"], rtol=1e-5, atol=1e-5)
    assert FFN(100).w1.weight.shape == (default_d_ff(100), 100)
    assert tuple(ffn.w2.weight.shape) == (16, 48)

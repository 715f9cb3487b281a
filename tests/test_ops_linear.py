"""Linear (and the fast shared-input linears): gradcheck, and forward/grads against F.linear through torch
autograd and against the reference op."""

import pytest
import torch
import torch.nn.functional as F

from llm.fast.linears import linears
from llm.ops.linear import linear
from llm.transformer import Linear


pytestmark = pytest.mark.usefixtures("one_thread")


def test_gradcheck() -> None:
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(linear, (x, w))
    w2 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, w2: linears(x, w, w2), (x, w, w2))


def test_matches_f_linear(ref_snapshot) -> None:
    x = torch.randn(2, 7, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    dy = torch.randn(2, 7, 8)
    y_ref = F.linear(x, w)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, w), dy)
    stored = ref_snapshot({"y": y_ref, "dx": dx_ref, "dw": dw_ref}, rtol=1e-5, atol=1e-5)
    y = linear(x, w)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    for name, ours in (("y", y), ("dx", dx), ("dw", dw)):
        torch.testing.assert_close(ours, stored[name], rtol=1e-5, atol=1e-5)


def test_shared_input_linears_match_f_linear(ref_snapshot) -> None:
    x = torch.randn(2, 7, 16, requires_grad=True)
    ws = [torch.randn(n, 16, requires_grad=True) for n in (8, 4, 4)]
    dys = [torch.randn(2, 7, n) for n in (8, 4, 4)]
    ys_ref = [F.linear(x, w) for w in ws]
    grads_ref = torch.autograd.grad(ys_ref, (x, *ws), dys)
    ref = {f"y{i}": y for i, y in enumerate(ys_ref)} | {f"d{i}": g for i, g in enumerate(grads_ref)}
    stored = ref_snapshot(ref, rtol=1e-5, atol=1e-5)
    ys = linears(x, *ws)
    grads = torch.autograd.grad(ys, (x, *ws), dys)
    for i, y in enumerate(ys):
        torch.testing.assert_close(y, stored[f"y{i}"], rtol=1e-5, atol=1e-5)
    for i, g in enumerate(grads):  # d0 = dx (summed over the three branches), then dW_i
        torch.testing.assert_close(g, stored[f"d{i}"], rtol=1e-5, atol=1e-5)


def test_shared_input_linears_match_the_reference_op() -> None:
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(n, 16, dtype=torch.float64, requires_grad=True) for n in (8, 4)]
    dys = [torch.randn(2, 7, n, dtype=torch.float64) for n in (8, 4)]
    ref = [linear(x, w) for w in ws]
    fast = linears(x, *ws)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(fast, (x, *ws), dys), torch.autograd.grad(ref, (x, *ws), dys)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_module_init() -> None:
    lin = Linear(300, 200)
    w = lin.weight.detach()
    std = (2 / 500) ** 0.5
    assert w.shape == (200, 300)
    assert w.abs().max() <= 3 * std + 1e-6
    assert abs(w.std().item() / std - 0.986) < 0.03  # truncating N(0, σ²) at ±3σ leaves std ≈ 0.986σ

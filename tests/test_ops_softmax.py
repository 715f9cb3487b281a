"""Softmax: gradcheck, forward/grads against F.softmax, stability for huge logits; the fast in-place
softmax helper against the reference."""

import pytest
import torch
import torch.nn.functional as F

from llm.fast.softmax import exp_rows_
from llm.ops.softmax import softmax
from llm.transformer import Softmax


pytestmark = pytest.mark.usefixtures("one_thread")


def test_gradcheck() -> None:
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: softmax(x, 1), (x,))


def test_matches_f_softmax(ref_snapshot) -> None:
    x = (5 * torch.randn(3, 6, 10)).requires_grad_()
    dy = torch.randn(3, 6, 10)
    out = {}
    for dim in (-1, 1):
        y_ref = F.softmax(x, dim)
        (dx_ref,) = torch.autograd.grad(y_ref, (x,), dy)
        out[f"y{dim}"], out[f"dx{dim}"] = y_ref, dx_ref
    stored = ref_snapshot(out, rtol=1e-5, atol=1e-6)
    for dim in (-1, 1):
        y = softmax(x, dim)
        (dx,) = torch.autograd.grad(y, (x,), dy)
        torch.testing.assert_close(y, stored[f"y{dim}"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dx, stored[f"dx{dim}"], rtol=1e-5, atol=1e-6)


def test_stable_for_large_logits() -> None:
    x = torch.tensor([[1000.0, 1001.0, 999.0], [-1000.0, -1000.0, -1e4]])
    y = Softmax(-1)(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, F.softmax(x.double(), -1).float())


def test_fast_exp_rows_matches_the_reference() -> None:
    x = 30 * torch.randn(4, 5, 9, dtype=torch.float64)
    e = x.clone()
    m, l = exp_rows_(e)
    torch.testing.assert_close(e / l, softmax(x, -1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m + l.log(), torch.logsumexp(x, -1, keepdim=True), rtol=1e-12, atol=1e-12)

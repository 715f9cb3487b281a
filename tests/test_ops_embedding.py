"""Embedding: gradcheck, and forward/grads against F.embedding (repeated ids must accumulate)."""

import pytest
import torch
import torch.nn.functional as F

from llm.ops.embedding import embedding
from llm.transformer import Embedding


pytestmark = pytest.mark.usefixtures("one_thread")


def test_gradcheck() -> None:
    ids = torch.tensor([[0, 3, 3], [1, 0, 4]])
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: embedding(ids, w), (w,))


def test_matches_f_embedding(ref_snapshot) -> None:
    ids = torch.randint(0, 11, (3, 9))
    ids[0, :3] = 2  # repeats
    w = torch.randn(11, 6, requires_grad=True)
    dy = torch.randn(3, 9, 6)
    y_ref = F.embedding(ids, w)
    (dw_ref,) = torch.autograd.grad(y_ref, (w,), dy)
    stored = ref_snapshot({"y": y_ref, "dw": dw_ref}, rtol=1e-5, atol=1e-5)
    y = embedding(ids, w)
    (dw,) = torch.autograd.grad(y, (w,), dy)
    torch.testing.assert_close(y, stored["y"], rtol=0, atol=0)
    torch.testing.assert_close(dw, stored["dw"], rtol=1e-5, atol=1e-5)


def test_module_init() -> None:
    w = Embedding(1000, 64).weight.detach()
    assert w.shape == (1000, 64) and w.abs().max() <= 3.0
    assert abs(w.std().item() - 0.986) < 0.03

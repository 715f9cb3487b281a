"""Numerically stable softmax along one dimension.

    forward:  y = exp(x − max(x)) / Σ exp(x − max(x))     (subtracting the max changes nothing
                                                            mathematically but keeps exp ≤ 1)
    backward: dx = y ⊙ (dy − Σ_dim dy ⊙ y)                 (Jacobian diag(y) − y yᵀ applied to dy)
Only y is saved.
"""

from __future__ import annotations

import torch
from torch.autograd import Function


def softmax_forward(x: torch.Tensor, dim: int) -> torch.Tensor:
    y = x - x.amax(dim, keepdim=True)
    y.exp_()
    return y.div_(y.sum(dim, keepdim=True))


def softmax_backward(y: torch.Tensor, dy: torch.Tensor, dim: int) -> torch.Tensor:
    dx = dy * y
    return dx.sub_(y * dx.sum(dim, keepdim=True))


class SoftmaxFn(Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int) -> torch.Tensor:
        y = softmax_forward(x, dim)
        ctx.save_for_backward(y)
        ctx.dim = dim
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (y,) = ctx.saved_tensors
        return softmax_backward(y, dy, ctx.dim), None


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """exp(x) / Σ_dim exp(x), computed stably."""
    if not torch.is_grad_enabled():  # inference: no autograd.Function overhead
        return softmax_forward(x, dim)
    return SoftmaxFn.apply(x, dim)

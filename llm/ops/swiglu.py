"""SiLU and the SwiGLU gate.

    silu(a)      = a σ(a)                     d silu/da = σ(a) (1 + a (1 − σ(a)))
    swiglu(a, b) = silu(a) ⊙ b                 (a = x W1ᵀ, b = x W3ᵀ, both (... f))
    backward:      da = dy ⊙ b ⊙ silu'(a),    db = dy ⊙ silu(a)
One Function each, so autograd stores a and b only (not σ(a), silu(a) and the product).
"""

from __future__ import annotations

import torch
from torch.autograd import Function


class SiluFn(Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a)
        return a * torch.sigmoid(a)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (a,) = ctx.saved_tensors
        s = torch.sigmoid(a)
        # σ(a)(1 + a(1 − σ(a))) = σ(a) + silu(a)(1 − σ(a))
        grad = a * (1 - s)
        grad.add_(1).mul_(s).mul_(dy)
        return grad


class SwiGLUFn(Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        out = torch.sigmoid(a)
        return out.mul_(a).mul_(b)  # in place on the fresh σ(a) buffer

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        a, b = ctx.saved_tensors
        s = torch.sigmoid(a)
        db = None
        if ctx.needs_input_grad[1]:
            db = a * s
            db.mul_(dy)
        # da = dy b σ(a) (1 + a (1 − σ(a))); built in place on one fresh buffer
        da = torch.rsub(s, 1).mul_(a).add_(1).mul_(s).mul_(b).mul_(dy)
        return da, db


def silu(a: torch.Tensor) -> torch.Tensor:
    """a σ(a), elementwise."""
    return SiluFn.apply(a)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) ⊙ b, elementwise (the SwiGLU gate)."""
    return SwiGLUFn.apply(a, b)

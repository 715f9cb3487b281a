"""SiLU and the SwiGLU gate.

    silu(a)      = a σ(a)                     d silu/da = σ(a) (1 + a (1 − σ(a)))
    swiglu(a, b) = silu(a) ⊙ b                 (a = x W1ᵀ, b = x W3ᵀ, both (... f))
    backward:      da = dy ⊙ b ⊙ silu'(a),    db = dy ⊙ silu(a)
One Function each, so autograd keeps only what the hand-written backward reads.
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
        sig = torch.sigmoid(a)
        silu_a = a * sig
        # Save σ(a) and silu(a) instead of a: backward needs no exp, and the memory equals what
        # autograd keeps for silu(a) * b anyway.
        ctx.save_for_backward(sig, silu_a, b)
        return silu_a * b

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        sig, silu_a, b = ctx.saved_tensors
        db = silu_a * dy if ctx.needs_input_grad[1] else None
        # silu'(a) = σ(a)(1 + a(1 − σ(a))) = σ + silu − silu·σ ; da = dy ⊙ b ⊙ silu'(a)
        da = torch.add(sig, silu_a).addcmul_(silu_a, sig, value=-1)  # one fresh buffer, then in place
        return da.mul_(dy).mul_(b), db


def silu(a: torch.Tensor) -> torch.Tensor:
    """a σ(a), elementwise."""
    return SiluFn.apply(a)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) ⊙ b, elementwise (the SwiGLU gate)."""
    return SwiGLUFn.apply(a, b)


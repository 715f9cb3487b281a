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


def _swiglu(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, σ(a), silu(a)): the forward math, shared by the Function and the no-grad path."""
    sig = torch.sigmoid(a)
    silu_a = a * sig
    return silu_a * b, sig, silu_a


class SwiGLUFn(Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        y, sig, silu_a = _swiglu(a, b)
        # Save σ(a) and silu(a) instead of a: backward needs no exp, and the memory equals what
        # autograd keeps for silu(a) * b anyway.
        ctx.save_for_backward(sig, silu_a, b)
        return y

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
    if not torch.is_grad_enabled():  # inference: no autograd.Function overhead
        return _swiglu(a, b)[0]
    return SwiGLUFn.apply(a, b)


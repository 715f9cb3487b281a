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
        da = torch.addcmul(sig + silu_a, silu_a, sig, value=-1)
        return da.mul_(dy).mul_(b), db


class SwiGLUPackedFn(Function):
    """swiglu on a packed ab = [a | b] (... 2f), the output of one matmul with [W1; W3]. Backward writes
    da and db straight into one (... 2f) buffer, so the packed matmul's backward is one GEMM and no
    concatenation copy is needed."""

    @staticmethod
    def forward(ctx, ab: torch.Tensor) -> torch.Tensor:
        a, b = ab.chunk(2, -1)
        sig = torch.sigmoid(a)
        silu_a = a * sig
        ctx.save_for_backward(sig, silu_a, b)
        return silu_a * b

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        sig, silu_a, b = ctx.saved_tensors
        dab = torch.empty(*dy.shape[:-1], 2 * dy.shape[-1], dtype=dy.dtype, device=dy.device)
        da, db = dab.chunk(2, -1)
        torch.mul(silu_a, dy, out=db)
        torch.addcmul(sig + silu_a, silu_a, sig, value=-1, out=da)
        da.mul_(dy).mul_(b)
        return dab


def silu(a: torch.Tensor) -> torch.Tensor:
    """a σ(a), elementwise."""
    return SiluFn.apply(a)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) ⊙ b, elementwise (the SwiGLU gate)."""
    return SwiGLUFn.apply(a, b)


def swiglu_packed(ab: torch.Tensor) -> torch.Tensor:
    """swiglu(a, b) for ab = [a | b] packed along the last dim (... 2f) -> (... f)."""
    if ab.shape[-1] % 2:
        raise ValueError(f"packed swiglu needs an even last dimension, got {ab.shape[-1]}")
    return SwiGLUPackedFn.apply(ab)

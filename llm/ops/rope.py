"""Rotary position embedding (RoPE) on adjacent pairs.

Pair k of a vector, (x[2k], x[2k+1]), is rotated by the angle θ_k(pos) = pos / theta^(2k/d):
    forward:  y[... s 2k]   = x[2k] cos θ − x[2k+1] sin θ          y = R(θ) x per pair,
              y[... s 2k+1] = x[2k] sin θ + x[2k+1] cos θ          R(θ) = [[cos θ, −sin θ], [sin θ, cos θ]]
    backward: dx = R(θ)ᵀ dy = R(−θ) dy      (a rotation is orthogonal: rotate back, i.e. sin → −sin)
Shapes (einops): x `... s d`, cos/sin `... s (d/2)` broadcastable against x's pairs; x's gradient is summed
back to x's shape. Computed in float32 at least, returned in x's dtype. `llm.fast.rope` is the same rotation
as one complex multiply.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch.autograd import Function


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """R(θ) applied to the pairs of x (... s d), with cos θ, sin θ given as (... s d/2)."""
    ct = torch.promote_types(x.dtype, torch.float32)
    x0, x1 = rearrange(x.to(ct), "... (k two) -> two ... k", two=2)
    c, s = cos.to(ct), sin.to(ct)
    y = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c))
    return rearrange(y, "two ... k -> ... (k two)").to(x.dtype)


class RopeFn(Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.x_shape = x.shape
        return rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        dx = rotate(dy, cos, -sin)
        if dx.shape != ctx.x_shape:  # x was broadcast against wider position tables
            dx = dx.sum_to_size(ctx.x_shape)
        return dx, None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x (... s d) by the angles whose cos/sin are given as (... s d/2)."""
    if x.shape[-1] % 2:
        raise ValueError(f"RoPE needs an even last dimension, got {x.shape[-1]}")
    if not torch.is_grad_enabled():  # inference: no autograd.Function overhead
        return rotate(x, cos, sin)
    return RopeFn.apply(x, cos, sin)

"""Rotary position embedding (RoPE) on adjacent pairs.

Pair k of a vector, (x[2k], x[2k+1]), is rotated by the angle θ_k(pos) = pos / theta^(2k/d):
    forward:  y[... s 2k]   = x[2k] cos θ − x[2k+1] sin θ
              y[... s 2k+1] = x[2k] sin θ + x[2k+1] cos θ
Seen as complex numbers z_k = x[2k] + i x[2k+1] this is one multiplication y = z · e^{iθ}, so
    backward: dz = dy · e^{−iθ}         (the inverse rotation: a rotation's Jacobian is orthogonal)
cos/sin: (... s d/2), broadcastable against x (... s d).
"""

from __future__ import annotations

import torch
from torch.autograd import Function

_COMPLEX_OK = (torch.float32, torch.float64)


def _broadcast(a: torch.Size, b: torch.Size) -> tuple[int, ...]:
    """Broadcast shape of a and b. Plain Python: torch.broadcast_shapes goes through torch._refs (tens of
    µs a call, and it imports sympy on first use: seconds of start-up)."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    out = []
    for i, j in zip(a, b):
        if i != j and 1 not in (i, j):
            raise ValueError(f"RoPE tables of shape {tuple(b)} do not broadcast against x pairs {tuple(a)}")
        out.append(j if i == 1 else i)
    return tuple(out)


def _real_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype in _COMPLEX_OK else torch.float32


def rotation(cos: torch.Tensor, sin: torch.Tensor, sign: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """e^{±iθ} as a complex tensor (... s d/2) from the cos/sin tables; `dtype` = the real dtype (fp32/fp64).
    The inference path builds it once per forward pass and reuses it in every layer (`rope_rotate`)."""
    if cos.dtype != dtype:
        cos, sin = cos.to(dtype), sin.to(dtype)
    return torch.complex(cos, sin if sign > 0 else -sin)


def rope_rotate(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of x (... s d) by the complex rot (... s d/2) from `rotation` (no autograd: inference)."""
    return _rotate(x, rot)


def _rotate(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Multiply the pairs of x, as complex numbers, by rot; returns a fresh contiguous tensor in x's dtype."""
    dtype = x.dtype
    xc = x if dtype in _COMPLEX_OK else x.float()  # complex views need fp32/fp64
    if xc.stride(-1) != 1 or any(st % 2 for st in xc.stride()[:-1]):
        xc = xc.contiguous()
    z = torch.view_as_complex(xc.unflatten(-1, (-1, 2)))
    if rot.dtype != z.dtype:
        rot = rot.to(z.dtype)
    shape = _broadcast(z.shape, rot.shape)
    # out= makes the result contiguous even when x is a transposed view (e.g. heads split from qkv)
    out = torch.empty(shape, dtype=z.dtype, device=z.device)
    torch.mul(z, rot, out=out)
    y = torch.view_as_real(out).flatten(-2)
    return y if dtype in _COMPLEX_OK else y.to(dtype)


def _rotate_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """The same rotation (by ±θ) in real arithmetic, for torch.compile: Inductor generates no code for
    complex tensors (it would copy x into a complex layout, call the eager kernel and copy back), while
    this is one fused elementwise kernel. Eager keeps the complex multiply (one op)."""
    ct = _real_dtype(x)  # bf16 in, fp32 rotation (as the complex path does)
    x0, x1 = x.to(ct).unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos.to(ct), sin.to(ct) * sign
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).to(x.dtype)


class RopeFn(Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.x_shape = x.shape
        if torch.compiler.is_compiling():
            return _rotate_real(x, cos, sin, 1.0)
        return _rotate(x, rotation(cos, sin, 1.0, _real_dtype(x)))

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        if torch.compiler.is_compiling():
            dx = _rotate_real(dy, cos, sin, -1.0)
        else:
            dx = _rotate(dy, rotation(cos, sin, -1.0, _real_dtype(dy)))
        if dx.shape != ctx.x_shape:  # x was broadcast against wider position tables
            dx = dx.sum_to_size(ctx.x_shape)
        return dx, None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x (... s d) by the angles whose cos/sin are given as (... s d/2)."""
    if x.shape[-1] % 2:
        raise ValueError(f"RoPE needs an even last dimension, got {x.shape[-1]}")
    if not torch.is_grad_enabled():  # inference: the same math without autograd.Function overhead
        if torch.compiler.is_compiling():
            return _rotate_real(x, cos, sin, 1.0)
        return _rotate(x, rotation(cos, sin, 1.0, _real_dtype(x)))
    return RopeFn.apply(x, cos, sin)

"""RoPE, fast: the rotation of `llm.ops.rope` (the reference it is tested against; read its docstring for
the math) as complex arithmetic.

Seen as complex numbers z_k = x[2k] + i x[2k+1], the rotation of pair k by θ_k is one multiplication:
    forward:  y = z · e^{iθ}          backward: dz = dy · e^{−iθ}
Eager runs that as one complex `mul` into a fresh contiguous tensor (even when x is a transposed view, e.g.
heads split from qkv) instead of the reference's six elementwise ops. Compiled, it runs the reference's real
`rotate`: Inductor generates no code for complex tensors (it would copy x into a complex layout, call the
eager kernel and copy back), while the real form fuses into one kernel. Inference: `layer_rotation` builds
e^{iθ} once per forward pass and every layer calls `rope_rotate` with it.
"""

from __future__ import annotations

import torch
from torch.autograd import Function

from llm.ops.rope import rotate

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
    """e^{±iθ} as a complex tensor (... s d/2) from the cos/sin tables; `dtype` = the real dtype (fp32/fp64)."""
    if cos.dtype != dtype:
        cos, sin = cos.to(dtype), sin.to(dtype)
    return torch.complex(cos, sin if sign > 0 else -sin)


def rope_rotate(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Multiply the pairs of x (... s d), as complex numbers, by rot (... s d/2) from `rotation`; returns a
    fresh contiguous tensor in x's dtype (no autograd)."""
    dtype = x.dtype
    xc = x if dtype in _COMPLEX_OK else x.float()  # complex views need fp32/fp64
    if xc.stride(-1) != 1 or any(st % 2 for st in xc.stride()[:-1]):
        xc = xc.contiguous()
    z = torch.view_as_complex(xc.unflatten(-1, (-1, 2)))
    if rot.dtype != z.dtype:
        rot = rot.to(z.dtype)
    # out= makes the result contiguous even when x is a transposed view
    out = torch.empty(_broadcast(z.shape, rot.shape), dtype=z.dtype, device=z.device)
    torch.mul(z, rot, out=out)
    y = torch.view_as_real(out).flatten(-2)
    return y if dtype in _COMPLEX_OK else y.to(dtype)


def _rotate_by(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """x's pairs rotated by ±θ: the complex multiply in eager, the reference's real form when compiling."""
    if torch.compiler.is_compiling():
        return rotate(x, cos, sin if sign > 0 else -sin)
    return rope_rotate(x, rotation(cos, sin, sign, _real_dtype(x)))


class FastRopeFn(Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.x_shape = x.shape
        return _rotate_by(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        dx = _rotate_by(dy, cos, sin, -1.0)
        if dx.shape != ctx.x_shape:  # x was broadcast against wider position tables
            dx = dx.sum_to_size(ctx.x_shape)
        return dx, None, None


def fast_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`llm.ops.rope.rope`: rotate adjacent pairs of x (... s d) by the angles whose cos/sin are (... s d/2)."""
    if x.shape[-1] % 2:
        raise ValueError(f"RoPE needs an even last dimension, got {x.shape[-1]}")
    if not torch.is_grad_enabled():  # inference: no autograd.Function overhead
        return _rotate_by(x, cos, sin, 1.0)
    return FastRopeFn.apply(x, cos, sin)


def layer_rotation(cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor | None:
    """e^{iθ} shared by every layer of one inference forward pass, or None where each layer rotates on its
    own: with autograd (the Function saves cos/sin), and when compiling (no complex tensors)."""
    if cos is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    return rotation(cos, sin, 1.0, cos.dtype if cos.dtype == torch.float64 else torch.float32)

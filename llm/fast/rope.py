"""RoPE, fast: the rotation of `llm.ops.rope` (the reference it is tested against; read its docstring for
the math) as complex arithmetic.

Seen as complex numbers z_k = x[2k] + i x[2k+1], the rotation of pair k by θ_k is one multiplication:
    forward:  y = z · e^{iθ}          backward: dz = dy · e^{−iθ} = dy · conj(e^{iθ})
`layer_rotation` builds e^{iθ} once per forward pass for every layer, and `rope_rotate` runs one complex
`mul` into a fresh contiguous tensor (even when x is a transposed view, e.g. heads split from qkv) instead
of the reference's six elementwise ops. Compiled, the reference runs instead: Inductor generates no code for
complex tensors (it would copy x into a complex layout, call the eager kernel and copy back), while the
reference's real form fuses into one kernel.
"""

from __future__ import annotations

import torch
from torch.autograd import Function

from llm.ops.rope import rope

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


def rotation(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """e^{iθ} as a complex tensor (... s d/2) from the cos/sin tables; `dtype` = the real dtype (fp32/fp64)."""
    return torch.complex(cos.to(dtype), sin.to(dtype))


def _mul_pairs(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """The pairs of x (... s d), as complex numbers, times rot (... s d/2): a fresh contiguous tensor in x's dtype."""
    dtype = x.dtype
    xc = x if dtype in _COMPLEX_OK else x.float()  # complex views need fp32/fp64
    if xc.stride(-1) != 1 or any(st % 2 for st in xc.stride()[:-1]):
        xc = xc.contiguous()
    z = torch.view_as_complex(xc.unflatten(-1, (-1, 2)))
    if rot.dtype != z.dtype:
        rot = rot.to(z.dtype)
    out = torch.empty(_broadcast(z.shape, rot.shape), dtype=z.dtype, device=z.device)
    torch.mul(z, rot, out=out)  # out=: contiguous even when x is a transposed view
    y = torch.view_as_real(out).flatten(-2)
    return y if dtype in _COMPLEX_OK else y.to(dtype)


class RotatePairsFn(Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rot)
        ctx.x_shape = x.shape
        return _mul_pairs(x, rot)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (rot,) = ctx.saved_tensors
        dx = _mul_pairs(dy, rot.conj_physical())  # rotate back
        return dx.sum_to_size(ctx.x_shape), None  # summed over what x was broadcast against


def rope_rotate(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x (... s d) by rot = e^{iθ} (... s d/2) from `rotation`."""
    if not torch.is_grad_enabled():  # inference: no autograd.Function overhead
        return _mul_pairs(x, rot)
    return RotatePairsFn.apply(x, rot)


def layer_rotation(cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor | None:
    """e^{iθ} shared by every layer of one forward pass, or None: no RoPE, or compiling (see the docstring)."""
    if cos is None or torch.compiler.is_compiling():
        return None
    return rotation(cos, sin, cos.dtype if cos.dtype == torch.float64 else torch.float32)


def fast_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`llm.ops.rope.rope`, fast: rotate adjacent pairs of x (... s d) by the angles whose cos/sin are (... s d/2)."""
    rot = layer_rotation(cos, sin)
    if rot is None:
        return rope(x, cos, sin)
    if x.shape[-1] % 2:
        raise ValueError(f"RoPE needs an even last dimension, got {x.shape[-1]}")
    return rope_rotate(x, rot)

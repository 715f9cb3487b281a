"""Root-mean-square normalisation with a learnable gain.

    forward:  r[...]     = 1 / sqrt(mean_d x[... d]² + eps)          ("rstd", saved)
              x̂[... d]   = x[... d] r[...]
              y[... d]   = x̂[... d] g[d]
    backward: dg[d]      = Σ_{...} dy[... d] x̂[... d]
              dx[... d]  = r[...] (dy g − x̂ · mean_d(dy g x̂))
Computed in float32 (at least) and cast back to x's dtype; only x and r are saved.
"""

from __future__ import annotations

import torch
from torch.autograd import Function


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd): the forward math, shared by the Function and the no-grad path."""
    ct = _compute_dtype(x.dtype)
    xf = x.to(ct)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))
    y = xf * rstd
    y.mul_(gain.to(ct))
    return y.to(x.dtype), rstd


class RmsNormFn(Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = _rms_norm(x, gain, eps)
        ctx.save_for_backward(x, rstd, gain)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, rstd, gain = ctx.saved_tensors
        ct = _compute_dtype(x.dtype)
        xhat = x.to(ct) * rstd
        dyf = dy.to(ct)
        dgain = None
        if ctx.needs_input_grad[1]:
            dgain = (dyf * xhat).reshape(-1, x.shape[-1]).sum(0).to(gain.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            g = dyf * gain.to(ct)  # d loss / d x̂
            proj = (g * xhat).mean(-1, keepdim=True)
            dx = g.sub_(xhat.mul_(proj)).mul_(rstd).to(x.dtype)  # reuse buffers: in place
        return dx, dgain, None


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dim of x (... d) with gain (d)."""
    if not torch.is_grad_enabled():  # inference: no autograd.Function overhead
        return _rms_norm(x, gain, eps)[0]
    return RmsNormFn.apply(x, gain, eps)

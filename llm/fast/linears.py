"""Several linear maps of one input (q/k/v, or w1/w3) as one Function: y_i = x W_iᵀ.

    forward:  y_i[... o_i] = x[... i] W_i[o_i i]          (separate outputs: one smaller allocation each)
    backward: dx[... i]    = Σ_i dy_i[... o_i] W_i[o_i i]  (accumulated in place with addmm_ in one buffer)
              dW_i[o_i i]  = Σ_{...} dy_i[... o_i] x[... i]
Equal to one `llm.ops.linear` per weight (tested against it); there autograd allocates a dx per branch
and adds them up.
"""

from __future__ import annotations

import torch
from torch.autograd import Function


class SharedInputLinearFn(Function):
    # custom_fwd/bwd: the same autocast state in backward as in forward (see llm.ops.linear)
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.save_for_backward(x, *weights)
        return tuple(torch.matmul(x, w.t()) for w in weights)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, *dys: torch.Tensor):
        x, *weights = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        dx = None
        if ctx.needs_input_grad[0]:
            for dy, w in zip(dys, weights):
                dy2 = dy.reshape(-1, dy.shape[-1])
                w = w.to(dy.dtype)
                dx = dy2.mm(w) if dx is None else dx.addmm_(dy2, w)
            dx = dx.view(x.shape)
        dws = [
            dy.reshape(-1, dy.shape[-1]).t().mm(x2.to(dy.dtype)) if ctx.needs_input_grad[1 + i] else None
            for i, dy in enumerate(dys)
        ]
        return (dx, *dws)


def linears(x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(x W_1ᵀ, x W_2ᵀ, ...) for one input x (... in) and weights W_i (out_i in)."""
    if not torch.is_grad_enabled():  # inference: no autograd.Function overhead
        return tuple(torch.matmul(x, w.t()) for w in weights)
    return SharedInputLinearFn.apply(x, *weights)

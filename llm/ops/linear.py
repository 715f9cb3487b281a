"""Linear map without bias: y = x Wᵀ.

    forward:  y[... o]  = x[... i] W[o i]
    backward: dx[... i] = dy[... o] W[o i]
              dW[o i]   = Σ_{...} dy[... o] x[... i]      (all leading dims folded into one matmul)
`llm.fast.linears` applies several weights to one input with one backward.
"""

from __future__ import annotations

import torch
from torch.autograd import Function


class LinearFn(Function):
    # custom_fwd/bwd: under CUDA bf16 autocast the backward runs in the same autocast state as the
    # forward, so dy (bf16) and W (fp32) are cast consistently. No effect on CPU fp32.
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return torch.matmul(x, weight.t())  # matmul folds (b s) into one GEMM

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.matmul(dy, weight.to(dy.dtype))
        if ctx.needs_input_grad[1]:
            dw = dy.reshape(-1, dy.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]).to(dy.dtype))
        return dx, dw


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = x Wᵀ with x (... in) and W (out in)."""
    if not torch.is_grad_enabled():  # inference: no autograd.Function overhead
        return torch.matmul(x, weight.t())
    return LinearFn.apply(x, weight)

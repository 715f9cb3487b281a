"""Linear map without bias: y = x Wᵀ (and several maps of one input: y_i = x W_iᵀ).

    forward:  y[... o]  = x[... i] W[o i]
    backward: dx[... i] = dy[... o] W[o i]
              dW[o i]   = Σ_{...} dy[... o] x[... i]      (all leading dims folded into one matmul)
Several weights on one input (q/k/v, or w1/w3): dx = Σ_i dy_i W_i, accumulated in place with addmm_
into one buffer instead of autograd allocating a tensor per branch and adding them up.
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


class SharedInputLinearFn(Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.save_for_backward(x, *weights)
        # separate outputs, not one wide GEMM + split: each output is its own (smaller) allocation
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


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = x Wᵀ with x (... in) and W (out in)."""
    if not torch.is_grad_enabled():  # inference: no autograd.Function overhead
        return torch.matmul(x, weight.t())
    return LinearFn.apply(x, weight)


def linears(x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(x W_1ᵀ, x W_2ᵀ, ...) for one input x (... in) and weights W_i (out_i in)."""
    if not torch.is_grad_enabled():  # inference: no autograd.Function overhead
        return tuple(torch.matmul(x, w.t()) for w in weights)
    return SharedInputLinearFn.apply(x, *weights)

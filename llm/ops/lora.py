"""A LoRA linear map (Hu et al. 2021): a frozen W plus a trainable low-rank update B A, scaled by s = alpha/r.

    forward:  xd = x ⊙ m                          m: the dropout mask, 0 or 1/(1-p) per element (m = 1: none)
              u[... r]  = xd[... i] A[r i]         A (r in), B (out r), r ≪ in, out
              y[... o]  = x[... i] W[o i] + s · u[... r] B[o r]
    backward: du[... r] = s · dy[... o] B[o r]
              dx[... i] = dy[... o] W[o i] + (du[... r] A[r i]) ⊙ m
              dA[r i]   = Σ_{...} du[... r] xd[... i]
              dB[o r]   = s · Σ_{...} dy[... o] u[... r]
              dW[o i]   = Σ_{...} dy[... o] x[... i]      only when W is trainable (ctx.needs_input_grad)
The point of LoRA in the backward: with W frozen the (out in) GEMM for dW is skipped, and what remains
for A and B costs O(r (in + out)) per token. u is kept from the forward (it is small: r per token); the
mask m goes through save_for_backward like every tensor, so activation checkpointing frees and rebuilds
it with the rest (the caller draws it, under checkpointing with the RNG state the recompute restores).
"""

from __future__ import annotations

import torch
from torch.autograd import Function


class LoRALinearFn(Function):
    # custom_fwd/bwd: the same autocast state in backward as in forward (see llm.ops.linear). All leading
    # dims are folded into one (n = tokens), so every product is one GEMM and the LoRA terms are added by
    # the GEMMs themselves (addmm_ with beta = 1) instead of a separate pass over the (n out) output.
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scale: float, mask: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (n in); a copy only when x is not contiguous, then kept instead of x
        m2 = None if mask is None else mask.reshape(x2.shape)
        u = (x2 if m2 is None else x2 * m2).mm(lora_a.t())  # (n r)
        y = x2.mm(weight.t())
        y.addmm_(u, lora_b.t().to(y.dtype), alpha=scale)
        ctx.scale, ctx.x_shape = scale, x.shape
        ctx.save_for_backward(x2, weight, lora_a, lora_b, u, m2)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy: torch.Tensor):
        x2, weight, lora_a, lora_b, u, m2 = ctx.saved_tensors
        s = ctx.scale
        need_x, need_w, need_a, need_b = ctx.needs_input_grad[:4]
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = da = db = None
        du = dy2.mm(lora_b.to(dy.dtype)).mul_(s) if need_x or need_a else None  # (n r)
        if need_x:
            dx = dy2.mm(weight.to(dy.dtype))
            if m2 is None:
                dx.addmm_(du, lora_a.to(dy.dtype))
            else:
                dx.addcmul_(du.mm(lora_a.to(dy.dtype)), m2)
            dx = dx.view(ctx.x_shape)
        if need_w:
            dw = dy2.t().mm(x2.to(dy.dtype))
        if need_a:
            da = du.t().mm((x2 if m2 is None else x2 * m2).to(dy.dtype))
        if need_b:
            db = dy2.t().mm(u.to(dy.dtype)).mul_(s)
        return dx, dw, da, db, None, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """y = x Wᵀ + scale · ((x ⊙ mask) Aᵀ) Bᵀ for x (... in), W (out in), A (r in), B (out r); mask (... in)
    or None (no dropout)."""
    if not torch.is_grad_enabled():  # inference: no autograd.Function overhead
        xd = x if mask is None else x * mask
        return torch.matmul(x, weight.t()).add_(torch.matmul(torch.matmul(xd, lora_a.t()), lora_b.t()), alpha=scale)
    return LoRALinearFn.apply(x, weight, lora_a, lora_b, scale, mask)

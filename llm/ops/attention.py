"""Scaled dot-product attention with any boolean mask, forward and backward by hand.

Shapes (einops): q `... sq d`, k `... sk d`, v `... sk dv`, mask `... sq sk` (bool, True = may attend);
leading dims broadcast. With scale c = 1/sqrt(d):
    forward:  S[... q k] = c Q[... q d] K[... k d]          (masked entries → −inf)
              P[... q k] = softmax_k(S)
              O[... q v] = P[... q k] V[... k v]
    backward: dV = Pᵀ dO
              dP = dO Vᵀ
              dS = P ⊙ (dP − rowsum(dP ⊙ P))               (the softmax backward, `llm.ops.softmax`)
              dQ = c dS K,   dK = c dSᵀ Q
Gradients are summed back to each input's shape (a K/V broadcast over heads gets the sum over them).
P is saved for backward: memory (... sq sk). This is the reference; `llm.fast.attention` (blocked causal)
and `llm.fast.flash_attention` (FlashAttention-2) compute the same function in less time or memory.
"""

from __future__ import annotations

import math

import torch
from torch.autograd import Function

from llm.ops.softmax import softmax_backward, softmax_forward


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, P): the forward math, shared by the Function and the no-grad path."""
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = softmax_forward(s, -1)
    return torch.matmul(p, v), p


class AttentionFn(Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        o, p = _attention(q, k, v, mask)
        ctx.save_for_backward(q, k, v, p)
        ctx.scale = 1.0 / math.sqrt(q.shape[-1])
        return o

    @staticmethod
    def backward(ctx, do: torch.Tensor):
        q, k, v, p = ctx.saved_tensors
        c = ctx.scale
        dv = torch.matmul(p.transpose(-1, -2), do).sum_to_size(v.shape)
        ds = softmax_backward(p, torch.matmul(do, v.transpose(-1, -2)), -1)
        dq = torch.matmul(ds, k).mul_(c).sum_to_size(q.shape)
        dk = torch.matmul(ds.transpose(-1, -2), q).mul_(c).sum_to_size(k.shape)
        return dq, dk, dv, None


def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(Q Kᵀ / sqrt(d_k), masked) V for Q (... q d_k), K (... k d_k), V (... k d_v);
    `mask` (... q k) bool, True = may attend."""
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"attention mask must be bool (True = may attend), got {mask.dtype}")
    dtype = q.dtype
    ct = torch.promote_types(torch.promote_types(q.dtype, k.dtype), torch.promote_types(v.dtype, torch.float32))
    if ct == q.dtype == k.dtype == v.dtype:
        if not torch.is_grad_enabled():  # inference: no autograd.Function overhead
            return _attention(q, k, v, mask)[0]
        return AttentionFn.apply(q, k, v, mask)
    # bf16 under autocast, or a bf16 query against an fp32 KV cache: softmax in fp32, result in q's dtype
    with torch.autocast(q.device.type, enabled=False):
        return AttentionFn.apply(q.to(ct), k.to(ct), v.to(ct), mask).to(dtype)


"""Scaled dot-product attention, forward and backward by hand.

With scale c = 1/sqrt(d_k):
    forward:  S[... q k] = c Q[... q d] K[... k d]          (masked entries → −inf)
              P[... q k] = softmax_k(S)
              O[... q v] = P[... q k] V[... k v]
    backward: dV = Pᵀ dO
              dP = dO Vᵀ
              dS = P ⊙ (dP − rowsum(dP ⊙ P))               (rowsum(dP ⊙ P) = rowsum(dO ⊙ O))
              dQ = c dS K,   dK = c dSᵀ Q

Two Functions:
- `AttentionFn`: general (any boolean mask, True = may attend, broadcastable). Saves P. Used by the
  public `scaled_dot_product_attention` and by the model when it decodes with a KV cache or masks padding.
- `CausalAttentionFn`: the training path, (b h s d) with a causal mask. It walks over (b·h) in chunks so
  the score matrix is a small reused buffer instead of a fresh (b h s s) tensor, saves only Q, K, V, O
  and the row log-sum-exp L, and recomputes P = exp(S − L) chunk by chunk in backward (flash-style).
"""

from __future__ import annotations

import math

import torch
from torch.autograd import Function

from llm.ops.softmax import softmax_backward, softmax_forward


class AttentionFn(Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        scale = 1.0 / math.sqrt(q.shape[-1])
        s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        p = softmax_forward(s, -1)
        ctx.save_for_backward(q, k, v, p)
        ctx.scale = scale
        return torch.matmul(p, v)

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
    return AttentionFn.apply(q, k, v, mask)


# Score-buffer size per chunk (elements). Small enough to stay in cache-friendly, reused memory.
CHUNK_ELEMS = 1 << 20
_BIAS_CACHE: dict[tuple, torch.Tensor] = {}


def _causal_bias(s: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(s s) additive mask: 0 on and below the diagonal, −inf above. Cached: it is the same every step."""
    key = (s, device, dtype)
    bias = _BIAS_CACHE.get(key)
    if bias is None:
        bias = torch.full((s, s), float("-inf"), device=device, dtype=dtype).triu_(1)
        if len(_BIAS_CACHE) > 16:
            _BIAS_CACHE.clear()
        _BIAS_CACHE[key] = bias
    return bias


class CausalAttentionFn(Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        *lead, s, d = q.shape
        scale = 1.0 / math.sqrt(d)
        q3, k3, v3 = (t.reshape(-1, s, d) for t in (q, k, v))
        B = q3.shape[0]
        bias = _causal_bias(s, q.device, q.dtype)
        cb = max(1, min(B, CHUNK_ELEMS // (s * s)))
        buf = torch.empty(cb, s, s, device=q.device, dtype=q.dtype)
        o = torch.empty_like(q3)
        lse = torch.empty(B, s, 1, device=q.device, dtype=q.dtype)
        for i in range(0, B, cb):
            j = min(B, i + cb)
            sc = buf[: j - i]
            torch.baddbmm(bias, q3[i:j], k3[i:j].transpose(1, 2), alpha=scale, out=sc)
            m = sc.amax(-1, keepdim=True)
            sc.sub_(m).exp_()
            denom = sc.sum(-1, keepdim=True)
            torch.bmm(sc, v3[i:j], out=o[i:j])
            o[i:j].div_(denom)  # normalise the (s d) output rather than the (s s) scores
            torch.add(m, denom.log_(), out=lse[i:j])
        ctx.save_for_backward(q3, k3, v3, o, lse)
        ctx.scale, ctx.shape = scale, q.shape
        return o.view(q.shape)

    @staticmethod
    def backward(ctx, do: torch.Tensor):
        q3, k3, v3, o, lse = ctx.saved_tensors
        B, s, d = q3.shape
        c = ctx.scale
        do3 = do.reshape(B, s, d)
        delta = (do3 * o).sum(-1, keepdim=True)  # rowsum(dP ⊙ P) = rowsum(dO ⊙ O)
        bias = _causal_bias(s, q3.device, q3.dtype)
        cb = max(1, min(B, CHUNK_ELEMS // (s * s)))
        pbuf = torch.empty(cb, s, s, device=q3.device, dtype=q3.dtype)
        dpbuf = torch.empty_like(pbuf)
        dq, dk, dv = torch.empty_like(q3), torch.empty_like(k3), torch.empty_like(v3)
        for i in range(0, B, cb):
            j = min(B, i + cb)
            p, dp = pbuf[: j - i], dpbuf[: j - i]
            torch.baddbmm(bias, q3[i:j], k3[i:j].transpose(1, 2), alpha=c, out=p)
            p.sub_(lse[i:j]).exp_()  # P recomputed from the saved log-sum-exp
            torch.bmm(p.transpose(1, 2), do3[i:j], out=dv[i:j])
            torch.bmm(do3[i:j], v3[i:j].transpose(1, 2), out=dp)
            dp.sub_(delta[i:j]).mul_(p)  # dS, in place
            torch.bmm(dp, k3[i:j], out=dq[i:j])
            torch.bmm(dp.transpose(1, 2), q3[i:j], out=dk[i:j])
        dq.mul_(c)
        dk.mul_(c)
        shape = ctx.shape
        return dq.view(shape), dk.view(shape), dv.view(shape)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax(Q Kᵀ / sqrt(d)) V for q, k, v all (... s d) with the same shape (training path)."""
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"causal_attention needs equal shapes, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    dtype = q.dtype
    # The buffers use out=, which autocast does not handle: run in the inputs' dtype, fp32 at least
    # (bf16/fp16 inputs get fp32 softmax statistics).
    with torch.autocast(q.device.type, enabled=False):
        if dtype not in (torch.float32, torch.float64):
            return CausalAttentionFn.apply(q.float(), k.float(), v.float()).to(dtype)
        return CausalAttentionFn.apply(q, k, v)

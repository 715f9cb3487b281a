"""FlashAttention-2 as Triton kernels (forward; backward split into D, dK/dV and dQ kernels).

The same algorithm as `llm/fast/flash_attention.py` (read its docstring for the math); here every
(query block, head) is one Triton program instead of one Python loop iteration.

Shapes (einops): q `b h sq d`, k, v `b hk sk d`, `h % hk == 0` (GQA native: head `i` reads kv head
`i // (h // hk)`), causal mask aligned bottom-right (query `t` at position `sk - sq + t`).

Kernels (grids in brackets):
- `_fwd`   [sq/BQ, b·h]: one query block, loop over key blocks with the online softmax. Stores O and
  L = logsumexp in base 2 (`m + log2 l` of `s·log2 e`, so the inner loop uses `exp2`, which is one
  hardware instruction; `L_natural = L · ln 2`).
- `_bwd_delta` [sq/BQ, b·h]: D = rowsum(dO ∘ O).
- `_bwd_dkdv` [sk/BK, b·hk]: one key block; loops over the g query heads sharing its kv head and over
  the query blocks that can see it, accumulating dK, dV in registers (no atomics, GQA sums for free).
- `_bwd_dq` [sq/BQ, b·h]: one query block; loops over key blocks, accumulating dQ (S is recomputed
  a second time: the FA2 split that trades FLOPs for no atomics).
Causal: key blocks entirely above the diagonal are never visited; blocks entirely below it run an
unmasked loop; only the few blocks straddling the diagonal pay for the mask (`MASK` constexpr).

Runs on CUDA, or on CPU under the Triton interpreter (`TRITON_INTERPRET=1` set before this module is
imported; the tests do that). fp32 inputs use TF32 `tl.dot` on GPUs (as F.sdpa's math path does not);
bf16/fp16 tiles accumulate in fp32.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _fwd_inner(acc, m, l, q, k_base, v_base, stride_ks, stride_vs, offs_q, offs_d, lo, hi, sk, offset, qk_scale,
               D: tl.constexpr, BLOCK_K: tl.constexpr, MASK: tl.constexpr, IS_CAUSAL: tl.constexpr):
    offs_k = tl.arange(0, BLOCK_K)
    dmask = offs_d[None, :] < D
    for start in range(lo, hi, BLOCK_K):
        kk = start + offs_k
        kv_mask = (kk[:, None] < sk) & dmask
        k = tl.load(k_base + kk[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + kk[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BQ BK), in log2 units
        if MASK:
            valid = kk[None, :] < sk
            if IS_CAUSAL:
                valid = valid & (kk[None, :] <= offs_q[:, None] + offset)
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m - m_new)  # rescales what was accumulated under the old max
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    return acc, m, l


@triton.jit
def _key_range(pid_q, sq, sk, offset, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """[0, lo): key blocks every query row of this block sees (no mask); [lo, hi): blocks needing a mask."""
    if IS_CAUSAL:
        hi = tl.minimum(sk, (pid_q + 1) * BLOCK_Q + offset)
        lo = tl.minimum(pid_q * BLOCK_Q + offset + 1, hi) // BLOCK_K * BLOCK_K
    else:
        hi = sk
        lo = sk // BLOCK_K * BLOCK_K
    return lo, hi


@triton.jit
def _fwd(Q, K, V, O, L, sq, sk, offset, qk_scale,
         stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
         stride_ob, stride_oh, stride_os,
         H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
         BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, IS_CAUSAL: tl.constexpr):
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_q[:, None] < sq) & (offs_d[None, :] < D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_q[:, None] * stride_qs + offs_d[None, :], mask=q_mask, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    lo, hi = _key_range(pid_q, sq, sk, offset, BLOCK_Q, BLOCK_K, IS_CAUSAL)
    acc, m, l = _fwd_inner(acc, m, l, q, k_base, v_base, stride_ks, stride_vs, offs_q, offs_d, 0, lo, sk, offset,
                           qk_scale, D, BLOCK_K, False, IS_CAUSAL)
    acc, m, l = _fwd_inner(acc, m, l, q, k_base, v_base, stride_ks, stride_vs, offs_q, offs_d, lo, hi, sk, offset,
                           qk_scale, D, BLOCK_K, True, IS_CAUSAL)
    o = acc / l[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_q[:, None] * stride_os + offs_d[None, :], o.to(O.dtype.element_ty), mask=q_mask)
    tl.store(L + pid_bh * sq + offs_q, m + tl.math.log2(l), mask=offs_q < sq)


@triton.jit
def _bwd_delta(O, DO, Dl, sq, stride_ob, stride_oh, stride_os, stride_db, stride_dh, stride_ds,
               H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr):
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_q[:, None] < sq) & (offs_d[None, :] < D)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_q[:, None] * stride_os + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_q[:, None] * stride_ds + offs_d[None, :], mask=mask, other=0.0)
    tl.store(Dl + pid_bh * sq + offs_q, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_q < sq)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, l_base, d_base, stride_qs, stride_ds, offs_k, offs_d, lo, hi, sq,
                offset, qk_scale, D: tl.constexpr, BLOCK_Q: tl.constexpr, MASK: tl.constexpr):
    offs_qb = tl.arange(0, BLOCK_Q)
    dmask = offs_d[None, :] < D
    for start in range(lo, hi, BLOCK_Q):
        qq = start + offs_qb
        rmask = qq < sq
        q = tl.load(q_base + qq[:, None] * stride_qs + offs_d[None, :], mask=rmask[:, None] & dmask, other=0.0)
        do = tl.load(do_base + qq[:, None] * stride_ds + offs_d[None, :], mask=rmask[:, None] & dmask, other=0.0)
        lse = tl.load(l_base + qq, mask=rmask, other=0.0)
        delta = tl.load(d_base + qq, mask=rmask, other=0.0)
        s_t = tl.dot(k, tl.trans(q)) * qk_scale  # Sᵀ (BK BQ): keys are the rows here
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASK:  # causal diagonal tiles; padded query rows have dO = 0 and D = 0, so they add nothing
            p_t = tl.where(offs_k[:, None] <= qq[None, :] + offset, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)
    return dk, dv


@triton.jit
def _bwd_dkdv(Q, K, V, DO, L, Dl, DK, DV, sq, sk, offset, qk_scale, scale,
              stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
              stride_db, stride_dh, stride_ds,
              H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, IS_CAUSAL: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_bhk = tl.program_id(1)
    HK: tl.constexpr = H // G
    b = pid_bhk // HK
    hk = pid_bhk % HK
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_k[:, None] < sk) & (offs_d[None, :] < D)
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_k[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_k[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    if IS_CAUSAL:
        # first query row that sees key k0 is k0 - offset; rows from k0 + BLOCK_K - 1 - offset on see the whole block
        q_lo = tl.maximum(k0 - offset, 0) // BLOCK_Q * BLOCK_Q
        q_mid = tl.minimum(tl.cdiv(tl.maximum(k0 + BLOCK_K - 1 - offset, 0), BLOCK_Q) * BLOCK_Q, tl.cdiv(sq, BLOCK_Q) * BLOCK_Q)
        q_mid = tl.maximum(q_mid, q_lo)
    else:
        q_lo = 0
        q_mid = 0
    for g in range(G):  # the query heads that share this kv head: their dK, dV contributions add up
        h = hk * G + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_db + h * stride_dh
        l_base = L + (b * H + h) * sq
        d_base = Dl + (b * H + h) * sq
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, l_base, d_base, stride_qs, stride_ds, offs_k, offs_d,
                             q_lo, q_mid, sq, offset, qk_scale, D, BLOCK_Q, True)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, l_base, d_base, stride_qs, stride_ds, offs_k, offs_d,
                             q_mid, sq, sq, offset, qk_scale, D, BLOCK_Q, False)
    # dK, dV are contiguous (b hk sk d), written by this wrapper
    out = (b * HK + hk) * sk * D + offs_k[:, None] * D + offs_d[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_q, offs_d, lo, hi, sk, offset,
              qk_scale, D: tl.constexpr, BLOCK_K: tl.constexpr, MASK: tl.constexpr, IS_CAUSAL: tl.constexpr):
    offs_kb = tl.arange(0, BLOCK_K)
    dmask = offs_d[None, :] < D
    for start in range(lo, hi, BLOCK_K):
        kk = start + offs_kb
        kv_mask = (kk[:, None] < sk) & dmask
        k = tl.load(k_base + kk[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + kk[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if MASK:
            valid = kk[None, :] < sk
            if IS_CAUSAL:
                valid = valid & (kk[None, :] <= offs_q[:, None] + offset)
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def _bwd_dq(Q, K, V, DO, L, Dl, DQ, sq, sk, offset, qk_scale, scale,
            stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
            stride_db, stride_dh, stride_ds,
            H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, IS_CAUSAL: tl.constexpr):
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = offs_q < sq
    q_mask = rmask[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_q[:, None] * stride_qs + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_q[:, None] * stride_ds + offs_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(L + pid_bh * sq + offs_q, mask=rmask, other=0.0)
    delta = tl.load(Dl + pid_bh * sq + offs_q, mask=rmask, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    lo, hi = _key_range(pid_q, sq, sk, offset, BLOCK_Q, BLOCK_K, IS_CAUSAL)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_q, offs_d, 0, lo, sk, offset,
                   qk_scale, D, BLOCK_K, False, IS_CAUSAL)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_q, offs_d, lo, hi, sk, offset,
                   qk_scale, D, BLOCK_K, True, IS_CAUSAL)
    out = pid_bh * sq * D + offs_q[:, None] * D + offs_d[None, :]  # dQ is contiguous (b h sq d)
    tl.store(DQ + out, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


def _strides(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


class FlashAttentionTriton(torch.autograd.Function):
    """Forward and FA2 backward as Triton kernels; saves q, k, v, O and the base-2 logsumexp L."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: float, block_q: int, block_k: int,
                launch: dict[str, int]) -> Tensor:
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        b, h, sq, d = q.shape
        sk = k.shape[2]
        g = h // k.shape[1]
        o = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty(b, h, sq, device=q.device, dtype=torch.float32)
        block_d = max(16, triton.next_power_of_2(d))
        grid = (triton.cdiv(sq, block_q), b * h)
        _fwd[grid](q, k, v, o, lse, sq, sk, sk - sq, scale * LOG2E, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
                   H=h, G=g, D=d, BLOCK_D=block_d, BLOCK_Q=block_q, BLOCK_K=block_k, IS_CAUSAL=is_causal, **launch)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (is_causal, scale, block_q, block_k, launch)
        return o

    @staticmethod
    def backward(ctx, grad_o: Tensor):
        q, k, v, o, lse = ctx.saved_tensors
        is_causal, scale, block_q, block_k, launch = ctx.args
        grad_o = grad_o if grad_o.stride(-1) == 1 else grad_o.contiguous()
        b, h, sq, d = q.shape
        hk, sk = k.shape[1], k.shape[2]
        g = h // hk
        block_d = max(16, triton.next_power_of_2(d))
        delta = torch.empty_like(lse)
        _bwd_delta[(triton.cdiv(sq, block_q), b * h)](o, grad_o, delta, sq, *_strides(o), *_strides(grad_o),
                                                     H=h, D=d, BLOCK_D=block_d, BLOCK_Q=block_q, **launch)
        dq = torch.empty(b, h, sq, d, device=q.device, dtype=q.dtype)
        dk = torch.empty(b, hk, sk, d, device=k.device, dtype=k.dtype)
        dv = torch.empty(b, hk, sk, d, device=v.device, dtype=v.dtype)
        common = (sq, sk, sk - sq, scale * LOG2E, scale, *_strides(q), *_strides(k), *_strides(v), *_strides(grad_o))
        meta = dict(H=h, G=g, D=d, BLOCK_D=block_d, BLOCK_Q=block_q, BLOCK_K=block_k, IS_CAUSAL=is_causal, **launch)
        _bwd_dkdv[(triton.cdiv(sk, block_k), b * hk)](q, k, v, grad_o, lse, delta, dk, dv, *common, **meta)
        _bwd_dq[(triton.cdiv(sq, block_q), b * h)](q, k, v, grad_o, lse, delta, dq, *common, **meta)
        return dq, dk, dv, None, None, None, None, None


def flash_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    is_causal: bool = True,
    scale: float | None = None,
    block_q: int = 64,
    block_k: int = 64,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> Tensor:
    """Same contract as `llm.fast.flash_attention.flash_attention` (q `b h sq d`, k/v `b hk sk d`, GQA native,
    bottom-right causal), computed by Triton kernels. Needs CUDA tensors, or TRITON_INTERPRET=1 for CPU.
    `num_warps` / `num_stages`: Triton launch options for all four kernels (None: Triton's defaults);
    `kernel/tune_flash_triton.py` times the combinations on a GPU."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"flash_attention_triton wants q, k, v of shape (b h s d); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k and v must be (b, h_kv, sk, d) with q's b and d; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q, k, v must share one of float32/float16/bfloat16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if is_causal and q.shape[2] > k.shape[2]:
        raise ValueError(f"causal attention needs sk >= sq (bottom-right aligned mask); got sq={q.shape[2]}, sk={k.shape[2]}")
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot tiles); got {blk}")
    for name, opt in (("num_warps", num_warps), ("num_stages", num_stages)):
        if opt is not None and not (isinstance(opt, int) and opt >= 1):
            raise ValueError(f"{name} must be a positive integer or None; got {opt!r}")
    if num_warps is not None and num_warps & (num_warps - 1):
        raise ValueError(f"num_warps must be a power of two; got {num_warps}")
    if q.device.type != "cuda" and not INTERPRETED:
        raise ValueError("Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before importing this module to run on CPU")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    launch = {key: val for key, val in (("num_warps", num_warps), ("num_stages", num_stages)) if val is not None}
    return FlashAttentionTriton.apply(q, k, v, is_causal, scale, block_q, block_k, launch)

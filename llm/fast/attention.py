"""Causal attention, fast: the training path of the model on a CPU, blocked, tested against
`llm.ops.attention.scaled_dot_product_attention` with a causal mask (same math, read its docstring).

q, k, v `b h s d` are folded to `(b h) s d` and walked in chunks of (b·h) and blocks of query rows: block
[r0, r1) only multiplies against keys [0, r1), so the masked upper triangle is mostly never computed, and
no online softmax is needed because every row's keys lie inside its block. Forward saves Q, K, V, O and the
row log-sum-exp L = m + log l (`llm.fast.softmax`), and either keeps P (when all its blocks fit in
SAVE_P_BYTES: backward then skips S = QKᵀ and the exp) or recomputes P = exp(S − L) block by block in
backward into a small reused buffer (flash-style: memory linear in s). Backward, per block:
    dV += Pᵀ dO,   dS = P ⊙ (dO Vᵀ − D) with D = rowsum(dO ⊙ O),   dQ = c dS K,   dK += c dSᵀ Q
Every bmm writes a contiguous buffer: with a strided out= the CPU bmm runs one small addmm_ per batch item.

Under torch.compile the same forward/backward run as the opaque custom ops `llm::causal_attention` and
`llm::causal_attention_backward`, so Inductor compiles only the code around them.
"""

from __future__ import annotations

import math

import torch
from torch.autograd import Function

from llm.fast.softmax import exp_rows_

# Score-buffer size per chunk (elements): small, reused memory instead of a fresh (b h s s) tensor.
CHUNK_ELEMS = 1 << 20
# Query rows per block. Block i (rows [i·Q, (i+1)·Q)) only needs keys [0, (i+1)·Q), so the masked upper
# triangle is mostly never computed (4 blocks: 10/16 of the square), and no online softmax is needed
# because every row's keys lie inside its block.
QUERY_BLOCK = 64
# P is kept from the forward (a fresh (rows keys) block each instead of one reused buffer) when all its
# blocks together take at most this many bytes: backward then skips recomputing S = QKᵀ and exp(S − L),
# a fifth of the attention's time at s = 256 (tiny: 21 MB per layer). Larger problems recompute P from L,
# flash-style, so their memory stays linear in s.
SAVE_P_BYTES = 64 << 20
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


def _blocks(s: int) -> list[tuple[int, int]]:
    qb = max(1, QUERY_BLOCK)
    return [(r, min(s, r + qb)) for r in range(0, s, qb)]


def _p_blocks(B: int, s: int) -> list[tuple[int, int, int, int]]:
    """(i, j, r0, r1) for every (b·h chunk, query block) the loops visit, in forward order."""
    blocks = _blocks(s)
    cb = max(1, min(B, CHUNK_ELEMS // (blocks[0][1] * s)))
    return [(i, min(B, i + cb), r0, r1) for i in range(0, B, cb) for r0, r1 in blocks]


def _keeps_p(q3: torch.Tensor) -> bool:
    B, s, _ = q3.shape
    return B * sum((r1 - r0) * r1 for r0, r1 in _blocks(s)) * q3.element_size() <= SAVE_P_BYTES


def _causal_forward(
    q3: torch.Tensor, k3: torch.Tensor, v3: torch.Tensor, keep: bool
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(O, L, P blocks) for q, k, v (B s d): the blocked forward, shared by the Function and the custom op.
    P blocks (normalised, one (j−i, r1−r0, r1) tensor per `_p_blocks` entry) only when `keep`."""
    B, s, d = q3.shape
    scale = 1.0 / math.sqrt(d)
    bias = _causal_bias(s, q3.device, q3.dtype)
    visits = _p_blocks(B, s)
    rows, cb = visits[0][3] - visits[0][2], visits[0][1] - visits[0][0]
    buf = None if keep else torch.empty(cb * rows * s, device=q3.device, dtype=q3.dtype)
    o = torch.empty(B, s, d, device=q3.device, dtype=q3.dtype)
    lse = torch.empty(B, s, 1, device=q3.device, dtype=q3.dtype)
    obuf = torch.empty(cb * rows * d, device=q3.device, dtype=q3.dtype)
    ps = []
    for i, j, r0, r1 in visits:  # keys [0, r1) only: the rest is masked anyway
        shape = (j - i, r1 - r0, r1)
        sc = torch.empty(shape, device=q3.device, dtype=q3.dtype) if keep else buf[: math.prod(shape)].view(shape)
        torch.baddbmm(bias[r0:r1, :r1], q3[i:j, r0:r1], k3[i:j, :r1].transpose(1, 2), alpha=scale, out=sc)
        m, denom = exp_rows_(sc)  # sc ← exp(S − m)
        torch.add(m, denom.log(), out=lse[i:j, r0:r1])
        # bmm into a contiguous buffer: with a strided out= (a row block of o) the CPU bmm falls
        # back to one small addmm_ per batch item, a parallel region each (slow with 2+ threads)
        ob = obuf[: (j - i) * (r1 - r0) * d].view(j - i, r1 - r0, d)
        if keep:
            ps.append(sc.div_(denom))  # P itself, for backward
            o[i:j, r0:r1] = torch.bmm(sc, v3[i:j, :r1], out=ob)
        else:
            torch.div(torch.bmm(sc, v3[i:j, :r1], out=ob), denom, out=o[i:j, r0:r1])  # normalise the small O block
    return o, lse, ps


def _causal_backward(
    q3: torch.Tensor, k3: torch.Tensor, v3: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, do3: torch.Tensor,
    ps: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV), all (B s d); P blocks from `ps` when the forward kept them, else recomputed from L."""
    B, s, d = q3.shape
    c = 1.0 / math.sqrt(d)
    delta = (do3 * o).sum(-1, keepdim=True)  # rowsum(dP ⊙ P) = rowsum(dO ⊙ O)
    bias = _causal_bias(s, q3.device, q3.dtype)
    visits = _p_blocks(B, s)
    rows, cb = visits[0][3] - visits[0][2], visits[0][1] - visits[0][0]
    pbuf = None if ps else torch.empty(cb * rows * s, device=q3.device, dtype=q3.dtype)
    dpbuf = torch.empty(cb * rows * s, device=q3.device, dtype=q3.dtype)
    dq = torch.empty(B, s, d, device=q3.device, dtype=q3.dtype)
    dk, dv = torch.empty_like(dq), torch.empty_like(dq)  # accumulated over query blocks
    qtmp = torch.empty(cb * rows * d, device=q3.device, dtype=q3.dtype)
    kvtmp = torch.empty(cb * s * d, device=q3.device, dtype=q3.dtype)
    # Within a chunk, last query block first: it sees all keys, so it writes dK, dV[i:j] whole (contiguous,
    # no zero fill); earlier blocks see a key prefix [0, r1), a strided slice, so their products go to a
    # contiguous buffer and are added (a strided bmm out= is one addmm_ per batch item).
    nb = len(_blocks(s))
    order = [c0 + b for c0 in range(0, len(visits), nb) for b in reversed(range(nb))]
    for idx in order:
        i, j, r0, r1 = visits[idx]
        n = (j - i) * (r1 - r0) * r1
        qi, doi, kk, vv = q3[i:j, r0:r1], do3[i:j, r0:r1], k3[i:j, :r1], v3[i:j, :r1]
        if ps:
            p = ps[idx]
        else:  # P recomputed from the saved log-sum-exp
            p = pbuf[:n].view(j - i, r1 - r0, r1)
            torch.baddbmm(bias[r0:r1, :r1], qi, kk.transpose(1, 2), alpha=c, out=p)
            p.sub_(lse[i:j, r0:r1]).exp_()
        dp = dpbuf[:n].view(j - i, r1 - r0, r1)
        full = r1 == s
        kv = dv[i:j] if full else kvtmp[: (j - i) * r1 * d].view(j - i, r1, d)
        torch.bmm(p.transpose(1, 2), doi, out=kv)
        if not full:
            dv[i:j, :r1].add_(kv)
        torch.bmm(doi, vv.transpose(1, 2), out=dp)
        dp.sub_(delta[i:j, r0:r1]).mul_(p)  # dS, in place
        dqi = torch.bmm(dp, kk, out=qtmp[: (j - i) * (r1 - r0) * d].view(j - i, r1 - r0, d))
        torch.mul(dqi, c, out=dq[i:j, r0:r1])
        if full:
            dk[i:j].baddbmm_(dp.transpose(1, 2), qi, beta=0, alpha=c)  # beta=0: the empty buffer is not read
        else:
            kv = torch.bmm(dp.transpose(1, 2), qi, out=kv)
            dk[i:j, :r1].add_(kv, alpha=c)
    return dq, dk, dv


class CausalAttentionFn(Function):
    """q, k, v (B s d) with B = b·h folded by the caller."""

    @staticmethod
    def forward(ctx, q3: torch.Tensor, k3: torch.Tensor, v3: torch.Tensor, keep_p: bool) -> torch.Tensor:
        o, lse, ps = _causal_forward(q3, k3, v3, keep_p)
        ctx.save_for_backward(q3, k3, v3, o, lse, *ps)
        return o

    @staticmethod
    def backward(ctx, do: torch.Tensor):
        q3, k3, v3, o, lse, *ps = ctx.saved_tensors
        return (*_causal_backward(q3, k3, v3, o, lse, do, ps), None)


# The same forward and backward as opaque custom ops, for torch.compile: Dynamo cannot trace the blocked
# loop (strided out= buffers) and Inductor would not beat it, so the compiled graph calls these and
# fuses only the code around them. Eager keeps CausalAttentionFn (a custom op costs ~15 µs more per call
# and its first call imports torch._dynamo).
@torch.library.custom_op("llm::causal_attention", mutates_args=())
def _causal_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep_p: bool
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    return _causal_forward(q, k, v, keep_p)


@_causal_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep_p: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    B, s, d = q.shape
    ps = [q.new_empty(j - i, r1 - r0, r1) for i, j, r0, r1 in _p_blocks(B, s)] if keep_p else []
    return q.new_empty(B, s, d), q.new_empty(B, s, 1), ps


@torch.library.custom_op("llm::causal_attention_backward", mutates_args=())
def _causal_backward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor,
    ps: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _causal_backward(q, k, v, o, lse, do, ps)


@_causal_backward_op.register_fake
def _(q, k, v, o, lse, do, ps):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _causal_setup_context(ctx, inputs, output) -> None:
    o, lse, ps = output
    ctx.save_for_backward(*inputs[:3], o, lse, *ps)


def _causal_op_backward(ctx, do: torch.Tensor, dlse, dps):
    q, k, v, o, lse, *ps = ctx.saved_tensors
    dq, dk, dv = _causal_backward_op(q, k, v, o, lse, do, ps)  # L and P are internal: no grads of theirs
    return dq, dk, dv, None


_causal_op.register_autograd(_causal_op_backward, setup_context=_causal_setup_context)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax(Q Kᵀ / sqrt(d)) V for q, k, v all (... s d) with the same shape (training path)."""
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"causal_attention needs equal shapes, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    dtype = q.dtype
    # The buffers use out=, which autocast does not handle: run in the inputs' dtype, fp32 at least
    # (bf16/fp16 inputs get fp32 softmax statistics).
    with torch.autocast(q.device.type, enabled=False):
        if dtype not in (torch.float32, torch.float64):
            q, k, v = q.float(), k.float(), v.float()
        s, d = q.shape[-2:]
        q3, k3, v3 = (t.reshape(-1, s, d) for t in (q, k, v))
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        keep = grad and _keeps_p(q3)  # no backward coming: no P to keep
        if torch.compiler.is_compiling():
            o = _causal_op(q3, k3, v3, keep)[0]
        elif not grad:  # inference: no autograd.Function overhead
            o = _causal_forward(q3, k3, v3, False)[0]
        else:
            o = CausalAttentionFn.apply(q3, k3, v3, keep)
        return o.view(q.shape).to(dtype)

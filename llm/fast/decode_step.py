"""One decode step of `llm.transformer.Transformer` through its KV cache, with as few tensor ops as possible.

A cached decode step multiplies one token by ~16 MB of weights (`demo`): on CPU those GEMVs take ~0.5 ms,
but the module path runs ~350 small tensor ops around them (~900 ATen calls, each a Python call and a
dispatch of a few µs), which cost more than the arithmetic. This path computes the same function with
~170 ops (~330 ATen calls), about 40 per layer:

    x = E[t]                                                 (b d)
    per layer:  h = x · rstd(x)                              RMSNorm; its gain g1 is folded into W_qkv
                [q | k | v] = h W_qkvᵀ                        one GEMV: W_qkv = [c·W_q; W_k; W_v] diag(g1),
                                                              c = 1/sqrt(d_head) (attention's scale)
                q, k ← rotate (q, k) pairs by e^{iθ(pos)}     RoPE as one complex multiply
                K[pos], V[pos] ← k, v                         written in place into the cache
                o = softmax(q Kᵀ) V                           per K/V head, its g query heads as g rows
                x = x + o W_oᵀ                                one addmm
                h = x · rstd(x);  [a | b] = h W_13ᵀ           W_13 = [W_1; W_3] diag(g2)
                x = x + (silu(a) ⊙ b) W_2ᵀ                    one addmm
    logits = x · rstd(x) W_headᵀ                             W_head = W_lm diag(g_final)

The merged weights are inference copies (stored transposed, (in out): the faster GEMV layout), built on the
first decode step into a KV cache and kept on it (`KVCache.decode_weights`) for the rest of its life: one
generation call, during which the model's weights do not change, so a model that keeps training between
generations is sampled from its current weights. `invalidate(cache)` drops them early, for a caller that
changes the weights while keeping a cache. Building takes ~10 ms for `demo`; while they live they cost about
one more copy of the non-embedding weights; models above `MAX_BYTES` of weights take the general path
instead (there the matmuls dominate and the per-op overhead saved here hardly matters).

Folding the gains and the scale into the weights changes only rounding (float64: equal to the torch.nn
reference to 1e-10; float32: to the training path to 1e-5, tests/test_generating_decode_step.py).
Quantized models (llm.quant) take the same step: their int rows and scales are concatenated the same way
(the attention scale c folded into the q rows' scales), the norm gains multiply h instead.
Only the plain case: a `Transformer` with impl="fast", one new token per row, no padding mask, fp32/fp64
weights, no autograd. Everything else (prefill, left-padded batches, bf16 models, subclasses, the reference
model, unmerged LoRA adapters: llm.lora) goes through `Transformer.forward`; a merged adapter is in the weights. On CUDA the step runs in the weights' dtype, not under bf16
autocast: at batch 1 it is bound by reading the weights, and autocast would re-cast every fp32 matrix on
every call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from llm.fast.softmax import exp_rows_
from llm.kv_cache import KVCache
from llm.quant import QuantLinear, QuantWeight, quant_matmul
from llm.transformer import Linear, Transformer

MAX_BYTES = 1 << 30  # models with more weight bytes than this use the general path (no second copy)


@dataclass
class _Layer:
    w_qkv: Tensor | QuantWeight  # (d, (h + 2 h_kv) d_head): [c·W_q; W_k; W_v]ᵀ with the ln1 gain folded in
    w_o: Tensor | QuantWeight  # (d, d)
    w_13: Tensor | QuantWeight  # (d, 2 f): [W_1; W_3]ᵀ with the ln2 gain folded in
    w_2: Tensor | QuantWeight  # (f, d)
    eps1: Tensor  # (1,): RMSNorm epsilons as tensors (see _rstd)
    eps2: Tensor
    g1: Tensor | None = None  # quantized blocks: the RMSNorm gains, applied to h (not foldable into int weights)
    g2: Tensor | None = None


@dataclass
class _Weights:
    model: Transformer  # the model the copies were made from
    supported: bool  # False: the model is not the plain case (dtype, size, layout): use the general path
    embedding: Tensor | None = None
    layers: list[_Layer] | None = None
    w_head: Tensor | None = None  # (d, vocab) with the final norm's gain folded in
    eps_final: Tensor | None = None
    rot: Tensor | None = None  # complex (max_len, d_head/2): e^{iθ} of every position
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0


def _plain_weight(module: torch.nn.Module) -> bool:
    """Whether `module` computes x Wᵀ with its `.weight` (or is quantized): a Linear, or a LoRA linear
    (llm.lora) whose update is merged into W. An unmerged one adds a term the merged copies would miss."""
    return isinstance(module, Linear | QuantLinear) or getattr(module, "merged", False) is True


def _supported(model: Transformer) -> bool:
    if not len(model.layers) or any(layer.attn.rope is None for layer in model.layers):
        return False
    projections = [m for layer in model.layers for m in (layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj,
                   layer.attn.output_proj, layer.ffn.w1, layer.ffn.w2, layer.ffn.w3)]
    if not all(_plain_weight(m) for m in [*projections, model.lm_head]):
        return False
    params = list(model.parameters())
    if any(p.dtype not in (torch.float32, torch.float64) or p.dtype != params[0].dtype for p in params):
        return False
    return sum(p.numel() * p.element_size() for p in params) <= MAX_BYTES


def _stack_q(mods: list[QuantLinear], first_scale: float = 1.0) -> QuantWeight:
    """Quantized [s·W_1; W_2; ...] (Σ out_i, in): the int rows and their scales concatenated (per-row and
    per-group scales both run along the rows), the factor s folded into W_1's scales."""
    scales = [m.scale * first_scale if i == 0 else m.scale for i, m in enumerate(mods)]
    return QuantWeight(torch.cat([m.weight_q for m in mods]), torch.cat(scales), mods[0].bits, mods[0].group_size)


def _quant_layer(layer: torch.nn.Module, c: float, eps1: Tensor, eps2: Tensor) -> _Layer:
    """The merged weights of a block whose linears are QuantLinears (llm.quant): gains kept apart."""
    a, f = layer.attn, layer.ffn
    return _Layer(
        w_qkv=_stack_q([a.q_proj, a.k_proj, a.v_proj], c), w_o=_stack_q([a.output_proj]),
        w_13=_stack_q([f.w1, f.w3]), w_2=_stack_q([f.w2]), eps1=eps1, eps2=eps2,
        g1=layer.ln1.weight.detach(), g2=layer.ln2.weight.detach(),
    )


def _stack_t(mats: list[Tensor], gain: Tensor | None = None, scales: list[float] | None = None) -> Tensor:
    """[s_1 W_1; s_2 W_2; ...] diag(gain), transposed: (in, Σ out_i) contiguous, one pass per matrix."""
    out = torch.empty(mats[0].shape[1], sum(m.shape[0] for m in mats), dtype=mats[0].dtype, device=mats[0].device)
    col = 0
    for i, m in enumerate(mats):
        dst = out[:, col : col + m.shape[0]]
        col += m.shape[0]
        s = 1.0 if scales is None else scales[i]
        if gain is None:
            dst.copy_(m.t()) if s == 1.0 else torch.mul(m.t(), s, out=dst)
        else:
            torch.mul(m.t(), gain[:, None] if s == 1.0 else gain[:, None] * s, out=dst)
    return out


@torch.inference_mode(False)  # ordinary tensors even when first called under inference mode:
@torch.no_grad()  # they may be read in any mode while the cache lives
def _build(model: Transformer) -> _Weights:
    w = _Weights(model, _supported(model))
    if not w.supported:
        return w
    attn0 = model.layers[0].attn
    c = 1.0 / math.sqrt(attn0.head_dim)
    dtype, device = model.lm_head.weight.dtype, model.lm_head.weight.device

    def eps(norm: torch.nn.Module) -> Tensor:
        return torch.tensor([norm.eps], dtype=dtype, device=device)

    w.layers = []
    for layer in model.layers:
        a, f = layer.attn, layer.ffn
        if isinstance(a.q_proj, QuantLinear):
            w.layers.append(_quant_layer(layer, c, eps(layer.ln1), eps(layer.ln2)))
            continue
        w.layers.append(_Layer(
            w_qkv=_stack_t([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], layer.ln1.weight, [c, 1.0, 1.0]),
            w_o=_stack_t([a.output_proj.weight]),
            w_13=_stack_t([f.w1.weight, f.w3.weight], layer.ln2.weight),
            w_2=_stack_t([f.w2.weight]),
            eps1=eps(layer.ln1),
            eps2=eps(layer.ln2),
        ))
    w.embedding = model.token_embeddings.weight
    w.w_head = _stack_t([model.lm_head.weight], model.ln_final.weight)
    w.eps_final = eps(model.ln_final)
    w.rot = torch.complex(attn0.rope.cos.to(dtype), attn0.rope.sin.to(dtype))
    w.num_heads, w.num_kv_heads, w.head_dim = attn0.num_heads, attn0.num_kv_heads, attn0.head_dim
    return w


def weights(model: torch.nn.Module, cache: KVCache) -> _Weights | None:
    """The inference copies of `model`'s weights for decoding into `cache` (built on the cache's first decode
    step and kept with it), or None when this step does not apply to the model."""
    if type(model) is not Transformer or model.impl != "fast":
        return None
    w = cache.decode_weights
    if w is None or w.model is not model:
        w = cache.decode_weights = _build(model)
    return w if w.supported else None


def invalidate(cache: KVCache) -> None:
    """Drop the copies kept with `cache`: the next decode step rebuilds them from the model's weights."""
    cache.decode_weights = None


def _rstd(x: Tensor, eps: Tensor) -> Tensor:
    """1 / sqrt(mean_d x² + eps), (b 1), in three ops: ‖x‖ (vector_norm), then (eps + ‖x‖·‖x‖/d)^(-1/2).
    eps is a (1,) tensor: a Python float operand would be wrapped into a tensor on every call."""
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return torch.addcmul(eps, n, n, value=1.0 / x.shape[-1]).rsqrt_()


def _normed(x: Tensor, eps: Tensor, gain: Tensor | None) -> Tensor:
    """RMSNorm of x; the gain is applied here only when it is not folded into the weights (quantized)."""
    h = x * _rstd(x, eps)
    return h if gain is None else h.mul_(gain)


def _mm(x: Tensor, w: Tensor | QuantWeight) -> Tensor:
    """x W for a float (in out) matrix, x Ŵᵀ for a quantized (out in) one."""
    return quant_matmul(x, w) if isinstance(w, QuantWeight) else torch.mm(x, w)


def _addmm(x: Tensor, a: Tensor, w: Tensor | QuantWeight) -> Tensor:
    """x + a W, one addmm for a float matrix."""
    return x + quant_matmul(a, w) if isinstance(w, QuantWeight) else torch.addmm(x, a, w)


@torch.inference_mode()
def decode_step(w: _Weights, tokens: Tensor, cache: KVCache) -> Tensor:
    """Logits (b vocab) of the next token after `tokens` (b,) int64, appended to `cache` at position
    cache.length (every row at the same position: no padding), with `w = weights(model, cache)`. Advances it.
    Runs under inference mode (fewer dispatch steps per op): the logits are an inference tensor, which
    functional ops accept anywhere; clone them before editing them in place outside inference mode."""
    b = tokens.shape[0]
    pos = cache.length
    if cache.batch != b:
        raise ValueError(f"batch size {b} does not match the KV cache's {cache.batch}")
    if pos + 1 > cache.max_len:
        raise ValueError(f"KV cache full: {pos} + 1 tokens exceed max_len {cache.max_len}")
    if pos + 1 > w.rot.shape[0]:
        raise ValueError(f"sequence length {pos + 1} exceeds context_length {w.rot.shape[0]}")
    h, hkv, dh = w.num_heads, w.num_kv_heads, w.head_dim
    g, d, bk = h // hkv, h * dh, b * hkv
    rot = w.rot[pos]  # (d_head/2) complex
    # views of the cache for all layers at once, (L b·h_kv ...): where this step writes, and what it reads
    k_new = torch.view_as_complex(cache.k[:, :, :, pos].unflatten(-1, (-1, 2)))  # (L b h_kv d_head/2) complex
    v_new = cache.v[:, :, :, pos]  # (L b h_kv d_head)
    keys_t = cache.k[:, :, :, : pos + 1].flatten(1, 2).transpose(-1, -2)  # (L b·h_kv d_head t)
    values = cache.v[:, :, :, : pos + 1].flatten(1, 2)  # (L b·h_kv t d_head)
    x = w.embedding.index_select(0, tokens)  # (b d): a fresh tensor, never a view into the table
    for i, lw in enumerate(w.layers):
        qkv = _mm(_normed(x, lw.eps1, lw.g1), lw.w_qkv)  # (b (h + 2 h_kv) d_head)
        z = torch.view_as_complex(qkv.view(b, h + 2 * hkv, dh // 2, 2))  # pairs as complex numbers
        # RoPE: q rotated into a fresh tensor, k rotated straight into its cache slot
        q = torch.view_as_real(z[:, :h] * rot).view(bk, g, dh)  # the g query heads of a K/V head as g rows
        torch.mul(z[:, h : h + hkv], rot, out=k_new[i])
        v_new[i].copy_(qkv[:, (h + hkv) * dh :].view(b, hkv, dh))
        s = torch.bmm(q, keys_t[i])  # (b·h_kv g t), scale folded into W_q
        _, l = exp_rows_(s)
        o = torch.bmm(s, values[i]).div_(l)  # normalise (g d_head), not (g t)
        x = _addmm(x, o.view(b, d), lw.w_o)
        ab = _mm(_normed(x, lw.eps2, lw.g2), lw.w_13)
        a, gate = ab.chunk(2, dim=-1)
        x = _addmm(x, torch.sigmoid(a).mul_(a).mul_(gate), lw.w_2)
    cache.advance(1)
    return torch.mm(x * _rstd(x, w.eps_final), w.w_head)

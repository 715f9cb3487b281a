"""A decoder-only Transformer language model built from hand-written autograd ops.

Pre-norm blocks (x + attn(ln1(x)), then + ffn(ln2(x))), RoPE, SwiGLU, RMSNorm, optional grouped-query
attention and weight tying. Module and parameter names follow the CS336 layout, so its state dicts load
with `load_state_dict`.

`impl` chooses how the same function is computed (the same parameters and state dict either way):
- "reference": only the `llm.ops` Functions, the plain readable model: one Linear per projection, RoPE in
  real arithmetic, attention through `scaled_dot_product_attention` with a causal mask, the loss as lm_head
  then `cross_entropy`.
- "fast" (default): the `llm.fast` variants, each tested against its reference op: q/k/v and w1/w3 as
  shared-input linears, RoPE as a complex multiply, a blocked causal attention kernel (or FlashAttention-2,
  see `attn_impl`), lm_head fused with the loss; generation uses `llm.fast.decode_step`.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from typing import NamedTuple

import torch
from einops import rearrange, repeat
from torch import nn

from llm.config import RMS_NORM_EPS, ModelConfig, check_impl, default_d_ff
from llm.fast.attention import causal_attention
from llm.fast.cross_entropy import linear_cross_entropy
from llm.fast.flash_attention import flash_attention
from llm.fast.linears import linears
from llm.fast.lora_linears import lora_linears, shared_lora
from llm.fast.rope import layer_rotation, rope_rotate
from llm.kv_cache import KVCache
from llm.ops.attention import scaled_dot_product_attention
from llm.ops.cross_entropy import cross_entropy
from llm.ops.embedding import embedding
from llm.ops.linear import linear
from llm.ops.rmsnorm import rms_norm
from llm.ops.rope import rope
from llm.ops.softmax import softmax
from llm.ops.swiglu import silu, swiglu
from llm.optim import AdamW, SGDDecay, cos_lr_scheduler, gradient_clip  # re-exported: the course's names live here

__all__ = [
    "AdamW",
    "CrossEntropyLoss",
    "Embedding",
    "FFN",
    "Linear",
    "MultiHeadAttention",
    "RmsNorm",
    "RoPE",
    "SGDDecay",
    "ScaledDotProductAttention",
    "SiLU",
    "Softmax",
    "Transformer",
    "TransformerBlock",
    "cos_lr_scheduler",
    "cross_entropy",
    "gradient_clip",
    "scaled_dot_product_attention",
    "softmax",
]

ATTN_IMPLS = ("auto", "ours", "flash", "triton")


class Linear(nn.Module):
    """y = x Wᵀ, W (out in), no bias; W ~ N(0, 2/(in+out)) truncated at ±3σ."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        std = math.sqrt(2.0 / (in_features + out_features))
        nn.init.trunc_normal_(self.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Embedding(nn.Module):
    """Lookup table W (vocab d); W ~ N(0, 1) truncated at ±3."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        nn.init.trunc_normal_(self.weight, mean=0.0, std=1.0, a=-3.0, b=3.0)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return embedding(token_ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"




class RmsNorm(nn.Module):
    """x / rms(x) · g over the last dim, computed in float32 and cast back; g starts at ones."""

    def __init__(self, d_model: int, eps: float = RMS_NORM_EPS, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class SiLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu(x)


class Softmax(nn.Module):
    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softmax(x, self.dim)


class ScaledDotProductAttention(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return scaled_dot_product_attention(q, k, v, mask)


class CrossEntropyLoss(nn.Module):
    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, targets)


class FFN(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) ⊙ w3 x)."""

    def __init__(self, d_model: int, d_ff: int | None = None, device=None, dtype=None, impl: str = "fast") -> None:
        super().__init__()
        check_impl(impl)
        d_ff = d_ff or default_d_ff(d_model)
        self.impl = impl
        self.w1 = Linear(d_model, d_ff, device=device, dtype=dtype)
        self.w2 = Linear(d_ff, d_model, device=device, dtype=dtype)
        self.w3 = Linear(d_model, d_ff, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "fast" and isinstance(self.w1, Linear):  # w1 and w3 read the same x: one Function (see _qkv)
            a, b = linears(x, self.w1.weight, self.w3.weight)
        elif self.impl == "fast" and shared_lora(self.w1, self.w3):
            a, b = lora_linears(x, self.w1, self.w3)
        else:
            a, b = self.w1(x), self.w3(x)
        return self.w2(swiglu(a, b))


class RoPE(nn.Module):
    """Rotary embedding for head dim d_k: pair k of position p is rotated by p / theta^(2k/d_k)."""

    def __init__(self, theta: float, d_k: int, max_seq_len: int, device=None) -> None:
        super().__init__()
        if d_k % 2:
            raise ValueError(f"RoPE needs an even head dimension, got d_k={d_k}")
        self.d_k, self.max_seq_len = d_k, max_seq_len
        # angles in float64 so long positions keep their precision, stored as float32 tables
        inv_freq = theta ** (-torch.arange(0, d_k, 2, dtype=torch.float64, device=device) / d_k)
        angles = torch.arange(max_seq_len, dtype=torch.float64, device=device)[:, None] * inv_freq
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def tables(self, token_positions: torch.Tensor | None, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (... s d_k/2) for the positions (default 0..seq_len-1)."""
        if token_positions is None:
            if seq_len > self.max_seq_len:
                raise ValueError(f"sequence length {seq_len} exceeds RoPE max_seq_len {self.max_seq_len}")
            return self.cos[:seq_len], self.sin[:seq_len]
        if token_positions.dtype.is_floating_point or token_positions.dtype == torch.bool:
            raise ValueError(f"token_positions must be integers, got {token_positions.dtype}")
        if token_positions.numel():
            mm = torch.aminmax(token_positions)  # one pass, one sync
            lo, hi = int(mm.min), int(mm.max)
            if lo < 0 or hi >= self.max_seq_len:
                raise ValueError(f"token positions must be in [0, {self.max_seq_len}), got {lo}..{hi}")
        return self.cos[token_positions], self.sin[token_positions]

    def forward(self, x: torch.Tensor, token_positions: torch.Tensor | None = None) -> torch.Tensor:
        cos, sin = self.tables(token_positions, x.shape[-2])
        return rope(x, cos, sin)


@functools.cache
def _cuda_attention() -> str:
    """The causal training attention on CUDA: the Triton kernels when Triton is installed."""
    return "triton" if importlib.util.find_spec("triton") is not None else "flash"


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention with RoPE on Q, K (when theta is given) and grouped-query
    attention (num_kv_heads < num_heads: each K/V head serves num_heads / num_kv_heads query heads)."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        max_seq_len: int | None = None,
        theta: float | None = None,
        num_kv_heads: int | None = None,
        device=None,
        dtype=None,
        attn_impl: str = "auto",
        impl: str = "fast",
    ) -> None:
        super().__init__()
        if num_heads <= 0 or d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        check_impl(impl)
        self.d_model, self.num_heads, self.num_kv_heads = d_model, num_heads, num_kv_heads
        self.head_dim = d_model // num_heads
        self.attn_impl, self.impl = attn_impl, impl
        kv_dim = self.head_dim * num_kv_heads
        self.q_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.k_proj = Linear(d_model, kv_dim, device=device, dtype=dtype)
        self.v_proj = Linear(d_model, kv_dim, device=device, dtype=dtype)
        self.output_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.rope = None
        if theta is not None:
            if max_seq_len is None:
                raise ValueError("RoPE (theta given) needs max_seq_len")
            self.rope = RoPE(theta, self.head_dim, max_seq_len, device=device)

    def _qkv(self, x: torch.Tensor, inputs: AttnInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (b h s d), k and v (b h_kv s d), with RoPE applied to q and k."""
        # q, k, v read the same x: one Function, whose backward accumulates dx in one buffer (float Linears;
        # quantized ones, llm.quant, hold no .weight and run their own matmul)
        if self.impl == "fast" and isinstance(self.q_proj, Linear):
            q, k, v = linears(x, self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)
        elif self.impl == "fast" and shared_lora(self.q_proj, self.k_proj, self.v_proj):  # LoRA on all three (llm.lora)
            q, k, v = lora_linears(x, self.q_proj, self.k_proj, self.v_proj)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = (rearrange(t, "b s (h d) -> b h s d", d=self.head_dim) for t in (q, k, v))
        if inputs.rot is not None:  # fast: the rotation e^{iθ} was built once for all layers
            return rope_rotate(q, inputs.rot), rope_rotate(k, inputs.rot), v
        if inputs.cos is not None:  # the reference (or fast, compiled: see llm.fast.rope)
            q, k = rope(q, inputs.cos, inputs.sin), rope(k, inputs.cos, inputs.sin)
        return q, k, v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttnInputs) -> torch.Tensor:
        """Attention output (b h s d) for q (b h s d) against k, v (b h_kv t d)."""
        g = self.num_heads // self.num_kv_heads
        if self.impl == "reference":  # every query head against a copy of its K/V head, masked
            k, v = (repeat(t, "b hk t d -> b (hk g) t d", g=g) for t in (k, v))
            return scaled_dot_product_attention(q, k, v, inputs.mask)
        if inputs.causal:  # training, or a prefill into an empty cache: a causal kernel
            if g > 1:
                k, v = (t.repeat_interleave(g, dim=1) for t in (k, v))
            return self._attend_causal(q, k, v)
        # GQA without copying K/V: the g query heads of one K/V head become g·s query rows, so
        # scores are (b h_kv g·s total) against the un-expanded keys (mask rows repeated to match)
        o = scaled_dot_product_attention(rearrange(q, "b (hk g) s d -> b hk (g s) d", g=g), k, v, inputs.mask)
        return rearrange(o, "b hk (g s) d -> b (hk g) s d", g=g)

    def _attend_causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """impl="fast" training path: (b h s d) causal attention with K/V heads already expanded.
        `attn_impl`: "ours" the blocked Function (fast on CPU), "flash" FlashAttention-2 in PyTorch,
        "triton" FlashAttention-2 as Triton kernels; "auto" = triton on CUDA (flash where Triton is
        missing), ours elsewhere. A Python loop of small launches is slow on a GPU; one kernel is not."""
        impl = self.attn_impl
        if impl == "auto":
            impl = _cuda_attention() if q.device.type == "cuda" else "ours"
        if impl == "triton":
            # imported here: Triton is optional (not on macOS) and heavy to import
            from llm.fast.flash_attention_triton import flash_attention_triton

            return flash_attention_triton(q, k, v, True)
        if impl == "flash":
            return flash_attention(q.contiguous(), k.contiguous(), v.contiguous(), True)
        return causal_attention(q, k, v)

    def forward(
        self,
        x: torch.Tensor,
        token_positions: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        layer_idx: int = 0,
        attention_mask: torch.Tensor | None = None,
        inputs: AttnInputs | None = None,
    ) -> torch.Tensor:
        """`inputs`: RoPE tables and mask precomputed by `Transformer.hidden` (the same for every layer);
        None = compute them here from token_positions / kv_cache / attention_mask."""
        if inputs is None:
            offset = kv_cache.length if kv_cache is not None else 0
            inputs = attn_inputs(self, x.shape[1], token_positions, offset, attention_mask, x.device)
        q, k, v = self._qkv(x, inputs)
        if kv_cache is not None:
            kc, vc = kv_cache.update(layer_idx, k, v)
            if not inputs.causal:  # causal: a prefill into an empty cache, whose new keys are all there is
                k, v = kc, vc
        o = self._attend(q, k, v, inputs)
        return self.output_proj(rearrange(o, "b h s d -> b s (h d)"))


class AttnInputs(NamedTuple):
    """What every attention layer of one forward pass shares, computed once."""

    cos: torch.Tensor | None  # RoPE tables (s d/2) or (b 1 s d/2); None = no RoPE
    sin: torch.Tensor | None
    mask: torch.Tensor | None  # bool, True = may attend, (rows total) or (b 1 rows total); None = attend to all
    causal: bool  # impl="fast", no cache offset and no padding: a causal kernel over the new tokens, no mask
    rot: torch.Tensor | None = None  # impl="fast" (not compiled): complex e^{iθ} from cos/sin, shared by all layers


def attn_inputs(
    attn: MultiHeadAttention,
    s: int,
    token_positions: torch.Tensor | None,
    offset: int,
    attention_mask: torch.Tensor | None,
    device: torch.device,
) -> AttnInputs:
    """RoPE tables and attention mask for s new tokens after `offset` cached ones, for `attn`'s layout.
    The mask has s rows (the reference), or g·s (fast: the g query heads of a K/V head as one block of rows,
    see MultiHeadAttention._attend)."""
    cos = sin = None
    rope_mod = attn.rope
    if rope_mod is not None:
        if token_positions is None:
            if offset + s > rope_mod.max_seq_len:
                raise ValueError(f"sequence length {offset + s} exceeds RoPE max_seq_len {rope_mod.max_seq_len}")
            cos, sin = rope_mod.cos[offset : offset + s], rope_mod.sin[offset : offset + s]  # slices: no arange
        else:
            cos, sin = rope_mod.tables(token_positions, s)
            if cos.dim() == 3:  # per-row positions (b s half): broadcast over heads
                cos, sin = cos[:, None], sin[:, None]
    fast = attn.impl == "fast"
    causal = fast and offset == 0 and attention_mask is None
    mask = None
    # one new query and no padding attends to every cached key: no mask at all (the decode step)
    if not causal and (attention_mask is not None or s > 1):
        total = offset + s
        qi = torch.arange(offset, total, device=device)[:, None]
        kj = torch.arange(total, device=device)[None, :]
        mask = kj <= qi  # (s total): causal against absolute positions in the cache
        if attention_mask is not None:
            # padded keys are hidden; each query still sees itself so a padding row is not all
            # −inf (its output is garbage that nothing real attends to)
            mask = (mask & attention_mask[:, None, None, :]) | (kj == qi)
        groups = attn.num_heads // attn.num_kv_heads
        if fast and groups > 1:
            mask = mask.repeat(*(1,) * (mask.dim() - 2), groups, 1)
    return AttnInputs(cos, sin, mask, causal, layer_rotation(cos, sin) if fast else None)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(ln1(x)), then + ffn(ln2(x))."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        d_ff: int,
        max_seq_len: int,
        theta: float,
        num_kv_heads: int | None = None,
        device=None,
        dtype=None,
        attn_impl: str = "auto",
        impl: str = "fast",
        eps: float = RMS_NORM_EPS,
    ) -> None:
        super().__init__()
        self.ln1 = RmsNorm(d_model, eps, device=device, dtype=dtype)
        self.attn = MultiHeadAttention(
            d_model, num_heads, max_seq_len, theta, num_kv_heads, device=device, dtype=dtype, attn_impl=attn_impl,
            impl=impl,
        )
        self.ln2 = RmsNorm(d_model, eps, device=device, dtype=dtype)
        self.ffn = FFN(d_model, d_ff, device=device, dtype=dtype, impl=impl)

    def forward(
        self,
        x: torch.Tensor,
        token_positions: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        layer_idx: int = 0,
        attention_mask: torch.Tensor | None = None,
        inputs: AttnInputs | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), token_positions, kv_cache, layer_idx, attention_mask, inputs)
        return x + self.ffn(self.ln2(x))


def _check_int(name: str, t: torch.Tensor) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor (e.g. torch.long), got {t.dtype}")


class Transformer(nn.Module):
    """Token embeddings → num_layers TransformerBlocks → ln_final → lm_head (unnormalised logits).
    `impl`: "fast" or "reference" (see the module docstring); `attn_impl`: which fast causal attention
    kernel (MultiHeadAttention._attend_causal), unused by the reference."""

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        d_model: int,
        num_layers: int,
        num_heads: int,
        d_ff: int | None = None,
        rope_theta: float = 10000.0,
        num_kv_heads: int | None = None,
        tie_embeddings: bool = False,
        rms_norm_eps: float = RMS_NORM_EPS,
        attn_impl: str = "auto",
        device=None,
        dtype=None,
        impl: str = "fast",
    ) -> None:
        super().__init__()
        check_impl(impl)
        self.impl = impl
        self.config = ModelConfig(
            vocab_size=vocab_size,
            context_length=context_length,
            d_model=d_model,
            num_layers=num_layers,
            num_heads=num_heads,
            d_ff=d_ff,
            rope_theta=rope_theta,
            num_kv_heads=num_kv_heads,
            tie_embeddings=tie_embeddings,
            rms_norm_eps=rms_norm_eps,
        )  # validates: d_model % num_heads, num_heads % num_kv_heads, positive sizes
        cfg = self.config
        self.vocab_size, self.context_length = vocab_size, context_length
        self.token_embeddings = Embedding(vocab_size, d_model, device=device, dtype=dtype)
        self.layers = nn.ModuleList(
            TransformerBlock(
                d_model, num_heads, cfg.d_ff, context_length, rope_theta, num_kv_heads,
                device=device, dtype=dtype, attn_impl=attn_impl, impl=impl, eps=rms_norm_eps,
            )
            for _ in range(num_layers)
        )
        self.ln_final = RmsNorm(d_model, rms_norm_eps, device=device, dtype=dtype)
        self.lm_head = Linear(d_model, vocab_size, device=device, dtype=dtype)
        if tie_embeddings:
            self.lm_head.weight = self.token_embeddings.weight

    @classmethod
    def from_config(cls, cfg: ModelConfig, **kw) -> "Transformer":
        return cls(**cfg.to_dict(), **kw)

    def new_kv_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        cfg = self.config
        max_len = max_len or cfg.context_length
        if max_len > cfg.context_length:
            raise ValueError(f"max_len {max_len} exceeds context_length {cfg.context_length}")
        p = self.lm_head.weight
        return KVCache(cfg.num_layers, batch, cfg.num_kv_heads or cfg.num_heads, max_len, cfg.head_dim, p.device, p.dtype)

    def _check_inputs(self, token_ids, token_positions, kv_cache, attention_mask) -> None:
        _check_int("token_ids", token_ids)
        if token_ids.dim() != 2:
            raise ValueError(f"token_ids must be (batch, seq), got shape {tuple(token_ids.shape)}")
        b, s = token_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if past + s > self.context_length:
            raise ValueError(f"sequence length {past + s} exceeds context_length {self.context_length}")
        if kv_cache is not None:
            kv_cache.check_room(b, s)
        if token_ids.numel():
            mm = torch.aminmax(token_ids)  # one pass, one sync
            lo, hi = int(mm.min), int(mm.max)
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"token ids must be in [0, {self.vocab_size}), got min {lo}, max {hi}")
        if token_positions is not None:
            _check_int("token_positions", token_positions)
            if token_positions.shape[-1] != s:
                raise ValueError(f"token_positions shape {tuple(token_positions.shape)} does not match seq length {s}")
        if attention_mask is not None:
            if attention_mask.dtype != torch.bool:
                raise ValueError(f"attention_mask must be bool (True = real token), got {attention_mask.dtype}")
            if tuple(attention_mask.shape) != (b, past + s):
                raise ValueError(f"attention_mask must be (batch, cached + new) = {(b, past + s)}, got {tuple(attention_mask.shape)}")

    def hidden(
        self,
        token_ids: torch.Tensor,
        token_positions: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final normalised hidden states (b s d), i.e. everything but lm_head."""
        self._check_inputs(token_ids, token_positions, kv_cache, attention_mask)
        s = token_ids.shape[1]
        if token_positions is None and attention_mask is not None:
            # left padding: a row's first real token is position 0
            token_positions = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)[:, -s:]
        x = self.token_embeddings(token_ids)
        inputs = None
        if len(self.layers):  # RoPE tables and mask once per forward, not once per layer
            offset = kv_cache.length if kv_cache is not None else 0
            inputs = attn_inputs(self.layers[0].attn, s, token_positions, offset, attention_mask, x.device)
        for i, layer in enumerate(self.layers):
            x = layer(x, token_positions, kv_cache, i, attention_mask, inputs)
        if kv_cache is not None:
            kv_cache.advance(s)
        return self.ln_final(x)

    def forward(
        self,
        token_ids: torch.Tensor,
        token_positions: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (b s vocab) for token_ids (b s)."""
        return self.lm_head(self.hidden(token_ids, token_positions, kv_cache, attention_mask))

    def loss(self, token_ids: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy of next-token predictions, cross_entropy(forward(x), targets); impl="fast" fuses
        lm_head with the loss so the (b s vocab) logits are never held in memory at once. `loss_mask` (b s;
        bool, or float weights): the mean is over the positions it counts only (fine-tuning: the answer's
        tokens; padding at the end of a row is left out by position, whatever its target id)."""
        _check_int("targets", targets)
        if targets.shape != token_ids.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} must equal token_ids shape {tuple(token_ids.shape)}")
        if loss_mask is not None and loss_mask.shape != targets.shape:
            raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} must equal targets shape {tuple(targets.shape)}")
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= self.vocab_size):
            raise ValueError(f"targets must be in [0, {self.vocab_size})")
        h = self.hidden(token_ids)
        if self.impl == "fast":
            return linear_cross_entropy(h, self.lm_head.weight, targets, loss_mask)
        return cross_entropy(self.lm_head(h), targets, loss_mask)

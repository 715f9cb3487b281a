"""The same decoder-only Transformer as `llm.transformer.Transformer`, built the usual way from torch.nn
layers and torch.nn.functional (nanoGPT / Llama style). It is the yardstick for `benchmarking_model.py`
(`--compare torch`) and an independent check of our model: its state-dict keys are identical, so the same
weights load into both and the logits must agree.

Architecture (as ours): token embedding → L × [x + attn(rms_norm(x)), x + ffn(rms_norm(x))] → rms_norm →
lm_head. Attention: q/k/v/output projections without bias, RoPE on adjacent pairs (x[2k], x[2k+1]) rotated
by pos / theta^(2k/d_head), causal `F.scaled_dot_product_attention`, grouped-query heads when
num_kv_heads < num_heads. FFN: SwiGLU w2(silu(w1 x) * w3 x). RMSNorm eps rms_norm_eps (default 1e-5).
Optional tied embeddings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llm.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, d_model: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # half precision normalises in float32 (as ours does); float32/float64 stay as they are
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        return F.rms_norm(xf, (x.shape[-1],), self.weight.to(xf.dtype), self.eps).to(x.dtype)


def rope_tables(theta: float, head_dim: int, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_seq_len, head_dim/2)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(max_seq_len, dtype=torch.float64)[:, None] * inv_freq
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b h s d); rotate each adjacent pair (x[2k], x[2k+1]) by the angle whose cos/sin are (s d/2)."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, context_length: int, theta: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = d_model // num_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, num_kv_heads * self.head_dim, bias=False)
        self.output_proj = nn.Linear(d_model, d_model, bias=False)
        cos, sin = rope_tables(theta, self.head_dim, context_length)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, self.cos[:s], self.sin[:s]), apply_rope(k, self.cos[:s], self.sin[:s])
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.output_proj(o.transpose(1, 2).reshape(b, s, d))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.attn = Attention(cfg.d_model, cfg.num_heads, cfg.num_kv_heads or cfg.num_heads, cfg.context_length, cfg.rope_theta)
        self.ln2 = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class TorchTransformer(nn.Module):
    """torch.nn twin of llm.transformer.Transformer (same kwargs, same state-dict keys)."""

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
        rms_norm_eps: float = 1e-5,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.config = cfg = ModelConfig(
            vocab_size=vocab_size, context_length=context_length, d_model=d_model, num_layers=num_layers, num_heads=num_heads,
            d_ff=d_ff, rope_theta=rope_theta, num_kv_heads=num_kv_heads, tie_embeddings=tie_embeddings,
            rms_norm_eps=rms_norm_eps,
        )
        self.token_embeddings = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(num_layers))
        self.ln_final = RMSNorm(d_model, rms_norm_eps)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self._init_weights()
        if tie_embeddings:
            self.lm_head.weight = self.token_embeddings.weight
        self.to(device=device, dtype=dtype)

    @classmethod
    def from_config(cls, cfg: ModelConfig, **kw) -> "TorchTransformer":
        return cls(**cfg.to_dict(), **kw)

    @torch.no_grad()
    def _init_weights(self) -> None:
        """The same initialisation as ours (truncated normals), so training curves are comparable too."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                std = math.sqrt(2.0 / (m.in_features + m.out_features))
                nn.init.trunc_normal_(m.weight, std=std, a=-3 * std, b=3 * std)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=1.0, a=-3.0, b=3.0)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Logits (b s vocab)."""
        x = self.token_embeddings(token_ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.ln_final(x))

    def loss(self, token_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(token_ids)
        return F.cross_entropy(logits.flatten(0, -2), targets.flatten())


def torch_adamw(params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """torch.optim.AdamW with torch's default implementation choice for the device (what users get)."""
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

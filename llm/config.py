"""Model shapes and presets shared by training, generation and the benchmarks."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields


# How `llm.transformer.Transformer` computes the model: "fast" (llm/fast) or "reference" (only llm/ops).
IMPLS = ("fast", "reference")
RMS_NORM_EPS = 1e-5  # the default epsilon of every RmsNorm (Llama's rms_norm_eps; some models use 1e-6)


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be 'fast' or 'reference', got {impl!r}")


def default_d_ff(d_model: int) -> int:
    """SwiGLU hidden size: about 8/3 * d_model, rounded up to a multiple of 64."""
    return 64 * math.ceil(8 * d_model / 3 / 64)


@dataclass
class ModelConfig:
    """Exactly the keyword arguments of `llm.transformer.Transformer`."""

    vocab_size: int = 10_000
    context_length: int = 256
    d_model: int = 512
    num_layers: int = 4
    num_heads: int = 16
    d_ff: int | None = None
    rope_theta: float = 10_000.0
    num_kv_heads: int | None = None
    tie_embeddings: bool = False
    rms_norm_eps: float = RMS_NORM_EPS  # checkpoints saved before this field existed load with this default

    def __post_init__(self) -> None:
        if self.d_ff is None:
            self.d_ff = default_d_ff(self.d_model)
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if (self.d_model // self.num_heads) % 2:
            raise ValueError(f"head dim d_model/num_heads = {self.d_model // self.num_heads} must be even for RoPE")
        kv = self.num_kv_heads or self.num_heads
        if kv <= 0 or self.num_heads % kv:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({kv})")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**d)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def num_params(self, *, embedding: bool = True) -> int:
        """Parameter count; `embedding=False` leaves out the input embedding (the usual "non-embedding" count)."""
        d, f, L = self.d_model, self.d_ff, self.num_layers
        kv_dim = self.head_dim * (self.num_kv_heads or self.num_heads)
        per_layer = d * d * 2 + 2 * d * kv_dim + 3 * d * f + 2 * d
        n = L * per_layer + d  # + ln_final
        head = self.vocab_size * d
        if embedding:
            return n + head + (0 if self.tie_embeddings else head)
        return n

    def flops_per_token(self, *, training: bool = True, seq_len: int | None = None) -> float:
        """Matmul FLOPs per token: 2N forward (N = weights touched by matmuls: blocks + lm_head) plus
        attention's 2 * 2 * L * d * T (QK^T and PV, full square, as PaLM's MFU counts it).
        Training (forward + backward) is 3x forward."""
        T = seq_len or self.context_length
        n_matmul = self.num_params(embedding=False) - (2 * self.num_layers + 1) * self.d_model
        n_matmul += self.vocab_size * self.d_model
        forward = 2 * n_matmul + 4 * self.num_layers * self.d_model * T
        return 3 * forward if training else forward


# The sizes of CS336 assignment 2 and the course's TinyStories model; `demo` is what trains here in minutes.
MODEL_PRESETS: dict[str, ModelConfig] = {
    "demo": ModelConfig(vocab_size=2048, context_length=256, d_model=256, num_layers=4, num_heads=8),
    "tiny": ModelConfig(vocab_size=10_000, context_length=256, d_model=256, num_layers=4, num_heads=8),
    "tinystories": ModelConfig(vocab_size=10_000, context_length=256, d_model=512, d_ff=1344, num_layers=4, num_heads=16),
    "small": ModelConfig(vocab_size=10_000, context_length=1024, d_model=768, d_ff=3072, num_layers=12, num_heads=12),
    "medium": ModelConfig(vocab_size=10_000, context_length=1024, d_model=1024, d_ff=4096, num_layers=24, num_heads=16),
    "large": ModelConfig(vocab_size=10_000, context_length=1024, d_model=1280, d_ff=5120, num_layers=36, num_heads=20),
    "xl": ModelConfig(vocab_size=10_000, context_length=1024, d_model=1600, d_ff=6400, num_layers=48, num_heads=25),
    "2.7B": ModelConfig(vocab_size=10_000, context_length=1024, d_model=2560, d_ff=10240, num_layers=32, num_heads=32),
}


def model_preset(name: str) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(MODEL_PRESETS)}")
    return ModelConfig(**MODEL_PRESETS[name].to_dict())

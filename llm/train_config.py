"""Training configuration: one dataclass, named presets, TOML files and command-line flags.

Precedence (later wins): preset  <  `--config file.toml`  <  explicit flags. On `--resume`, the
checkpoint's own config takes the place of the preset, so `--resume auto` alone continues a run as it was.

TOML layout (every key optional; unknown keys are errors)::

    preset = "tinystories"
    max_steps = 2000
    lr = 1e-3
    [model]
    d_model = 256
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from llm.config import MODEL_PRESETS, ModelConfig, check_impl, model_preset

DTYPES = ("auto", "float32", "bfloat16", "float16")
CHECKPOINT_FORMATS = ("pt", "safetensors")
PARALLEL_MODES = ("ddp", "fsdp")


def _help(default: Any, text: str) -> Any:
    """A field with a default and the help text of its flag (`uv run -m llm.training --help`)."""
    return field(default=default, metadata={"help": text})


@dataclass
class TrainConfig:
    """Everything a training run needs besides the model shape (`model`)."""

    preset: str = _help("demo", "name of the preset this config started from (informational)")
    model: ModelConfig = field(default_factory=lambda: model_preset("demo"))
    # data: memmapped token arrays (.npy, uint16/uint32) and the tokenizer that made them
    train_data: str = "data/demo/train.npy"
    val_data: str = "data/demo/val.npy"
    tokenizer_dir: str | None = _help(None, "None: <dir of train_data>/tokenizer when it exists")
    prepare_demo_data: bool = _help(False, "build data/demo (built-in stories -> BPE -> .npy) when missing; no other dir")
    out_dir: str = "runs/demo"
    # optimisation
    max_steps: int = 1000
    batch_size: int = _help(16, "sequences per micro-batch per process")
    grad_accum: int = _help(1, "micro-batches per optimizer step (per process)")
    lr: float = _help(1e-3, "peak learning rate after warmup")
    min_lr: float = _help(1e-4, "reached at max_steps by the cosine schedule")
    warmup_steps: int = _help(100, "linear warmup steps; unless given, a preset's is at most max_steps // 10")
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = _help(1.0, "max global L2 norm of the gradient; 0 disables clipping")
    # bookkeeping
    eval_interval: int = _help(100, "steps between validation passes (and at the last step)")
    eval_batches: int = _help(20, "fixed held-out batches per validation pass")
    log_interval: int = 10
    checkpoint_interval: int = _help(500, "0: checkpoint only at the end (and on interrupt)")
    keep_last: int = _help(
        2, "newest step checkpoints kept (best.pt and the last one shown healthy are kept besides)")
    checkpoint_format: str = _help(
        "pt", "pt (torch.save, loaded weights_only) | safetensors (tensors + a JSON of the rest: no pickle at all)")
    seed: int = 0
    # hardware
    device: str = _help("auto", "auto | cpu | cuda | cuda:N | mps")
    dtype: str = _help("auto", "auto (bf16 autocast on CUDA, fp32 elsewhere) | float32 | bfloat16 | float16")
    compile: bool = _help(False, "torch.compile the model")
    activation_checkpointing: str = _help(
        "none", "none | full | every-K: recompute checkpointed blocks in backward (less memory, ~1/3 more compute)")
    parallel: str = _help(
        "ddp", "ddp | fsdp: how torchrun's ranks share the model (fsdp: weights, gradients and AdamW state sharded "
        "across ranks, sharded DCP checkpoints)")
    impl: str = _help("fast", "fast (llm/fast kernels) | reference (only the plain llm/ops Functions): same model, same checkpoints")
    threads: int | None = _help(None, "torch CPU threads per process; None: cores / processes on this node")
    peak_flops: float | None = _help(None, "device peak FLOP/s for MFU; None: data sheet (GPU) or measured (CPU)")
    # the sample printed at the end
    sample_prompt: str = "Once upon a time"
    sample_tokens: int = 60

    def validate(self) -> None:
        """Raise ValueError with one clear line for the first invalid value."""
        self.model.validate()
        positive = ("max_steps", "batch_size", "grad_accum", "eval_interval", "eval_batches", "log_interval")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "checkpoint_interval", "keep_last", "seed", "sample_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must not exceed max_steps ({self.max_steps})")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.grad_clip >= 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"checkpoint_format must be one of {', '.join(CHECKPOINT_FORMATS)}, got {self.checkpoint_format!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check_impl(self.impl)
        checkpoint_every(self.activation_checkpointing)
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {', '.join(PARALLEL_MODES)}, got {self.parallel!r}")
        if self.threads is not None and self.threads <= 0:
            raise ValueError(f"threads must be positive, got {self.threads}")
        if self.peak_flops is not None and not self.peak_flops > 0:
            raise ValueError(f"peak_flops must be positive, got {self.peak_flops}")
        dev = self.device.split(":")[0]
        if dev not in ("auto", "cpu", "cuda", "mps"):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if not self.out_dir:
            raise ValueError("out_dir must not be empty")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        model = d.pop("model", None)
        _check_keys(d, _train_fields(), "training")
        cfg = cls(**_coerce(cls, d, "training"))
        if model is not None:
            model = dict(model)
            _check_keys(model, {f.name for f in fields(ModelConfig)}, "model")
            cfg.model = ModelConfig(**_coerce(ModelConfig, model, "model"))
        return cfg

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step for ONE process (multiply by the world size)."""
        return self.batch_size * self.grad_accum * self.model.context_length


AC_MODES = "none | full | every-K (e.g. every-2: blocks 0, 2, 4, ...)"


def checkpoint_every(mode: str) -> int:
    """Every how many blocks activation checkpointing `mode` checkpoints one: 0 for none, 1 for full,
    K for every-K (llm.parallel applies it)."""
    if mode == "none":
        return 0
    if mode == "full":
        return 1
    k = mode.removeprefix("every-")
    if k != mode and k.isdigit() and int(k) > 0:
        return int(k)
    raise ValueError(f"activation_checkpointing must be {AC_MODES}, got {mode!r}")


def _train_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in fields(TrainConfig) if f.name != "model"}


_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None)}


def _coerce(cls: type, d: dict[str, Any], what: str) -> dict[str, Any]:
    """Check each value against the dataclass annotation (TOML/JSON give plain types); ints may stand in for floats."""
    out = {}
    for f in fields(cls):
        if f.name not in d or f.name == "model":
            continue
        v = d[f.name]
        allowed = [_TYPES[t.strip()] for t in str(f.type).split("|") if t.strip() in _TYPES]
        if float in allowed and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        ok = any(isinstance(v, t) and not (t is int and isinstance(v, bool)) for t in allowed)
        if allowed and not ok:
            names = " or ".join(t.__name__ if t is not type(None) else "none" for t in allowed)
            raise ValueError(f"{what} config: {f.name} must be {names}, got {v!r}")
        out[f.name] = v
    return out


def _check_keys(d: dict, known: dict | set, what: str) -> None:
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} config key(s): {', '.join(unknown)}")


def _preset(model: str, **kw: Any) -> TrainConfig:
    return TrainConfig(preset=kw.pop("preset", model), model=model_preset(model), **kw)


def _size_preset(name: str) -> TrainConfig:
    # The CS336 assignment-2 sizes: context 1024, OpenWebText-style data prepared under data/owt.
    return _preset(
        name, train_data="data/owt/train.npy", val_data="data/owt/val.npy", out_dir=f"runs/{name}",
        max_steps=20_000, batch_size=8, grad_accum=4, lr=6e-4, min_lr=6e-5, warmup_steps=1000,
        eval_interval=500, eval_batches=40, log_interval=20, checkpoint_interval=1000,
    )


def _make_presets() -> dict[str, TrainConfig]:
    presets = {
        # The README's first command: trains in ~3-5 minutes on 2 CPU cores and writes a story.
        "demo": _preset(
            "demo", prepare_demo_data=True, out_dir="runs/demo", max_steps=200, batch_size=16, lr=3e-3,
            min_lr=3e-4, warmup_steps=20, weight_decay=0.1, eval_interval=50, eval_batches=4, log_interval=10,
            checkpoint_interval=100, keep_last=2,
        ),
        # The course's TinyStories model (~17M non-embedding params); data from `llm.data download/prepare`.
        "tinystories": _preset(
            "tinystories", train_data="data/tinystories/train.npy", val_data="data/tinystories/val.npy",
            out_dir="runs/tinystories", max_steps=10_000, batch_size=64, lr=1e-3, min_lr=1e-4, warmup_steps=500,
            eval_interval=500, eval_batches=40, log_interval=50, checkpoint_interval=1000,
        ),
        # The demo's shape with a 10k vocabulary, on TinyStories: a quick first real-data run.
        "tiny": _preset(
            "tiny", train_data="data/tinystories/train.npy", val_data="data/tinystories/val.npy",
            out_dir="runs/tiny", max_steps=5000, batch_size=32, lr=2e-3, min_lr=2e-4, warmup_steps=200,
            eval_interval=250, log_interval=20,
        ),
    }
    for name in MODEL_PRESETS:
        presets.setdefault(name, _size_preset(name))
    return presets


TRAIN_PRESETS: dict[str, TrainConfig] = _make_presets()


def train_preset(name: str) -> TrainConfig:
    """A fresh copy of a named preset."""
    if name not in TRAIN_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(TRAIN_PRESETS)}")
    return TrainConfig.from_dict(TRAIN_PRESETS[name].to_dict())


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config into {train keys..., "model": {...}} (validated keys, not values)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        with path.open("rb") as f:
            d = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    model = d.get("model", {})
    if not isinstance(model, dict):
        raise ValueError(f"config file {str(path)!r}: [model] must be a table")
    _check_keys({k: v for k, v in d.items() if k != "model"}, _train_fields(), f"training ({path.name})")
    _check_keys(model, {f.name for f in fields(ModelConfig)}, f"model ({path.name})")
    return d


def merge(base: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """`base` with `overrides` applied ({train keys..., "model": {model keys...}}); validated."""
    d = base.to_dict()
    overrides = dict(overrides)
    model_over = overrides.pop("model", {}) or {}
    if "d_model" in model_over and "d_ff" not in model_over:
        model_over = {**model_over, "d_ff": None}  # re-derive d_ff from the new width
    d.update(overrides)
    d["model"] = {**d["model"], **model_over}
    cfg = TrainConfig.from_dict(d)
    cfg.validate()
    return cfg

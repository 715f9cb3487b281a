"""LoRA fine-tuning of a `llm.transformer.Transformer`: wrap chosen projections in `LoRALinear`, train only A, B.

    apply_lora(model, LoraConfig(rank=8, alpha=16, dropout=0.0, targets=("q", "v")))  -> trainable parameters
    merge_lora(model) / unmerge_lora(model)     W ← W ± (alpha/r) B A, in fp32; merged = the base's speed
    merge_and_unload(model)                     merge, then plain Linears again (a base model: save it whole)
    lora_state_dict(model) / load_lora_state_dict(model, sd)      just the A, B tensors
    save_adapter(path, model, config, base_checkpoint, base_sha256) / load_adapter(path) / attach_adapter(...)

Each targeted Linear becomes a LoRALinear holding the same frozen `weight` Parameter (its state-dict key is
unchanged) plus `lora_A` (r in), Kaiming-uniform as torch.nn's linear init, and `lora_B` (out r), zero: at
step 0 the model computes exactly the base function. rank 0 means full fine-tuning: nothing is wrapped and
every parameter is trainable. A LoRALinear is not a `Linear`, so the model's fused fast paths (q/k/v as one
Function, `llm.fast.decode_step`'s merged weights) step aside for an unmerged one and apply again once merged.

An adapter is two files side by side: PATH (.safetensors: the A, B tensors) and PATH with suffix .json
(the LoraConfig, the base checkpoint's path and sha256, the model config, and the sha256 of the tensors
file, so a pair from two different saves is refused). Each is written atomically, the tensors first.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from llm.fileio import replacing, sha256_of, write_json
from llm.ops.lora import lora_linear
from llm.ops.linear import linear
from llm.transformer import Linear

StrPath = str | os.PathLike[str]
ATTENTION = ("q_proj", "k_proj", "v_proj", "output_proj")
FFN = ("w1", "w2", "w3")
PROJECTIONS = ATTENTION + FFN
ALIASES: dict[str, tuple[str, ...]] = {
    "q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("output_proj",), "o_proj": ("output_proj",),
    "gate_proj": ("w1",), "down_proj": ("w2",), "up_proj": ("w3",),  # the Llama / Hugging Face names
    "attn": ATTENTION, "ffn": FFN, "mlp": FFN, "all": PROJECTIONS,
}
ADAPTER_FORMAT = "llm-lora-adapter"


def resolve_targets(targets: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Projection names (in the model's order) for names and aliases: "q,v" -> ("q_proj", "v_proj")."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    chosen: set[str] = set()
    for item in (t.strip() for t in items):
        if item in PROJECTIONS:
            chosen.add(item)
        elif item in ALIASES:
            chosen.update(ALIASES[item])
        else:
            known = ", ".join([*PROJECTIONS, *ALIASES])
            raise ValueError(f"unknown LoRA target {item!r}; choose from {known}")
    if not chosen:
        raise ValueError("LoRA targets are empty; name at least one projection (e.g. q,v)")
    return tuple(p for p in PROJECTIONS if p in chosen)


@dataclass
class LoraConfig:
    """rank r (0 = full fine-tuning), alpha (the update is scaled by alpha/r), dropout on the LoRA branch's
    input, and the projections to adapt (names or aliases, see resolve_targets; default all of them)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = PROJECTIONS

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"LoRA rank must be an integer >= 0 (0 = full fine-tuning), got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        self.alpha = float(self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        self.targets = resolve_targets(self.targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LoRA config fields: {sorted(unknown)}")
        return cls(**{k: tuple(v) if k == "targets" else v for k, v in d.items()})


class LoRALinear(nn.Module):
    """y = x Wᵀ + (alpha/r) · (dropout(x) Aᵀ) Bᵀ with W frozen (`llm.ops.lora`); merged: y = x Wᵀ, W holding
    W + (alpha/r) B A."""

    def __init__(self, base: Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        w = base.weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.scale, self.dropout = rank, alpha / rank, dropout
        self.weight = w
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # torch.nn.Linear's init, as LoRA's authors use
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return linear(x, self.weight)
        mask = None
        if self.training and self.dropout > 0:
            keep = 1.0 - self.dropout
            mask = torch.empty_like(x).bernoulli_(keep).div_(keep)
        return lora_linear(x, self.weight, self.lora_A, self.lora_B, self.scale, mask)

    def delta(self) -> torch.Tensor:
        """(alpha/r) B A in fp32 (whatever the weights' dtype or an enclosing autocast)."""
        with torch.autocast(self.weight.device.type, enabled=False):
            return torch.mm(self.lora_B.detach().float(), self.lora_A.detach().float()).mul_(self.scale)

    @torch.no_grad()
    def set_merged(self, merged: bool) -> None:
        """W ← W + ΔW (merge) or W − ΔW (unmerge), summed in fp32 and stored in W's dtype."""
        if merged == self.merged:
            return
        sign = 1.0 if merged else -1.0
        self.weight.copy_(self.weight.float().add_(self.delta(), alpha=sign).to(self.weight.dtype))
        self.merged = merged

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, merged={self.merged}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRALinear modules of `model` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _targets_of(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, nn.Module, str, Linear]]:
    """(qualified name, parent, attribute, Linear) for every Linear whose attribute name is a target."""
    found = []
    for prefix, parent in model.named_modules():
        for attr, child in parent.named_children():
            if attr in targets and isinstance(child, Linear):
                found.append((f"{prefix}.{attr}" if prefix else attr, parent, attr, child))
    return found


def apply_lora(model: nn.Module, config: LoraConfig) -> list[nn.Parameter]:
    """Wrap config.targets in LoRALinear and freeze everything else; returns the trainable parameters (all
    of them for rank 0, full fine-tuning). The new tensors live on each weight's device and dtype."""
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters (unload them with merge_and_unload first)")
    if config.rank == 0:
        for p in model.parameters():
            p.requires_grad_(True)
        return list(model.parameters())
    found = _targets_of(model, config.targets)
    if not found:
        raise ValueError(f"no Linear named {', '.join(config.targets)} in the model")
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = []
    for _, parent, attr, base in found:
        wrapped = LoRALinear(base, config.rank, config.alpha, config.dropout)
        wrapped.train(model.training)
        setattr(parent, attr, wrapped)
        trainable += [wrapped.lora_A, wrapped.lora_B]
    return trainable


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its weight (W ← W + (alpha/r) B A in fp32): the forward is one matmul again."""
    for m in lora_modules(model).values():
        m.set_merged(True)


def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora (W ← W − (alpha/r) B A in fp32): W is back to within rounding (~1e-7 relative)."""
    for m in lora_modules(model).values():
        m.set_merged(False)


def merge_and_unload(model: nn.Module) -> None:
    """Merge every adapter and put plain Linears back: the result is a base model (same state-dict keys as
    the checkpoint it came from, all fast paths), e.g. to save a merged full checkpoint."""
    _unwrap(model, merge=True)


def _unwrap(model: nn.Module, *, merge: bool) -> None:
    """Replace each LoRALinear by a plain Linear holding its weight, merged first or (merge=False) unmerged."""
    for name, m in lora_modules(model).items():
        m.set_merged(merge)
        parent_name, _, attr = name.rpartition(".")
        plain = Linear(m.in_features, m.out_features, device="meta")  # no init work: the weight is replaced
        plain.weight = m.weight
        setattr(model.get_submodule(parent_name), attr, plain)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"layers.0.attn.q_proj.lora_A": A, ...}: the adapter tensors only (detached, not copied)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = m.lora_A.detach(), m.lora_B.detach()
    return out


def _check_lora_keys(expected: dict[str, tuple[int, ...]], sd: dict[str, torch.Tensor]) -> None:
    """One ValueError line when `sd`'s names or shapes differ from `expected` (name -> shape)."""
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        parts = [f"missing {len(missing)} (e.g. {missing[0]})"] if missing else []
        parts += [f"unexpected {len(unexpected)} (e.g. {unexpected[0]})"] if unexpected else []
        raise ValueError(f"LoRA tensors do not match the model's adapters: {'; '.join(parts)}")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise ValueError(f"LoRA tensor {k} has shape {tuple(sd[k].shape)}, the model needs {shape}")


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy A, B tensors (lora_state_dict's keys) into the model's adapters; all are checked before any is
    written. Merged adapters are unmerged, loaded and merged again."""
    _check_lora_keys({k: tuple(t.shape) for k, t in lora_state_dict(model).items()}, sd)
    for name, m in lora_modules(model).items():
        was_merged = m.merged
        m.set_merged(False)
        m.lora_A.copy_(sd[f"{name}.lora_A"])
        m.lora_B.copy_(sd[f"{name}.lora_B"])
        m.set_merged(was_merged)


# ------------------------------------------------------------------------------------------ adapter files


def adapter_paths(path: StrPath) -> tuple[Path, Path]:
    """(tensors, config) files of an adapter named by either file, by their common stem, or by a directory
    that holds adapter.safetensors + adapter.json."""
    p = Path(path)
    if p.is_dir():
        p = p / "adapter"
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_adapter(path: StrPath, model: nn.Module, config: LoraConfig, base_checkpoint: str, base_sha256: str) -> None:
    """Write the model's A, B tensors (safetensors) and a JSON config naming the base checkpoint and its
    sha256 (see the module docstring), each atomically."""
    tensors = {k: t.contiguous().cpu() for k, t in lora_state_dict(model).items()}
    if not tensors:
        raise ValueError("the model has no LoRA adapters to save (rank 0 is full fine-tuning: save a checkpoint)")
    tensors_path, config_path = adapter_paths(path)
    tensors_path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(tensors_path) as tmp:
        save_file(tensors, tmp, metadata={"format": ADAPTER_FORMAT})
    model_config = getattr(model, "config", None)
    write_json(config_path, {
        "format": ADAPTER_FORMAT,
        "lora": config.to_dict(),
        "base_checkpoint": str(base_checkpoint),
        "base_sha256": base_sha256,
        "model_config": model_config.to_dict() if hasattr(model_config, "to_dict") else None,
        "tensors": tensors_path.name,
        "tensors_sha256": sha256_of(tensors_path),
    })


def _read_meta(config_path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"no LoRA adapter at {config_path} (save_adapter writes it)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read adapter config {config_path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{config_path} is not a LoRA adapter config of this project (format {ADAPTER_FORMAT!r})")
    return meta


def load_adapter(path: StrPath) -> tuple[LoraConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(config, tensors on the CPU, meta) of an adapter; meta is its JSON record (base_checkpoint,
    base_sha256, model_config, ...). One ValueError line for a missing, damaged or mismatched pair."""
    tensors_path, config_path = adapter_paths(path)
    meta = _read_meta(config_path)
    if not tensors_path.is_file():
        raise ValueError(f"LoRA adapter tensors {tensors_path} not found (named by {config_path})")
    if sha256_of(tensors_path) != meta.get("tensors_sha256"):
        raise ValueError(f"{tensors_path} is not the file {config_path} was saved with (sha256 differs)")
    try:
        config = LoraConfig.from_dict(meta.get("lora") or {})
        tensors = load_file(tensors_path)
    except (TypeError, ValueError, SafetensorError) as e:
        raise ValueError(f"cannot load LoRA adapter {tensors_path}: {e}") from None
    return config, tensors, meta


def _check_base(model: nn.Module, meta: dict[str, Any], where: Path, base_sha256: str | None) -> None:
    """One ValueError line when the adapter was made for another base (hash) or another shape of model."""
    if base_sha256 is not None and base_sha256 != meta.get("base_sha256"):
        raise ValueError(
            f"LoRA adapter {where} was trained on {meta.get('base_checkpoint')} (sha256 {str(meta.get('base_sha256'))[:12]}…), "
            f"not on this base (sha256 {base_sha256[:12]}…)"
        )
    want, have = meta.get("model_config"), getattr(model, "config", None)
    if isinstance(want, dict) and hasattr(have, "to_dict"):
        diff = [k for k, v in have.to_dict().items() if k in want and want[k] != v]
        if diff:
            k = diff[0]
            raise ValueError(f"LoRA adapter {where} is for a model with {k}={want[k]}, this one has {k}={have.to_dict()[k]}")


def attach_adapter(model: nn.Module, path: StrPath, base_sha256: str | None = None) -> tuple[LoraConfig, dict[str, Any]]:
    """Load an adapter onto `model` (apply_lora + load_lora_state_dict); (config, meta). With `base_sha256`
    (the loaded checkpoint's) a base other than the one the adapter was trained on is refused. Everything
    is checked before the model is touched: on an error it is left as it was."""
    config, tensors, meta = load_adapter(path)
    where = adapter_paths(path)[1]
    _check_base(model, meta, where, base_sha256)
    expected = {}
    for name, _, _, base in _targets_of(model, config.targets):
        expected[f"{name}.lora_A"] = (config.rank, base.in_features)
        expected[f"{name}.lora_B"] = (base.out_features, config.rank)
    try:
        _check_lora_keys(expected, tensors)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    apply_lora(model, config)
    load_lora_state_dict(model, tensors)
    return config, meta

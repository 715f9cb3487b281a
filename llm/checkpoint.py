"""Checkpoints: atomic save, safe (weights_only) load, RNG state, and run-directory helpers.

A checkpoint is one dict: {"model": state_dict, "optimizer": state_dict | None, "iteration": int, **extra}.
Everything in it is a type `torch.load(weights_only=True)` accepts (tensors, numbers, strings, None, lists,
tuples, dicts), so loading never runs pickled code. It is stored in one of two formats, chosen by the file
name: X.pt is the dict `torch.save`d; X.safetensors holds its tensors and X.json the rest
(llm.checkpoint_safetensors), no pickle at all. Both load into the same dict.

Run-directory layout: RUN_DIR/checkpoints/step_0000100.pt (one per save) and RUN_DIR/checkpoints/best.pt
(or .safetensors with their .json).
Writes go to a temporary file in the same directory, are fsynced, then renamed over the target with
os.replace, so a crash (even kill -9) at any moment leaves either the old file or the new one, never half.
An FSDP run writes sharded checkpoints instead: directories step_0000100.dcp/ (and best.dcp/), one DCP
shard per rank, complete when renamed into place, checked by their SHA256SUMS (llm.sharded_checkpoint);
they are listed, resumed, pruned and retired like the files, and `read_checkpoint` reads them whole.
Beside each checkpoint X.pt lies X.pt.sha256 (`sha256sum` format) with the digest of the bytes written;
every load by path verifies it, so a file damaged later on disk is refused instead of yielding NaN weights.
A safetensors checkpoint's JSON is written last and records the tensor file's sha256: a pair that does not
belong together (a crash between the writes) is refused too.
RUN_DIR/checkpoints/retired/<timestamp>/ holds what a rewind or a divergence set aside (moved, never deleted).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import time
import warnings
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save as safetensors_bytes
from torch import nn

from llm.bpe.tokenizer import BpeTokenizer
from llm.checkpoint_safetensors import SIDECAR_FORMAT, join_tensors, sidecar_path, split_tensors
from llm.config import ModelConfig
from llm.decoding import check_compatible
from llm.fileio import replacing, sha256_of
from llm.hardware import device_from_name
from llm.optim import is_dtensor, local
from llm.quant import (
    DEFAULT_GROUP_SIZE, QUANTIZE_CHOICES, check_record, empty_quantized, load_quantized_state, quantize_model,
)
from llm.sharded_checkpoint import ShardedCheckpointError, fsdp_module, is_sharded_checkpoint, verify_sharded
from llm.train_config import TrainConfig
from llm.transformer import Transformer

StrPath = str | os.PathLike[str]
CORE_KEYS = ("model", "optimizer", "iteration")
STEP_RE = re.compile(r"^step_(\d+)\.(?:pt|safetensors|dcp)$")  # a file, or a sharded checkpoint's directory
SIDECAR_RE = re.compile(r"^(?:step_\d+|best)\.json$")  # the JSON of a safetensors checkpoint
BEST_NAMES = ("best.pt", "best.safetensors", "best.dcp")
TMP_PREFIX = ".tmp-"  # temp files: .tmp-<target name>-<random>; never matched by STEP_RE
CHECKSUM_SUFFIX = ".sha256"  # X.pt -> X.pt.sha256
EXPLODED = 1e3  # max |weight| this many times its value at the start (or 1, if larger): a diverged model
RETIRED_DIR = "retired"  # checkpoints/retired/<timestamp>/: what an abandoned branch left, moved aside whole
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
DATA_PARALLEL = (nn.parallel.DistributedDataParallel, nn.DataParallel)
T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, unsafe, or not matching the model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint where one was asked for."""


# ---------------------------------------------------------------------------------------------- models


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers, in any nesting."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module) and isinstance(model, DATA_PARALLEL):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def strip_wrapper_prefixes(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop "module." / "_orig_mod." key prefixes that wrappers add, when every key carries them."""
    while state_dict:
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
                break
        else:
            return state_dict
    return state_dict


def _check_state_dict(src: object, state_dict: dict[str, Any], model: nn.Module) -> None:
    """One clear line naming missing/unexpected keys and shape mismatches (first few of each)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and isinstance(state_dict[k], torch.Tensor) and state_dict[k].shape != v.shape
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            problems.append(f"{label} {', '.join(items[:5])}{more}")
    if problems:
        raise CheckpointError(f"checkpoint {src} does not match the model: {'; '.join(problems)}")


# ---------------------------------------------------------------------------------------------- save/load


def _safe(obj: Any, where: str) -> Any:
    """A copy of `obj` made of weights_only-loadable types; numpy, Path and dataclasses are converted."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor, torch.dtype, torch.device)):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _safe(dataclasses.asdict(obj), where)
    if isinstance(obj, dict):
        return {k: _safe(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_safe(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise ValueError(
        f"cannot checkpoint {where}: type {type(obj).__name__} is not loadable with weights_only=True "
        "(use tensors, numbers, strings, lists, tuples or dicts)"
    )


def _fsync_dir(path: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[IO[bytes]], T], *, stale: Path | Iterable[Path] | None = None) -> T:
    """`write(f)` into a temp file in `path`'s directory, fsync, then os.replace over `path`
    (llm.fileio.replacing: readers see the old file or the new one, never part of one; any failure removes
    the temp file, and a full disk is one NoSpaceError line naming `path`). `stale` (files describing the
    old content, such as its checksum) is removed just before the swap, so it never vouches for the new
    file. Returns write's result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.urandom(4).hex()}")
    with replacing(path, tmp=tmp):
        with open(tmp, "xb") as f:  # a file object: torch chains the OSError it hit
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
        for p in [stale] if isinstance(stale, Path) else stale or ():
            p.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return result


class _HashingWriter:
    """A write-only file that hashes what passes through it: the digest of exactly the bytes written.
    It has no seek, so a writer that wanted to go back would fail loudly rather than leave a wrong digest."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.sha256 = f, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _save_hashed(obj: Any, f: IO[bytes]) -> str:
    writer = _HashingWriter(f)
    torch.save(obj, writer)
    return writer.sha256.hexdigest()


def checksum_path(path: StrPath) -> Path:
    """The checksum file of a checkpoint: X.pt -> X.pt.sha256."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def atomic_torch_save(obj: Any, path: StrPath) -> Path:
    """torch.save to a temp file in the target's directory, fsync, os.replace over the target; then its
    sha256 beside it, written the same way. A crash between the two leaves a checkpoint without a checksum
    (it loads, unverified, like one written before checksums existed), never one with a wrong checksum.
    sha256 runs at ~1.5 GB/s (SHA-NI, ARMv8 crypto), the pace of the write itself, and is computed on the
    bytes as they stream out, so the file is not read back."""
    path = Path(path)
    sidecar = checksum_path(path)
    digest = _atomic_write(path, functools.partial(_save_hashed, obj), stale=sidecar)
    _atomic_write(sidecar, lambda f: f.write(f"{digest}  {path.name}\n".encode()))
    return path


def is_safetensors(path: StrPath) -> bool:
    """Whether `path` names a checkpoint in the safetensors format (by its suffix)."""
    return Path(path).suffix == ".safetensors"


def companion_files(path: StrPath) -> list[Path]:
    """The files that belong to checkpoint `path`: its checksum, and a safetensors checkpoint's JSON."""
    return [checksum_path(path)] + ([sidecar_path(path)] if is_safetensors(path) else [])


def atomic_safetensors_save(payload: dict[str, Any], path: StrPath) -> Path:
    """A checkpoint dict as PATH (.safetensors: its tensors), PATH.sha256, and PATH's JSON (everything else),
    each written atomically and the JSON last: it records the tensor file's sha256, so it vouches only for the
    tensors written with it. The old checksum and JSON go just before the new tensors replace the old ones.
    The file's bytes are built in memory first (one copy of the tensors), so they are hashed as written."""
    path = Path(path)
    skeleton, tensors = split_tensors(payload)
    data = safetensors_bytes(tensors, metadata={"format": "pt"})
    digest = hashlib.sha256(data).hexdigest()
    _atomic_write(path, lambda f: f.write(data), stale=companion_files(path))
    _atomic_write(checksum_path(path), lambda f: f.write(f"{digest}  {path.name}\n".encode()))
    state = {"format": SIDECAR_FORMAT, "tensors": path.name, "tensors_sha256": digest, "checkpoint": skeleton}
    _atomic_write(sidecar_path(path), lambda f: f.write((json.dumps(state, indent=1) + "\n").encode()))
    return path


def save_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    iteration: int,
    out: StrPath | IO[bytes],
    *,
    extra: dict[str, Any] | None = None,
) -> None:
    """Save model weights (wrapper prefixes removed), optimizer state and iteration, plus `extra` keys.

    `out` is a path (written atomically; X.safetensors in the safetensors format, anything else with
    torch.save) or a binary file object (torch.save, written as is, CS336 style).
    """
    extra = extra or {}
    clash = [k for k in extra if k in CORE_KEYS]
    if clash:
        raise ValueError(f"extra keys {clash} clash with the checkpoint's own keys {list(CORE_KEYS)}")
    payload = {
        "model": strip_wrapper_prefixes(unwrap_model(model).state_dict()),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "iteration": int(iteration),
    }
    payload.update(_safe(extra, "extra"))
    payload["optimizer"] = _safe(payload["optimizer"], "optimizer state")
    if isinstance(out, (str, os.PathLike)):
        (atomic_safetensors_save if is_safetensors(out) else atomic_torch_save)(payload, out)
    else:
        torch.save(payload, out)


def _detail(e: BaseException) -> str:
    """The informative line of an exception message (torch.load's carry boilerplate around it)."""
    boilerplate = ("weights only load failed", "please file an issue", "check the documentation")
    for line in str(e).splitlines():
        line = line.replace("WeightsUnpickler error:", "").strip()
        if line and not line.lower().startswith(boilerplate):
            return line.split(" This is an internal miniz error")[0]  # the rest is torch's generic advice
    return type(e).__name__


def verify_checksum(path: StrPath) -> bool:
    """True when `path` matches its .sha256 file, False when it has none (written before checksums existed);
    CheckpointError naming the file when it does not match."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        try:
            verify_sharded(path)
        except ShardedCheckpointError as e:
            raise CheckpointError(str(e)) from None
        return True
    sidecar = checksum_path(path)
    try:
        recorded = sidecar.read_text().split()
    except FileNotFoundError:
        return False
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: cannot read its checksum file ({e})") from None
    if not recorded or not re.fullmatch(r"[0-9a-f]{64}", recorded[0]):
        raise CheckpointError(f"checkpoint {path} is corrupt: its checksum file {sidecar.name} holds no sha256")
    actual = sha256_of(path)
    if actual != recorded[0]:
        raise CheckpointError(f"checkpoint {path} is corrupt: checksum mismatch (sha256 {actual[:16]}..., "
                              f"{sidecar.name} says {recorded[0][:16]}...)")
    return True


def _torch_load(src: StrPath | IO[bytes]) -> Any:
    """torch.load(weights_only=True) onto the CPU; CheckpointError with one line for anything else."""
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols; we raise instead
            warnings.simplefilter("ignore")
            return torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" in str(e).lower():  # a class/function reference: code weights_only will not run
            raise CheckpointError(
                f"refusing to load {src}: it holds objects that weights_only loading does not allow ({_detail(e)})"
            ) from None
        raise CheckpointError(f"not a checkpoint or corrupted: {src} ({_detail(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, IndexError) as e:
        raise CheckpointError(f"not a checkpoint or corrupted: {src} ({_detail(e)})") from None


def _read_sidecar(path: Path) -> dict[str, Any]:
    """The JSON state of safetensors checkpoint `path`; CheckpointError when it is missing or unreadable."""
    sidecar = sidecar_path(path)
    try:
        state = json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: its state file {sidecar.name} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: cannot read {sidecar.name} ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("checkpoint"), dict):
        raise CheckpointError(f"checkpoint {path} is corrupt: {sidecar.name} holds no checkpoint state")
    return state


def _read_safetensors(path: Path, verified: bool) -> dict[str, Any]:
    """A safetensors checkpoint (tensors + JSON) as its dict. `verified`: its .sha256 matched (so the digest
    recorded there is the file's); the JSON must name that digest, else it belongs to other tensors."""
    state = _read_sidecar(path)
    digest = checksum_path(path).read_text().split()[0] if verified else sha256_of(path)
    if state.get("tensors_sha256") != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt: {sidecar_path(path).name} was written with other "
                              f"tensors (sha256 {str(state.get('tensors_sha256'))[:16]}..., file {digest[:16]}...)")
    try:
        tensors = load_safetensors(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"not a checkpoint or corrupted: {path} ({_detail(e)})") from None
    try:
        return join_tensors(state["checkpoint"], tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: {sidecar_path(path).name} names tensor {e} "
                              "that the file lacks") from None


def read_checkpoint(src: StrPath | IO[bytes]) -> dict[str, Any]:
    """Load a checkpoint dict onto the CPU (weights_only=True, or safetensors + JSON), after verifying its
    checksum (paths); one clear error if it is not one. A sharded checkpoint (DCP directory) is read whole."""
    if isinstance(src, (str, os.PathLike)) and is_sharded_checkpoint(src):
        try:
            return fsdp_module().read_sharded_full(Path(src))
        except ShardedCheckpointError as e:
            raise CheckpointError(str(e)) from None
    if isinstance(src, (str, os.PathLike)):
        if not Path(src).is_file():
            raise CheckpointNotFoundError(f"checkpoint not found: {src}")
        verified = verify_checksum(src)
        ckpt = _read_safetensors(Path(src), verified) if is_safetensors(src) else _torch_load(src)
    else:
        ckpt = _torch_load(src)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"not a checkpoint or corrupted: {src} (no 'model' entry)")
    return ckpt


def load_checkpoint(
    src: StrPath | IO[bytes], model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> int:
    """Restore model (and optimizer) state in place from `src`; return the saved iteration."""
    ckpt = read_checkpoint(src)
    target = unwrap_model(model)
    state_dict = strip_wrapper_prefixes(ckpt["model"])
    _check_state_dict(src, state_dict, target)
    target.load_state_dict(state_dict)
    if optimizer is not None:
        if ckpt.get("optimizer") is None:
            raise CheckpointError(f"checkpoint {src} holds no optimizer state")
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {src}: optimizer state does not fit: {e}") from None
    if "iteration" not in ckpt:
        raise CheckpointError(f"not a checkpoint or corrupted: {src} (no 'iteration' entry)")
    return int(ckpt["iteration"])


# ---------------------------------------------------------------------------------------------- health


@dataclasses.dataclass(frozen=True)
class Divergence:
    reason: str  # one line: what was seen
    weights_ruined: bool  # the weights themselves are bad (not just one step's gradient)


def max_abs_weight(params: Iterable[torch.Tensor]) -> float:
    """max |w| over all parameters, one fused pass and one host sync; NaN when any weight is NaN. Sharded
    (DTensor) parameters: the max over this rank's shards, then over the ranks (the same on every rank)."""
    params = list(params)
    groups = {p.device_mesh.get_group() for p in params if is_dtensor(p)}
    tensors = [t for t in (local(p.detach()) for p in params) if t.numel()]
    if not tensors and not groups:
        return 0.0
    norms = torch._foreach_norm(tensors, math.inf) if tensors else []
    device = tensors[0].device if tensors else local(params[0]).device
    top = torch.stack([n.float().to(device) for n in norms]).max() if norms else torch.zeros((), device=device)
    if groups:
        top = torch.nan_to_num(top, nan=math.inf)  # a NaN on any rank must win the MAX: as +inf it does
    for group in groups:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    return top.item()


@dataclasses.dataclass
class DivergenceCheck:
    """The tests a training state passes before it may be checkpointed, so that no checkpoint (and so no
    "last good checkpoint") is a diverged model. All cheap: host floats the loop has anyway, plus one
    max |w| pass per save."""

    vocab_size: int
    start_max: float  # max |weight| when this training process started (after init or resume)

    @classmethod
    def start(cls, params: Iterable[torch.Tensor], vocab_size: int) -> DivergenceCheck:
        return cls(vocab_size, max_abs_weight(params))

    def weights_problem(self, params: Iterable[torch.Tensor]) -> Divergence | None:
        """Non-finite weights, or weights grown EXPLODED times past where they started."""
        top = max_abs_weight(params)
        if not math.isfinite(top):
            return Divergence(f"non-finite weights (max |weight| {top})", True)
        base = self.start_max if math.isfinite(self.start_max) else 1.0
        if top > EXPLODED * max(base, 1.0):
            return Divergence(f"max |weight| {top:.3g} is over {EXPLODED:.0e} times the {base:.3g} it started at", True)
        return None

    def step_problem(self, loss: float, grad_norm: float, *, overflow_ok: bool) -> Divergence | None:
        """From one step's loss and pre-clip gradient norm (both computed on the weights before the update):
        a non-finite gradient norm (unless fp16 loss scaling will skip that step), or a model stuck at the
        uniform distribution: loss ln(vocab) with no gradient at all, which no later step can leave."""
        if not math.isfinite(grad_norm):
            return None if overflow_ok else Divergence(f"non-finite gradient norm ({grad_norm})", False)
        uniform = math.log(self.vocab_size)
        if grad_norm <= 1e-8 and abs(loss - uniform) < 1e-3:
            return Divergence(f"loss {loss:.4f} = ln(vocab {self.vocab_size}) with gradient norm {grad_norm:.3g}: "
                              "the model predicts the uniform distribution and no gradient reaches it", True)
        return None


# ---------------------------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG a training step may touch, in weights_only-safe types."""
    version, mt, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),  # uint32 → int64: torch.load handles it everywhere
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of capture_rng_state. CUDA states are restored for the devices both runs have."""
    try:
        py = state["python"]
        random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
        npy = state["numpy"]
        np.random.set_state(
            (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
        )
        torch.set_rng_state(state["torch"].cpu())
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"invalid RNG state in checkpoint: {type(e).__name__}: {e}") from None
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


# ---------------------------------------------------------------------------------------------- run dirs


def _checkpoint_dir(path: StrPath) -> Path:
    """RUN_DIR → RUN_DIR/checkpoints when that exists; a checkpoints dir → itself."""
    path = Path(path)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def _step_files(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_RE.match(p.name)) and p.exists()]
    return sorted(found)


def latest_checkpoint(directory: StrPath) -> Path | None:
    """Newest RUN_DIR/checkpoints/step_*.pt by step number (or in `directory` itself); None if there is none."""
    files = _step_files(_checkpoint_dir(directory))
    return files[-1][1] if files else None


def best_checkpoint(directory: Path) -> Path | None:
    """DIR/best.pt, best.safetensors or best.dcp (the newest when a run switched formats); None when none."""
    found = [directory / name for name in BEST_NAMES if (directory / name).exists()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def resolve_checkpoint(path: StrPath) -> Path:
    """A checkpoint file or sharded checkpoint → itself; a run or checkpoints dir → its best checkpoint
    (best.pt, best.safetensors or best.dcp) if present, else the newest step checkpoint."""
    path = Path(path)
    if path.is_file() or is_sharded_checkpoint(path):
        return path
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    directory = _checkpoint_dir(path)
    best = best_checkpoint(directory)
    if best is not None:
        return best
    latest = latest_checkpoint(directory)
    if latest is None:
        raise CheckpointNotFoundError(f"no checkpoint in {path} (looked for best.* and step_*.pt, .safetensors or "
                                      f".dcp in {directory})")
    return latest


def latest_intact_checkpoint(directory: StrPath) -> tuple[Path | None, list[str]]:
    """The newest step checkpoint that passes its checksum (or, without one, loads), and one line per newer
    one that did not. (None, lines) when none is intact; (None, []) when there is none at all."""
    skipped = []
    for _, path in reversed(_step_files(_checkpoint_dir(directory))):
        try:
            if not verify_checksum(path):
                read_checkpoint(path)  # no checksum: at least the file must load
            return path, skipped
        except CheckpointError as e:
            skipped.append(str(e))
    return None, skipped


def prune_checkpoints(directory: StrPath, keep_last: int, *, keep: Iterable[StrPath] = ()) -> list[Path]:
    """Delete all but the newest `keep_last` step_*.pt (.safetensors) files with their checksums and JSON
    (best.* and the paths in `keep` are always kept), checksum and JSON files whose checkpoint is gone, and
    temp files left by interrupted saves (call this from the one process that writes checkpoints). Returns
    the removed paths."""
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0, got {keep_last}")
    directory = _checkpoint_dir(directory)
    kept = {Path(p).resolve() for p in keep}
    files = _step_files(directory)
    doomed = [p for _, p in files[: max(len(files) - keep_last, 0)] if p.resolve() not in kept]
    doomed += [c for p in doomed for c in companion_files(p) if c.is_file()]
    if directory.is_dir():
        for p in directory.iterdir():
            orphan = p.name.endswith(CHECKSUM_SUFFIX) and not p.with_name(p.name[: -len(CHECKSUM_SUFFIX)]).exists()
            orphan |= bool(SIDECAR_RE.match(p.name)) and not p.with_suffix(".safetensors").exists()
            if (p.name.startswith(TMP_PREFIX) or orphan) and p not in doomed:
                doomed.append(p)  # a temp file, or the temp directory of a killed sharded save
    for p in doomed:
        remove_checkpoint(p)
    return doomed


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint file or a sharded checkpoint's directory (gone already: nothing to do)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def checkpoint_step(path: StrPath) -> int | None:
    """The iteration a checkpoint was saved at, read without loading its tensors (mmap, the JSON of a
    safetensors checkpoint, or a sharded checkpoint's meta.pt); None if unreadable."""
    if Path(path).is_dir():  # a sharded checkpoint: its meta.pt holds the iteration
        path = Path(path) / "meta.pt"
    try:
        if is_safetensors(path):
            return int(_read_sidecar(Path(path))["checkpoint"]["iteration"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(ckpt["iteration"])
    except Exception:  # any damage means "not known to belong to the kept history"; torch raises many types
        return None


def split_jsonl_by_step(path: Path, step: int) -> tuple[list[str], list[str]]:
    """The lines of a JSON-lines log (metrics.jsonl) whose record's "step" is at most `step`, and those
    beyond it; lines that are not such records (a torn last line) are in neither."""
    upto: list[str] = []
    after: list[str] = []
    if not path.is_file():
        return upto, after
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step", 0), int):
            (after if rec.get("step", 0) > step else upto).append(line)
    return upto, after


def _new_retired_dir(directory: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        dest = directory / RETIRED_DIR / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            dest.mkdir(parents=True)
            return dest
        except FileExistsError:
            continue
    raise CheckpointError(f"cannot make a new folder in {directory / RETIRED_DIR}: 999 exist for {stamp}")


def retire_checkpoints(directory: StrPath, after_step: int, *, metrics: StrPath | None = None
                       ) -> tuple[Path | None, list[str]]:
    """Move what lies beyond `after_step` out of the way, deleting nothing: step files with a larger step,
    best.pt (.safetensors) when saved after that step (or unreadable), each with its checksum (and JSON), into
    DIR/retired/<timestamp>/, and copy there (as metrics.jsonl) the records of `metrics` after that step
    (the live log is trimmed by its writer). Returns (that folder, one label per thing retired), or
    (None, []) when nothing lay beyond `after_step`."""
    directory = _checkpoint_dir(directory)
    later = [(p, p.name) for s, p in _step_files(directory) if s > after_step]
    for best in (directory / name for name in BEST_NAMES):
        step = checkpoint_step(best) if best.exists() else after_step
        if step is None or step > after_step:
            later.append((best, f"{best.name} (step {step})" if step is not None else f"{best.name} (unreadable)"))
    tail = split_jsonl_by_step(Path(metrics), after_step)[1] if metrics is not None else []
    if not later and not tail:
        return None, []
    dest = _new_retired_dir(directory)
    for p, _ in later:
        os.replace(p, dest / p.name)
        for c in companion_files(p):
            if c.is_file():
                os.replace(c, dest / c.name)
    if tail:
        _atomic_write(dest / "metrics.jsonl", lambda f: f.write("".join(t + "\n" for t in tail).encode()))
    _fsync_dir(directory)
    _fsync_dir(dest)
    return dest, [label for _, label in later] + ([f"{len(tail)} metrics records"] if tail else [])


# ------------------------------------------------------------------------------ loading for generation


def _load_weights(model: Transformer, ckpt: dict[str, Any], path: Path, quantize: str | None) -> None:
    """Load ckpt's weights into `model`: a quantized checkpoint (a "quantization" record, llm.quantize)
    into QuantLinears of its bit width; a float one as is, then quantized when `quantize` names a format."""
    state_dict = strip_wrapper_prefixes(dict(ckpt["model"]))
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    if "quantization" in ckpt:
        bits, group_size = check_record(ckpt["quantization"], path)
        if quantize is not None and QUANTIZE_CHOICES[quantize] != bits:
            raise ValueError(f"{path} is quantized to int{bits}; it cannot be loaded as {quantize}")
        load_quantized_state(empty_quantized(model, bits, group_size), state_dict, path)
        return
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise ValueError(f"{path}: weights do not match its model_config ({first})") from None
    if quantize is not None:
        quantize_model(model, QUANTIZE_CHOICES[quantize], DEFAULT_GROUP_SIZE)


def load_model(checkpoint: StrPath, *, device: str | torch.device | None = None,
               tokenizer_dir: StrPath | None = None, quantize: str | None = None,
               ) -> tuple[Transformer, BpeTokenizer, Path]:
    """(model, tokenizer, checkpoint path) from a checkpoint file or a run directory; ValueError with one
    clear line for anything missing or inconsistent. What generation and evaluation load. `quantize`
    ("int8" | "int4") quantizes a float checkpoint's block linears on load (llm.quant)."""
    src = Path(checkpoint)
    if not src.exists():
        raise ValueError(f"checkpoint not found: {src}")
    try:
        path = Path(resolve_checkpoint(src))
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(str(e).splitlines()[0] if str(e) else f"no checkpoint in {src}") from None
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as e:  # already one line naming the file
        raise ValueError(str(e)) from None
    except Exception as e:  # a truncated/foreign file: torch raises many types
        raise ValueError(f"cannot read checkpoint {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"{path} is not a model checkpoint of this project (needs 'model' and 'model_config')")
    try:
        cfg = ModelConfig.from_dict(dict(ckpt["model_config"]))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: incompatible model_config: {e}") from None
    model = Transformer.from_config(cfg, device=device_from_name(None if device is None else str(device)))
    _load_weights(model, ckpt, path, quantize)
    model.eval()
    tok_dir = find_tokenizer_dir(tokenizer_dir or ckpt.get("tokenizer_dir"), path)
    try:
        tokenizer = BpeTokenizer.load(tok_dir)
    except Exception as e:
        raise ValueError(f"cannot load tokenizer from {tok_dir}: {e}") from None
    check_compatible(model, tokenizer)
    return model, tokenizer, path


def checkpoint_or_default_run(checkpoint: StrPath | None) -> Path:
    """What a command loads: `checkpoint` as given, or else the default training run (TrainConfig.out_dir,
    runs/demo), with a one-line hint when that run has no checkpoint yet."""
    if checkpoint is not None:
        return Path(checkpoint)
    run = Path(TrainConfig.out_dir)
    try:
        resolve_checkpoint(run)
    except CheckpointNotFoundError:
        raise ValueError(f"no trained model in {run} yet: run uv run -m llm.training first") from None
    return run


def find_tokenizer_dir(given: StrPath | None, ckpt_path: Path) -> Path:
    if given is None:
        raise ValueError(f"{ckpt_path} records no tokenizer_dir; pass --tokenizer-dir DIR")
    given = Path(given)
    # relative paths were written relative to the project root at training time; also try the run dir
    candidates = [given] if given.is_absolute() else [given, *(p / given for p in ckpt_path.parents)]
    for c in candidates:
        if (c / "vocab.json").exists():
            return c
    raise ValueError(f"tokenizer directory {given} not found (needs vocab.json + merges.txt); pass --tokenizer-dir DIR")

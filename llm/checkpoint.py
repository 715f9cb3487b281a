"""Checkpoints: atomic save, safe (weights_only) load, RNG state, and run-directory helpers.

A checkpoint is one `torch.save`d dict: {"model": state_dict, "optimizer": state_dict | None,
"iteration": int, **extra}. Everything in it is a type `torch.load(weights_only=True)` accepts
(tensors, numbers, strings, None, lists, tuples, dicts), so loading never runs pickled code.

Run-directory layout: RUN_DIR/checkpoints/step_0000100.pt (one per save) and RUN_DIR/checkpoints/best.pt.
Writes go to a temporary file in the same directory, are fsynced, then renamed over the target with
os.replace, so a crash (even kill -9) at any moment leaves either the old file or the new one, never half.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import random
import re
import warnings
import zipfile
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import nn

from llm.fileio import replacing

StrPath = str | os.PathLike[str]
CORE_KEYS = ("model", "optimizer", "iteration")
STEP_RE = re.compile(r"^step_(\d+)\.pt$")
TMP_PREFIX = ".tmp-"  # temp files: .tmp-<target name>-<random>; never matched by STEP_RE
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
DATA_PARALLEL = (nn.parallel.DistributedDataParallel, nn.DataParallel)


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


def atomic_torch_save(obj: Any, path: StrPath) -> Path:
    """torch.save to a temp file in the target's directory, fsync, then os.replace over the target.
    Any failure removes the temp file; a full disk raises llm.fileio.NoSpaceError naming `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.urandom(4).hex()}")
    with replacing(path, tmp=tmp), open(tmp, "xb") as f:  # a file object: torch chains the OSError it hit
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(path.parent)
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

    `out` is a path (written atomically) or a binary file object (written as is, CS336 style).
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
        atomic_torch_save(payload, out)
    else:
        torch.save(payload, out)


def _detail(e: BaseException) -> str:
    """The informative line of an exception message (torch.load's carry boilerplate around it)."""
    boilerplate = ("weights only load failed", "please file an issue", "check the documentation")
    for line in str(e).splitlines():
        line = line.replace("WeightsUnpickler error:", "").strip()
        if line and not line.lower().startswith(boilerplate):
            return line
    return type(e).__name__


def read_checkpoint(src: StrPath | IO[bytes]) -> dict[str, Any]:
    """Load a checkpoint dict onto the CPU with weights_only=True; one clear error if it is not one."""
    if isinstance(src, (str, os.PathLike)) and not Path(src).is_file():
        raise CheckpointNotFoundError(f"checkpoint not found: {src}")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols; we raise instead
            warnings.simplefilter("ignore")
            ckpt = torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" in str(e).lower():  # a class/function reference: code weights_only will not run
            raise CheckpointError(
                f"refusing to load {src}: it holds objects that weights_only loading does not allow ({_detail(e)})"
            ) from None
        raise CheckpointError(f"not a checkpoint or corrupted: {src} ({_detail(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, IndexError) as e:
        raise CheckpointError(f"not a checkpoint or corrupted: {src} ({_detail(e)})") from None
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
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_RE.match(p.name)) and p.is_file()]
    return sorted(found)


def latest_checkpoint(directory: StrPath) -> Path | None:
    """Newest RUN_DIR/checkpoints/step_*.pt by step number (or in `directory` itself); None if there is none."""
    files = _step_files(_checkpoint_dir(directory))
    return files[-1][1] if files else None


def resolve_checkpoint(path: StrPath) -> Path:
    """A checkpoint file → itself; a run or checkpoints dir → its best.pt if present, else the newest step file."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    directory = _checkpoint_dir(path)
    if (directory / "best.pt").is_file():
        return directory / "best.pt"
    latest = latest_checkpoint(directory)
    if latest is None:
        raise CheckpointNotFoundError(f"no checkpoint in {path} (looked for best.pt and step_*.pt in {directory})")
    return latest


def prune_checkpoints(directory: StrPath, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` step_*.pt files (best.pt is always kept), and temp files left by
    interrupted saves (call this from the one process that writes checkpoints). Returns the removed paths."""
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0, got {keep_last}")
    directory = _checkpoint_dir(directory)
    files = _step_files(directory)
    doomed = [p for _, p in files[: max(len(files) - keep_last, 0)]]
    if directory.is_dir():
        doomed += [p for p in directory.iterdir() if p.name.startswith(TMP_PREFIX) and p.is_file()]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed

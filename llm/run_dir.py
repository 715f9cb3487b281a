"""A training run's directory and its bookkeeping:

    RUN_DIR/.lock                   held by rank 0 for the whole run (a second run there stops with one line)
    RUN_DIR/config.json             the effective TrainConfig
    RUN_DIR/metrics.jsonl           llm.metrics.MetricsLog
    RUN_DIR/checkpoints/step_NNNNNNN.pt, best.pt     (+ .sha256 each; llm.checkpoint writes them atomically)
                                    or .safetensors (+ .sha256 and .json) with --checkpoint-format safetensors
    RUN_DIR/checkpoints/retired/<timestamp>/         what a rewind or a divergence moved aside (never deleted)

Which checkpoint a --resume means, what a fresh start may replace, which files a rewind retires, and the
one-line message of a diverged run all live here; the file formats live in llm.checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from llm.checkpoint import (
    Divergence,
    capture_rng_state,
    companion_files,
    latest_checkpoint,
    latest_intact_checkpoint,
    prune_checkpoints,
    remove_checkpoint,
    retire_checkpoints,
    save_checkpoint,
)
from llm.data import DirLockBusy, _dir_lock
from llm.distributed import DistInfo, barrier, broadcast_from_main
from llm.fileio import write_text
from llm.sharded_checkpoint import DCP_SUFFIX, fsdp_module
from llm.train_config import TrainConfig


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def step_checkpoint_path(out_dir: str | Path, step: int, fmt: str = "pt") -> Path:
    """RUN_DIR/checkpoints/step_NNNNNNN.<fmt> (fmt "pt" or "safetensors": the file's format)."""
    return checkpoint_dir(out_dir) / f"step_{step:07d}.{fmt}"


def find_latest_checkpoint(out_dir: str | Path) -> Path | None:
    """Newest step checkpoint of a run directory (not best.pt: resuming continues the latest state)."""
    d = checkpoint_dir(out_dir)
    return latest_checkpoint(d) if d.is_dir() else None


def resolve_resume(resume: str, out_dir: str, say: Callable[[str], None] | None = None) -> Path | None:
    """--resume auto -> newest intact checkpoint in out_dir (None: start fresh); a run dir -> its newest intact
    one; a file -> it. `say` gets one line when damaged newer checkpoints were passed over."""
    if resume == "auto":
        return _newest_intact(Path(out_dir), resume, say)
    p = Path(resume)
    if p.is_dir():
        found = _newest_intact(p, resume, say)
        if found is None:
            raise ValueError(f"--resume {resume}: no checkpoints/step_*.pt in that directory")
        return found
    if not p.is_file():
        raise ValueError(f"--resume {resume}: no such checkpoint file or run directory")
    return p


def _newest_intact(run_dir: Path, resume: str, say: Callable[[str], None] | None) -> Path | None:
    """The newest step checkpoint of run_dir that is intact (checksum, or loads); a damaged newer one is
    passed over with one line saying which was used; ValueError when none is intact."""
    d = checkpoint_dir(run_dir)
    found, skipped = latest_intact_checkpoint(d) if d.is_dir() else (None, [])
    if found is None and skipped:
        raise ValueError(f"--resume {resume}: no intact checkpoint in {d}: {'; '.join(skipped)}")
    if skipped and say is not None:
        say(f"--resume {resume}: {'; '.join(skipped)}; resuming from {found}")
    return found


def earlier_run(out_dir: str, ckpt_path: Path | None, overwrite: bool) -> Path | None:
    """The newest checkpoint of an earlier run that a fresh start (no `ckpt_path`) would replace; a fresh
    start would interleave its step files with the old run's (and prune the wrong ones), so without
    `overwrite` that is an error."""
    old = find_latest_checkpoint(out_dir)
    if ckpt_path is None and old is not None and not overwrite:
        raise ValueError(
            f"{out_dir} already holds a run (checkpoint {old.name}): continue it with --resume auto, "
            f"start over with --overwrite, or choose another --out-dir"
        )
    return old if ckpt_path is None else None


def clear_earlier_run(out_dir: str, info: DistInfo, log: Callable[[str], None]) -> None:
    """--overwrite, once the new run's inputs checked out: rank 0 removes the earlier run's checkpoints."""
    if info.is_main:
        log(f"--overwrite: removing the earlier run's checkpoints in {checkpoint_dir(out_dir)}")
        d = checkpoint_dir(out_dir)
        for p in [*d.glob("*.pt"), *d.glob("*.safetensors"), *d.glob("*.dcp")]:
            for f in (p, *companion_files(p)):
                remove_checkpoint(f)
    barrier(info)


def open_run_dir(cfg: TrainConfig, resumed_at: int | None, log: Callable[[str], None]) -> None:
    """Rank 0, before the first step: RUN_DIR/config.json, the checkpoints folder, and on a resume at step
    `resumed_at` the retiring of what came after it. Resuming continues one history: later checkpoints (and a
    best.pt from after that step) would be picked by the next --resume auto and pruned against the new ones,
    and later metrics records would interleave with the redone steps."""
    run_dir = Path(cfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.json", cfg.to_json() + "\n")
    checkpoint_dir(run_dir).mkdir(parents=True, exist_ok=True)
    if resumed_at is None:
        return
    dest, moved = retire_checkpoints(checkpoint_dir(run_dir), resumed_at, metrics=run_dir / "metrics.jsonl")
    if dest is not None:
        log(f"resuming at step {resumed_at}: moved what came after it ({', '.join(moved)}) to {dest} "
            "(retired, not deleted)")


def divergence_message(out_dir: str, info: DistInfo, step: int, problem: Divergence, last_ckpt: Path | None, *,
                       ruined_from: int | None = None) -> str:
    """The one line for a run that diverged at `step`. When the weights are ruined from step `ruined_from`
    (default: `step`) on, rank 0 first moves checkpoints saved from them to checkpoints/retired/, so neither
    this message nor the next --resume auto offers one as healthy."""
    moved = ""
    if problem.weights_ruined and info.is_main:
        dest, names = retire_checkpoints(checkpoint_dir(out_dir), (step if ruined_from is None else ruined_from) - 1)
        if dest is not None:
            moved = f"; moved {', '.join(names)} (saved from those weights) to {dest}"
        if last_ckpt is not None and not last_ckpt.exists():
            last_ckpt = find_latest_checkpoint(out_dir)
    return (f"training diverged at step {step} ({problem.reason}); stopped without saving{moved}; "
            f"last healthy checkpoint: {last_ckpt or 'none'} (try a lower --lr or --grad-clip)")


def save_run_checkpoint(cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler, step: int, *, best: bool, best_val: float, elapsed: float,
                        tokenizer_dir: str | None, last_ckpt: Path | None, info: DistInfo | None = None) -> Path:
    """Rank 0 writes step_N.pt (or best.pt) atomically with all a bit-exact resume needs; older step files
    beyond keep_last are pruned, but never `last_ckpt`, the newest one a later step's loss has shown healthy.
    An fsdp run writes step_N.dcp (best.dcp) instead, every rank its shard: all ranks call this then."""
    extra = {
        "model_config": cfg.model.to_dict(), "train_config": cfg.to_dict(), "tokenizer_dir": tokenizer_dir,
        "rng": capture_rng_state(), "sampler": {"kind": "stateless", "seed": cfg.seed, "next_step": step},
        "best_val": best_val, "elapsed": elapsed,
    }
    if scaler.is_enabled():
        extra["scaler"] = scaler.state_dict()
    fmt = cfg.checkpoint_format
    path = checkpoint_dir(cfg.out_dir) / f"best.{fmt}" if best else step_checkpoint_path(cfg.out_dir, step, fmt)
    info = info or DistInfo()
    if cfg.parallel == "fsdp":
        path = fsdp_module().save_sharded(path.with_suffix(DCP_SUFFIX), model, optimizer, step, extra, info)
    else:
        save_checkpoint(model, optimizer, step, path, extra=extra)
    if info.is_main:  # a run that switched --parallel or --checkpoint-format: the other formats' twins are older
        for suffix in {".pt", ".safetensors", DCP_SUFFIX} - {path.suffix}:
            twin = path.with_suffix(suffix)
            for f in (twin, *companion_files(twin)):
                remove_checkpoint(f)
    if not best and info.is_main:
        prune_checkpoints(checkpoint_dir(cfg.out_dir), max(1, cfg.keep_last), keep=[last_ckpt] if last_ckpt else [])
    return path


@contextlib.contextmanager
def run_dir_lock(out_dir: str, info: DistInfo) -> Iterator[None]:
    """Rank 0 holds RUN_DIR/.lock for the whole run, so a second run in the same out_dir stops with one line
    instead of interleaving checkpoints and metrics; the other ranks learn the outcome from rank 0."""
    with contextlib.ExitStack() as stack:
        error = None
        if info.is_main:
            try:
                stack.enter_context(_dir_lock(Path(out_dir), wait=False))
            except DirLockBusy as e:
                error = f"{e}: wait for it to finish or choose another --out-dir"
        error = broadcast_from_main(error, info)
        if error is not None:
            raise ValueError(error)
        yield

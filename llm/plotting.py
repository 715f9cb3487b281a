"""Plots of a training run from its RUN_DIR/metrics.jsonl: loss.png (train/val vs step and vs wall time), lr.png.

matplotlib is a dependency of the package; in an environment installed without it we say so and carry on,
because a missing plot must never cost a finished training run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from llm.fileio import replacing

INSTALL_HINT = "matplotlib is not installed, so no plots were drawn: run `uv sync --extra plot` to get loss.png and lr.png"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of RUN_DIR/metrics.jsonl (a torn last line from a killed run is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist: is {str(run_dir)!r} a training run directory?")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _import_pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on servers
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig, paths: list[Path]) -> None:
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        # atomic: a reader never sees half a png; the temp ends in .png because savefig picks the format from it
        with replacing(p, tmp=p.with_name(f".{p.name}.tmp{os.getpid()}.png")) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")


def plot_run(run_dir: str | Path, img_dir: str | Path | None = None, *, unigram_entropy: float | None = None,
             quiet: bool = False) -> list[Path]:
    """Write loss.png and lr.png into `run_dir` (and `img_dir` if given); `unigram_entropy` (nats) adds the
    corpus' context-free baseline as a dashed line. Returns the files written; [] (with a hint on stderr)
    when matplotlib is missing."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    plt = _import_pyplot()
    if plt is None:
        if not quiet:
            print(INSTALL_HINT, file=sys.stderr, flush=True)
        return []
    train = [r for r in records if r.get("type") == "train"]
    val = [r for r in records if r.get("type") == "eval"]
    title = run_dir.name
    dirs = [run_dir] + ([Path(img_dir)] if img_dir is not None else [])
    written: list[Path] = []

    fig, (ax_step, ax_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, label in ((ax_step, "step", "step"), (ax_time, "time", "wall time (min)")):
        scale = 1 / 60 if key == "time" else 1
        if train:
            ax.plot([r[key] * scale for r in train], [r["loss"] for r in train], label="train", lw=1.2)
        if val:
            ax.plot([r[key] * scale for r in val], [r["val_loss"] for r in val], "o-", label="validation", ms=3)
        if unigram_entropy is not None:  # what a model that ignores context would score
            ax.axhline(unigram_entropy, color="gray", ls="--", lw=1, label="unigram entropy of the corpus")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    ax_step.set_ylabel("cross-entropy loss (nats/token)")
    ax_step.legend()
    fig.suptitle(f"loss: {title}")
    paths = [d / "loss.png" for d in dirs]
    _save(fig, paths)
    written += paths
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    ax.set_title(f"learning rate: {title}")
    paths = [d / "lr.png" for d in dirs]
    _save(fig, paths)
    written += paths
    plt.close(fig)
    return written

"""What a training run reports: progress lines on stderr and RUN_DIR/metrics.jsonl (one JSON object per
line, flushed, so `llm.training plot` can follow a live run), with tokens/s measured over training steps only."""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from llm.checkpoint import split_jsonl_by_step
from llm.fileio import space_errors, write_text


def log(msg: str) -> None:
    """One progress or status line on stderr (stdout is left to the results: final loss, sample)."""
    print(msg, file=sys.stderr, flush=True)


def quiet_log(msg: str) -> None:
    """`log` for a run asked to be quiet, and for every rank but 0."""


def fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class MetricsLog:
    """RUN_DIR/metrics.jsonl, one JSON object per line, flushed so `plot` can follow a live run."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            # Drop records beyond the checkpoint (the run died after logging them): they are about to be redone.
            keep, _ = split_jsonl_by_step(path, resume_step)
            write_text(path, "".join(k + "\n" for k in keep))
        self._f = path.open("a")

    def write(self, record: dict) -> None:
        if self.enabled:
            with space_errors(self.path):
                self._f.write(json.dumps(record) + "\n")
                self._f.flush()

    def close(self) -> None:
        if self.enabled:
            self._f.close()


@dataclass
class Throughput:
    """Steps since the last progress line and the time they took, eval and checkpoint time left out."""

    t0: float = field(default_factory=time.perf_counter)
    steps: int = 0

    def tokens_per_s(self, tokens_per_step: int, now: float) -> float:
        return self.steps * tokens_per_step / max(now - self.t0, 1e-9)

    def restart(self) -> None:
        self.t0, self.steps = time.perf_counter(), 0

    def leave_out(self, seconds: float) -> None:
        """Time spent outside training steps (eval, checkpoints) does not count against tokens/s."""
        self.t0 += seconds

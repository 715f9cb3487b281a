"""Checkpoints: exact resume, atomic writes (even under kill -9), RNG round trip, run-dir helpers, safety.

The reference for "resume" is the uninterrupted run itself, computed live in the same test: every loss
and parameter after resuming must be bit-identical to it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from llm.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    DivergenceCheck,
    capture_rng_state,
    checksum_path,
    latest_checkpoint,
    latest_intact_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    read_checkpoint,
    resolve_checkpoint,
    restore_rng_state,
    retire_checkpoints,
    save_checkpoint,
)
from llm.optim import AdamW, cos_lr_scheduler, gradient_clip
from tests.corrupt import scribble_tensor_bytes, truncate


class Tiny(nn.Module):
    """Two parameters: enough to exercise state dicts without depending on the real model."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) * 0.3)
        self.b = nn.Parameter(torch.zeros(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w.T + self.b)


class CompiledLike(nn.Module):
    """Stands in for torch.compile's OptimizedModule: the real module under `_orig_mod`."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._orig_mod = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._orig_mod(x)


def _train(model: nn.Module, opt: torch.optim.Optimizer, start: int, stop: int) -> list[float]:
    """A loop that draws from every RNG the checkpoint must restore (torch, numpy, python)."""
    losses = []
    for it in range(start, stop):
        x = torch.randn(4, 6) + float(np.random.rand()) + random.random()
        loss = ((model(x) - 0.5) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gradient_clip(model.parameters(), 0.5)
        for g in opt.param_groups:
            g["lr"] = cos_lr_scheduler(it, 1e-2, 1e-3, 3, 15)
        opt.step()
        losses.append(loss.item())
    return losses


def _seed(s: int) -> None:
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


@pytest.mark.parametrize("wrap", ["plain", "data_parallel", "compiled"])
def test_save_load_continues_identically(tmp_path: Path, wrap: str) -> None:
    def make() -> tuple[nn.Module, nn.Module, AdamW]:
        torch.manual_seed(0)
        inner = Tiny()
        outer = {"plain": inner, "data_parallel": nn.DataParallel(inner), "compiled": CompiledLike(inner)}[wrap]
        return inner, outer, AdamW(outer.parameters(), lr=1e-2, weight_decay=0.1)

    _, model, opt = make()
    _seed(1)
    full = _train(model, opt, 0, 20)
    final = {k: v.clone() for k, v in model.state_dict().items()}

    _, model, opt = make()
    _seed(1)
    first = _train(model, opt, 0, 10)
    path = tmp_path / "run" / "checkpoints" / "step_0000010.pt"
    save_checkpoint(model, opt, 10, path, extra={"rng": capture_rng_state(), "note": Path("x")})
    saved = read_checkpoint(path)
    assert set(saved["model"]) == {"w", "b"}  # wrapper prefixes never reach the file
    assert saved["iteration"] == 10 and saved["note"] == "x"

    _seed(12345)  # scramble every RNG: resume must not depend on the process's state
    _, model2, opt2 = make()
    step = load_checkpoint(path, model2, opt2)
    restore_rng_state(read_checkpoint(path)["rng"])
    rest = _train(model2, opt2, step, 20)
    assert first + rest == full  # bit-identical losses
    for k, v in model2.state_dict().items():
        assert torch.equal(v, final[k]), k


def test_loads_state_dicts_saved_with_wrapper_prefixes(tmp_path: Path) -> None:
    model = Tiny()
    for prefix in ("module.", "_orig_mod.", "module._orig_mod."):
        torch.save({"model": {prefix + k: v for k, v in model.state_dict().items()}, "iteration": 3}, tmp_path / "c.pt")
        fresh = Tiny()
        assert load_checkpoint(tmp_path / "c.pt", fresh) == 3
        assert torch.equal(fresh.w, model.w)


def test_file_like_out_and_src() -> None:
    model, buf = Tiny(), io.BytesIO()
    save_checkpoint(model, None, 7, buf)
    buf.seek(0)
    fresh = Tiny()
    assert load_checkpoint(buf, fresh) == 7 and torch.equal(fresh.w, model.w)


def test_crash_mid_write_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "best.pt"
    model = Tiny()
    save_checkpoint(model, None, 1, path)
    before = path.read_bytes()

    def dies_halfway(obj, f, *a, **k):  # writes a partial file, then the "process" dies
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(Tiny(), None, 2, path)
    assert path.read_bytes() == before and read_checkpoint(path)["iteration"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "best.pt.sha256"]  # no temp file left behind


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_kill_9_during_save_never_leaves_partial_latest(tmp_path: Path) -> None:
    """A real SIGKILL, in a forked child, after the new data is written but before the rename."""
    ckpts = tmp_path / "checkpoints"
    save_checkpoint(Tiny(), None, 1, ckpts / "step_0000001.pt")
    model = Tiny()  # built before the fork: the child only saves
    pid = os.fork()
    if pid == 0:  # child: die the hard way right before os.replace; never return into pytest
        try:
            os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
            save_checkpoint(model, None, 2, ckpts / "step_0000002.pt")
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    leftovers = [p for p in ckpts.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0, "the child died with its temp file written"
    assert latest_checkpoint(tmp_path) == ckpts / "step_0000001.pt"
    assert read_checkpoint(latest_checkpoint(tmp_path))["iteration"] == 1
    assert prune_checkpoints(tmp_path, keep_last=5) == leftovers  # stale temp files are cleaned up
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000001.pt", "step_0000001.pt.sha256"]


def test_rng_round_trip_is_weights_only_safe(tmp_path: Path) -> None:
    random.gauss(0, 1)  # leave a cached gaussian in python's and numpy's state
    np.random.standard_normal()
    state = capture_rng_state()
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3), np.random.standard_normal(), torch.rand(3))
    torch.save(state, tmp_path / "rng.pt")
    _seed(999)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), random.gauss(0, 1), np.random.rand(3), np.random.standard_normal(), torch.rand(3))
    assert got[:2] == expected[:2] and np.array_equal(got[2], expected[2]) and got[3] == expected[3]
    assert torch.equal(got[4], expected[4])
    with pytest.raises(CheckpointError, match="RNG"):
        restore_rng_state({"python": {}})


def _touch_steps(d: Path, steps: list[int]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for s in steps:
        (d / f"step_{s:07d}.pt").write_bytes(b"x")


def test_latest_resolve_prune(tmp_path: Path) -> None:
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    assert latest_checkpoint(run) is None
    with pytest.raises(CheckpointNotFoundError, match="not found"):
        resolve_checkpoint(run)
    run.mkdir()
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint in"):
        resolve_checkpoint(run)
    _touch_steps(ckpts, [9, 100, 20, 1000])
    (ckpts / "step_notanumber.pt").write_bytes(b"x")
    assert latest_checkpoint(run) == ckpts / "step_0001000.pt"  # by number, not by name or mtime
    assert latest_checkpoint(ckpts) == ckpts / "step_0001000.pt"
    assert resolve_checkpoint(run) == ckpts / "step_0001000.pt"
    (ckpts / "best.pt").write_bytes(b"x")
    assert resolve_checkpoint(run) == resolve_checkpoint(ckpts) == ckpts / "best.pt"
    assert resolve_checkpoint(ckpts / "step_0000020.pt") == ckpts / "step_0000020.pt"
    removed = prune_checkpoints(run, keep_last=2)
    assert sorted(p.name for p in removed) == ["step_0000009.pt", "step_0000020.pt"]
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.pt", "step_0000100.pt", "step_0001000.pt",
                                                       "step_notanumber.pt"]
    prune_checkpoints(run, keep_last=0)
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.pt", "step_notanumber.pt"]
    with pytest.raises(ValueError, match="keep_last"):
        prune_checkpoints(run, keep_last=-1)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_refuses_pickled_objects(tmp_path: Path) -> None:
    torch.save({"model": {}, "iteration": 1, "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refusing to load"):
        read_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"extra\['cfg'\].*weights_only"):
        save_checkpoint(Tiny(), None, 1, tmp_path / "x.pt", extra={"cfg": object()})
    assert not (tmp_path / "x.pt").exists()
    with pytest.raises(ValueError, match="clash"):
        save_checkpoint(Tiny(), None, 1, tmp_path / "x.pt", extra={"iteration": 3})


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt", Tiny())
    good = tmp_path / "good.pt"
    save_checkpoint(Tiny(), AdamW(Tiny().parameters()), 5, good)
    blob = good.read_bytes()
    cases = {"truncated.pt": blob[: len(blob) // 2], "empty.pt": b"", "noise.pt": os.urandom(300),
             "pickle.pt": pickle.dumps([1, 2, 3])}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match="not a checkpoint or corrupted") as e:
            read_checkpoint(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)


def test_state_dict_mismatch_names_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(Tiny(6), None, 1, path)
    with pytest.raises(CheckpointError, match=r"shape mismatch w: checkpoint \(6, 6\) vs model \(4, 4\)"):
        load_checkpoint(path, Tiny(4))

    class Other(Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.extra = nn.Parameter(torch.zeros(1))
            del self.b

    with pytest.raises(CheckpointError, match="missing keys extra; unexpected keys b"):
        load_checkpoint(path, Other())
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(path, Tiny(), AdamW(Tiny().parameters()))
    save_checkpoint(Tiny(), AdamW(Tiny().parameters()), 1, path)
    two = Tiny()
    with pytest.raises(CheckpointError, match="optimizer state does not fit"):
        load_checkpoint(path, two, AdamW([{"params": [two.w]}, {"params": [two.b]}]))


# ---------------------------------------------------------------------------------------------- integrity


def test_checksum_is_written_beside_and_verified_on_every_load(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "step_0000003.pt"
    model = Tiny(64)  # a 16 KiB weight: room to scribble inside one tensor's data
    save_checkpoint(model, AdamW(model.parameters()), 3, path)
    digest, name = checksum_path(path).read_text().split()
    assert name == path.name and digest == hashlib.sha256(path.read_bytes()).hexdigest()  # `sha256sum -c` format
    assert read_checkpoint(path)["iteration"] == 3
    scribble_tensor_bytes(path)
    with pytest.raises(CheckpointError, match=r"checkpoint .*step_0000003\.pt is corrupt: checksum mismatch") as e:
        load_checkpoint(path, Tiny(64))
    assert "\n" not in str(e.value)
    # without the checksum the damage goes unnoticed: torch.load reads NaNs (why the checksum exists)
    checksum_path(path).unlink()
    assert torch.isnan(read_checkpoint(path)["model"]["w"]).any()


def test_checkpoints_without_a_checksum_still_load(tmp_path: Path) -> None:
    torch.save({"model": Tiny().state_dict(), "iteration": 4}, tmp_path / "old.pt")  # written before checksums
    assert load_checkpoint(tmp_path / "old.pt", Tiny()) == 4
    save_checkpoint(Tiny(), None, 5, tmp_path / "best.pt")
    save_checkpoint(Tiny(), None, 6, tmp_path / "best.pt")  # overwriting replaces the checksum too
    assert read_checkpoint(tmp_path / "best.pt")["iteration"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "best.pt.sha256", "old.pt"]


def test_latest_intact_checkpoint_skips_damaged_ones(tmp_path: Path) -> None:
    ckpts = tmp_path / "checkpoints"
    for step in (5, 10, 15):
        save_checkpoint(Tiny(64), None, step, ckpts / f"step_{step:07d}.pt")
    truncate(ckpts / "step_0000015.pt")
    scribble_tensor_bytes(ckpts / "step_0000010.pt")
    path, skipped = latest_intact_checkpoint(tmp_path)
    assert path == ckpts / "step_0000005.pt"
    assert len(skipped) == 2 and "step_0000015.pt" in skipped[0] and "checksum mismatch" in skipped[1]
    truncate(ckpts / "step_0000005.pt")
    assert latest_intact_checkpoint(tmp_path)[0] is None
    assert latest_intact_checkpoint(tmp_path / "nowhere") == (None, [])


def test_prune_keeps_protected_files_and_takes_checksums_along(tmp_path: Path) -> None:
    ckpts = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        save_checkpoint(Tiny(), None, step, ckpts / f"step_{step:07d}.pt")
    (ckpts / "step_0000009.pt.sha256").write_text("0  step_0000009.pt\n")  # its checkpoint is gone
    removed = prune_checkpoints(tmp_path, keep_last=1, keep=[ckpts / "step_0000002.pt"])
    assert sorted(p.name for p in removed) == ["step_0000001.pt", "step_0000001.pt.sha256", "step_0000003.pt",
                                               "step_0000003.pt.sha256", "step_0000009.pt.sha256"]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000002.pt", "step_0000002.pt.sha256",
                                                       "step_0000004.pt", "step_0000004.pt.sha256"]


def test_retire_moves_the_later_branch_aside(tmp_path: Path) -> None:
    ckpts = tmp_path / "checkpoints"
    for step in (5, 10, 15):
        save_checkpoint(Tiny(), None, step, ckpts / f"step_{step:07d}.pt")
    save_checkpoint(Tiny(), None, 15, ckpts / "best.pt")
    metrics = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"type": "train", "step": s}) for s in (5, 10, 11, 15)]
    metrics.write_text("\n".join(lines) + "\n")
    dest, moved = retire_checkpoints(ckpts, 10, metrics=metrics)
    assert dest is not None and dest.parent == ckpts / "retired"
    assert moved == ["step_0000015.pt", "best.pt (step 15)", "2 metrics records"]
    assert sorted(p.name for p in dest.iterdir()) == ["best.pt", "best.pt.sha256", "metrics.jsonl", "step_0000015.pt",
                                                      "step_0000015.pt.sha256"]
    assert (dest / "metrics.jsonl").read_text().splitlines() == lines[2:]
    assert metrics.read_text().splitlines() == lines  # the live log is trimmed by its writer, not here
    assert sorted(p.name for p in ckpts.iterdir()) == ["retired", "step_0000005.pt", "step_0000005.pt.sha256",
                                                       "step_0000010.pt", "step_0000010.pt.sha256"]
    assert read_checkpoint(dest / "step_0000015.pt")["iteration"] == 15  # moved whole, checksum and all
    assert retire_checkpoints(ckpts, 10) == (None, [])  # nothing beyond step 10 any more
    save_checkpoint(Tiny(), None, 5, ckpts / "best.pt")
    assert retire_checkpoints(ckpts, 10) == (None, [])  # a best.pt from the kept history stays


def test_divergence_check() -> None:
    model = Tiny()
    check = DivergenceCheck.start(model.parameters(), vocab_size=64)
    assert check.weights_problem(model.parameters()) is None
    assert check.step_problem(4.0, 1.0, overflow_ok=False) is None
    with torch.no_grad():
        model.w[0, 0] = 500.0  # large, not exploded: up to 1e3 x max(start, 1)
    assert check.weights_problem(model.parameters()) is None
    with torch.no_grad():
        model.w[0, 0] = -1e6
    exploded = check.weights_problem(model.parameters())
    assert exploded.weights_ruined and "max |weight| 1e+06" in exploded.reason
    with torch.no_grad():
        model.w[0, 0] = float("nan")
    assert "non-finite weights" in check.weights_problem(model.parameters()).reason
    spike = check.step_problem(4.0, math.inf, overflow_ok=False)
    assert "non-finite gradient norm" in spike.reason and not spike.weights_ruined
    assert check.step_problem(4.0, math.inf, overflow_ok=True) is None  # fp16 loss scaling skips that step
    stuck = check.step_problem(math.log(64), 0.0, overflow_ok=False)
    assert stuck.weights_ruined and "ln(vocab 64)" in stuck.reason and "gradient norm 0" in stuck.reason
    assert check.step_problem(math.log(64), 0.5, overflow_ok=False) is None  # at ln(V) and still learning

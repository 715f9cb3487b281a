"""A full disk: every writer removes its temp file and the CLIs print one line
`error: no space left on device (or file size limit) while writing PATH`; earlier checkpoints stay intact.

The end-to-end cases run the CLI in a subprocess under RLIMIT_FSIZE with SIGXFSZ ignored, so a write past the
limit fails with EFBIG (treated like ENOSPC) instead of killing the process. One case fills a real tmpfs
(ENOSPC) where this process may mount one (root on Linux); it is skipped elsewhere."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llm import data
from llm.checkpoint import read_checkpoint
from llm.fileio import NoSpaceError, replacing, space_errors, write_text
from llm.stories import generate_stories
from llm.training import train
from tests.test_training import _cfg, _tokens

resource = pytest.importorskip("resource", reason="RLIMIT_FSIZE needs the POSIX resource module")
REPO = Path(__file__).resolve().parents[1]
NO_SPACE = "error: no space left on device (or file size limit) while writing "


def _limited(max_bytes: int):
    def apply() -> None:  # runs in the child between fork and exec; both settings survive exec
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return apply


def run_limited(args: list[str], max_bytes: int) -> subprocess.CompletedProcess:
    """`python ARGS` (e.g. -m llm.training ...) in the repository root, every file it writes capped at `max_bytes`."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          preexec_fn=_limited(max_bytes), timeout=300)


def _temps(directory: Path) -> list[str]:
    return [str(p) for p in directory.rglob("*") if ".tmp" in p.name]


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode not in (0, None), proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    return proc.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------ the helper


def test_replacing_removes_its_temp_on_failure_and_names_the_final_path(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(NoSpaceError) as info:
        with replacing(target) as tmp, open(tmp, "x") as f:
            f.write("new")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(info.value) == f"no space left on device (or file size limit) while writing {target}"
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    with pytest.raises(KeyError):  # any other failure: the temp (here a directory) goes too, the error is kept
        with replacing(tmp_path / "tokenizer") as tmp:
            tmp.mkdir()
            (tmp / "vocab.json").write_text("{}")
            raise KeyError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    write_text(target, "new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_a_wrapped_efbig_is_found_and_the_outermost_block_names_the_file(tmp_path: Path) -> None:
    def torch_like_failure() -> None:  # torch.save: RuntimeError("unexpected pos") raised while handling the OSError
        try:
            raise OSError(errno.EFBIG, "File too large")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 704 vs 598") from None

    with pytest.raises(NoSpaceError, match=r"while writing .*best\.pt$") as info:
        with space_errors(tmp_path / "best.pt"), space_errors(tmp_path / ".best.pt.123.tmp"):
            torch_like_failure()
    assert info.value.errno == errno.EFBIG
    with pytest.raises(RuntimeError, match="something else"), space_errors(tmp_path / "x"):
        raise RuntimeError("something else")


# ------------------------------------------------------------------------------------------ the CLIs


@pytest.fixture(scope="module")
def paused_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """A run paused at step 5, and the bytes of its checkpoints (step_0000005.pt, best.pt, their checksums) to compare."""
    d = tmp_path_factory.mktemp("disk")
    np.save(d / "train.npy", _tokens(6000, 0))
    np.save(d / "val.npy", _tokens(1000, 1))
    run = d / "run"
    train(_cfg(d, run, max_steps=10, checkpoint_interval=5), stop_at=5, quiet=True)
    return run, {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}


# 512 bytes: config.json (the first file a resumed run writes) does not fit; 40 kB: it does, and metrics.jsonl
# too, but the next checkpoint does not (best.pt at step 10's eval comes before step_0000010.pt).
@pytest.mark.parametrize("limit, written", [(512, "config.json"), (40_000, "checkpoints/best.pt")])
def test_training_on_a_full_disk_is_one_line_and_keeps_earlier_checkpoints(paused_run, limit: int, written: str) -> None:
    run, before = paused_run
    assert sorted(before) == ["best.pt", "best.pt.sha256", "step_0000005.pt", "step_0000005.pt.sha256"]
    proc = run_limited(["-m", "llm.training", "--resume", "auto", "--out-dir", str(run), "--no-plot", "--no-sample"], limit)
    assert _one_error_line(proc) == NO_SPACE + str(run / written)
    assert _temps(run) == []
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before
    assert read_checkpoint(run / "checkpoints" / "step_0000005.pt")["iteration"] == 5


def test_prepare_on_a_full_disk_leaves_no_temp_files_and_the_rerun_works(tmp_path: Path) -> None:
    src = tmp_path / "stories.txt"
    generate_stories(src, size_mb=0.15, seed=1, progress=False)
    out = tmp_path / "p"
    proc = run_limited(["-m", "llm.data", "prepare", "--input", str(src), "--out", str(out), "--vocab-size", "300"], 60_000)
    assert _one_error_line(proc) == NO_SPACE + f"{out / 'train.txt'} and {out / 'val.txt'}"
    assert _temps(out) == []
    assert data.main(["prepare", "--input", str(src), "--out", str(out), "--vocab-size", "300"]) == 0
    assert (out / "meta.json").is_file() and _temps(out) == []


@pytest.fixture
def tmpfs(tmp_path: Path):
    """A 256 KiB tmpfs mounted at tmp_path/mnt (root on Linux only)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux; the RLIMIT_FSIZE cases cover the same paths")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_prepare_on_a_real_full_tmpfs_frees_the_space_it_took(tmpfs: Path, tmp_path: Path, capsys) -> None:
    src = tmp_path / "stories.txt"
    generate_stories(src, size_mb=0.5, seed=1, progress=False)
    assert data.main(["prepare", "--input", str(src), "--out", str(tmpfs / "p"), "--vocab-size", "300"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == NO_SPACE + f"{tmpfs / 'p' / 'train.txt'} and {tmpfs / 'p' / 'val.txt'}"
    assert _temps(tmpfs) == []
    assert sum(p.stat().st_size for p in tmpfs.rglob("*") if p.is_file()) < 1000  # only .lock and the state file

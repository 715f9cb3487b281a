"""Issue #12, "Nothing lost": a run never rewrites data the user named, and two runs never share a run dir.

(1) The README's custom-data commands leave every file of the prepared directory byte-identical, build
no demo corpus, and a mistyped --train-data is one error line that writes nothing.
(2) RUN_DIR/.lock: a second run in a directory in use stops with one line and writes nothing there; the
lock of a process that died holding it is taken over. Tiny model and data, so each test takes seconds."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llm import training
from llm.data import ensure_demo_data
from llm.data import main as data_main
from llm.train_config import merge, train_preset
from llm.training import main, train

REPO = Path(__file__).resolve().parents[1]
VOCAB = 300
# the model and loop of a run that takes seconds; everything about the data comes from the README's commands
TINY = ["--d-model", "32", "--num-layers", "1", "--num-heads", "2", "--context-length", "16", "--batch-size", "2",
        "--eval-batches", "1", "--threads", "1", "--peak-flops", "1e12", "--sample-tokens", "4"]
WORDS = "the cat dog ran sat on a mat big small red blue happy sad tree house".split()


def _corpus(path: Path, docs: int = 60) -> None:
    rng = np.random.default_rng(0)
    text = "\n<|endoftext|>\n".join(" ".join(rng.choice(WORDS, size=40)) for _ in range(docs))
    path.write_text(text + "\n<|endoftext|>\n")


def _hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, hidden ones included."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` with its size and mtime: what "writes nothing" compares."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture
def prepared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path as the working directory, holding corpus.txt prepared into mine/ as the README says."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # no plots: the run says so and carries on
    _corpus(tmp_path / "corpus.txt")
    assert data_main(["prepare", "--input", "corpus.txt", "--vocab-size", str(VOCAB), "--out", "mine"]) == 0
    return tmp_path / "mine"


@pytest.mark.parametrize("via", ["flags", "toml"])
def test_readme_custom_data_commands_leave_the_prepared_files_byte_identical(prepared: Path, via: str, capsys) -> None:
    before = _hashes(prepared)
    assert {"train.npy", "val.npy", "train.txt", "val.txt", "meta.json", "tokenizer/vocab.json"} <= set(before)
    data = {"train_data": "mine/train.npy", "val_data": "mine/val.npy", "tokenizer_dir": "mine/tokenizer"}
    if via == "flags":
        named = [x for k, v in data.items() for x in (training._flag(k), v)]
    else:
        Path("my.toml").write_text("".join(f'{k} = "{v}"\n' for k, v in data.items()))
        named = ["--config", "my.toml"]
    capsys.readouterr()
    rc = main([*named, "--vocab-size", str(VOCAB), "--max-steps", "2", "--warmup-steps", "1", *TINY])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert _hashes(prepared) == before
    assert not Path("data").exists() and "stories" not in err  # no demo corpus built anywhere
    assert json.loads(Path("runs/demo/config.json").read_text())["train_data"] == "mine/train.npy"


def test_mistyped_train_data_is_one_error_line_and_writes_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    rc = main(["--train-data", "other/nope.npy", "--max-steps", "2", "--warmup-steps", "1", *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("error: train_data 'other/nope.npy' does not exist")
    assert list(tmp_path.iterdir()) == []  # no other/, no data/demo, no run dir


def test_demo_data_is_built_only_at_the_demo_presets_own_paths(prepared: Path, capsys) -> None:
    before = _hashes(prepared)
    # a library caller that keeps the demo preset's prepare_demo_data but names its own data
    cfg = merge(train_preset("demo"), {"train_data": "mine/train.npy", "val_data": "mine/val.npy", "out_dir": "r",
                                       "max_steps": 1, "warmup_steps": 0, "eval_batches": 1, "batch_size": 2,
                                       "model": {"vocab_size": VOCAB, "context_length": 16, "d_model": 32,
                                                 "num_layers": 1, "num_heads": 2}})
    assert cfg.prepare_demo_data
    train(cfg, quiet=True)
    # the demo corpus generator itself refuses a directory it did not make
    with pytest.raises(ValueError, match="mine holds data ensure_demo_data did not make"):
        ensure_demo_data(prepared, vocab_size=VOCAB, size_mb=0.01, quiet=True)
    assert _hashes(prepared) == before and not Path("data").exists()
    # asking for the demo corpus and naming other data at once is a bad input: one line, nothing written
    capsys.readouterr()
    rc = main(["--prepare-demo-data", "--train-data", "mine/train.npy", "--out-dir", "r2", *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: prepare_demo_data builds data/demo"), err
    assert not Path("r2").exists()


# ------------------------------------------------------------------------------------------ run dir lock
@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    d = tmp_path / "tokens"
    d.mkdir()
    rng = np.random.default_rng(0)
    np.save(d / "train.npy", rng.integers(0, 64, 3000).astype(np.uint16))
    np.save(d / "val.npy", rng.integers(0, 64, 500).astype(np.uint16))
    return d


def _argv(tokens: Path, out: Path, *extra: str) -> list[str]:
    return ["--train-data", str(tokens / "train.npy"), "--val-data", str(tokens / "val.npy"), "--out-dir", str(out),
            "--vocab-size", "64", "--warmup-steps", "1", "--eval-interval", "2", "--log-interval", "1",
            "--checkpoint-interval", "1", "--no-prepare-demo-data", "--no-plot", "--no-sample", *TINY, *extra]


def test_a_second_run_in_a_run_dir_in_use_stops_with_one_line_and_writes_nothing(tokens: Path, tmp_path: Path,
                                                                                   monkeypatch, capsys) -> None:
    """Run B starts in A's --out-dir while A is in its first step (in this process: flock locks belong to
    the open file, so the second open conflicts just as another process's would)."""
    out = tmp_path / "run"
    second: dict = {}
    orig = training.LossModule.forward

    def forward(self, x, y):
        if not second:
            second["tree"] = _tree(out)
            capsys.readouterr()
            second["rc"] = main(_argv(tokens, out, "--max-steps", "4"))
            second["err"] = capsys.readouterr().err.strip().splitlines()
            second["tree_after"] = _tree(out)
        return orig(self, x, y)

    monkeypatch.setattr(training.LossModule, "forward", forward)
    assert main(_argv(tokens, out, "--max-steps", "4")) == 0
    assert second["rc"] == 2 and len(second["err"]) == 1, second["err"]
    assert second["err"][0].startswith(f"error: {out} is in use by pid {os.getpid()} (started ")
    assert second["tree_after"] == second["tree"]  # B wrote nothing in the run dir
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]
    assert steps == [1, 2, 3, 4]
    assert not (out / ".lock").exists()  # released at the end


_HOLD = """
import sys
from pathlib import Path
from llm.data import _dir_lock
with _dir_lock(Path(sys.argv[1]), wait=False):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def test_the_lock_names_another_process_and_a_dead_ones_lock_is_taken_over(tokens: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert main(_argv(tokens, out, "--max-steps", "2")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is in use by pid {holder.pid} (started " in err[0], err
        assert [p.name for p in out.iterdir()] == [".lock"]
    finally:
        holder.kill()  # SIGKILL: no release, the record of a dead process stays in the file
        holder.wait()
    assert str(holder.pid) in (out / ".lock").read_text()
    assert main(_argv(tokens, out, "--max-steps", "2")) == 0
    err = capsys.readouterr().err.splitlines()
    stale = [line for line in err if "stale lock" in line]
    assert len(stale) == 1 and f"pid {holder.pid}" in stale[0], err
    assert not (out / ".lock").exists()

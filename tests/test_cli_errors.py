"""Bad command-line input gives one line `error: ...` and a non-zero exit, before any long work starts:
URLs, devices, data files that are not token arrays, output paths that are files or directories, sizes,
worker counts, and a download's --sha256 checked against a file that is already there."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kernel import benchmarking_model
from llm import bpe_tokenizer, data, download, evaluate, generating, hardware, training
from llm.checkpoint import save_checkpoint
from tests.test_generating import byte_tokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def one_error_line(capsys, rc: int) -> str:
    assert rc not in (0, None)
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err), err
    return err[-1]


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A tiny checkpoint with its tokenizer and a validation array it records."""
    tok = byte_tokenizer()
    tok.save(tmp_path / "tokenizer")
    np.save(tmp_path / "val.npy", np.asarray(tok.encode("the hello shell held the help desk. " * 4), dtype=np.uint16))
    model = tiny_model(ctx=16)
    path = tmp_path / "step_0000001.pt"
    save_checkpoint(model, None, 1, path, extra={"model_config": model.config.to_dict(),
                                                 "tokenizer_dir": str(tmp_path / "tokenizer"),
                                                 "train_config": {"val_data": str(tmp_path / "val.npy")}})
    return path


# ------------------------------------------------------------------------------------------- devices


def test_device_names_resolve_to_usable_devices_or_one_line() -> None:
    assert hardware.device_from_name("cpu") == torch.device("cpu")
    assert hardware.device_from_name(None).type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match="unknown device 'foo'"):
        hardware.device_from_name("foo")
    with pytest.raises(ValueError, match="unknown device 'meta'"):
        hardware.device_from_name("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            hardware.device_from_name("cuda:1")


@pytest.mark.parametrize("device, message", [
    pytest.param("cuda", "device cuda requested but torch sees no CUDA GPU", marks=NO_CUDA),
    ("foo", "unknown device 'foo'"),
])
def test_generation_and_evaluation_name_a_missing_device_in_one_line(ckpt: Path, capsys, device: str, message: str) -> None:
    line = one_error_line(capsys, generating.main(["--checkpoint", str(ckpt), "--prompt", "hi", "--device", device]))
    assert message in line
    line = one_error_line(capsys, evaluate.main(["--checkpoint", str(ckpt), "--device", device]))
    assert message in line


# ------------------------------------------------------------------------------------------- evaluate


@pytest.mark.parametrize("make, message", [
    (lambda d: d, "is a directory"),
    (lambda d: _write(d / "latin1.txt", "café crème ".encode("latin-1") * 50), "not UTF-8 text"),
    (lambda d: _write(d / "noise.bin", np.random.default_rng(0).bytes(4000)), "binary data"),
    (lambda d: _write(d / "ids.bin", np.arange(300, dtype=np.uint16).tobytes()), "binary"),
    (lambda d: _save(d / "floats.npy", np.random.default_rng(0).random(50)), "expected integer token ids"),
    (lambda d: _save(d / "tokens.dat", np.arange(40, dtype=np.uint16)), None),  # a .npy under another name is read
])
def test_evaluate_rejects_data_that_is_not_tokens_or_text(ckpt: Path, tmp_path: Path, capsys, make, message) -> None:
    path = make(tmp_path)
    rc = evaluate.main(["--checkpoint", str(ckpt), "--data", str(path), "--json"])
    if message is None:
        assert rc == 0 and '"tokens": 39' in capsys.readouterr().out
    else:
        assert message in one_error_line(capsys, rc)


def _write(path: Path, payload: bytes) -> Path:
    path.write_bytes(payload)
    return path


def _save(path: Path, arr: np.ndarray) -> Path:
    with open(path, "wb") as f:
        np.save(f, arr)
    return path


@pytest.mark.parametrize("flag, message", [("--stride", "stride must be in [1, context_length=16], got 0"),
                                           ("--context-length", "context_length must be in [1, 16]")])
def test_evaluate_zero_stride_or_context_is_an_error_not_the_default(ckpt: Path, capsys, flag: str, message: str) -> None:
    assert message in one_error_line(capsys, evaluate.main(["--checkpoint", str(ckpt), flag, "0"]))


# ------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("argv, message", [
    (["--sample-prompt", ""], "--sample-prompt must not be empty"),
    (["--img-dir", "FILE"], "--img-dir FILE is a file, not a directory"),
    (["--out-dir", "FILE"], "--out-dir FILE is a file, not a directory"),
    (["--out-dir", "FILE/run"], "--out-dir FILE/run: FILE is a file, not a directory"),
])
def test_training_checks_every_argument_before_it_starts(tmp_path: Path, monkeypatch, capsys, argv, message) -> None:
    monkeypatch.chdir(tmp_path)
    Path("FILE").write_text("not a directory")
    if "--out-dir" not in argv:
        argv = argv + ["--out-dir", "run"]
    line = one_error_line(capsys, training.main(argv))
    assert message in line and training.main(argv) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]  # nothing started: no data, no run directory


# ------------------------------------------------------------------------------------------- data


def test_download_bad_url_is_one_line(tmp_path: Path, capsys) -> None:
    line = one_error_line(capsys, download.main(["owt", "--url", "notaurl", "--out", str(tmp_path)]))
    assert "notaurl" in line and "http" in line
    assert not (tmp_path / "owt").exists()


def test_download_checks_sha256_of_a_file_already_there(tmp_path: Path, capsys) -> None:
    existing = tmp_path / "tinystories" / "a.txt"
    existing.parent.mkdir()
    existing.write_bytes(b"once upon a time\n")
    url = "http://127.0.0.1:9/a.txt"  # never contacted: the file is already there
    good = hashlib.sha256(existing.read_bytes()).hexdigest()
    bad = "0" * 64
    line = one_error_line(capsys, download.main(["tinystories", "--out", str(tmp_path), "--url", url, "--sha256", bad]))
    assert "sha256" in line and str(existing) in line and "kept" in line
    assert existing.read_bytes() == b"once upon a time\n"
    assert download.main(["tinystories", "--out", str(tmp_path), "--url", url, "--sha256", good, "--quiet"]) == 0
    capsys.readouterr()
    # an unpacked .gz: the hash of the archive, recorded when it was fetched, is what --sha256 names
    (tmp_path / "tinystories" / "b.txt.gz.sha256").write_text(f"{good}  b.txt.gz\n")
    (tmp_path / "tinystories" / "b.txt").write_text("unpacked")
    gz = "http://127.0.0.1:9/b.txt.gz"
    line = one_error_line(capsys, download.main(["tinystories", "--out", str(tmp_path), "--url", gz, "--sha256", bad]))
    assert "does not match" in line and "kept" in line
    assert download.main(["tinystories", "--out", str(tmp_path), "--url", gz, "--sha256", good, "--quiet"]) == 0


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_worker_counts_below_one_are_errors(tmp_path: Path, capsys, workers: str) -> None:
    src = tmp_path / "t.txt"
    src.write_text("a b c\n<|endoftext|>\nd e f\n")
    line = one_error_line(capsys, data.main(["prepare", "--input", str(src), "--out", str(tmp_path / "p"),
                                             "--vocab-size", "300", "--num-workers", workers]))
    assert f"num_workers must be >= 1 (or unset for the default), got {workers}" in line
    assert not (tmp_path / "p").exists()
    line = one_error_line(capsys, bpe_tokenizer.main(["train", "--input", str(src), "--vocab-size", "260",
                                                      "--out", str(tmp_path / "tok"), "--workers", workers]))
    assert "num_workers must be >= 1" in line


def test_generate_size_is_capped_and_checked_against_free_space(tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "s.txt"
    line = one_error_line(capsys, data.main(["generate", "--out", str(out), "--size-mb", "1e12"]))
    assert "size_mb must be at most" in line and not out.exists()
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=10**9 - 10**6, free=10**6))
    line = one_error_line(capsys, data.main(["generate", "--out", str(out), "--size-mb", "5"]))
    assert "5 MB needed but only 1 MB free" in line and not out.exists()
    line = one_error_line(capsys, data.main(["generate", "--out", str(tmp_path), "--size-mb", "0.01"]))
    assert "is a directory, not a file" in line


def test_benchmark_json_into_a_directory_fails_before_it_runs(tmp_path: Path, capsys) -> None:
    rc = benchmarking_model.main(["--device", "cpu", "--steps", "1", "--warmup", "0", "--json", str(tmp_path)])
    line = one_error_line(capsys, rc)
    assert f"--json {tmp_path} is a directory, not a file" in line

"""inspect_data.py on small generated arrays: exact counts, documents, sampler, leakage, verdicts, errors."""

import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import inspect_data  # noqa: E402


def _corpus(n: int, vocab: int, eot: int, seed: int = 0, doc_every: int = 100) -> np.ndarray:
    g = np.random.default_rng(seed)
    a = np.minimum(g.zipf(1.4, n), vocab - 1).astype(np.uint16)
    a[a == eot] = eot + 1
    a[g.random(n) < 1 / doc_every] = eot
    return a


def _write(d: Path, train: np.ndarray, val: np.ndarray | None, meta: dict | None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "train.npy", train)
    if val is not None:
        np.save(d / "val.npy", val)
    if meta is not None:
        (d / "meta.json").write_text(json.dumps(meta))
    return d


def _run(capsys, *argv) -> tuple[int, dict | str, str]:
    rc = inspect_data.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    if "--json" in argv and rc != 2:
        return rc, json.loads(out), err
    return rc, out, err


@pytest.fixture
def prepared(tmp_path):
    vocab, eot = 512, 0
    train = _corpus(400_000, vocab, eot)
    val = _corpus(20_000, vocab, eot, seed=1)
    val[:5_000] = train[10_000:15_000]  # a quarter of val copied from train: leakage
    return _write(tmp_path / "ds", train, val, {"vocab_size": vocab, "eot_id": eot}), train, val


def test_counts_documents_and_verdict(prepared, capsys):
    d, train, val = prepared
    rc, rep, _ = _run(capsys, d, "--json", "--no-plot", "--batches", "20")
    assert rc == 0 and rep["verdict"] in ("OK", "WARN")
    r = rep["train"]
    assert r["dtype"] == "uint16" and r["tokens"] == len(train) and r["bytes_on_disk"] == (d / "train.npy").stat().st_size
    assert r["stats"] == "exact (full pass)"
    ref = np.bincount(train, minlength=512)
    assert r["vocab_used"] == int((ref > 0).sum()) and r["max_id"] == int(train.max())
    top = r["top_tokens"][0]
    assert top["id"] == int(ref.argmax()) and top["share"] == pytest.approx(ref.max() / len(train))
    k = r["top1pct_ids"]
    assert k == 6 and r["top1pct_share"] == pytest.approx(np.sort(ref)[::-1][:k].sum() / len(train))
    p = ref[ref > 0] / len(train)
    assert r["unigram_entropy_nats"] == pytest.approx(float(-(p * np.log(p)).sum()))
    # Documents: an independent split of the token list on the separator.
    # Documents end with a separator; the piece after the last one is an unterminated tail.
    pieces = np.split(train, np.flatnonzero(train == 0) + 1)
    docs = [len(p_) - 1 for p_ in pieces[:-1] if len(p_) > 1]
    assert r["documents"]["unterminated_tail_tokens"] == len(pieces[-1])
    assert r["eot_count"] == int((train == 0).sum())
    assert r["documents"]["count"] == len(docs)
    assert (r["documents"]["min"], r["documents"]["max"]) == (min(docs), max(docs))
    assert r["documents"]["median"] == pytest.approx(float(np.median(docs)))


def test_leakage_matches_a_set_reference(prepared, capsys):
    d, train, val = prepared
    rc, rep, _ = _run(capsys, d, "--json", "--no-plot", "--ngram", "8", "--ngram", "30", "--leak-samples", "100000", "--batches", "2")
    lk = rep["leakage"]
    assert lk["train_exact"]
    for n in (8, 30):
        tr = {train[i : i + n].tobytes() for i in range(len(train) - n + 1)}
        vs = {val[i : i + n].tobytes() for i in range(len(val) - n + 1)}
        assert lk[str(n)] == pytest.approx(len(vs & tr) / len(vs), abs=1e-9), n
    assert 0.15 < lk["30"] < 0.35
    assert any("leakage" in w for w in rep["warnings"])


def test_sampler_coverage_reference(prepared, capsys):
    d, train, _ = prepared
    B, L, N = 8, 64, 30
    rc, rep, _ = _run(capsys, d, "--json", "--no-plot", "--batch-size", B, "--context-length", L, "--batches", N)
    s = rep["train"]["sampler"]
    starts = np.random.default_rng(0).integers(0, len(train) - L, size=(N, B)).ravel()
    mark = np.zeros(len(train), dtype=bool)
    for st in starts:
        mark[st : st + L + 1] = True
    assert s["coverage"] == pytest.approx(mark.mean())
    assert s["repeated_windows"] == pytest.approx(1 - len(set(starts.tolist())) / len(starts))
    assert s["epochs"] == pytest.approx(N * B * L / len(train))
    assert s["distinct_tokens_per_batch_min"] <= s["distinct_tokens_per_batch_mean"] <= B * (L + 1)


def test_sampled_mode_is_labelled(prepared, capsys):
    d, _, _ = prepared
    rc, rep, _ = _run(capsys, d, "--json", "--no-plot", "--max-scan", "100000", "--batches", "2")
    assert rep["train"]["stats"].startswith("sampled")
    assert rep["leakage"]["train_exact"] is False
    assert rep["val"]["stats"] == "exact (full pass)"


def test_text_report(prepared, capsys):
    d, _, _ = prepared
    rc, out, _ = _run(capsys, d, "--no-plot", "--batches", "5")
    for needle in ("train.npy: uint16", "top tokens:", "top 1% of vocab", "tokens/document: min", "sampler (5 batches", "leakage:", "verdict:"):
        assert needle in out, needle
    assert out.strip().splitlines()[-1].startswith("verdict:")


def test_errors_and_warnings(tmp_path, capsys):
    bad = _corpus(50_000, 1000, 0)
    bad[123] = 999
    d = _write(tmp_path / "bad", bad, bad[:400].astype(np.uint32), {"vocab_size": 600, "eot_id": 0})
    rc, rep, _ = _run(capsys, d, "--json", "--no-plot", "--batches", "2")
    assert rc == 1 and rep["verdict"] == "ERROR"
    assert any("ids exceed vocab" in e for e in rep["errors"])
    assert any("val tiny" in w for w in rep["warnings"])
    assert any("uint32" in w for w in rep["warnings"])
    d2 = _write(tmp_path / "sparse", np.arange(1, 5000, dtype=np.uint16) % 50 + 1, None, {"vocab_size": 4096, "eot_id": 0})
    rc, rep, _ = _run(capsys, d2, "--json", "--no-plot", "--batches", "2")
    assert rc == 0 and rep["verdict"] == "WARN"
    text = " ".join(rep["warnings"])
    assert "vocab mostly unused" in text and "no document separators" in text and "no val split" in text


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda d: _write(d, _corpus(1000, 64, 0), None, None), "meta.json: missing"),
        (lambda d: (_write(d, _corpus(1000, 64, 0), None, {"vocab_size": 64}), (d / "train.npy").write_bytes(b"garbage")), "not a valid .npy"),
        (lambda d: _write(d, np.zeros(100, dtype=np.float32), None, {"vocab_size": 64}), "dtype float32"),
        (lambda d: (_write(d, _corpus(1000, 64, 0), None, {"vocab_size": 64}), (d / "meta.json").write_text("{oops")), "not valid JSON"),
        (lambda d: d.mkdir(), "no train.npy or val.npy"),
    ],
)
def test_bad_inputs_give_one_line(tmp_path, capsys, setup, match):
    d = tmp_path / "x"
    setup(d)
    rc, _, err = _run(capsys, d, "--no-plot")
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and match in err


def test_single_file_with_vocab_flag(tmp_path, capsys):
    p = tmp_path / "tokens.npy"
    np.save(p, _corpus(10_000, 300, 0))
    rc, rep, _ = _run(capsys, p, "--vocab-size", "300", "--json", "--no-plot", "--batches", "2")
    assert rc == 0 and rep["tokens"]["tokens"] == 10_000 and "leakage" not in rep


def test_plots_or_install_hint(prepared, capsys, tmp_path):
    d, _, _ = prepared
    rc, rep, _ = _run(capsys, d, "--json", "--img-dir", tmp_path / "img", "--batches", "2")
    if importlib.util.find_spec("matplotlib") is None:
        assert any("uv sync --extra plot" in n for n in rep["notes"])
        assert not (tmp_path / "img").exists()
    else:
        assert [Path(p).name for p in rep["plots"]] == ["data_ds_train.png", "data_ds_val.png"]
        assert all(Path(p).stat().st_size > 1000 for p in rep["plots"])


def test_fast_on_a_few_megabytes(tmp_path, capsys):
    train = _corpus(3_000_000, 4096, 0)  # 6 MB
    d = _write(tmp_path / "big", train, train[:100_000].copy(), {"vocab_size": 4096, "eot_id": 0})
    t0 = time.perf_counter()
    rc, rep, _ = _run(capsys, d, "--json", "--no-plot")
    assert rc == 0 and time.perf_counter() - t0 < 10  # ~0.5 s here; 1 GB measured in docs/data.md

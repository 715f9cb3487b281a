"""prepare / ensure_demo_data with the real BPE tokenizer: document split, round trip, idempotence, resume."""

import hashlib
import json
import math
import os
from collections import Counter

import numpy as np
import pytest

import llm.data as data
from llm.bpe_tokenizer import BpeTokenizer
from llm.data import EOT, ensure_demo_data, load_meta, open_tokens, prepare
from llm.stories import generate_stories


def _docs(text: str) -> list[str]:
    return [d.strip() for d in text.split(EOT) if d.strip()]


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    p = tmp_path_factory.mktemp("src") / "stories.txt"
    generate_stories(p, size_mb=0.15, seed=1, progress=False)
    return p


def _in_val(doc: str, fraction: float = 0.05) -> bool:
    """The hash split's rule, computed here with hashlib directly: BLAKE2b-64 of the text below fraction * 2^64."""
    return int.from_bytes(hashlib.blake2b(doc.encode(), digest_size=8).digest(), "big") < fraction * 2**64


def _steps(err: str) -> dict[str, str]:
    out = {}
    for line in err.splitlines():
        if line.startswith("prepare: ") and (": up to date" in line or ": done in" in line):
            name = line.split(": ")[1]
            out[name] = "skipped" if "up to date" in line else "ran"
    return out


def test_prepare_round_trip_and_meta(stories, tmp_path, capsys):
    out = tmp_path / "p"
    meta = prepare(stories, out, 400)
    assert set(_steps(capsys.readouterr().err).values()) == {"ran"}
    tok = BpeTokenizer.load(meta["tokenizer_dir"])
    train, val = open_tokens(meta["train"], tok.vocab_size), open_tokens(meta["val"], tok.vocab_size)
    assert train.dtype == np.uint16 and meta["dtype"] == "uint16"
    # Whole documents: the decoded splits hold exactly the source documents, each exactly once.
    src = _docs(stories.read_text(encoding="utf-8"))
    got_train, got_val = _docs(tok.decode(train.tolist())), _docs(tok.decode(val.tolist()))
    assert sorted(got_train + got_val) == sorted(set(src)), "every distinct document once"
    assert meta["duplicate_documents"] == len(src) - len(set(src)) and meta["split_method"] == "hash"
    assert got_val == [d for d in got_val if _in_val(d)] and len(got_val) == meta["val_documents"] > 0
    assert not any(_in_val(d) for d in got_train)
    assert meta["train_documents"] == len(got_train)
    assert int((np.asarray(train) == meta["eot_id"]).sum()) == len(got_train), "one separator per document"
    # Counts and entropy against an independent float64 computation.
    c = Counter(np.asarray(train).tolist())
    p = np.array(list(c.values()), dtype=np.float64) / len(train)
    assert meta["unigram_entropy"] == pytest.approx(float(-(p * np.log(p)).sum()), abs=1e-6)
    assert meta["unigram_entropy_bits"] == pytest.approx(meta["unigram_entropy"] / math.log(2), abs=1e-5)
    assert meta["vocab_used"] == len(c)
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val)
    assert meta["bytes_per_token"] == pytest.approx((out / "train.txt").stat().st_size / len(train), abs=1e-4)
    assert meta["vocab_size"] == tok.vocab_size <= 400 and meta["requested_vocab_size"] == 400
    assert meta["special_tokens"] == {EOT: tok.token_id(EOT)}
    import hashlib

    assert meta["source_sha256"] == hashlib.sha256(stories.read_bytes()).hexdigest()
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk["tokenizer_dir"] == "tokenizer" and on_disk["train"] == "train.npy"  # relative: the dir can move
    assert load_meta(out) == meta


def test_split_is_deterministic(stories, tmp_path):
    a = prepare(stories, tmp_path / "a", 300, quiet=True)
    b = prepare(stories, tmp_path / "b", 300, quiet=True)
    assert (tmp_path / "a" / "val.txt").read_bytes() == (tmp_path / "b" / "val.txt").read_bytes()
    assert np.array_equal(np.load(a["train"]), np.load(b["train"]))


def test_idempotent_force_and_changed_input(stories, tmp_path, capsys):
    src = tmp_path / "s.txt"
    src.write_bytes(stories.read_bytes())
    out = tmp_path / "p"
    prepare(src, out, 300)
    capsys.readouterr()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    m2 = prepare(src, out, 300)
    assert set(_steps(capsys.readouterr().err).values()) == {"skipped"}
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    prepare(src, out, 300, force=True)
    assert set(_steps(capsys.readouterr().err).values()) == {"ran"}
    # A different vocab size keeps the split but redoes the tokenizer and everything after it.
    prepare(src, out, 320)
    steps = _steps(capsys.readouterr().err)
    assert steps == {"split": "skipped", "tokenizer": "ran", "encode_train": "ran", "encode_val": "ran", "meta": "ran"}
    # A changed source redoes everything.
    with open(src, "a", encoding="utf-8") as f:
        f.write("One more little story.\n" + EOT + "\n")
    m3 = prepare(src, out, 320)
    assert set(_steps(capsys.readouterr().err).values()) == {"ran"}
    assert m3["source_sha256"] != m2["source_sha256"]


def test_interrupted_run_redoes_only_unfinished_steps(stories, tmp_path, capsys, monkeypatch):
    out = tmp_path / "p"
    real = BpeTokenizer.encode_file

    def flaky(self, input_path, output_path, *a, **k):
        if "val" in os.path.basename(str(input_path)):
            real(self, input_path, output_path, *a, **k)  # write the temp output, then "crash"
            raise KeyboardInterrupt
        return real(self, input_path, output_path, *a, **k)

    monkeypatch.setattr(BpeTokenizer, "encode_file", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare(stories, out, 300)
    assert (out / "train.npy").exists() and not (out / "val.npy").exists() and not (out / "meta.json").exists()
    assert not [p for p in out.iterdir() if ".tmp" in p.name], "no temp files left behind"
    monkeypatch.setattr(BpeTokenizer, "encode_file", real)
    capsys.readouterr()
    meta = prepare(stories, out, 300)
    steps = _steps(capsys.readouterr().err)
    assert steps == {"split": "skipped", "tokenizer": "skipped", "encode_train": "skipped", "encode_val": "ran", "meta": "ran"}
    assert meta["val_tokens"] > 0


def test_val_input_and_blank_line_documents(tmp_path):
    train = tmp_path / "train.txt"
    val = tmp_path / "val.txt"
    train.write_text("".join(f"The cat number {i} sat on the mat.\n\nIt was happy.\n\n" for i in range(200)))
    val.write_text("The dog sat on the mat.\n")
    meta = prepare(train, tmp_path / "a", 300, val_input=val, quiet=True)
    assert meta["val_source"] == str(val) and meta["val_fraction"] is None
    assert not (tmp_path / "a" / "train.txt").exists(), "no copy of the training text when val is given"
    tok = BpeTokenizer.load(meta["tokenizer_dir"])
    assert tok.decode(np.load(meta["val"]).tolist()) == val.read_text()
    # Without separators, documents are blank-line paragraphs; the split keeps them whole.
    meta = prepare(train, tmp_path / "b", 300, quiet=True)
    vtext = (tmp_path / "b" / "val.txt").read_text()
    paras = [p.strip() for p in vtext.split("\n\n") if p.strip()]
    distinct = {f"The cat number {i} sat on the mat." for i in range(200)} | {"It was happy."}
    assert paras == [p for p in paras if _in_val(p)] and set(paras) == {p for p in distinct if _in_val(p)}
    assert meta["duplicate_documents"] == 199, "'It was happy.' 200 times: kept once"


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"input_path": "missing.txt"}, FileNotFoundError, "not found"),
        ({"vocab_size": 100}, ValueError, "vocab_size must be"),
        ({"val_fraction": 0.0}, ValueError, "val_fraction"),
        ({"val_fraction": 1.0}, ValueError, "val_fraction"),
    ],
)
def test_bad_arguments(stories, tmp_path, kwargs, exc, match):
    args = {"input_path": stories, "out_dir": tmp_path / "x", "vocab_size": 300, **kwargs}
    with pytest.raises(exc, match=match):
        prepare(**args)


def test_single_document_needs_val_input(tmp_path):
    src = tmp_path / "one.txt"
    src.write_text("Just one story with no separators and no blank lines.\n")
    with pytest.raises(ValueError, match="need >= 2 .*--val-input"):
        prepare(src, tmp_path / "x", 300, quiet=True)


def test_ensure_demo_data_is_idempotent(tmp_path, capsys):
    out = tmp_path / "demo"
    meta = ensure_demo_data(out, vocab_size=300, size_mb=0.1, seed=0)
    err = capsys.readouterr().err
    assert "generating" in err and (out / "stories.txt").exists()
    assert meta["train_tokens"] > 0 and meta["dir"] == str(out)
    again = ensure_demo_data(out, vocab_size=300, size_mb=0.1, seed=0)
    err = capsys.readouterr().err
    assert "generating" not in err and set(_steps(err).values()) == {"skipped"}
    assert again == meta
    ensure_demo_data(out, vocab_size=300, size_mb=0.1, seed=1)  # another seed: new corpus, redone
    assert "generating" in capsys.readouterr().err


def test_cli(stories, tmp_path, capsys):
    rc = data.main(["prepare", "--input", str(stories), "--out", str(tmp_path / "c"), "--vocab-size", "300"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["vocab_size"] <= 300
    rc = data.main(["prepare", "--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "c"), "--vocab-size", "300"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1
    rc = data.main(["generate", "--out", str(tmp_path / "g.txt"), "--size-mb", "0.01"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["stories"] > 0

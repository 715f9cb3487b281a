"""prepare over the input formats of llm.text_sources: the same text gives the same tokens whatever the container."""

import bz2
import csv
import gzip
import json
import lzma

import numpy as np
import pytest

import llm.data as data
import llm.text_sources
from llm.data import EOT, prepare
from llm.text_sources import SourceOptions

DOCS = [f"Story {i}: the {w} cat sat on the mat, and then it said \"hi, {w}\".\nThe end." for i, w in
        enumerate(["red", "blue", "green", "small", "big", "old", "new", "odd", "shy", "kind"] * 3)]


def _tokens(out):
    return np.load(out / "train.npy").tolist(), np.load(out / "val.npy").tolist()


def _write_txt(path):
    path.write_text("".join(f"{d}\n{EOT}\n" for d in DOCS), encoding="utf-8")


def _write_jsonl(path, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for d in DOCS:
            f.write(json.dumps({"id": 1, "text": d}) + "\n")


def _write_parquet(path):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow (the parquet extra) is not installed")
    import pyarrow as pa

    table = pa.table({"id": list(range(len(DOCS))), "text": DOCS})
    pq.write_table(table, path, row_group_size=7)  # several row groups, one batch each


def _write_csv(path):
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows([i, d] for i, d in enumerate(DOCS))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    _write_txt(d / "c.txt")
    prepare(d / "c.txt", d / "out", 300, quiet=True)
    return _tokens(d / "out")


@pytest.mark.parametrize("name, write", [
    ("c.jsonl", _write_jsonl),
    ("c.json", _write_jsonl),
    ("c.csv", _write_csv),
    ("c.parquet", _write_parquet),
    ("c.txt.gz", lambda p: p.write_bytes(gzip.compress(_text()))),
    ("c.txt.xz", lambda p: p.write_bytes(lzma.compress(_text()))),
    ("c.txt.bz2", lambda p: p.write_bytes(bz2.compress(_text()))),
    ("c.jsonl.gz", lambda p: _write_jsonl(p, gzip.open)),
])
def test_every_format_gives_the_same_tokens(reference, tmp_path, name, write):
    write(tmp_path / name)
    meta = prepare(tmp_path / name, tmp_path / "out", 300, quiet=True)
    assert _tokens(tmp_path / "out") == reference
    assert meta["input_files"] == 1 and meta["skipped_bad_records"] == 0


def _text():
    return "".join(f"{d}\n{EOT}\n" for d in DOCS).encode()


def test_chat_messages_json_array_and_tsv(reference, tmp_path):
    with open(tmp_path / "chat.jsonl", "w") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n")
        f.write(json.dumps({"other": 1}) + "\n")  # neither field: bad, skipped
    (tmp_path / "arr.json").write_text(json.dumps([{"body": d} for d in DOCS[:2]]))
    (tmp_path / "t.tsv").write_text("body\n" + "".join(d.replace("\n", " ") + "\n" for d in DOCS[2:]))
    prepare([tmp_path / "chat.jsonl", tmp_path / "arr.json", tmp_path / "t.tsv"], tmp_path / "o", 300, quiet=True,
            source_options=SourceOptions(text_field="body", text_column="body", skip_bad=True))
    text = (tmp_path / "o" / "source.txt").read_text()
    assert text.startswith(f"a\nb\n{EOT}\n{DOCS[0]}\n{EOT}\n")  # a chat record: its messages joined
    assert f"{DOCS[3].replace(chr(10), ' ')}\n{EOT}\n" in text
    assert data.load_meta(tmp_path / "o")["skipped_bad_records"] == 1


def test_directory_glob_and_repeated_inputs(reference, tmp_path):
    half = len(DOCS) // 2
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "a.txt").write_text("".join(f"{d}\n{EOT}\n" for d in DOCS[:half]))
    (tmp_path / "in" / "sub" / "b.txt").write_text("".join(f"{d}\n{EOT}\n" for d in DOCS[half:]))
    (tmp_path / "in" / "notes.md").write_text("not an input")  # unknown formats in a directory are left out
    prepare(tmp_path / "in", tmp_path / "in" / "out", 300, quiet=True)  # out inside the input: never read back
    assert _tokens(tmp_path / "in" / "out") == reference
    prepare(str(tmp_path / "in" / "**" / "?.txt"), tmp_path / "g", 300, quiet=True)  # a.txt, sub/b.txt
    assert _tokens(tmp_path / "g") == reference
    prepare([tmp_path / "in" / "a.txt", tmp_path / "in" / "sub" / "b.txt"], tmp_path / "r", 300, quiet=True)
    assert _tokens(tmp_path / "r") == reference


def test_doc_sep_blank_line_and_fingerprint(tmp_path, capsys):
    src = tmp_path / "p.txt"
    src.write_text("\n\n".join(DOCS))
    opts = SourceOptions(doc_sep="blank-line")
    prepare(src, tmp_path / "o", 300, source_options=opts)
    assert (tmp_path / "o" / "source.txt").read_text().count(EOT) == len(DOCS)  # a single "\n" inside a doc is no blank line
    capsys.readouterr()
    prepare(src, tmp_path / "o", 300, source_options=opts)
    assert "gather: up to date" in capsys.readouterr().err
    with pytest.raises(ValueError, match="found 1 distinct document"):  # options are in the fingerprint: gathered again
        prepare(src, tmp_path / "o", 300, source_options=SourceOptions(doc_sep="eot"))
    assert "gather: done" in capsys.readouterr().err
    assert (tmp_path / "o" / "source.txt").read_text().count(EOT) == 1


def test_malformed_record_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "data.jsonl"
    lines = [json.dumps({"text": d}) for d in DOCS]
    lines[16] = "{not json"
    lines[20] = json.dumps({"txt": "x"})
    bad.write_text("\n".join(lines) + "\n")
    args = ["prepare", "--input", str(bad), "--out", str(tmp_path / "o"), "--vocab-size", "300"]
    assert data.main(args) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the step log lines: the one error line
    assert err.startswith(f"error: {bad}:17: not valid JSON (") and err.endswith("(pass --skip-bad to skip such records)")
    assert not (tmp_path / "o" / "meta.json").exists()
    assert data.main([*args, "--skip-bad"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["skipped_bad_records"] == 2 and "skipped 2 bad record(s)" in err and f"{bad}:17" in err
    bad_csv = tmp_path / "d.csv"
    bad_csv.write_text("id,body\n1,x\n")
    assert data.main(["prepare", "--input", str(bad_csv), "--out", str(tmp_path / "c"), "--vocab-size", "300"]) == 2
    assert f"{bad_csv}:1: no column 'text'" in capsys.readouterr().err


@pytest.mark.parametrize("name, content, match", [
    ("x.parquet", b"PAR1", "not a valid .parquet|pyarrow"),
    ("x.parquet.gz", b"", "compressed inside"),
    ("x.zst", b"", "unknown input format"),
    ("x.txt.zst", b"", "zstandard"),
    ("x.txt.gz", b"not gzip at all", "not a valid .gz"),
    ("x.bin", b"", "unknown input format"),
])
def test_bad_inputs_are_one_line(tmp_path, name, content, match):
    if match == "zstandard" and llm.text_sources.zstandard is not None:
        pytest.skip("zstandard is installed here")
    if name == "x.parquet.gz" and llm.text_sources.pyarrow_module() is None:
        pytest.skip("pyarrow (the parquet extra) is not installed")
    (tmp_path / name).write_bytes(content)
    with pytest.raises((ValueError, OSError), match=match):
        prepare(tmp_path / name, tmp_path / "o", 300, quiet=True)
    with pytest.raises(FileNotFoundError, match="no input file matches"):
        prepare(str(tmp_path / "*.nothing"), tmp_path / "o", 300, quiet=True)
    assert (tmp_path / name).read_bytes() == content


def test_parquet_column_errors_and_missing_pyarrow(tmp_path, monkeypatch, capsys):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow (the parquet extra) is not installed")
    import pyarrow as pa

    pq.write_table(pa.table({"body": ["a b c", None, "d e f"], "n": [1, 2, 3]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"t.parquet: no column 'text' \(columns: body, n; choose one with --text-column\)"):
        prepare(tmp_path / "t.parquet", tmp_path / "o", 300, quiet=True)
    with pytest.raises(ValueError, match="column 'n' holds int64, not text"):
        prepare(tmp_path / "t.parquet", tmp_path / "o", 300, quiet=True, source_options=SourceOptions(text_column="n"))
    with pytest.raises(ValueError, match=r"t.parquet: row 2: null 'body' \(pass --skip-bad"):
        prepare(tmp_path / "t.parquet", tmp_path / "o", 300, quiet=True, source_options=SourceOptions(text_column="body"))
    monkeypatch.setattr(llm.text_sources, "pyarrow_module", lambda: None)  # as without the extra: one line naming the install
    assert data.main(["prepare", "--input", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "o"), "--vocab-size", "300"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 't.parquet'}: .parquet needs pyarrow: uv sync --extra parquet (or pip install pyarrow)\n"

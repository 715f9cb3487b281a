"""The train/val split by document hash: stable when inputs are added, exact duplicates dropped, and a
directory split the older (seeded random) way keeps its split unless asked."""

import hashlib
import json

import llm.data as data
from llm.data import EOT, load_meta, prepare


def _docs(n: int, tag: str) -> list[str]:
    return [f"Note {tag}{i}: the {tag} fox ran {i % 7} times round the old barn, then slept." for i in range(n)]


def _write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


def _sides(out):
    def docs(name):
        return [d.strip() for d in (out / name).read_text().split(EOT) if d.strip()]

    return docs("train.txt"), docs("val.txt")


def _in_val(doc: str, fraction: float) -> bool:  # the rule, from hashlib directly
    return int.from_bytes(hashlib.blake2b(doc.encode(), digest_size=8).digest(), "big") < fraction * 2**64


def test_adding_a_file_keeps_every_old_document_on_its_side(tmp_path):
    a, b = _docs(40, "a"), _docs(25, "b")
    (tmp_path / "in").mkdir()
    _write_jsonl(tmp_path / "in" / "a.jsonl", a)
    meta1 = prepare(tmp_path / "in", tmp_path / "o", 300, val_fraction=0.2, quiet=True)
    train1, val1 = _sides(tmp_path / "o")
    assert sorted(train1 + val1) == sorted(a) and meta1["duplicate_documents"] == 0
    assert val1 == [d for d in a if _in_val(d, 0.2)] and len(val1) == meta1["val_documents"] > 0
    _write_jsonl(tmp_path / "in" / "0b.jsonl", b + a[:3] + b[:2])  # sorts first: every old document moves down
    meta2 = prepare(tmp_path / "in", tmp_path / "o", 300, val_fraction=0.2, quiet=True)
    train2, val2 = _sides(tmp_path / "o")
    assert set(val1) <= set(val2) and set(train1) <= set(train2), "no old document changed side"
    assert sorted(train2 + val2) == sorted(set(a + b)), "each distinct document once"
    assert meta2["duplicate_documents"] == 5 == load_meta(tmp_path / "o")["duplicate_documents"]


def test_a_directory_split_the_random_way_keeps_it(tmp_path, capsys):
    src = tmp_path / "c.txt"
    src.write_text("".join(f"{d}\n{EOT}\n" for d in _docs(60, "c") + _docs(2, "c")))  # two duplicates
    meta = prepare(src, tmp_path / "o", 300, split="random")  # the fingerprint prepare wrote before hash splits
    assert meta["split_method"] == "random" and meta["split_seed"] == 0 and meta["val_documents"] == round(0.05 * 62)
    assert meta["duplicate_documents"] == 0, "the random split never dropped duplicates"
    state = json.loads((tmp_path / "o" / ".prepare_state.json").read_text())
    assert set(state["split"]) == {"source_sha256", "val_fraction", "separator", "seed"}
    before = _sides(tmp_path / "o")
    capsys.readouterr()
    meta = prepare(src, tmp_path / "o", 300)  # no --split: the directory's own method, said in one line
    err = capsys.readouterr().err
    assert "split by a seeded random sample; keeping it" in err and "split: up to date, skipped" in err
    assert _sides(tmp_path / "o") == before and meta["split_method"] == "random"
    meta = prepare(src, tmp_path / "o", 300, split="hash")  # asked: re-split, and from now on the default
    assert "prepare: split: done" in capsys.readouterr().err
    assert meta["split_method"] == "hash" and meta["duplicate_documents"] == 2 and meta["split_seed"] is None
    prepare(src, tmp_path / "o", 300)
    assert "split: up to date, skipped" in capsys.readouterr().err


def test_cli_split_flag_and_duplicates_line(tmp_path, capsys):
    src = tmp_path / "c.txt"
    src.write_text("".join(f"{d}\n{EOT}\n" for d in _docs(40, "d") + _docs(3, "d")))
    args = ["prepare", "--input", str(src), "--out", str(tmp_path / "o"), "--vocab-size", "300"]
    assert data.main(args) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["duplicate_documents"] == 3 and "dropped 3 exact duplicate document(s)" in err
    assert data.main([*args, "--split", "random"]) == 0
    assert json.loads(capsys.readouterr().out)["split_method"] == "random"

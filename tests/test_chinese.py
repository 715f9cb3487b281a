"""Chinese text through byte-level BPE: a mixed Chinese/English corpus the test makes (full-width punctuation,
full-width Latin letters and digits, quotes) trains, round-trips exactly, and inspect_data.py shows it decoded."""

import random
import sys
from pathlib import Path

import numpy as np
import pytest

from llm.bpe_tokenizer import BpeTokenizer
from llm.data import EOT, prepare

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import inspect_data  # noqa: E402

SUBJECTS = ["小猫", "我们", "老师", "这个模型", "妈妈", "小明和小红", "the model", "GPU"]
VERBS = ["喜欢", "正在学习", "看见了", "想要", "训练", "读完了"]
OBJECTS = ["苹果", "中文和English", "一本《新书》", "Python 程序", "ＡＢＣ和１２３", "“你好，世界”", "大约 42 个词元"]
ENDS = ["。", "！", "？", "……", "；", "。（完）"]


def zh_corpus(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct documents of 2-5 sentences, Chinese with English words, digits and full-width forms."""
    g = random.Random(seed)
    docs = []
    for i in range(n):
        sentences = [f"{g.choice(SUBJECTS)}{g.choice(VERBS)}{g.choice(OBJECTS)}{g.choice(ENDS)}" for _ in range(g.randint(2, 5))]
        docs.append(f"第{i}篇：" + "".join(sentences))
    return docs


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("zh")
    docs = zh_corpus(300)
    (d / "zh.txt").write_text("".join(f"{doc}\n{EOT}\n" for doc in docs), encoding="utf-8")
    meta = prepare(d / "zh.txt", d / "out", 600, quiet=True)
    return d / "out", docs, meta


def test_chinese_trains_and_round_trips(prepared):
    out, docs, meta = prepared
    tok = BpeTokenizer.load(meta["tokenizer_dir"])
    decoded = tok.decode(np.load(meta["train"]).tolist()) + tok.decode(np.load(meta["val"]).tolist())
    assert "\ufffd" not in decoded
    assert sorted(d.strip() for d in decoded.split(EOT) if d.strip()) == sorted(docs), "every document, byte for byte"
    text = "小明说：“ＧＰＵ很快！”Then he left。"
    assert tok.decode(tok.encode(text)) == text
    # Compression: Han characters are 3 UTF-8 bytes each, and BPE merges them (and common pairs) into tokens.
    assert meta["bytes_per_token"] == pytest.approx((out / "train.txt").stat().st_size / meta["train_tokens"], abs=1e-3)
    assert meta["bytes_per_token"] > 3.0


def test_inspect_shows_chinese_decoded(prepared, capsys):
    out, docs, _ = prepared
    assert inspect_data.main([str(out), "--no-plot", "--batches", "2"]) == 0
    report = capsys.readouterr().out
    first = (out / "train.txt").read_text(encoding="utf-8").split(f"\n{EOT}\n")[0]
    line = next(x for x in report.splitlines() if x.startswith("  first document: "))
    assert line == f"  first document: {first[:80]!r}" and "第" in line and "\ufffd" not in report


def test_partial_character_tokens_are_shown_as_bytes():
    tok = BpeTokenizer({i: bytes([i]) for i in range(256)} | {256: "猫".encode()[:2], 257: "猫".encode()}, [], [])
    assert inspect_data._token_text(tok, 256) == {"text": None, "bytes": "e78c"}
    assert inspect_data._tok_repr({"id": 256, "text": None, "bytes": "e78c"}) == "b'\\xe7\\x8c'"
    assert inspect_data._token_text(tok, 257) == {"text": "猫"}
    arr = np.array([257, 257, 256], dtype=np.uint16)  # the window ends inside a character: left out, not U+FFFD
    assert inspect_data._sample(arr, tok, None) == "猫猫"

"""GPT-2 compatibility: real GPT-2 files load via from_files and encode exactly like tiktoken's gpt2.

GPT-2's vocab.json and merges.txt are vendored in tests/fixtures/gpt2/ (with their licence). tiktoken
is built offline from the same vocab.json (tiktoken's ranks are GPT-2's token ids).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import tiktoken

from llm.bpe.gpt2_bytes import str_to_token
from llm.bpe.pretokenize import GPT2_PATTERN
from llm.bpe_tokenizer import BpeTokenizer

EOT = "<|endoftext|>"
REPO = Path(__file__).resolve().parents[1]


GPT2_DIR = REPO / "tests" / "fixtures" / "gpt2"


@pytest.fixture(scope="module")
def gpt2() -> BpeTokenizer:
    d = GPT2_DIR
    return BpeTokenizer.from_files(d / "vocab.json", d / "merges.txt", [EOT])


@pytest.fixture(scope="module")
def tik() -> tiktoken.Encoding:
    raw = json.loads((GPT2_DIR / "vocab.json").read_text(encoding="utf-8"))
    ranks = {str_to_token(s): i for s, i in raw.items() if s != EOT}
    return tiktoken.Encoding(name="gpt2_offline", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: 50256})


TEXTS = {
    "english": "Hello, world! It's a beautiful day; we've seen 1,234 birds (and I'm sure they'll sing).",
    "german": "Größenwahn über Straßen: Die Bücher wären schön, aber äußerst teuer – naïve Grüße!",
    "chinese": "我们今天去北京天安门广场，看到了很多人。机器学习是人工智能的一个分支。",
    "emoji": "I love 🍕 and 🐍!! 👩‍👩‍👧‍👦 family 🇩🇪 flag, 👍🏽 ok 🙂🙂🙂",
    "whitespace": "a  b   c\n\n\n  d\t\t e \r\n  \n\n    indented\n        code()   \u00a0nbsp \u3000ideo  ",
    "specials": f"First doc.{EOT}Second doc\n{EOT}\n{EOT}{EOT}last <|endof text|> <|endoftext",
    "code": "def f(x):\n    return x**2  # square\n\nprint(f(3))\n",
    "numbers": "In 2024, 3.14159 ≈ π and 1e10 > 999999999; ١٢٣ ⅔ ²",
}


def test_gpt2_files_load(gpt2) -> None:
    assert gpt2.vocab_size == 50257 and len(gpt2.merges) == 50000
    assert gpt2.token_id(EOT) == 50256
    assert gpt2.vocab[gpt2.encode(" the")[0]] == b" the"


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_encode_matches_tiktoken(gpt2, tik, ref_snapshot, name) -> None:
    text = TEXTS[name]
    stored = ref_snapshot({"ids": np.array(tik.encode(text, allowed_special="all"), dtype=np.int64)})
    ours = gpt2.encode(text)
    assert ours == stored["ids"].tolist()
    assert gpt2.decode(ours) == text
    assert list(gpt2.encode_iterable(text.splitlines(keepends=True))) == ours


def test_random_unicode_matches_tiktoken_and_roundtrips(gpt2, tik) -> None:
    rng = random.Random(7)
    pools = [(0x20, 0x7E), (0x09, 0x0D), (0xA0, 0x24F), (0x400, 0x4FF), (0x4E00, 0x4FFF),
             (0x1F300, 0x1F64F), (0x0, 0xD7FF), (0xE000, 0x10FFFF)]
    for _ in range(300):
        s = "".join(chr(rng.randint(*rng.choice(pools))) for _ in range(rng.randint(0, 50)))
        ids = gpt2.encode(s)
        assert ids == tik.encode_ordinary(s), repr(s)
        assert gpt2.decode(ids) == s


def test_bulk_path_matches_tiktoken(gpt2, tik, monkeypatch) -> None:
    """The NumPy piece-table path with GPT-2's vocabulary (byte ids != byte values, whole-token
    shortcut), in tiny blocks so every text crosses several."""
    import llm.bpe.piece_table as piece_table
    import llm.bpe.tokenizer as tokenizer_mod

    monkeypatch.setattr(tokenizer_mod, "_BULK", 0)
    monkeypatch.setattr(piece_table, "_BLOCK", 48)
    monkeypatch.setattr(piece_table, "_BATCH", 200)
    tok = BpeTokenizer(gpt2.vocab, gpt2.merges, [EOT])
    rng = random.Random(8)
    texts = list(TEXTS.values()) + ["".join(chr(rng.randint(0x20, 0x2FF)) for _ in range(200)) for _ in range(20)]
    for s in texts + ["".join(texts)]:
        assert tok.encode(s) == tik.encode(s, allowed_special="all"), repr(s)


def test_save_load_gpt2_roundtrip(gpt2, tmp_path) -> None:
    tok = BpeTokenizer.load(gpt2.save(tmp_path / "gpt2"))
    assert tok.vocab == gpt2.vocab and tok.merges == gpt2.merges and tok.token_id(EOT) == 50256
    s = TEXTS["english"] + EOT + TEXTS["german"]
    assert tok.encode(s) == gpt2.encode(s)

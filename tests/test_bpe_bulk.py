"""The NumPy encoding path (fast_split, hash_index, batch_bpe, piece_table) against independent
references: `regex.findall` with GPT-2's pattern, a Python dict, the tokenizer's scalar BPE and
tiktoken. Blocks and batches are made tiny here so that texts of a few KB cross many of them."""

from __future__ import annotations

import random

import numpy as np
import pytest
import regex

import llm.bpe.piece_table as piece_table
import llm.bpe.tokenizer as tokenizer_mod
from llm.bpe.batch_bpe import BatchBpe
from llm.bpe.fast_split import classify, pretoken_starts, unicode_classes
from llm.bpe.hash_index import HashIndex
from llm.bpe.pretokenize import GPT2_PATTERN, find_cut
from llm.bpe_tokenizer import BpeTokenizer, train_bpe
from tests.test_bpe import EOT, make_text, random_unicode, tiktoken_for

GPT2_RE = regex.compile(GPT2_PATTERN)
# every character class and every rule of the pattern, and the places where rules meet
EDGE = list("abcsdmtlvreSDMT'' \n\t\r\x0b\x0c12 .,!?-") + [
    "\xa0", "\x85", "\u3000", "\u2028", "\x1c", "é", "ß", "中", "文", "٣", "Ⅻ", "😀", "  ", "   ",
    "'s", "'ll", "'re", "'ve", "'d", " '", "''", "\xa0 ", " \xa0", "\n ", " \n"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> BpeTokenizer:
    p = tmp_path_factory.mktemp("bulk") / "c.txt"
    p.write_text(make_text(6000, seed=21, docs=6) + "don't we've they'll I'd it's '''s", encoding="utf-8")
    return BpeTokenizer(*train_bpe(p, 256 + 1 + 300, [EOT], num_workers=1), [EOT])


@pytest.fixture
def bulk(monkeypatch) -> None:
    """Every encode through the piece table, in blocks of ~64 chars learnt in batches of ~256."""
    monkeypatch.setattr(tokenizer_mod, "_BULK", 0)
    monkeypatch.setattr(piece_table, "_BLOCK", 64)
    monkeypatch.setattr(piece_table, "_BATCH", 256)


def split(s: str, breaks: list[int] | None = None) -> list[str]:
    cp, cls, _ = classify(s)
    st = pretoken_starts(cp, cls, None if breaks is None else np.array(breaks, np.int64)).tolist()
    return [s[a:b] for a, b in zip(st, st[1:] + [len(s)])]


def test_pretoken_starts_equal_regex_findall() -> None:
    rng = random.Random(0)
    for i in range(3000):
        s = "".join(rng.choice(EDGE) for _ in range(rng.randint(1, 40)))
        if i % 3 == 0:
            s = s.encode("ascii", "ignore").decode() or "x"  # the 1-byte ASCII path
        assert split(s) == GPT2_RE.findall(s), repr(s)
    s = random_unicode(random.Random(1), 5000)
    assert split(s) == GPT2_RE.findall(s)


def test_pretoken_starts_with_breaks_equal_findall_of_each_part() -> None:
    """Text glued from parts (special tokens taken out) splits as each part on its own."""
    rng = random.Random(2)
    for _ in range(1500):
        parts = ["".join(rng.choice(EDGE) for _ in range(rng.randint(1, 8))) for _ in range(rng.randint(2, 5))]
        breaks = np.cumsum([len(p) for p in parts[:-1]]).tolist()
        expected = [t for p in parts for t in GPT2_RE.findall(p)]
        assert split("".join(parts), breaks) == expected, parts


def test_block_cuts_are_safe() -> None:
    """The piece table cuts blocks with find_cut: pre-tokenising both sides gives the whole's pre-tokens."""
    rng = random.Random(8)
    for _ in range(1000):
        s = "".join(rng.choice(EDGE) for _ in range(rng.randint(2, 40)))
        p = find_cut(s, rng.randint(0, len(s)), (), final=True)
        if p > 0:
            assert GPT2_RE.findall(s[:p]) + GPT2_RE.findall(s[p:]) == GPT2_RE.findall(s), (s, p)


def test_unicode_classes_are_regex_classes() -> None:
    table = unicode_classes()
    rng = random.Random(3)
    for cp in [0x85, 0xA0, 0x1C, 0x2028, 0x3000, 0x661, 0x2162, 0xD800] + rng.sample(range(0x110000), 3000):
        c = chr(cp)
        want = 0 if regex.match(r"\p{L}", c) else 1 if regex.match(r"\p{N}", c) else 2 if regex.match(r"\s", c) else 3
        assert table[cp] == want, hex(cp)


def test_hash_index_equals_a_dict() -> None:
    rng = np.random.default_rng(4)
    ref: dict[tuple[int, int], int] = {}
    index = HashIndex(2, capacity=16)
    for step in range(30):  # many growths; zero keys and keys that share a word included
        a = rng.integers(0, 50, 40).astype(np.uint64) * np.uint64(2**58)
        b = rng.integers(0, 2**63, 40, dtype=np.uint64) if step % 2 else np.zeros(40, np.uint64)
        keys = {(int(x), int(y)) for x, y in zip(a, b)} - ref.keys()
        ka = np.array([k[0] for k in keys], np.uint64)
        kb = np.array([k[1] for k in keys], np.uint64)
        vals = np.arange(len(ref), len(ref) + len(keys))
        index.put(ka, kb, vals)
        ref.update(zip(keys, vals.tolist()))
        qa = np.concatenate([a, rng.integers(0, 2**63, 20, dtype=np.uint64)])
        qb = np.concatenate([b, rng.integers(0, 2**63, 20, dtype=np.uint64)])
        got = index.get(qa, qb)
        assert got.tolist() == [ref.get((int(x), int(y)), -1) for x, y in zip(qa, qb)]
    assert len(index) == len(ref)


def test_batch_bpe_equals_scalar_bpe(trained) -> None:
    """All pre-tokens at once, round by round, against the tokenizer's one-at-a-time BPE."""
    batch = BatchBpe(trained._byte_ids, trained._rank_of, trained._merged_id)
    rng = random.Random(5)
    words = sorted(set(GPT2_RE.findall(make_text(3000, seed=6))))
    words += ["".join(rng.choice("thenads ") for _ in range(rng.randint(1, 15))) for _ in range(500)]
    words += ["aaaa", "aaaaa", "   ", "     ", "x", "ééé"]
    lens = np.array([len(w.encode()) for w in words])
    ids, counts = batch(np.frombuffer("".join(words).encode(), np.uint8), lens)
    got = np.split(ids, np.cumsum(counts)[:-1])
    assert [g.tolist() for g in got] == [trained._bpe(w) for w in words]


@pytest.mark.usefixtures("bulk")
def test_bulk_encode_matches_tiktoken(trained) -> None:
    tik = tiktoken_for(trained)
    rng = random.Random(7)
    texts = ["".join(rng.choice(EDGE + [EOT, "the", " the", "and"]) for _ in range(rng.randint(0, 60)))
             for _ in range(400)]
    texts += [random_unicode(rng, 300) for _ in range(5)]
    texts += ["\xa0  x" * 40, " " * 200 + "x", "the" * 50 + " " + "thenads" * 9, EOT * 3, "", "a"]
    for s in texts:  # one after another: the table carries over between calls
        assert trained.encode(s) == tik.encode(s, allowed_special="all"), repr(s)
    whole = "".join(texts)
    assert trained.encode(whole) == tik.encode(whole, allowed_special="all")
    assert trained.encode_to_array(whole).tolist() == tik.encode(whole, allowed_special="all")


@pytest.mark.usefixtures("bulk")
def test_bulk_table_limit_and_fresh_tokenizers_agree(trained, monkeypatch) -> None:
    """A table emptied between batches (memory bound) and a cold one give the same ids."""
    text = make_text(4000, seed=9, docs=4)
    expected = tiktoken_for(trained).encode(text, allowed_special="all")
    monkeypatch.setattr(tokenizer_mod, "_TABLE_LIMIT", 50)
    tiny = BpeTokenizer(trained.vocab, trained.merges, [EOT])
    assert tiny.encode(text) == expected and tiny.encode(text) == expected
    assert tiny._table.count < len(tiny._table._whole) + 50 + piece_table._BATCH  # emptied, not grown

"""Tests for llm.bpe_tokenizer that need nothing outside the repository (fixtures made in tmp_path)."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import regex

from llm.bpe.pretokenize import GPT2_PATTERN, pretokenize
from llm.bpe_tokenizer import BpeTokenizer, main, train_bpe

EOT = "<|endoftext|>"
WORDS = ["the", "The", "then", "there", "at", "a", "an", "and", "sand", "land", "hand", "th", "he",
         "don't", "we've", "I'm", "she'll", "it's", "Straße", "über", "naïve", "日本語", "中文",
         "🙂", "👍🏽", "42", "1999", "3.14", "x=y", "(ok)", "--", "...", "\t", "  ", "\n", "\n\n", " \n "]


def make_text(n_words: int, seed: int, docs: int = 5) -> str:
    """Deterministic messy text: words, digits, punctuation, contractions, non-ASCII, whitespace
    runs, and documents separated by the special token."""
    rng = random.Random(seed)
    out = []
    for d in range(docs):
        for _ in range(n_words // docs):
            w = rng.choice(WORDS)
            out.append(w if rng.random() < 0.3 else " " + w)
        out.append(EOT if d % 2 == 0 else "\n" + EOT + "\n")
    return "".join(out)


def naive_train(text: str, vocab_size: int, specials: list[str]) -> list[tuple[bytes, bytes]]:
    """Reference trainer: recount every pair after every merge (slow, obviously right)."""
    alts = "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True))
    parts = regex.split(alts, text) if specials else [text]
    words: Counter[tuple[bytes, ...]] = Counter()
    for part in parts:
        for m in regex.finditer(GPT2_PATTERN, part):
            words[tuple(bytes([b]) for b in m.group().encode("utf-8"))] += 1
    merges = []
    while 256 + len(specials) + len(merges) < vocab_size:
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))  # most frequent, ties: greatest bytes pair
        merges.append(best)
        new: Counter[tuple[bytes, ...]] = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += c
        words = new
    return merges


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("bpe") / "corpus.txt"
    p.write_text(make_text(3000, seed=1), encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def trained(corpus) -> BpeTokenizer:
    vocab, merges = train_bpe(corpus, 256 + 1 + 300, [EOT], num_workers=1)
    return BpeTokenizer(vocab, merges, [EOT])


def test_ascii_fast_path_matches_gpt2_regex() -> None:
    rng = random.Random(0)
    alphabet = [chr(i) for i in range(128)]
    for _ in range(300):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert pretokenize(s) == regex.findall(GPT2_PATTERN, s), repr(s)


def test_train_matches_naive_reference(corpus) -> None:
    text = corpus.read_text(encoding="utf-8")
    vocab_size = 256 + 1 + 300
    vocab, merges = train_bpe(corpus, vocab_size, [EOT], num_workers=1)
    ref = naive_train(text, vocab_size, [EOT])
    assert merges == ref
    assert len(vocab) == vocab_size
    assert vocab[256] == EOT.encode() and all(vocab[b] == bytes([b]) for b in range(256))
    assert [vocab[257 + k] for k in range(len(merges))] == [a + b for a, b in merges]
    # specials never merged, never merged across: no learned token contains a piece of <|endoftext|>
    assert not any(b"<|" in a + b or b"|>" in a + b for a, b in merges)


def test_train_ties_prefer_greatest_pair(tmp_path) -> None:
    p = tmp_path / "ties.txt"
    p.write_text("ab cd ab cd zz yy", encoding="utf-8")  # (a,b), (c,d), (' ',c) tie with count 2
    _, merges = train_bpe(p, 256 + 3, [], num_workers=1)
    assert merges == naive_train(p.read_text(), 256 + 3, [])
    assert merges[0] == (b"c", b"d")  # greatest of the tied pairs wins


def test_train_invariant_to_num_workers(tmp_path) -> None:
    p = tmp_path / "c.txt"
    p.write_text(make_text(20000, seed=2, docs=40), encoding="utf-8")
    results = [train_bpe(p, 256 + 1 + 200, [EOT], num_workers=w) for w in (1, 2, 3)]
    assert results[0] == results[1] == results[2]


def test_train_errors(tmp_path) -> None:
    p = tmp_path / "c.txt"
    p.write_text("hello", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab_size 200 .*257"):
        train_bpe(p, 200, [EOT])
    bad = tmp_path / "bad.txt"
    bad.write_bytes("héllo wörld ".encode() * 10 + b"\xff tail")
    with pytest.raises(ValueError, match=r"byte offset 140"):
        train_bpe(bad, 300, [EOT])
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    vocab, merges = train_bpe(empty, 1000, [EOT])
    assert merges == [] and len(vocab) == 257 and vocab[256] == EOT.encode()


def random_unicode(rng: random.Random, n: int) -> str:
    pools = [(0x20, 0x7E), (0x09, 0x0D), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x4FFF),
             (0x1F300, 0x1F64F), (0x3000, 0x3003), (0x0, 0xD7FF), (0xE000, 0x10FFFF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        out.append(chr(rng.randint(lo, hi)))
        if rng.random() < 0.02:
            out.append(EOT)
    return "".join(out)


def test_roundtrip_and_streaming_property(trained) -> None:
    rng = random.Random(1234)
    for _ in range(200):
        s = random_unicode(rng, rng.randint(0, 60))
        ids = trained.encode(s)
        assert trained.decode(ids) == s
        # any split of the input streams to the same ids
        cuts = sorted(rng.randint(0, len(s)) for _ in range(3))
        pieces = [s[i:j] for i, j in zip([0, *cuts], [*cuts, len(s)])]
        assert list(trained.encode_iterable(pieces)) == ids


def test_decode_invalid_utf8_gives_replacement(trained) -> None:
    s = "日本語🙂 über"
    data = s.encode()
    for k in range(len(data) + 1):
        # ids of every prefix of the *bytes*, built from single-byte tokens
        ids = [b for b in data[:k]]
        assert trained.decode(ids) == data[:k].decode("utf-8", errors="replace")
    assert "\ufffd" in trained.decode([0xE6])
    with pytest.raises(ValueError, match="unknown token id"):
        trained.decode([10**6])


def test_encode_iterable_long_stream_matches_encode(trained) -> None:
    text = make_text(40000, seed=3, docs=30)
    lines = text.splitlines(keepends=True)
    assert list(trained.encode_iterable(lines)) == trained.encode(text)
    # character by character around special tokens and whitespace runs
    small = make_text(400, seed=4, docs=4)
    assert list(trained.encode_iterable(iter(small))) == trained.encode(small)


def test_special_tokens_overlapping_longest_first() -> None:
    vocab = {i: bytes([i]) for i in range(256)}
    tok = BpeTokenizer(vocab, [], [EOT, EOT + EOT])
    a, aa = tok.token_id(EOT), tok.token_id(EOT + EOT)
    assert a != aa
    assert tok.encode(EOT + EOT + EOT + "x") == [aa, a, ord("x")]
    assert tok.decode(tok.encode("hi" + EOT + EOT)) == "hi" + EOT + EOT
    with pytest.raises(ValueError, match="not a special token"):
        tok.token_id("<|nope|>")


def test_save_load_roundtrip_and_encode_file(trained, tmp_path) -> None:
    d = trained.save(tmp_path / "tok")
    assert {p.name for p in d.iterdir()} == {"vocab.json", "merges.txt", "tokenizer_config.json"}
    tok = BpeTokenizer.load(d)
    assert tok.vocab == trained.vocab and tok.merges == trained.merges
    assert tok.special_tokens == [EOT] and tok.token_id(EOT) == 256
    assert tok.vocab_size == trained.vocab_size == 557
    text = make_text(30000, seed=5, docs=20)
    src = tmp_path / "in.txt"
    src.write_text(text, encoding="utf-8")
    for w in (1, 2):
        n = tok.encode_file(src, tmp_path / f"out{w}.npy", num_workers=w, progress=False)
        arr = np.load(tmp_path / f"out{w}.npy", mmap_mode="r")
        assert arr.dtype == np.uint16 and n == len(arr)
        assert arr.tolist() == trained.encode(text)


def test_encode_file_uint32_for_large_vocab(tmp_path) -> None:
    vocab = {i: bytes([i]) for i in range(256)}
    vocab[70000] = EOT.encode()
    tok = BpeTokenizer(vocab, [], [EOT])
    src = tmp_path / "in.txt"
    src.write_text("ab" + EOT + "c", encoding="utf-8")
    n = tok.encode_file(src, tmp_path / "o.npy", progress=False)
    arr = np.load(tmp_path / "o.npy", mmap_mode="r")
    assert arr.dtype == np.uint32 and n == 4 and arr.tolist() == [97, 98, 70000, 99]


def test_cli_train_encode_and_errors(corpus, tmp_path, capsys) -> None:
    out = tmp_path / "tok"
    assert main(["train", "--input", str(corpus), "--vocab-size", "300", "--special-token", EOT,
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "longest token" in printed and "wall time" in printed
    npy = tmp_path / "ids.npy"
    assert main(["encode", "--tokenizer", str(out), "--input", str(corpus), "--output", str(npy)]) == 0
    assert "bytes/token" in capsys.readouterr().out
    tok = BpeTokenizer.load(out)
    assert np.load(npy).tolist() == tok.encode(corpus.read_text(encoding="utf-8"))
    assert main(["train", "--input", str(corpus), "--vocab-size", "10", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert main(["encode", "--tokenizer", str(tmp_path / "missing"), "--input", str(corpus),
                 "--output", str(npy)]) == 2

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
    with pytest.raises(ValueError, match="list of strings"):
        train_bpe(p, 300, EOT)
    with pytest.raises(ValueError, match="empty string"):
        BpeTokenizer({i: bytes([i]) for i in range(256)}, [], [""])
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
    # the files open in HF tokenizers (GPT-2 format) and encode the same
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf = Tokenizer(models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    sample = make_text(500, seed=6, docs=1).replace(EOT, "")
    assert hf.encode(sample).ids == tok.encode(sample)
    text = make_text(30000, seed=5, docs=20)
    src = tmp_path / "in.txt"
    src.write_text(text, encoding="utf-8")
    for w in (1, 2):
        n = tok.encode_file(src, tmp_path / f"out{w}.npy", num_workers=w, progress=False)
        arr = np.load(tmp_path / f"out{w}.npy", mmap_mode="r")
        assert arr.dtype == np.uint16 and n == len(arr)
        assert arr.tolist() == trained.encode(text)


def test_pickle_roundtrip(trained) -> None:
    import pickle

    trained.encode("warm the caches " * 3)
    clone = pickle.loads(pickle.dumps(trained))
    s = make_text(300, seed=11)
    assert clone.encode(s) == trained.encode(s) and clone.token_id(EOT) == trained.token_id(EOT)


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


def tiktoken_for(tok: BpeTokenizer):
    """tiktoken Encoding with the same vocabulary: an independent encoder to compare against."""
    import tiktoken

    specials = {s: tok.token_id(s) for s in tok.special_tokens}
    ranks = {b: i for i, b in tok.vocab.items() if i not in specials.values()}
    return tiktoken.Encoding(name="trained", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def test_whitespace_set_is_regex_backslash_s() -> None:
    from llm.bpe.pretokenize import WHITESPACE

    ws = {c for c in map(chr, range(0x3001)) if regex.match(r"\s", c)}
    assert ws == WHITESPACE  # no White_Space character lies above U+3000


def test_encode_fast_path_matches_tiktoken_on_whitespace_soup(trained, ref_snapshot) -> None:
    """The regex path (and its cache) against tiktoken over many messy strings, encoded one after
    another by the same tokenizer so cached pieces meet new contexts; glued, the NumPy path."""
    tik = tiktoken_for(trained)
    alphabet = [" ", " ", " ", "  ", "\n", "\n\n", "\t", "\r\n", "\x0b", "\x0c", "\u00a0", "\u3000", "\u2028",
                "a", "the", "The", "and", "'s", "'ll", "'", "7", "42", ",", ".", "!?", "ü", "日本", "🙂", EOT]
    rng = random.Random(99)
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(1500)]
    texts += [" " * k + "x" + " " * k for k in range(6)] + ["\n \n", " \n", "\n ", "a  b", "a \u00a0b"]
    ref = [tik.encode(s, allowed_special="all") for s in texts]
    lengths = np.array([len(r) for r in ref])
    stored = ref_snapshot({"lengths": lengths, "ids": np.concatenate([np.array(r, dtype=np.int64) for r in ref])})
    ids = [trained.encode(s) for s in texts]
    assert np.array_equal(np.array([len(r) for r in ids]), stored["lengths"].numpy())
    assert np.concatenate([np.array(r, dtype=np.int64) for r in ids]).tolist() == stored["ids"].tolist()
    # the same strings glued into one text (bulk cache fill) and streamed piecewise
    whole = "".join(texts)
    assert trained.encode(whole) == tik.encode(whole, allowed_special="all")
    assert trained.encode(whole * 3) == tik.encode(whole * 3, allowed_special="all")  # > one block
    assert list(trained.encode_iterable(texts)) == trained.encode(whole)


def test_train_agrees_with_hf_tokenizers_until_first_tie() -> None:
    """HF `tokenizers` breaks count ties differently, so compare merges up to the first step at which
    the naive trainer sees a tie for the top count."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    rng = random.Random(5)
    letters, weights = "etaoinshrdlu", [30, 25, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3]
    text = "".join(" " + "".join(rng.choices(letters, weights, k=rng.randint(1, 6))) for _ in range(8000))
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=256 + 60, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([text], trainer)
    import json

    from llm.bpe.gpt2_bytes import str_to_token

    raw = json.loads(hf.to_str())["model"]["merges"]
    hf_merges = [tuple(map(str_to_token, m.split(" ") if isinstance(m, str) else m)) for m in raw]

    # first tie according to a naive recount
    words: Counter[tuple[bytes, ...]] = Counter(tuple(bytes([b]) for b in m.encode()) for m in
                                                regex.findall(GPT2_PATTERN, text))
    untied = 0
    while untied < len(hf_merges):
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += c
        top = pairs.most_common(2)
        if len(top) < 2 or top[0][1] == top[1][1]:
            break
        best = top[0][0]
        words = Counter({tuple(_merge(w, best)): c for w, c in words.items()})
        untied += 1
    assert untied >= 10, f"fixture should give a long tie-free prefix, got {untied}"
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "t.txt"
        p.write_text(text, encoding="utf-8")
        _, merges = train_bpe(p, 256 + 60, [], num_workers=1)
    assert merges[:untied] == hf_merges[:untied]


def _merge(w: tuple[bytes, ...], pair: tuple[bytes, bytes]) -> list[bytes]:
    out, i = [], 0
    while i < len(w):
        if i + 1 < len(w) and (w[i], w[i + 1]) == pair:
            out.append(w[i] + w[i + 1])
            i += 2
        else:
            out.append(w[i])
            i += 1
    return out


def test_encode_iterable_is_lazy_with_bounded_buffer(trained) -> None:
    """An endless stream: ids must flow after a bounded amount of input (no whole-text buffering)."""
    from itertools import islice

    from llm.bpe.tokenizer import _STREAM_MIN

    consumed = 0
    rng = random.Random(0)
    lines = [make_text(30, seed=s, docs=1).replace("\n", " ") + "\n" for s in range(20)]

    def endless():
        nonlocal consumed
        while True:
            line = rng.choice(lines)
            consumed += len(line)
            yield line

    first = list(islice(trained.encode_iterable(endless()), 5000))
    assert len(first) == 5000
    assert consumed < 4 * _STREAM_MIN + 20000  # ~5000 ids need ~20K chars; the buffer adds <= ~2x64K


def test_long_pretokens_match_tiktoken(trained) -> None:
    """Pre-tokens longer than the short-word path (heap BPE) and longer than the cache limit."""
    tik = tiktoken_for(trained)
    rng = random.Random(3)
    texts = ["the" * 700, "ab" * 1500 + " " + "x" * 999, "".join(rng.choice("thenads") for _ in range(5000)),
             " " + "".join(rng.choice("日本語中文") for _ in range(300)), "1234567890" * 50]
    for s in texts:
        assert trained.encode(s) == tik.encode_ordinary(s)


def test_small_read_blocks_and_many_chunks_change_nothing(tmp_path, monkeypatch, trained) -> None:
    """Workers read their range in blocks cut at safe places; tiny blocks must give the same text,
    the same training result and the same encoded file."""
    import llm.bpe.chunks as chunks
    from llm.bpe.chunks import chunk_boundaries, iter_range_text

    text = make_text(6000, seed=8, docs=7)
    p = tmp_path / "c.txt"
    p.write_text(text, encoding="utf-8")
    expected = train_bpe(p, 256 + 1 + 80, [EOT], num_workers=1)
    ids = trained.encode(text)
    monkeypatch.setattr(chunks, "BLOCK", 997)
    bounds = chunk_boundaries(p, 5, [EOT])
    assert len(bounds) == 6
    pieces = [t for a, b in zip(bounds, bounds[1:]) for t in iter_range_text(p, a, b, [EOT])]
    assert len(pieces) > 20 and "".join(pieces) == text
    assert train_bpe(p, 256 + 1 + 80, [EOT], num_workers=3) == expected
    trained.encode_file(p, tmp_path / "o.npy", num_workers=2, progress=False)
    assert np.load(tmp_path / "o.npy").tolist() == ids


def test_errors_from_workers_and_encode_file(tmp_path, trained) -> None:
    bad = tmp_path / "bad.txt"
    good = ("word " * 50_000).encode()
    bad.write_bytes(good + b"\xc3\x28 tail" + good)
    with pytest.raises(ValueError, match=f"byte offset {len(good)}"):
        train_bpe(bad, 300, [EOT], num_workers=2)
    with pytest.raises(ValueError, match=f"byte offset {len(good)}"):
        trained.encode_file(bad, tmp_path / "o.npy", num_workers=2, progress=False)
    assert not (tmp_path / "o.npy").exists() and list(tmp_path.iterdir()) == [bad]
    with pytest.raises(ValueError, match="not found"):
        trained.encode_file(tmp_path / "missing.txt", tmp_path / "o.npy")


def test_specials_with_spaces_encode_and_stream(trained) -> None:
    specials = [EOT, "<|a b|>", "hello world"]
    tok = BpeTokenizer(trained.vocab, trained.merges, specials)
    assert tok.token_id("<|a b|>") != tok.token_id("hello world") and tok.token_id(EOT) == 256
    tik = tiktoken_for(tok)
    rng = random.Random(12)
    parts = ["hello", " world", "hello world", "<|a b|>", "<|a", " b|>", EOT, " the", "  ", "\n", "x"]
    for _ in range(200):
        s = "".join(rng.choice(parts) for _ in range(rng.randint(0, 40)))
        ids = tok.encode(s)
        assert ids == tik.encode(s, allowed_special="all"), repr(s)
        assert tok.decode(ids) == s
        cut = sorted(rng.randint(0, len(s)) for _ in range(4))
        pieces = [s[i:j] for i, j in zip([0, *cut], [*cut, len(s)])]
        assert list(tok.encode_iterable(pieces)) == ids
    long = "".join(rng.choice(parts) for _ in range(30000))  # several streaming buffers
    assert list(tok.encode_iterable(long[i : i + 777] for i in range(0, len(long), 777))) == tok.encode(long)


def test_word_and_punctuation_specials_in_bulk_fill_match_tiktoken(trained) -> None:
    """Specials that look like an ASCII word or punctuation ("hello", "...") stay special, on the
    regex path and (glued into one long text) on the NumPy path."""
    rng = random.Random(5)
    words = ["alpha", "beta", "data.", "hello", "hello,", "say", "x", "a.", "...", EOT, "foo...", "z" + EOT, "a.b"]
    for special in ["hello", "...", "a."]:
        tok = BpeTokenizer(trained.vocab, trained.merges, [EOT, special])
        tik = tiktoken_for(tok)
        texts = [" ".join(rng.choice(words) + rng.choice(["", "q", ".", ";'"]) for _ in range(60)) for _ in range(20)]
        for s in texts + ["".join(texts)]:
            assert tok.encode(s) == tik.encode(s, allowed_special="all"), (special, s)

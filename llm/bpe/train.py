"""Byte-level BPE training: `train_bpe(input_path, vocab_size, special_tokens) -> (vocab, merges)`.

Vocabulary id layout (ours, CS336-style): ids 0..255 are the single bytes (id == byte value), then
the special tokens in the order given, then one id per merge in creation order. Real GPT-2 files
loaded with `BpeTokenizer.from_files` keep GPT-2's own ids.

The rule is exact: each step merges the most frequent adjacent pair (summed over pre-token counts);
ties go to the lexicographically greatest pair `(bytes_a, bytes_b)`. The algorithm:
1. count unique pre-tokens (in parallel over file ranges, see `count_pretokens`);
2. count pairs once, keep `pair -> words containing it`;
3. per merge, rewrite only the words that contain the pair, updating pair counts incrementally;
4. pick the best pair with a lazy max-heap. Only pairs with the new token ever *gain* count, so
   other entries can only be stale-high: pop, and if the stored count is stale push it back
   corrected. The heap key inverts the byte order so the min-heap yields the greatest pair on ties.
"""

from __future__ import annotations

import heapq
import multiprocessing as mp
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from operator import add

from llm.bpe.chunks import chunk_boundaries, iter_range_text
from llm.bpe.pretokenize import pretokenize, special_splitter
from llm.machine import usable_cores

# bytes -> str with code point 255-b: string order of the result is the reverse of byte order
_INVERT = bytes(range(255, -1, -1))
_SENTINEL = "\u0100"  # larger than any inverted byte: a proper prefix sorts *after* its extensions


def _desc_key(token: bytes) -> str:
    """String whose ascending order is the descending order of `token` (bytes order)."""
    return token.translate(_INVERT).decode("latin-1") + _SENTINEL


def check_workers(num_workers: int | None) -> None:
    """None means the default; any other value must be a positive count (0 or -1 do not mean "default" or
    "all cores" here: they are errors rather than a silent guess)."""
    if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1):
        raise ValueError(f"num_workers must be >= 1 (or unset for the default), got {num_workers}")


def mp_context() -> mp.context.BaseContext:
    """fork where available: workers start in milliseconds and inherit the (read-only) state."""
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else methods[0])


def _count_range(args: tuple[str, int, int, tuple[str, ...]]) -> Counter[str]:
    path, start, end, specials = args
    split = special_splitter(specials)
    counts: Counter[str] = Counter()
    for text in iter_range_text(path, start, end, specials):
        # special tokens are dropped: they never take part in merges, and splitting on them keeps
        # pre-tokens (hence pairs) from crossing document boundaries.
        for i, part in enumerate(split.split(text) if split else (text,)):
            if i % 2 == 0 and part:
                counts.update(pretokenize(part))
    return counts


def count_pretokens(
    input_path: str | os.PathLike,
    special_tokens: Sequence[str],
    num_workers: int | None = None,
    progress: bool = False,
) -> Counter[str]:
    """Counter of pre-token strings over the file; workers count their own byte ranges."""
    check_workers(num_workers)
    path = os.fspath(input_path)
    size = os.path.getsize(path)
    if num_workers is None:
        num_workers = min(usable_cores(), 1 + size // (1 << 20))  # tiny files: no process start-up
    num_tasks = max(num_workers, -(-size // (32 << 20)))  # ~32 MB tasks so progress can be shown
    bounds = chunk_boundaries(path, num_tasks, special_tokens)
    tasks = [(path, a, b, tuple(special_tokens)) for a, b in zip(bounds, bounds[1:])]
    t0 = time.perf_counter()
    if num_workers <= 1 or len(tasks) <= 1:
        results = map(_count_range, tasks)
        pool = None
    else:
        pool = mp_context().Pool(min(num_workers, len(tasks)))
        results = pool.imap(_count_range, tasks)
    total: Counter[str] = Counter()
    try:
        for (_, a, b, _), counts in zip(tasks, results):
            total.update(counts)  # fast dict update while total is empty
            if progress:
                done = b  # ranges complete in order (imap)
                mbs = done / 1e6 / max(time.perf_counter() - t0, 1e-9)
                print(f"pre-tokenise: {done / 1e6:.1f}/{size / 1e6:.1f} MB, {mbs:.1f} MB/s, "
                      f"{len(total):,} unique", file=sys.stderr, flush=True)
    finally:
        if pool is not None:
            pool.terminate()
    return total


def _char(i: int) -> str:
    """Token id -> one character (skipping the surrogate block, which str cannot hold)."""
    return chr(i if i < 0xD800 else i + 0x800)


def _id(c: str) -> int:
    i = ord(c)
    return i if i < 0xD800 else i - 0x800


def merge_pairs(
    word_counts: dict[bytes, int],
    num_merges: int,
    first_id: int,
    progress: bool = False,
) -> list[tuple[int, int]]:
    """The exact BPE merge sequence as (id_a, id_b) pairs; merge k creates id first_id + k.

    word_counts maps a pre-token's UTF-8 bytes to its count; byte b starts as token id b.
    Each word is a `str` with one character per token, so a pair is a 2-character string and
    rewriting a word is `str.replace` (C speed, and exactly the left-to-right non-overlapping merge).
    """
    if first_id + num_merges + 0x800 > 0x10FFFF:
        raise ValueError(f"vocab_size {first_id + num_merges} is too large (at most {0x10FFFF - 0x800})")
    tok: dict[int, bytes] = {b: bytes([b]) for b in range(256)}
    key: dict[str, str] = {_char(b): _desc_key(t) for b, t in tok.items()}
    words, counts, pair_count, where = _index_words(word_counts)
    heap = [(-c, key[q[0]] + key[q[1]], q) for q, c in pair_count.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    t0 = last = time.perf_counter()
    while len(merges) < num_merges and heap:
        negc, k, p = heapq.heappop(heap)
        c = pair_count.get(p, 0)
        if c != -negc:  # stale: the pair lost count since it was pushed
            if c > 0:
                heapq.heappush(heap, (-c, k, p))
            continue
        ca, cb = p
        t = first_id + len(merges)
        tc = _char(t)
        merges.append((_id(ca), _id(cb)))
        tok[t] = tok[_id(ca)] + tok[_id(cb)]
        key[tc] = _desc_key(tok[t])
        new_pairs = _merge_in_words(p, tc, words, counts, pair_count, where)
        pair_count.pop(p, None)
        for q in new_pairs:
            if pair_count[q] > 0:
                heapq.heappush(heap, (-pair_count[q], key[q[0]] + key[q[1]], q))
        if progress and (now := time.perf_counter()) - last > 1.0:
            last = now
            m = len(merges)
            eta = (now - t0) / m * (num_merges - m)
            print(f"merges: {m:,}/{num_merges:,}, ETA {eta:.0f} s", file=sys.stderr, flush=True)
    if progress:
        print(f"merges: {len(merges):,}/{num_merges:,} in {time.perf_counter() - t0:.1f} s"
              + ("" if len(merges) == num_merges else " (no pairs left)"), file=sys.stderr, flush=True)
    return merges


def _index_words(
    word_counts: dict[bytes, int],
) -> tuple[list[str], list[int], defaultdict[str, int], defaultdict[str, list[int]]]:
    """(words, their counts, pair -> summed count, pair -> indices of the words holding it) for merge_pairs;
    words of one byte are left out, as they never hold a pair."""
    words: list[str] = []
    counts: list[int] = []
    pair_count: defaultdict[str, int] = defaultdict(int)
    where: defaultdict[str, list[int]] = defaultdict(list)  # may hold stale/duplicate entries
    for w, c in word_counts.items():
        if len(w) < 2:
            continue
        wi = len(words)
        s = w.decode("latin-1")  # byte b -> character b == token id b
        words.append(s)
        counts.append(c)
        for q in set(map(add, s, s[1:])):
            where[q].append(wi)
        for q in map(add, s, s[1:]):
            pair_count[q] += c
    return words, counts, pair_count, where


def _merge_in_words(
    p: str,
    tc: str,
    words: list[str],
    counts: list[int],
    pair_count: defaultdict[str, int],
    where: defaultdict[str, list[int]],
) -> set[str]:
    """Rewrite pair ``p`` as token ``tc`` in every word holding it, updating ``pair_count`` and ``where``
    incrementally; return the pairs that gained count (all contain ``tc``)."""
    ca, cb = p
    new_pairs: set[str] = set()
    for wi in where.pop(p):
        w = words[wi]
        i = w.find(p)
        if i < 0:
            continue  # stale index entry: the pair left this word in an earlier merge
        cw = counts[wi]
        nw = words[wi] = w.replace(p, tc)
        n = len(w)
        if n == 2:
            continue  # the whole word became t: only p itself disappears
        if w.find(p, i + 2) < 0:
            # one occurrence: only the neighbours' pairs change
            if i:
                left = w[i - 1]
                pair_count[left + ca] -= cw
                q = left + tc
                pair_count[q] += cw
                where[q].append(wi)
                new_pairs.add(q)
            if i + 2 < n:
                right = w[i + 2]
                pair_count[cb + right] -= cw
                q = tc + right
                pair_count[q] += cw
                where[q].append(wi)
                new_pairs.add(q)
        else:  # several occurrences: recount this word's pairs
            for q in map(add, w, w[1:]):
                pair_count[q] -= cw
            for q in map(add, nw, nw[1:]):
                pair_count[q] += cw
                if tc in q:
                    where[q].append(wi)
                    new_pairs.add(q)
    return new_pairs


def train_bpe(
    input_path: str | os.PathLike,
    vocab_size: int,
    special_tokens: Sequence[str],
    num_workers: int | None = None,
    progress: bool | None = None,
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Train byte-level BPE on a UTF-8 text file.

    Returns vocab {id: bytes} (256 bytes, then specials, then one entry per merge: len == vocab_size
    unless the corpus runs out of pairs) and merges [(bytes_a, bytes_b)] in creation order.
    `progress=None` shows progress on stderr for inputs over 16 MB.
    """
    if isinstance(special_tokens, str):
        raise ValueError("special_tokens must be a list of strings, not one string")
    specials = list(dict.fromkeys(special_tokens))  # de-duplicate, keep order
    if "" in specials:
        raise ValueError("a special token cannot be the empty string")
    base = 256 + len(specials)
    if vocab_size < base:
        raise ValueError(
            f"vocab_size {vocab_size} is smaller than the {base} base tokens "
            f"(256 bytes + {len(specials)} special tokens)"
        )
    path = os.fspath(input_path)
    if not os.path.isfile(path):
        raise ValueError(f"input file not found: {path}")
    if progress is None:
        progress = os.path.getsize(path) > (16 << 20)
    counts = count_pretokens(path, specials, num_workers, progress)
    word_counts: dict[bytes, int] = {}
    for w, c in counts.items():
        word_counts[w.encode("utf-8")] = c
    del counts
    pairs = merge_pairs(word_counts, vocab_size - base, base, progress)

    vocab: dict[int, bytes] = {b: bytes([b]) for b in range(256)}
    for i, s in enumerate(specials):
        vocab[256 + i] = s.encode("utf-8")
    merges: list[tuple[bytes, bytes]] = []
    for k, (a, b) in enumerate(pairs):
        vocab[base + k] = vocab[a] + vocab[b]
        merges.append((vocab[a], vocab[b]))
    return vocab, merges

"""Encode long texts in bulk: NumPy pre-tokenisation plus a hash table of pre-tokens already seen.

Text repeats its words, so BPE runs once per distinct pre-token and the rest is lookups. A Python
dict would need one str object and one lookup per pre-token (~1 µs each, the cost that caps a
pure-Python encoder); here a block of text is pre-tokenised at once (fast_split.py) and all its
pre-tokens are looked up at once in an open-addressing table held in NumPy arrays.

Key of a pre-token of up to 15 UTF-8 bytes: two uint64 words read straight from the byte buffer,
its first 7 bytes with its length in the top byte, and its last 8 bytes (0 when it has <= 7).
The two cover every byte, so the key *is* the pre-token and lookups are exact; a hash of it only
picks the slot. Longer pre-tokens (rare: long words, digit runs, unspaced scripts) go through `long_bpe`,
the tokenizer's memoised str path. Values are (offset, count) into one uint32 pool of token ids.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from llm.bpe.fast_split import classify, pretoken_starts, utf8_offsets
from llm.bpe.hash_index import HashIndex
from llm.bpe.pretokenize import find_cut

_KEY_BYTES = 15
_BLOCK = 1 << 17  # chars per block: temporaries stay in the CPU cache and below malloc's mmap size
_BATCH = 1 << 21  # chars of blocks whose new pre-tokens are learnt together
_BATCH_NEW = 1 << 15  # ... or fewer blocks, once they hold this many new pre-tokens
_MASKS = np.array([(1 << (8 * k)) - 1 for k in range(8)], dtype=np.uint64)

BatchBpe = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _keys(buf: np.ndarray, start: np.ndarray, nbytes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first 7 bytes | length << 56, last 8 bytes or 0) of each piece (<= 15 bytes; longer ones get
    nonsense); buf is uint8 with 8 zero bytes of padding."""
    word = np.ndarray((len(buf) - 8,), "<u8", buffer=buf, strides=(1,))  # 8 bytes from every offset
    k0 = word[start] & _MASKS[np.minimum(nbytes, 7)] | (nbytes.astype(np.uint64) << np.uint64(56))
    k1 = np.where(nbytes > 7, word[np.maximum(start + nbytes - 8, 0)], np.uint64(0))
    return k0, k1


def chars_to_ids(chars: str) -> np.ndarray:
    """uint32 ids from the str-of-chr(id) carrier the tokenizer's str paths use (one C call)."""
    return np.frombuffer(chars.encode("utf-32-le", "surrogatepass"), np.uint32)


def _ragged(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Indices start_0 .. start_0 + count_0 - 1, start_1 .., back to back."""
    before = np.cumsum(counts) - counts
    return np.repeat(starts - before, counts) + np.arange(int(counts.sum()))


class PieceTable:
    """pre-token -> token ids, for whole blocks of text at once.

    bpe(bytes, lens) runs BPE on new pre-tokens of <= 15 bytes, all at once (batch_bpe.py);
    long_bpe(pre_token) returns the ids of a longer one as a str of chr(id) (the tokenizer's memo).
    whole: pre-tokens that are tokens themselves (tiktoken's shortcut), known from the start.
    `limit` bounds the number of entries beyond those: the table starts afresh when it is passed
    (at 2^16 the arrays stay under 11 MB with GPT-2's vocabulary, measured on random words).
    """

    def __init__(self, bpe: BatchBpe, long_bpe: Callable[[str], str], whole: dict[bytes, int],
                 limit: int = 1 << 16) -> None:
        self._bpe, self._long_bpe = bpe, long_bpe
        self._whole = {b: i for b, i in whole.items() if 0 < len(b) <= _KEY_BYTES}
        self._limit = len(self._whole) + limit
        self.clear()

    def clear(self) -> None:
        self._index = HashIndex(2)  # key words (see the module doc) -> entry
        self._off = np.zeros(0, np.int64)  # entry -> its ids in the pool
        self._cnt = np.zeros(0, np.int64)
        self._pool = np.zeros(1 << 14, np.uint32)
        self._used = 0  # pool entries in use
        if self._whole:
            data = b"".join(self._whole) + bytes(8)
            lens = np.fromiter(map(len, self._whole), np.int64, len(self._whole))
            k0, k1 = _keys(np.frombuffer(data, np.uint8), np.cumsum(lens) - lens, lens)
            ids = np.fromiter(self._whole.values(), np.uint32, len(self._whole))
            self._add(k0, k1, ids, np.ones(len(ids), np.int64))

    @property
    def count(self) -> int:
        return len(self._index)

    def _add(self, k0, k1, ids: np.ndarray, cnt: np.ndarray) -> None:
        """New entries (absent, distinct) with their ids back to back."""
        off = self._stage(ids) + np.cumsum(cnt) - cnt
        self._used += len(ids)
        first = len(self._off)
        self._off = np.concatenate([self._off, off])
        self._cnt = np.concatenate([self._cnt, cnt])
        self._index.put(k0, k1, np.arange(first, first + len(cnt)))

    def _stage(self, ids: np.ndarray) -> int:
        """Write ids just past the pool's entries in use (growing it); returns where they start.
        They stay only until the next write unless the caller then advances `_used`."""
        end = self._used + len(ids)
        if end > len(self._pool):
            pool = np.zeros(max(2 * len(self._pool), end), np.uint32)
            pool[: self._used] = self._pool[: self._used]
            self._pool = pool
        self._pool[self._used : end] = ids
        return self._used

    # ---------------------------------------------------------------- encoding
    def encode(self, text: str, breaks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """uint32 ids of a text without special tokens, in blocks cut at safe places (pretokenize.find_cut).

        breaks: sorted positions in [0, len(text)] where special tokens were taken out (each side is
        pre-tokenised on its own); returned with the ids: the number of ids before each break.

        Blocks of _BLOCK chars keep the temporaries small; up to _BATCH chars of blocks are scanned
        first and their new pre-tokens learnt in one BatchBpe call (its cost is per round, not per
        pre-token), then assembled.
        """
        breaks = np.zeros(0, np.int64) if breaks is None else np.asarray(breaks, np.int64)
        at = np.zeros(len(breaks), np.int64)
        out, scans, start, end, done = [], [], 0, len(text), 0
        while start < end:
            if not scans and self.count > self._limit:  # bounded memory: start afresh, between batches
                self.clear()
            p = find_cut(text, start + _BLOCK, (), final=True)  # specials are out already
            p = end if p < 0 else p
            lo, hi = np.searchsorted(breaks, (start, p))
            scans.append((self._scan(text[start:p], breaks[lo:hi] - start), lo, hi))
            start = p
            if start == end or sum(len(sc.text) for sc, _, _ in scans) >= _BATCH or \
                    sum(len(sc.miss) for sc, _, _ in scans) >= _BATCH_NEW:  # (also bounds the table)
                self._learn([sc for sc, _, _ in scans])
                for sc, lo, hi in scans:
                    ids, before = self._assemble(sc)
                    at[lo:hi] = done + before
                    out.append(ids)
                    done += len(ids)
                scans = []
        at[np.searchsorted(breaks, end) :] = done
        ids = np.concatenate(out) if len(out) > 1 else out[0] if out else np.zeros(0, np.uint32)
        return ids, at

    def _scan(self, text: str, breaks: np.ndarray) -> _Scan:
        """Pre-tokenise a block, key its pre-tokens and look them up."""
        cp, cls, raw = classify(text)
        starts = pretoken_starts(cp, cls, breaks[breaks > 0])
        ends = np.empty_like(starts)
        ends[:-1], ends[-1] = starts[1:], len(cp)
        if len(raw) == len(cp):
            bstart, nbytes = starts, ends - starts
        else:
            at = utf8_offsets(cp)
            bstart = at[starts]
            nbytes = at[ends] - bstart
        buf = np.frombuffer(raw + bytes(8), np.uint8)
        k0, k1 = _keys(buf, bstart, nbytes)
        long_ = np.flatnonzero(nbytes > _KEY_BYTES)
        k0[long_] = 0  # looked up by string instead; a zero word matches no entry
        entry = self._index.get(k0, k1)
        miss = np.flatnonzero((entry < 0) & (k0 != 0))
        return _Scan(text, breaks, starts, ends, bstart, nbytes, buf, k0, k1, long_, entry, miss)

    def _learn(self, scans: list[_Scan]) -> None:
        """BPE of the distinct pre-tokens missing from the table, all blocks at once; then add them."""
        scans = [sc for sc in scans if len(sc.miss)]
        if not scans:
            return
        k0 = np.concatenate([sc.k0[sc.miss] for sc in scans])
        k1 = np.concatenate([sc.k1[sc.miss] for sc in scans])
        nbytes = np.concatenate([sc.nbytes[sc.miss] for sc in scans])
        data = np.concatenate([sc.buf[_ragged(sc.bstart[sc.miss], sc.nbytes[sc.miss])] for sc in scans])
        order = np.lexsort((k1, k0))  # one representative per distinct key
        k0s, k1s = k0[order], k1[order]
        first = order[np.concatenate(([True], (k0s[1:] != k0s[:-1]) | (k1s[1:] != k1s[:-1])))]
        ids, cnt = self._bpe(data[_ragged((np.cumsum(nbytes) - nbytes)[first], nbytes[first])], nbytes[first])
        self._add(k0[first], k1[first], ids.astype(np.uint32), cnt)

    def _assemble(self, sc: _Scan) -> tuple[np.ndarray, np.ndarray]:
        """The block's ids, and the number of ids before each of its breaks."""
        entry = sc.entry
        if len(sc.miss):
            entry[sc.miss] = self._index.get(sc.k0[sc.miss], sc.k1[sc.miss])
        src = self._off[entry]
        cnt = self._cnt[entry]
        if len(sc.long):  # ids staged past the pool's end, then gathered like the rest
            text, starts, ends = sc.text, sc.starts, sc.ends
            ids = [self._long_bpe(text[a:b]) for a, b in zip(starts[sc.long].tolist(), ends[sc.long].tolist())]
            lens = np.fromiter(map(len, ids), np.int64, len(ids))
            src[sc.long] = self._stage(chars_to_ids("".join(ids))) + np.cumsum(lens) - lens
            cnt[sc.long] = lens
        k = np.searchsorted(sc.starts, sc.breaks)  # breaks start pre-tokens: the index of that one
        if (cnt == 1).all():
            return self._pool[src], k
        before = np.cumsum(cnt) - cnt
        return self._pool[_ragged(src, cnt)], before[k]


class _Scan(NamedTuple):
    """A pre-tokenised block: pre-token starts/ends (chars), UTF-8 starts/lengths, the bytes (+8
    zero bytes), the key words, which pre-tokens are too long to key, table entries (-1: absent),
    and which keyed pre-tokens were absent when scanned."""

    text: str
    breaks: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    bstart: np.ndarray
    nbytes: np.ndarray
    buf: np.ndarray
    k0: np.ndarray
    k1: np.ndarray
    long: np.ndarray
    entry: np.ndarray
    miss: np.ndarray

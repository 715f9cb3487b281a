"""`BpeTokenizer`: encode / decode / stream with a trained (or GPT-2) byte-level BPE.

Encoding = split on special tokens (longest first) -> GPT-2 pre-tokens -> per pre-token, apply the
merges by rank (lowest rank first), which is the canonical BPE result.

Speed: a short text goes through the regex and a dict cache (pre-token -> ids); a long one through
piece_table.py, which pre-tokenises whole blocks in NumPy and looks all their pre-tokens up at once,
so BPE runs once per distinct pre-token. Ids are carried as one character per id (chr(id)) on the
str paths, so joining and converting are single C calls.
"""

from __future__ import annotations

import heapq
import json
import os
from array import array
from collections.abc import Iterable, Iterator, Sequence
from contextlib import suppress
from itertools import repeat
from pathlib import Path

import numpy as np

from llm.bpe.batch_bpe import BatchBpe
from llm.bpe.encode_file import encode_file as encode_file_to_npy
from llm.bpe.encode_file import token_dtype
from llm.bpe.gpt2_bytes import str_to_token, token_to_str
from llm.bpe.piece_table import PieceTable, chars_to_ids
from llm.bpe.pretokenize import pretokenize, rfind_cut, special_splitter
from llm.fileio import write_json, write_text

CONFIG_NAME = "tokenizer_config.json"
_CACHE_LIMIT = 1 << 18  # entries kept per cache; cleared when full so memory stays bounded
_TABLE_LIMIT = 1 << 16  # new pre-tokens kept by the NumPy piece table (beyond the vocabulary's)
_STREAM_MIN = 1 << 16  # chars buffered by encode_iterable before it looks for a cut
_NO_RANK = 1 << 62
_LONG_WORD = 64  # pre-tokens longer than this (in bytes) use the O(n log n) heap BPE
_MAX_PIECE = 64  # longer pre-tokens (e.g. unspaced scripts) are encoded but not cached: bounded memory
_BULK = 1 << 13  # texts at least this long use the NumPy piece table (~300 µs fixed cost per call;
# measured crossover with the regex path: 4-16K chars)


class _BpeCache(dict):
    """pre-token -> its ids as a str of chr(id); a miss runs BPE (__missing__ keeps hits in C)."""

    def __init__(self, bpe, seed: dict[str, str]) -> None:
        super().__init__(seed)
        self._bpe = bpe

    def __missing__(self, word: str) -> str:
        ids = "".join(map(chr, self._bpe(word)))
        if len(word) <= _MAX_PIECE:  # long pre-tokens are rare; caching them could cost MBs each
            self[word] = ids
        return ids


class BpeTokenizer:
    """Byte-level BPE tokenizer.

    vocab: {id: bytes}; merges: [(bytes_a, bytes_b)] in rank order; special_tokens: strings kept
    whole (added to the vocabulary with new ids if absent).
    """

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: Sequence[tuple[bytes, bytes]],
        special_tokens: Sequence[str] | None = None,
    ) -> None:
        self.vocab: dict[int, bytes] = dict(vocab)
        self.merges: list[tuple[bytes, bytes]] = [(bytes(a), bytes(b)) for a, b in merges]
        ids_of: dict[bytes, list[int]] = {}
        for i in sorted(self.vocab):
            ids_of.setdefault(self.vocab[i], []).append(i)

        # Ids the plain byte-level BPE needs: the single bytes (lowest id) and each merge result
        # (highest id when several share the bytes: in our layout merges come after specials).
        def single(b: bytes, lowest: bool) -> int:
            if b not in ids_of:
                raise ValueError(f"vocabulary has no token {b!r}")
            return ids_of[b][0] if lowest else ids_of[b][-1]

        self._byte_ids: list[int] = [single(bytes([x]), True) for x in range(256)]
        self._bytes_are_ids = self._byte_ids == list(range(256))
        regular = set(self._byte_ids)
        self._rank_of: dict[tuple[int, int], int] = {}  # (id_a, id_b) -> merge rank
        self._merged_id: list[int] = []  # merge rank -> id of the merged token
        for r, (a, b) in enumerate(self.merges):
            ia, ib, ic = single(a, False), single(b, False), single(a + b, False)
            if len(a) == 1:
                ia = self._byte_ids[a[0]]
            if len(b) == 1:
                ib = self._byte_ids[b[0]]
            self._rank_of.setdefault((ia, ib), r)  # first (lowest) rank wins on duplicates
            self._merged_id.append(ic)
            regular.add(ic)

        # Special tokens take an id with their bytes that plain BPE does not use, else a new id.
        if isinstance(special_tokens, str):
            raise ValueError("special_tokens must be a list of strings, not one string")
        self.special_tokens: list[str] = list(dict.fromkeys(special_tokens or ()))
        if "" in self.special_tokens:
            raise ValueError("a special token cannot be the empty string")
        self._special_ids: dict[str, int] = {}
        for s in self.special_tokens:
            sb = s.encode("utf-8")
            free = [i for i in ids_of.get(sb, []) if i not in regular]
            if free:
                sid = free[0]
            elif sb in ids_of and len(sb) > 1:
                sid = ids_of[sb][0]
            else:
                sid = max(self.vocab, default=-1) + 1
                self.vocab[sid] = sb
            self._special_ids[s] = sid
        self._split = special_splitter(self.special_tokens)
        size = max(self.vocab, default=-1) + 1
        self._decode_table: list[bytes | None] = [None] * size
        for i, t in self.vocab.items():
            if i < 0:
                raise ValueError(f"negative token id {i}")
            self._decode_table[i] = t
        # A pre-token that is itself a token encodes to that token (tiktoken's shortcut; for a
        # trained vocabulary also what the merges give, as each token was built from its own bytes),
        # so both caches start with the vocabulary instead of running BPE on its most common words.
        whole: dict[str, str] = {}
        for i in sorted(set(self._merged_id)) + self._byte_ids[:128]:
            with suppress(UnicodeDecodeError):
                whole.setdefault(self.vocab[i].decode("utf-8"), chr(i))
        self._whole = whole
        self._cache = _BpeCache(self._bpe, whole)  # pre-token -> id chars (the regex path)
        batch = BatchBpe(self._byte_ids, self._rank_of, self._merged_id)
        whole_ids = {t.encode("utf-8"): ord(c) for t, c in whole.items()}
        self._table = PieceTable(batch, self._cache.__getitem__, whole_ids, limit=_TABLE_LIMIT)

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        """Number of ids an embedding needs: max id + 1."""
        return len(self._decode_table)

    def token_id(self, special_token: str) -> int:
        try:
            return self._special_ids[special_token]
        except KeyError:
            raise ValueError(
                f"{special_token!r} is not a special token of this tokenizer "
                f"(special tokens: {self.special_tokens})"
            ) from None

    # ------------------------------------------------------------------ BPE core
    def _bpe(self, word: str) -> list[int]:
        """Apply merges by rank to one pre-token (cache-miss path).

        Repeatedly merge the adjacent pair of lowest rank (leftmost on ties), like tiktoken. After
        a merge only the two neighbouring pair ranks change, so `rs` is patched, not recomputed;
        min/index run in C.
        """
        data = word.encode("utf-8")
        # our layout has id == byte value, GPT-2's does not
        ids = list(data) if self._bytes_are_ids else list(map(self._byte_ids.__getitem__, data))
        if len(ids) < 2:
            return ids
        if len(ids) > _LONG_WORD:
            return self._bpe_long(ids)
        get, new_id = self._rank_of.get, self._merged_id
        rs = list(map(get, zip(ids, ids[1:]), repeat(_NO_RANK)))
        while True:
            r = min(rs)
            if r == _NO_RANK:
                break
            i = rs.index(r)
            t = new_id[r]
            ids[i : i + 2] = (t,)
            del rs[i]
            if not rs:
                break
            if i:
                rs[i - 1] = get((ids[i - 1], t), _NO_RANK)
            if i < len(rs):
                rs[i] = get((t, ids[i + 1]), _NO_RANK)
        return ids

    def _bpe_long(self, ids: list[int]) -> list[int]:
        """Same result as _bpe in O(n log n) for long pre-tokens (a base64 blob, an unspaced
        script): a heap of (rank, position) over a linked list; stale entries are skipped."""
        get, new_id = self._rank_of.get, self._merged_id
        n = len(ids)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap = [(r, i) for i, p in enumerate(zip(ids, ids[1:])) if (r := get(p)) is not None]
        heapq.heapify(heap)
        while heap:
            r, i = heapq.heappop(heap)
            j = nxt[i]
            if not alive[i] or j >= n or get((ids[i], ids[j])) != r:
                continue  # stale: position merged away or its pair changed
            ids[i] = new_id[r]
            alive[j] = False
            k = nxt[i] = nxt[j]
            if k < n:
                prv[k] = i
                if (rr := get((ids[i], ids[k]))) is not None:
                    heapq.heappush(heap, (rr, i))
            if (h := prv[i]) >= 0 and (rr := get((ids[h], ids[i]))) is not None:
                heapq.heappush(heap, (rr, h))
        return [t for t, a in zip(ids, alive) if a]

    def _encode_unit(self, text: str) -> str:
        """Id chars of a text that starts and ends at safe cuts (the regex path, specials kept)."""
        if len(self._cache) > _CACHE_LIMIT:  # bounded memory: start again from the vocabulary
            self._cache.clear()
            self._cache.update(self._whole)
        get = self._cache.__getitem__
        if self._split is None:
            return "".join(map(get, pretokenize(text)))
        out = []
        for i, part in enumerate(self._split.split(text)):
            if i % 2:
                out.append(chr(self._special_ids[part]))
            elif part:
                out.append("".join(map(get, pretokenize(part))))
        return "".join(out)

    def _encode_bulk(self, text: str) -> np.ndarray:
        """uint32 ids of any text: the special tokens (longest first) are taken out and kept whole,
        everything between them goes through the NumPy piece table in one pass."""
        if len(text) < _BULK:  # the piece table's fixed cost would dominate
            return chars_to_ids(self._encode_unit(text))
        if self._split is None:
            return self._table.encode(text)[0]
        parts = self._split.split(text)
        texts = parts[0::2]
        breaks = np.cumsum(np.fromiter(map(len, texts[:-1]), np.int64, len(texts) - 1))
        ids, at = self._table.encode("".join(texts), breaks)
        return np.insert(ids, at, [self._special_ids[s] for s in parts[1::2]])

    # ------------------------------------------------------------------ public API
    def encode(self, text: str) -> list[int]:
        if len(text) < _BULK:  # one id per character: utf-32 turns the str into ints in one C call
            return array("I", self._encode_unit(text).encode("utf-32-le", "surrogatepass")).tolist()
        return self._encode_bulk(text).tolist()

    def encode_to_array(self, text: str, dtype=None) -> np.ndarray:
        """encode() straight into a NumPy array (uint16/uint32 by vocab size unless dtype given)."""
        return self._encode_bulk(text).astype(dtype or token_dtype(self.vocab_size))

    def encode_iterable(self, iterable: Iterable[str]) -> Iterator[int]:
        """Lazily encode a stream of strings (e.g. a file's lines) exactly as encode("".join(...)).

        Text is buffered until a safe cut (see pretokenize.py) lets the head be encoded without
        any pre-token or special token changing when more text arrives; memory stays bounded by
        the buffer (~64K chars plus the longest run without a safe cut) and the pre-token cache.
        """
        specials = self.special_tokens
        buf = ""
        next_try = _STREAM_MIN
        for piece in iterable:
            buf += piece
            if len(buf) < next_try:
                continue
            p = rfind_cut(buf, specials)
            if p > 0:
                yield from self.encode(buf[:p])
                buf = buf[p:]
                next_try = _STREAM_MIN
            else:  # no safe cut yet: wait for twice as much text (keeps the search linear)
                next_try = 2 * len(buf)
        if buf:
            yield from self.encode(buf)

    def decode(self, ids: Iterable[int]) -> str:
        """Concatenate token bytes; invalid UTF-8 becomes U+FFFD."""
        table = self._decode_table
        try:
            data = b"".join([table[i] for i in ids])
        except (IndexError, TypeError):
            bad = next(i for i in ids if not (0 <= int(i) < len(table)) or table[int(i)] is None)
            raise ValueError(f"unknown token id {bad} (vocab_size {self.vocab_size})") from None
        return data.decode("utf-8", errors="replace")

    def encode_file(
        self,
        input_path: str | os.PathLike,
        output_path: str | os.PathLike,
        num_workers: int | None = None,
        progress: bool = True,
    ) -> int:
        """Encode a UTF-8 file to a .npy of uint16 (uint32 above 65,536 ids) in parallel chunks;
        returns the number of tokens."""
        return encode_file_to_npy(self, input_path, output_path, num_workers, progress)

    # ------------------------------------------------------------------ files
    @classmethod
    def from_files(
        cls,
        vocab_path: str | os.PathLike,
        merges_path: str | os.PathLike,
        special_tokens: Sequence[str] | None = None,
        _special_ids: dict[str, int] | None = None,
    ) -> BpeTokenizer:
        """Load GPT-2 format files: vocab.json {token string: id} and merges.txt (`a b` per line)."""
        try:
            raw = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read vocab file {vocab_path}: {e}") from None
        vocab = {int(i): str_to_token(s) for s, i in raw.items()}
        for s, i in (_special_ids or {}).items():
            vocab[int(i)] = s.encode("utf-8")
        merges: list[tuple[bytes, bytes]] = []
        try:
            lines = Path(merges_path).read_text(encoding="utf-8").split("\n")
        except OSError as e:
            raise ValueError(f"cannot read merges file {merges_path}: {e}") from None
        for n, line in enumerate(lines, 1):
            if not line or (n == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(f"{merges_path}:{n}: expected 'a b', got {line!r}")
            merges.append((str_to_token(parts[0]), str_to_token(parts[1])))
        return cls(vocab, merges, special_tokens)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write vocab.json + merges.txt (GPT-2 format) and tokenizer_config.json (special tokens)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        special_ids = set(self._special_ids.values())
        vocab_json: dict[str, int] = {}
        for i in sorted(self.vocab):
            s = token_to_str(self.vocab[i])
            if s not in vocab_json:  # a special equal to a regular token lives in the config only
                vocab_json[s] = i
            elif i not in special_ids:
                raise ValueError(f"two regular tokens with the same bytes {self.vocab[i]!r}")
        merges_txt = "#version: 0.2\n" + "".join(
            f"{token_to_str(a)} {token_to_str(b)}\n" for a, b in self.merges
        )
        config = {
            "format": "gpt2 byte-level BPE (vocab.json + merges.txt)",
            "special_tokens": self._special_ids,
            "vocab_size": self.vocab_size,
        }
        write_text(d / "vocab.json", json.dumps(vocab_json, ensure_ascii=False))
        write_text(d / "merges.txt", merges_txt)
        write_json(d / CONFIG_NAME, config, indent=1, ensure_ascii=False)
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> BpeTokenizer:
        """Inverse of save(); a directory without tokenizer_config.json loads with no specials."""
        d = Path(directory)
        if not (d / "vocab.json").is_file() or not (d / "merges.txt").is_file():
            raise ValueError(f"{d} is not a tokenizer directory (needs vocab.json and merges.txt)")
        special_ids: dict[str, int] = {}
        if (d / CONFIG_NAME).is_file():
            special_ids = json.loads((d / CONFIG_NAME).read_text(encoding="utf-8"))["special_tokens"]
        return cls.from_files(d / "vocab.json", d / "merges.txt", list(special_ids), special_ids)

    def __reduce__(self):
        # rebuild from the definition (caches are not worth shipping to worker processes)
        return (type(self), (self.vocab, self.merges, self.special_tokens))

    def __repr__(self) -> str:
        return (f"BpeTokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"special_tokens={self.special_tokens})")


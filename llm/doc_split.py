"""Train/val split of a document stream, by document hash (the default) or by a seeded random sample.

By hash: a document goes to val when its 64-bit BLAKE2b, read as a fraction of 2^64, is below
``val_fraction``. Its side depends on its text alone, so adding, removing or reordering other documents
(another input file) never moves it. Exact duplicates (the same text after whitespace stripping) are kept
once, at their first occurrence, and counted. Memory: 8 bytes per document (the hashes of the first
pass) plus a set of the duplicated ones.

By random sample (``method="random"``, what directories prepared before the hash split used): the val set
is ``max(1, round(val_fraction * n))`` documents drawn with ``random.Random(seed)``; every later document
shifts it, and duplicates stay.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llm.download import _Progress
from llm.fileio import replacing
from llm.text_sources import split_stream, stream_contains

SPLIT_METHODS = ("hash", "random")
_ONE = 1 << 64


def doc_hash(doc: str) -> int:
    """The 64-bit BLAKE2b of a document's UTF-8 text: its side of the split and its identity for dedup."""
    return int.from_bytes(hashlib.blake2b(doc.encode("utf-8"), digest_size=8).digest(), "big")


def iter_documents(path: str | Path, separator: str, bar: _Progress | None = None) -> Iterator[str]:
    """Stream the non-empty documents of a text file split on ``separator`` (whitespace-stripped), updating
    ``bar`` with the bytes read so far."""
    with open(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as f:
        for i, doc in enumerate(split_stream(f, separator)):
            if bar is not None and i % 1024 == 0:
                bar.update(raw.tell())
            yield doc
        if bar is not None:
            bar.update(raw.tell(), final=bar.t0 < bar.last)  # a closing line only after a progress line


def _bar(name: str, path: Path, progress: bool) -> _Progress:
    return _Progress(name, Path(path).stat().st_size, 0, progress)


@dataclass
class _HashSides:
    """Side of each document by its hash; the first copy of a duplicated text only."""

    threshold: int
    duplicated: set[int]
    forced_val: int | None = None  # the smallest hash, when no document falls below the threshold
    forced_train: int | None = None  # the largest, when every document does
    seen: set[int] = field(default_factory=set)
    duplicates: int = 0

    @classmethod
    def plan(cls, path: Path, sep: str, val_fraction: float, progress: bool = False) -> _HashSides:
        docs = iter_documents(path, sep, _bar("split: hashing", path, progress))
        hashes = np.fromiter((doc_hash(d) for d in docs), dtype=np.uint64)
        uniq, counts = np.unique(hashes, return_counts=True)
        if len(uniq) < 2:
            raise ValueError(f"{path}: found {len(uniq)} distinct document(s); need >= 2 to split off a validation set "
                             "(separate documents with a line <|endoftext|> or pass --val-input FILE)")
        sides = cls(min(int(val_fraction * _ONE), _ONE - 1), set(uniq[counts > 1].tolist()))
        below = int((uniq < np.uint64(sides.threshold)).sum())
        if below == 0:
            sides.forced_val = int(uniq[0])
        elif below == len(uniq):
            sides.forced_train = int(uniq[-1])
        return sides

    def side(self, i: int, doc: str) -> str | None:
        h = doc_hash(doc)
        if h in self.duplicated:
            if h in self.seen:
                self.duplicates += 1
                return None
            self.seen.add(h)
        val = (h < self.threshold or h == self.forced_val) and h != self.forced_train
        return "val" if val else "train"


@dataclass
class _RandomSides:
    val_ids: set[int]
    duplicates: int = 0  # not looked for

    @classmethod
    def plan(cls, path: Path, sep: str, val_fraction: float, seed: int) -> _RandomSides:
        n = sum(1 for _ in iter_documents(path, sep))
        if n < 2:
            raise ValueError(f"{path}: found {n} document(s); need >= 2 to split off a validation set "
                             "(separate documents with a line <|endoftext|> or pass --val-input FILE)")
        k = min(n - 1, max(1, round(val_fraction * n)))
        return cls(set(random.Random(seed).sample(range(n), k)))

    def side(self, i: int, doc: str) -> str:
        return "val" if i in self.val_ids else "train"


def split_documents(
    input_path: Path, train_path: Path, val_path: Path, val_fraction: float, separator: str, seed: int = 0,
    method: str = "hash", progress: bool = False,
) -> dict:
    """Write whole documents to a train and a val file (order preserved in both), chosen by ``method``
    (see the module docstring); return {train_documents, val_documents, duplicate_documents, separator, method}.
    ``progress``: a progress line on stderr (bytes, MB/s, ETA) for each pass that runs longer than a moment.

    Documents are separated by ``separator`` (written back as ``doc\\n<sep>\\n``); a file without it is
    split on blank lines (paragraphs, joined back with a blank line)."""
    if method not in SPLIT_METHODS:
        raise ValueError(f"split method must be one of {', '.join(SPLIT_METHODS)}, got {method!r}")
    try:
        with open(input_path, encoding="utf-8", newline="") as f:
            has_sep = stream_contains(f, separator)
    except UnicodeDecodeError as e:
        raise ValueError(f"{input_path}: not UTF-8 text ({e})") from None
    sep = separator if has_sep else "\n\n"
    if method == "hash":
        sides = _HashSides.plan(input_path, sep, val_fraction, progress)
    else:
        sides = _RandomSides.plan(input_path, sep, val_fraction, seed)
    bar = _bar("split: writing", input_path, progress)
    stats = _write_sides(input_path, train_path, val_path, sep, separator if has_sep else None, sides, bar)
    stats.update(duplicate_documents=sides.duplicates, separator=separator if has_sep else "blank line", method=method)
    return stats


def _write_sides(input_path: Path, train_path: Path, val_path: Path, sep: str, joiner_sep: str | None,
                 sides: _HashSides | _RandomSides, bar: _Progress) -> dict:
    both = f"{train_path} and {val_path}"  # written side by side: a full disk can strike either
    with (
        replacing(train_path, label=both) as train_tmp,
        replacing(val_path, label=both) as val_tmp,
        open(train_tmp, "x", encoding="utf-8", newline="") as train_f,
        open(val_tmp, "x", encoding="utf-8", newline="") as val_f,
    ):
        files = {"train": train_f, "val": val_f}
        stats = {"train_documents": 0, "val_documents": 0}
        for i, doc in enumerate(iter_documents(input_path, sep, bar)):
            which = sides.side(i, doc)
            if which is None:
                continue
            if joiner_sep is not None:
                files[which].write(f"{doc}\n{joiner_sep}\n")
            else:  # paragraphs: a blank line between them, a newline at the end
                files[which].write(("\n\n" if stats[f"{which}_documents"] else "") + doc)
            stats[f"{which}_documents"] += 1
        if joiner_sep is None:
            for f in files.values():
                f.write("\n")
    return stats

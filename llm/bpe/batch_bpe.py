"""BPE of many pre-tokens at once, in NumPy: one round per merge step instead of one per pre-token.

The canonical rule (tiktoken's, and `BpeTokenizer._bpe`'s) is: in each pre-token, repeatedly merge
the adjacent pair of lowest rank, leftmost first. A rank names one pair, and a pair made with the
new token always has a higher rank than the merge that made it (the token must exist first), so
one step of that rule is the same as merging *every* occurrence of the pre-token's lowest-rank
pair, left to right without overlap ("aaa" -> "aa" "a"). A round does that step for all pre-tokens
together: pair ranks from a vectorised hash map (hash_index.py), the per-pre-token minimum by
`minimum.reduceat`, then one gather that drops the right halves. Pre-tokens with nothing left to
merge leave the rounds, so a round costs what is still being merged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llm.bpe.hash_index import HashIndex

_NONE = np.iinfo(np.int64).max


class BatchBpe:
    def __init__(self, byte_ids: Sequence[int], rank_of: dict[tuple[int, int], int], merged_id: Sequence[int]) -> None:
        self._byte_ids = np.asarray(byte_ids, np.int64)
        pairs = np.array(list(rank_of), np.int64).reshape(-1, 2)
        self._rank = HashIndex(1, 4 * len(pairs))  # (left << 32 | right) -> merge rank
        self._rank.put(((pairs[:, 0] << 32) | pairs[:, 1]).astype(np.uint64),
                       np.fromiter(rank_of.values(), np.int64, len(rank_of)))
        self._merged = np.asarray(merged_id, np.int64)

    def __call__(self, data: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """BPE of len(lens) pre-tokens whose UTF-8 bytes lie back to back in `data` (uint8).

        Returns (ids, counts): the ids of all pre-tokens back to back, and how many each has.
        """
        tok = self._byte_ids[data]
        seg = np.repeat(np.arange(len(lens)), lens)
        done_tok, done_seg = [], []
        while len(tok):
            same = seg[1:] == seg[:-1]
            r = self._rank.get(((tok[:-1] << 32) | tok[1:]).astype(np.uint64))
            rank = np.full(len(tok), _NONE)
            rank[:-1] = np.where(same & (r >= 0), r, _NONE)
            first = np.flatnonzero(np.concatenate(([True], ~same)))  # where each pre-token starts
            low = np.repeat(np.minimum.reduceat(rank, first), np.diff(first, append=len(tok)))
            finished = low == _NONE  # nothing left to merge: out of the rounds
            if finished.any():
                done_tok.append(tok[finished])
                done_seg.append(seg[finished])
                live = ~finished
                tok, seg, rank, low = tok[live], seg[live], rank[live], low[live]
            hit = rank == low
            if (hit[1:] & hit[:-1]).any():  # runs like "aaa": every other position, from the left
                at = np.arange(len(hit))
                run_start = hit & ~np.concatenate(([False], hit[:-1]))
                from_start = at - np.maximum.accumulate(np.where(run_start, at, 0))
                hit &= from_start % 2 == 0
            where = np.flatnonzero(hit)
            tok[where] = self._merged[rank[where]]
            keep = np.ones(len(tok), bool)
            keep[where + 1] = False
            tok, seg = tok[keep], seg[keep]
        seg = np.concatenate(done_seg) if done_seg else np.zeros(0, np.int64)
        order = np.argsort(seg, kind="stable")  # pre-tokens finish in any order, each one whole
        tok = np.concatenate(done_tok)[order] if done_tok else np.zeros(0, np.int64)
        return tok, np.bincount(seg, minlength=len(lens))

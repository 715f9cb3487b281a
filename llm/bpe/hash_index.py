"""A hash map held in NumPy arrays, queried and filled a whole array of keys at a time.

Open addressing with linear probing: every query starts at its home slot and all queries advance
together, one vector step per probe, until they hit their key or an empty slot. The load factor is
kept <= 1/2 (1/4 after growing), so most queries end in the first step (measured: no faster at 1/8). NumPy has no hash map, and sorting plus
`searchsorted` costs ~100 ns a query (a cache miss per halving) against ~10 ns here.
"""

from __future__ import annotations

import numpy as np

_C = [np.uint64(c) for c in (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9)]


class HashIndex:
    """keys: tuples of `width` uint64 components (one array per component) -> int64 values >= 0."""

    def __init__(self, width: int, capacity: int = 1 << 10) -> None:
        if not 1 <= width <= len(_C):
            raise ValueError(f"width must be 1..{len(_C)}, got {width}")
        self._width = width
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        bits = max(4, (capacity - 1).bit_length())
        self._shift = np.uint64(64 - bits)
        self._keys = [np.zeros(1 << bits, np.uint64) for _ in range(self._width)]
        self._vals = np.full(1 << bits, -1, np.int64)  # -1 marks an empty slot
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def _home(self, keys: tuple[np.ndarray, ...]) -> np.ndarray:
        h = keys[0] * _C[0]
        for k, c in zip(keys[1:], _C[1:]):
            h ^= k * c
        return ((h ^ (h >> np.uint64(29))) * _C[0] >> self._shift).astype(np.int64)

    def get(self, *keys: np.ndarray) -> np.ndarray:
        """Value of each key, -1 where absent."""
        mask = len(self._vals) - 1
        out = np.full(len(keys[0]), -1, np.int64)
        slot = self._home(keys)
        idx = None  # the queries still probing (None: all of them, in order)
        while len(slot):
            v = self._vals[slot]
            hit = None  # an empty slot may "hit" an all-zero key: its value -1 still says absent
            for mine, theirs in zip(self._keys, keys):
                eq = mine[slot] == (theirs if idx is None else theirs[idx])
                hit = eq if hit is None else hit & eq
            go = ~hit & (v >= 0)
            if idx is None:
                out[hit] = v[hit]
                idx = np.flatnonzero(go)
            else:
                out[idx[hit]] = v[hit]
                idx = idx[go]
            slot = (slot[go] + 1) & mask
        return out

    def put(self, *keys_and_values: np.ndarray) -> None:
        """put(k_1, ..., k_width, values): keys must be absent and distinct."""
        *keys, values = keys_and_values
        if 2 * (self._size + len(values)) > len(self._vals):  # grow: re-place every entry
            old = self._vals >= 0
            entries = [k[old] for k in self._keys] + [self._vals[old]]
            self._alloc(4 * (self._size + len(values)))
            self._place(*entries)
        self._place(*keys, values)

    def _place(self, *keys_and_values: np.ndarray) -> None:
        """Each key moves on past occupied slots; when several reach the same empty slot in one
        step, the first takes it and the others move on."""
        *keys, values = keys_and_values
        mask = len(self._vals) - 1
        slot = self._home(tuple(keys))
        todo = np.arange(len(values))
        while len(todo):
            free = np.flatnonzero(self._vals[slot] == -1)
            s, first = np.unique(slot[free], return_index=True)
            won = free[first]
            w = todo[won]
            for mine, theirs in zip(self._keys, keys):
                mine[s] = theirs[w]
            self._vals[s] = values[w]
            lost = np.ones(len(todo), bool)
            lost[won] = False
            todo, slot = todo[lost], (slot[lost] + 1) & mask
        self._size += len(values)

"""GPT-2 pre-token boundaries of a whole text at once, in NumPy (no regex call per pre-token).

The GPT-2 pattern `'(?:[sdmt]|ll|ve|re)| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+` sorts
every character into one of four classes (L letter, N number, S whitespace, O other), and its
pre-tokens are then fixed by local rules, all checkable with shifted-array comparisons:

1. a pre-token starts where the class changes (runs of L, N, O; runs of S);
2. a whitespace run followed by a non-space loses its last character: that character starts a
   pre-token of its own, and if it is U+0020 the following run joins it (` ?\\p{L}+` etc.) instead
   of starting one (`\\s+(?!\\S)` backs off one character, then ` ?X+` takes the space);
3. a `'` that starts a pre-token and is followed by s/d/m/t (or ll/ve/re) is a contraction: the
   quote and those 1-2 letters are one pre-token, and a new one starts after them.
Tests compare this with `regex.findall` on random text built from the characters the rules name.
"""

from __future__ import annotations

from functools import cache

import numpy as np

L, N, S, O = 0, 1, 2, 3  # character classes
_SPACE, _QUOTE = 32, 39
_ONE = np.frombuffer(b"sdmt", np.uint8)
_TWO = [(ord(a), ord(b)) for a, b in ("ll", "ve", "re")]


@cache
def unicode_classes() -> np.ndarray:
    """Class of every code point, read off the `regex` module itself (its Unicode version, its \\s)."""
    import regex  # here: its ~11 MB of Unicode tables load only when a table is built (as in pretokenize)

    chars = np.arange(0x110000, dtype=np.uint32).tobytes().decode("utf-32-le", "surrogatepass")
    table = np.full(0x110000, O, np.uint8)
    for cls, pat in ((L, r"\p{L}+"), (N, r"\p{N}+"), (S, r"\s+")):
        for m in regex.finditer(pat, chars):
            table[m.start() : m.end()] = cls
    return table


@cache
def ascii_classes() -> np.ndarray:
    """The first 128 entries, without building the whole table (pure-ASCII text never needs it)."""
    table = np.full(128, O, np.uint8)
    for c in range(128):
        ch = chr(c)
        table[c] = L if ch.isalpha() else N if ch.isdigit() else S if ch in "\t\n\x0b\x0c\r " else O
    return table


def pretoken_starts(cp: np.ndarray, cls: np.ndarray, breaks: np.ndarray | None = None) -> np.ndarray:
    """Start index of every pre-token of a text, given its code points and their classes.

    cp: (n,) code points (uint8 for ASCII text, uint32 otherwise); cls: (n,) uint8 classes;
    breaks: sorted positions in (0, n) where the text was cut out of a longer one (at special
    tokens): each side is pre-tokenised as if it were the whole text.
    Returns sorted int64 starts; starts[0] == 0 and the last pre-token runs to n.
    """
    n = len(cp)
    if n == 0:
        return np.zeros(0, np.int64)
    start = np.empty(n, bool)
    start[0] = True
    np.not_equal(cls[1:], cls[:-1], out=start[1:])  # rule 1
    cut = None
    if breaks is not None and len(breaks):
        cut = np.zeros(n + 2, bool)
        cut[breaks] = True
    ws = cls == S
    cont = ws[:-1] & ~ws[1:]
    if cut is not None:  # a text's end is no "followed by a non-space"
        cont &= ~cut[1:n]
    last = np.flatnonzero(cont)  # rule 2: last whitespace before a non-space
    start[last] = True
    start[last + 1] = cp[last] != _SPACE
    if cut is not None:
        start[breaks] = True
    q = np.flatnonzero(cp[:-1] == _QUOTE)  # rule 3, only where a quote starts a pre-token
    if len(q):
        q = q[start[q] & (cls[q + 1] == L)]
        if cut is not None:  # the letters must be on the quote's side of a cut
            q = q[~cut[q + 1]]
        one = np.isin(cp[q + 1], _ONE)
        _contract(start, q[one], 1)
        q = q[~one]
        q = q[q + 2 < n]
        if cut is not None:
            q = q[~cut[q + 2]]
        a, b = cp[q + 1], cp[q + 2]
        two = np.zeros(len(q), bool)
        for x, y in _TWO:
            two |= (a == x) & (b == y)
        _contract(start, q[two], 2)
    return np.flatnonzero(start)


def _contract(start: np.ndarray, q: np.ndarray, k: int) -> None:
    """The quotes at q take the k letters after them; the letters' run restarts after them."""
    start[q + 1] = False
    if k == 2:
        start[q + 2] = False
    after = q + k + 1
    start[after[after < len(start)]] = True


def classify(text: str) -> tuple[np.ndarray, np.ndarray, bytes]:
    """(code points, classes, UTF-8 bytes) of a text; ASCII text takes the 1-byte shortcut."""
    if text.isascii():
        raw = text.encode("ascii")
        cp = np.frombuffer(raw, np.uint8)
        return cp, ascii_classes()[cp], raw
    cp = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    return cp, unicode_classes()[cp], text.encode("utf-8")


def utf8_offsets(cp: np.ndarray) -> np.ndarray:
    """(n + 1,) byte offset of each code point in the UTF-8 encoding (and the total at the end)."""
    width = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    out = np.zeros(len(cp) + 1, np.int64)
    np.cumsum(width, out=out[1:])
    return out

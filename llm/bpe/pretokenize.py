"""Pre-tokenisation: split on special tokens, then GPT-2's regex; safe places to cut a text in pieces.

BPE never merges across a pre-token boundary, so training counts pre-tokens and encoding caches
pre-token -> ids. Both cut large inputs into pieces (for workers, or to stream); a cut is *safe* when
pre-tokenising the two halves gives exactly the pre-tokens of the whole. Two kinds are safe:
- right after a printable ASCII non-space character that is followed by a space or newline
  (no GPT-2 pattern can extend a non-space token over whitespace, and a new one starts there),
- and neither half may split an occurrence of a special token (checked explicitly).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache

# GPT-2's pattern (OpenAI encoder.py), needs `regex` for \p{L} / \p{N}.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@cache
def gpt2_re():
    """Compiled lazily: importing `regex` costs ~11 MB of Unicode tables that ASCII text never needs."""
    import regex

    return regex.compile(GPT2_PATTERN)


# The same pattern restricted to ASCII text, for the stdlib `re` engine (about 2x faster than `regex`).
# `regex`'s \s on ASCII is exactly [\t\n\v\f\r ] (stdlib `re` would also include \x1c-\x1f).
_WS = r"\t\n\x0b\x0c\r "
ASCII_PATTERN = rf"""'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+"""
ASCII_RE = re.compile(ASCII_PATTERN)


def pretokenize(text: str) -> list[str]:
    """GPT-2 pre-tokens of a text that contains no special tokens."""
    return (ASCII_RE if text.isascii() else gpt2_re()).findall(text)


def special_splitter(special_tokens: Sequence[str]) -> re.Pattern[str] | None:
    """Regex whose `split` alternates text, special, text, ...; longest specials first so that
    overlapping ones (`<|a|>` and `<|a|><|a|>`) match the longest."""
    if not special_tokens:
        return None
    alts = sorted(set(special_tokens), key=lambda s: (-len(s), s))
    return re.compile("(" + "|".join(map(re.escape, alts)) + ")")


# Exactly the characters `regex` matches with \s (Unicode White_Space); tests check it.
WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
    "\u200a\u2028\u2029\u202f\u205f\u3000"
)

_CUT_BYTES = re.compile(rb"[\x21-\x7e](?=[ \n])")
_CUT_STR = re.compile(r"[\x21-\x7e](?=[ \n])")


def _spans_special(buf: bytes | str, p: int, specials: Sequence[bytes | str]) -> bool:
    """Does an occurrence of some special token start before p and end after p?"""
    for s in specials:
        if len(s) > 1 and buf.find(s, max(0, p - len(s) + 1), p + len(s) - 1) != -1:
            return True
    return False


def find_cut(buf: bytes | str, start: int, specials: Sequence[bytes | str], final: bool = False) -> int:
    """First safe cut p >= start in buf, or -1. Unless `final` (buf ends the text), cuts closer than
    the longest special token to the end are refused: an occurrence spanning them might be unseen."""
    limit = len(buf) if final else len(buf) - max((len(s) for s in specials), default=1)
    pat = _CUT_BYTES if isinstance(buf, bytes) else _CUT_STR
    for m in pat.finditer(buf, start, max(start, limit)):
        p = m.end()
        if not _spans_special(buf, p, specials):
            return p
    return -1


def rfind_cut(buf: bytes | str, specials: Sequence[bytes | str], final: bool = False) -> int:
    """Last safe cut in buf (searching backwards in growing windows), or -1."""
    limit = len(buf) if final else len(buf) - max((len(s) for s in specials), default=1)
    pat = _CUT_BYTES if isinstance(buf, bytes) else _CUT_STR
    window = 256
    while True:
        start = max(0, limit - window)
        last = -1
        for m in pat.finditer(buf, start, max(start, limit)):
            p = m.end()
            if not _spans_special(buf, p, specials):
                last = p
        if last != -1 or start == 0:
            return last
        window *= 16

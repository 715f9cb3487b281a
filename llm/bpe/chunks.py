"""Cut a file into byte ranges at safe places, and read a range back as text in bounded pieces.

Workers each read their own byte range (no process ever holds the whole corpus), and a range is
read in blocks of `block` bytes, cut again at safe places, so memory stays O(block).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

from llm.bpe.pretokenize import find_cut, rfind_cut

BLOCK = 4 << 20


def _decode(data: bytes, offset: int, path: str | os.PathLike) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{os.fspath(path)} is not valid UTF-8: byte offset {offset + e.start} "
            f"(byte 0x{data[e.start]:02x})"
        ) from None


def chunk_boundaries(path: str | os.PathLike, n: int, specials: Sequence[str]) -> list[int]:
    """Byte offsets [0, ..., size] splitting the file into <= n ranges at safe cuts."""
    size = os.path.getsize(path)
    sb = [s.encode("utf-8") for s in specials]
    back = max((len(s) for s in sb), default=1)
    bounds = [0]
    with open(path, "rb") as f:
        for i in range(1, n):
            target = size * i // n
            if target <= bounds[-1]:
                continue
            window = 1 << 16
            while True:
                lo = max(bounds[-1], target - back)
                f.seek(lo)
                buf = f.read(target - lo + window)
                final = lo + len(buf) >= size
                p = find_cut(buf, target - lo, sb, final=final)
                if p != -1:
                    bounds.append(lo + p)
                    break
                if final:  # no safe cut after target: the rest stays in one range
                    break
                window *= 4
    if bounds[-1] != size:
        bounds.append(size)
    return bounds


def iter_range_text(
    path: str | os.PathLike, start: int, end: int, specials: Sequence[str], block: int | None = None
) -> Iterator[str]:
    """Decoded pieces of bytes [start, end) of a file, each cut at a safe place."""
    block = block or BLOCK
    sb = [s.encode("utf-8") for s in specials]
    with open(path, "rb") as f:
        f.seek(start)
        pos, carry = start, b""
        while pos < end or carry:
            data = f.read(min(block, end - pos)) if pos < end else b""
            pos += len(data)
            buf = carry + data
            base = pos - len(buf)  # file offset of buf[0]
            if pos < end:
                p = rfind_cut(buf, sb)
                if p <= 0:  # no safe cut yet: read more
                    carry = buf
                    continue
            else:
                p = len(buf)
            yield _decode(buf[:p], base, path)
            carry = buf[p:]

"""Ways a checkpoint file gets damaged on disk, for the tests of checksums and of --resume auto's fallback."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path


def scribble_tensor_bytes(path: Path, n: int = 4096) -> None:
    """Overwrite `n` bytes inside the largest tensor's data with 0xFF (a float32 NaN pattern). The zip
    structure stays valid, so torch.load reads the file without complaint: only a checksum can tell."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    assert info.file_size >= 2 * n, f"largest record {info.filename} holds only {info.file_size} bytes"
    with path.open("r+b") as f:
        f.seek(info.header_offset)
        name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])  # local file header: fixed 30 bytes
        f.seek(info.header_offset + 30 + name_len + extra_len + info.file_size // 2 - n // 2)
        f.write(b"\xff" * n)


def truncate(path: Path) -> None:
    """Keep the first half of the file, as a copy or a disk that filled up would."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

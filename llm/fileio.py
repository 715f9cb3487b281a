"""Writing files safely: atomic replacement, no stray temp files, one clear line when the disk is full.

`replacing(path)` yields a temp path next to `path` (same directory, so `os.replace` is atomic). When the
block finishes, the temp is renamed over `path`; when it fails (an exception, Ctrl-C, a full disk) the temp
is removed, file or directory, so a reader sees the old file or the new one and the disk keeps no leftovers.

A write that fails for want of space (ENOSPC, EDQUOT) or over the process' file size limit (EFBIG, from
RLIMIT_FSIZE) becomes `NoSpaceError`, an OSError whose message is the one line
"no space left on device (or file size limit) while writing PATH". The OSError is looked for along the
exception's cause/context chain, because some writers wrap it (torch.save raises a RuntimeError
"inline_container.cc ... unexpected pos" whose context is the OSError). When such blocks nest, the outermost
one names the file: the path the user asked for rather than a temp file inside it.

This module imports only the standard library: the data CLIs use it without loading torch.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

StrPath = str | os.PathLike[str]
SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class NoSpaceError(OSError):
    """A write failed because the disk (or quota) is full or the file hit the size limit; str() is one line."""

    def __init__(self, path: StrPath, code: int = errno.ENOSPC, note: str = "") -> None:
        self.path = os.fspath(path)
        super().__init__(code, f"no space left on device (or file size limit) while writing {self.path}{note}")

    def __str__(self) -> str:
        return self.strerror


def space_error(exc: BaseException | None) -> OSError | None:
    """The OSError in `exc`'s cause/context chain that says the disk is full or the file too large, or None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in SPACE_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def space_errors(path: StrPath, note: str = "") -> Iterator[None]:
    """Turn a full-disk / file-too-large failure inside the block into NoSpaceError naming `path`."""
    try:
        yield
    except Exception as e:
        err = space_error(e)
        if err is None:
            raise
        raise NoSpaceError(path, err.errno, note) from e


def temp_path(final: StrPath) -> Path:
    """A fresh temp name next to `final`: .NAME.PID.RANDOM.tmp (hidden, and unique across processes)."""
    final = Path(final)
    return final.with_name(f".{final.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")


def remove(path: StrPath) -> None:
    """Delete a file or a directory tree if it exists; errors are ignored (this runs on failure paths)."""
    p = Path(path)
    with contextlib.suppress(OSError):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


@contextlib.contextmanager
def replacing(path: StrPath, *, tmp: StrPath | None = None, label: str | None = None) -> Iterator[Path]:
    """Yield a temp path (default `temp_path(path)`) for the block to create; then rename it over `path`.

    On any failure the temp is removed and the exception re-raised; a full disk raises NoSpaceError naming
    `label` (default: `path`). The block must close what it opened on the temp before it ends."""
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else temp_path(path)
    try:
        with space_errors(label if label is not None else path):
            yield tmp
            os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def sha256_of(path: StrPath) -> str:
    """Hex sha256 of a file's bytes, read in blocks (memory stays small whatever the file size)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_text(path: StrPath, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically, with the permissions the process umask gives (unlike mkstemp's 0600)."""
    with replacing(path) as tmp, open(tmp, "x", encoding=encoding) as f:
        f.write(text)


def write_json(path: StrPath, obj: object, *, indent: int = 2, **dumps) -> None:
    """`obj` as JSON (indented, newline-terminated) written atomically by write_text."""
    write_text(path, json.dumps(obj, indent=indent, **dumps) + "\n")


def check_writable(path: StrPath, *, what: str, is_dir: bool) -> None:
    """Raise ValueError with one line when `path` cannot be written as a directory (`is_dir`) or a file:
    it exists as the other kind, a parent on the way is a file, or the directory to write in is read-only.
    For checking command-line outputs before any long work starts."""
    p = Path(path)
    if p.exists() and p.is_dir() != is_dir:
        kind, other = ("a file", "a directory") if is_dir else ("a directory", "a file")
        raise ValueError(f"{what} {p} is {kind}, not {other}")
    parent = p if is_dir and p.exists() else p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{what} {p}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {p}: cannot write in {parent} (permission denied)")

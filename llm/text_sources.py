"""Documents from the files users have: plain text, JSON Lines / JSON, CSV / TSV (each optionally compressed),
and Parquet (compressed inside; read with pyarrow, the optional ``parquet`` extra).

``resolve_inputs`` turns ``--input`` values (files, directories walked recursively, globs) into a sorted,
deterministic list of files; ``gather`` streams every document of them into one text file, each document
followed by a line holding the separator (the layout ``split_documents`` reads).

Memory is bounded whatever the input size: one read block (8 MiB of text) plus the current document or
record (one JSONL line, one CSV row), plus the decompressor's window. The exception is a ``.json`` file
holding one top-level array, which JSON cannot stream with the standard library: it is read whole. A Parquet
file is read one record batch (at most 1,024 rows of the text column, within one row group) at a time.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import glob
import gzip
import io
import json
import lzma
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from llm.download import _Progress, pyarrow_module
from llm.fileio import replacing

try:
    import zstandard
except ImportError:  # optional: .zst inputs then stop with a one-line hint
    zstandard = None


FORMATS = (".txt", ".jsonl", ".json", ".csv", ".tsv", ".parquet")
PARQUET_HINT = ".parquet needs pyarrow: uv sync --extra parquet (or pip install pyarrow)"
COMPRESSIONS = (".gz", ".xz", ".bz2", ".zst")
DOC_SEPS = ("eot", "blank-line")
_BLOCK = 1 << 23  # characters per read of plain text


@dataclass
class SourceOptions:
    """How documents are found in the inputs (all part of prepare's fingerprint).

    doc_sep: for .txt, "eot" (the special separator), "blank-line", or None = the separator when the file
    holds one, else blank lines. text_field: the JSON key; a record without it but with a ``messages`` list
    contributes its messages' contents joined by newlines. text_column: the CSV/TSV column.
    skip_bad: count and skip malformed records instead of stopping at the first."""

    doc_sep: str | None = None
    text_field: str = "text"
    text_column: str = "text"
    skip_bad: bool = False


@dataclass
class BadRecords:
    """Malformed records met so far: with ``skip`` they are counted (the first few kept), else the first raises."""

    skip: bool
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, message: str) -> None:
        if not self.skip:
            raise ValueError(f"{message} (pass --skip-bad to skip such records)")
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(message)


def split_format(path: Path) -> tuple[str | None, str | None]:
    """(format suffix, compression suffix) of a file name, e.g. ('.jsonl', '.gz'); None where unknown/absent."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    comp = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else None
    fmt = suffixes[-1] if suffixes and suffixes[-1] in FORMATS else None
    return fmt, comp


def is_plain_text(path: Path) -> bool:
    return split_format(path) == (".txt", None)


def resolve_inputs(specs: list[str], exclude: Path | None = None) -> list[Path]:
    """Files named by ``specs`` in order: a file as is, a directory's known-format files recursively (sorted,
    hidden names and anything under ``exclude`` left out), a glob's matching known-format files (sorted).
    A file named twice is read once. Raises FileNotFoundError / ValueError with one line."""
    out: list[Path] = []
    seen: set[Path] = set()
    for spec in map(str, specs):
        if any(c in spec for c in "*?["):
            matches = map(Path, sorted(glob.glob(spec, recursive=True)))
            files = [p for p in matches if p.is_file() and _known(p) and not _inside(p, exclude)]
            if not files:
                raise FileNotFoundError(f"{spec}: no input file matches this pattern (formats: {_formats()})")
        elif Path(spec).is_dir():
            files = _walk(Path(spec), exclude)
        elif Path(spec).is_file():
            files = [Path(spec)]
            _check_format(files[0])
        else:
            raise FileNotFoundError(f"{spec}: input text file not found")
        for p in files:
            if (key := p.resolve()) not in seen:
                seen.add(key)
                out.append(p)
    return out


def _walk(root: Path, exclude: Path | None) -> list[Path]:
    files = []
    for p in root.rglob("*"):
        rel = p.relative_to(root).parts
        if any(part.startswith(".") for part in rel) or not p.is_file() or not _known(p):
            continue
        if _inside(p, exclude):
            continue
        files.append(p)
    if not files:
        raise FileNotFoundError(f"{root}: directory holds no input file (formats: {_formats()})")
    return sorted(files, key=lambda p: p.relative_to(root).parts)


def _inside(path: Path, exclude: Path | None) -> bool:
    """Whether ``path`` lies under ``exclude`` (the output directory): prepare never reads back what it writes."""
    return exclude is not None and path.resolve().is_relative_to(exclude.resolve())


def _known(path: Path) -> bool:
    return split_format(path)[0] is not None


def _formats() -> str:
    return ", ".join(FORMATS) + ", optionally " + "/".join(COMPRESSIONS)


def _check_format(path: Path) -> None:
    fmt, comp = split_format(path)
    if fmt == ".parquet" and comp is not None:
        raise ValueError(f"{path}: a .parquet file is compressed inside already; unpack the {comp} first")
    if fmt == ".parquet" and pyarrow_module() is None:
        raise ValueError(f"{path}: {PARQUET_HINT}")
    if fmt is None:
        raise ValueError(f"{path}: unknown input format (known: {_formats()})")
    if comp == ".zst" and zstandard is None:
        raise ValueError(f"{path}: .zst needs the zstandard package (uv pip install zstandard), or unpack it with zstd -d")


@contextlib.contextmanager
def open_text(path: Path, newline: str | None = "") -> Iterator[tuple[IO[bytes], io.TextIOWrapper | None]]:
    """(raw file, UTF-8 text stream) of ``path``, decompressed by its suffix; raw.tell() is the progress.
    A .parquet file has no text stream (None): pyarrow reads the raw file."""
    _check_format(path)
    fmt, comp = split_format(path)
    with open(path, "rb") as raw:
        if fmt == ".parquet":  # binary, read by pyarrow from the raw file
            yield raw, None
            return
        if comp == ".gz":
            binary = gzip.GzipFile(fileobj=raw)
        elif comp == ".xz":
            binary = lzma.LZMAFile(raw)
        elif comp == ".bz2":
            binary = bz2.BZ2File(raw)
        elif comp == ".zst":
            binary = zstandard.ZstdDecompressor().stream_reader(raw)
        else:
            binary = raw
        try:
            yield raw, io.TextIOWrapper(binary, encoding="utf-8", newline=newline)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e})") from None
        except (EOFError, OSError, lzma.LZMAError) as e:
            if comp is None or getattr(e, "errno", None) is not None:
                raise  # a system error (e.g. a full disk while writing), not a bad compressed stream
            raise ValueError(f"{path}: not a valid {comp} file, or truncated ({e})") from None


def split_stream(f: IO[str], separator: str) -> Iterator[str]:
    """The non-empty documents of a text stream split on ``separator`` (whitespace-stripped), block by block."""
    buf = ""
    while block := f.read(_BLOCK):
        buf += block
        parts = buf.split(separator)
        buf = parts.pop()  # the tail may continue in the next block
        for doc in parts:
            if doc := doc.strip():
                yield doc
    if doc := buf.strip():
        yield doc


def stream_contains(f: IO[str], needle: str) -> bool:
    tail = ""
    while block := f.read(_BLOCK):
        if needle in tail + block:
            return True
        tail = block[-len(needle) :]
    return False


def record_text(rec: object, text_field: str) -> tuple[str | None, str]:
    """(text, "") of a JSON record, or (None, what is wrong). A chat record's ``messages`` contents are joined."""
    if not isinstance(rec, dict):
        return None, f"expected a JSON object, got {type(rec).__name__}"
    value = rec.get(text_field)
    if isinstance(value, str):
        return value, ""
    if value is None and isinstance(rec.get("messages"), list):
        parts = [m.get("content") if isinstance(m, dict) else None for m in rec["messages"]]
        if all(isinstance(p, str) for p in parts):
            return "\n".join(parts), ""
        return None, "a message without a string 'content'"
    if value is not None:
        return None, f"field {text_field!r} is {type(value).__name__}, not a string"
    keys = ", ".join(list(rec)[:8])
    return None, f"no {text_field!r} field (keys: {keys}; choose one with --text-field)"


@dataclass
class _Reader:
    """Documents of one file, by format; malformed records go to ``bad``."""

    path: Path
    options: SourceOptions
    separator: str
    bad: BadRecords

    def documents(self, f: io.TextIOWrapper | None, raw: IO[bytes]) -> Iterator[str]:
        fmt = split_format(self.path)[0]
        if fmt == ".parquet":
            yield from self.parquet_docs(raw)
        elif fmt == ".txt":
            yield from split_stream(f, self.txt_separator())
        elif fmt == ".json" and self.json_array():
            yield from self.array_docs(f)
        elif fmt in (".jsonl", ".json"):
            yield from self.jsonl_docs(f)
        else:
            yield from self.csv_docs(f, fmt == ".tsv")

    def txt_separator(self) -> str:
        if self.options.doc_sep == "blank-line":
            return "\n\n"
        if self.options.doc_sep == "eot":
            return self.separator
        with open_text(self.path) as (_, f):  # auto: a second pass, to see whether the separator is used
            return self.separator if stream_contains(f, self.separator) else "\n\n"

    def json_array(self) -> bool:
        with open_text(self.path) as (_, f):
            while (c := f.read(1)) and c.isspace():
                pass
            return c == "["

    def jsonl_docs(self, f: io.TextIOWrapper) -> Iterator[str]:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                self.bad.add(f"{self.path}:{lineno}: not valid JSON ({e})")
                continue
            yield from self.checked(record_text(rec, self.options.text_field), f"{self.path}:{lineno}")

    def array_docs(self, f: io.TextIOWrapper) -> Iterator[str]:
        try:
            records = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.path}:{e.lineno}: not valid JSON ({e.msg})") from None
        for i, rec in enumerate(records if isinstance(records, list) else [records]):
            yield from self.checked(record_text(rec, self.options.text_field), f"{self.path}: record {i}")

    def csv_docs(self, f: io.TextIOWrapper, tsv: bool) -> Iterator[str]:
        csv.field_size_limit(1 << 30)  # a document may exceed csv's default 128 KiB cell limit
        dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {}
        reader = csv.DictReader(f, **dialect)
        col = self.options.text_column
        if reader.fieldnames is None or col not in reader.fieldnames:
            cols = ", ".join((reader.fieldnames or [])[:8])
            raise ValueError(f"{self.path}:1: no column {col!r} (columns: {cols}; choose one with --text-column)")
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                self.bad.add(f"{self.path}:{reader.line_num}: not valid {'TSV' if tsv else 'CSV'} ({e})")
                continue
            text = row.get(col)
            reason = "" if isinstance(text, str) else f"row has no {col!r} cell (too few fields)"
            yield from self.checked((text if not reason else None, reason), f"{self.path}:{reader.line_num}")

    def parquet_docs(self, raw: IO[bytes]) -> Iterator[str]:
        """The text column, one record batch at a time (pyarrow reads it row group by row group)."""
        pyarrow = pyarrow_module()
        try:
            pf = pyarrow.parquet.ParquetFile(raw)
        except (pyarrow.ArrowException, OSError) as e:
            raise ValueError(f"{self.path}: not a valid .parquet file ({e})") from None
        col = self.options.text_column
        schema = pf.schema_arrow
        if col not in schema.names:
            cols = ", ".join(schema.names[:8])
            raise ValueError(f"{self.path}: no column {col!r} (columns: {cols}; choose one with --text-column)")
        kind = schema.field(col).type
        if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)):
            raise ValueError(f"{self.path}: column {col!r} holds {kind}, not text (choose one with --text-column)")
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=[col]):
            for value in batch.column(0).to_pylist():
                row += 1
                reason = "" if value is not None else f"null {col!r}"
                yield from self.checked((value, reason), f"{self.path}: row {row}")

    def checked(self, text_reason: tuple[str | None, str], where: str) -> Iterator[str]:
        text, reason = text_reason
        if text is None:
            self.bad.add(f"{where}: {reason}")
        elif text := text.strip():
            yield text


@dataclass
class _Gather:
    files: list[Path]
    options: SourceOptions
    separator: str
    progress: bool
    bad: BadRecords = field(init=False)
    documents: int = 0
    done_bytes: int = 0

    def write(self, dest: Path) -> dict:
        self.bad = BadRecords(self.options.skip_bad)
        total = sum(p.stat().st_size for p in self.files)
        bar = _Progress("gather", total, 0, self.progress)
        t0 = time.perf_counter()
        with replacing(dest) as tmp, open(tmp, "x", encoding="utf-8", newline="") as out:
            for path in self.files:
                with open_text(path) as (raw, f):
                    for doc in _Reader(path, self.options, self.separator, self.bad).documents(f, raw):
                        out.write(f"{doc}\n{self.separator}\n")
                        self.documents += 1
                        if self.documents % 512 == 0:
                            bar.update(self.done_bytes + raw.tell(), extra=self.rate(t0))
                self.done_bytes += path.stat().st_size
        if time.perf_counter() - t0 > 5:  # a closing line only for inputs long enough to have shown progress
            bar.update(self.done_bytes, final=True, extra=self.rate(t0))
        return {"files": len(self.files), "input_bytes": total, "documents": self.documents,
                "skipped_bad": self.bad.count, "bad_examples": self.bad.examples}

    def rate(self, t0: float) -> str:
        return f"{self.documents:,} docs ({self.documents / max(time.perf_counter() - t0, 1e-6):,.0f} docs/s)"


def gather(files: list[Path], dest: Path, separator: str, options: SourceOptions, progress: bool = True) -> dict:
    """Write every document of ``files`` (in order) to ``dest`` as ``doc\\n<separator>\\n``, atomically;
    return {files, input_bytes, documents, skipped_bad, bad_examples}. Progress (bytes and documents per
    second, ETA over the on-disk input size) goes to stderr. Never writes to the inputs."""
    return _Gather(files, options, separator, progress).write(dest)

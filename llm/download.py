"""Download the public corpora the CS336 course uses, with progress, resume and integrity checks.

    uv run -m llm.data download wikitext-2 [--out data/]    # WikiText-2 (raw) parquet -> train/valid/test.txt articles
    uv run -m llm.data download wikitext-103                # WikiText-103 (raw), the same (~315 MB of parquet)
    uv run -m llm.data download tinystories [--out data/]   # TinyStoriesV2-GPT4 train + valid (~2.2 GB)
    uv run -m llm.data download owt [--out data/]           # OpenWebText sample train + valid (gzip, unpacked)
    uv run -m llm.data download tinystories --mirror https://hf-mirror.com
    uv run -m llm.data download tinystories --url URL [--url URL ...]

Only the standard library (urllib). A transfer writes ``FILE.part`` and resumes it with an HTTP Range
request after an interruption (rerun the same command); the finished file is size-checked against the
server's length (and the pinned size when there is one), sha256-checked against the pinned hash, else
against the hash recorded when that file was first downloaded (``FILE.sha256``), and renamed into place
atomically. Each download ends as text ``prepare`` takes: WikiText's parquet rows are joined into
articles (one per `` = Title = `` heading) separated by a line ``<|endoftext|>``; TinyStories already
separates its stories that way; OWT's ``.gz`` is unpacked.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from llm.bpe import EOT
from llm.cli import Parser
from llm.fileio import NoSpaceError, replacing, sha256_of, space_errors, write_text


HF = "https://huggingface.co"


def pyarrow_module():
    """``pyarrow`` with its ``parquet`` module loaded, or None without the optional ``parquet`` extra (then
    parquet inputs and the WikiText conversion stop with a one-line hint). Imported here, on first use, not at
    module level: it costs ~50 MB and ~0.5 s that every command importing llm.data would pay."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401 (loads pyarrow.parquet)
    except ImportError:
        return None
    return pyarrow
# WikiText at a fixed revision of its Hugging Face repository, so that the pinned sizes and hashes hold.
_WIKITEXT = f"{HF}/datasets/Salesforce/wikitext/resolve/b08601e04326c79dfdd32d625aee71d232d685c3"


@dataclass(frozen=True)
class Remote:
    url: str
    filename: str  # name of the final (decompressed) file
    size: int | None = None  # expected bytes of the downloaded object, when known
    sha256: str | None = None  # expected sha256 of the downloaded object, when known

    @property
    def gz(self) -> bool:
        return self.url.endswith(".gz")


def _wikitext(config: str, files: list[tuple[str, int | None, str | None]]) -> list[Remote]:
    return [Remote(f"{_WIKITEXT}/{config}/{name}", name, size, sha) for name, size, sha in files]


# Sizes and sha256 are pinned where they are published for the pinned revision (the train parquet files,
# whose hashes are their Git LFS object ids); elsewhere the size is checked against the server's
# Content-Length and the sha256 of the first download is recorded (FILE.sha256) and checked from then on.
# TinyStories and OWT are the URLs of the CS336 assignment 1 README (the "main" revision).
DATASETS: dict[str, list[Remote]] = {
    "wikitext-2": _wikitext("wikitext-2-raw-v1", [
        ("train-00000-of-00001.parquet", 6357543, "e83889baabc497075506f91975be5fac0d45c5290b6b20582c8cd1e853d0c9f7"),
        ("validation-00000-of-00001.parquet", None, None),
        ("test-00000-of-00001.parquet", None, None),
    ]),
    "wikitext-103": _wikitext("wikitext-103-raw-v1", [
        ("train-00000-of-00002.parquet", 156987808, "74da360f23826045b3e6ac6375411fdb15f003030aa74f2596ed08b857cb9212"),
        ("train-00001-of-00002.parquet", 157088770, "ba090ac30dbf5461e8dcbdd1a1b8e6f3cf9c2c756d64f0c1220450acd514f720"),
        ("validation-00000-of-00001.parquet", None, None),
        ("test-00000-of-00001.parquet", None, None),
    ]),
    "tinystories": [
        Remote(f"{HF}/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-train.txt"),
        Remote(f"{HF}/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-valid.txt", "TinyStoriesV2-GPT4-valid.txt"),
    ],
    "owt": [
        Remote(f"{HF}/datasets/stanford-cs336/owt-sample/resolve/main/owt_train.txt.gz", "owt_train.txt"),
        Remote(f"{HF}/datasets/stanford-cs336/owt-sample/resolve/main/owt_valid.txt.gz", "owt_valid.txt"),
    ],
}


class DownloadError(RuntimeError):
    """A download failed; the message is one line that says what to do."""


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class _Progress:
    """A one-line progress bar on stderr: percent, bytes, MB/s over this session, ETA, and a caller's ``extra``
    (e.g. documents per second) at the end."""

    def __init__(self, name: str, total: int | None, start: int, enabled: bool) -> None:
        self.name, self.total, self.start, self.enabled = name, total, start, enabled
        self.t0 = self.last = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.last_pct = -1

    def update(self, done: int, final: bool = False, extra: str = "") -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not final and now - self.last < (0.2 if self.tty else 5.0):
            return
        self.last = now
        rate = (done - self.start) / max(now - self.t0, 1e-6)
        if self.total:
            frac = done / self.total
            bar = "#" * int(frac * 20) + "-" * (20 - int(frac * 20))
            eta = (self.total - done) / rate if rate > 0 else float("inf")
            eta_s = _fmt_time(eta) if eta != float("inf") else "?"
            line = f"{self.name} [{bar}] {frac:6.1%} {_fmt_bytes(done)}/{_fmt_bytes(self.total)} {rate / 1e6:.1f} MB/s ETA {eta_s}"
        else:
            line = f"{self.name} {_fmt_bytes(done)} {rate / 1e6:.1f} MB/s"
        line += f" {extra}" if extra else ""
        print(("\r" + line + " " * 4) if self.tty else line, end="\n" if final or not self.tty else "", file=sys.stderr, flush=True)


def _offline_message(url: str, dest: Path, reason: object) -> str:
    host = urllib.parse.urlsplit(url).netloc
    return (
        f"cannot reach {host} ({reason}); check your internet connection or proxy (HTTPS_PROXY), "
        f"or fetch {url} by other means into {dest} and rerun (partial downloads resume)"
    )


def download_file(
    url: str,
    dest: str | os.PathLike,
    expected_size: int | None = None,
    expected_sha256: str | None = None,
    retries: int = 3,
    timeout: float = 30.0,
    progress: bool = True,
    chunk_size: int = 1 << 20,
    backoff: float = 2.0,
) -> dict:
    """Download ``url`` to ``dest`` via ``dest.part`` (resumed with HTTP Range); return {path, bytes, sha256, resumed_from}.

    Interrupted transfers are retried ``retries`` times (resuming each time); if they still fail the
    ``.part`` file stays for the next run. A size or sha256 mismatch deletes the ``.part`` (it is
    corrupt, resuming it cannot help) and raises. Raises DownloadError with one line on any failure.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    resumed_from = part.stat().st_size if part.exists() else 0
    transfer = _Transfer(url, dest, part, retries, timeout, progress, chunk_size, backoff)
    while not transfer.once():
        pass
    want = expected_size if expected_size is not None else transfer.total
    size, digest = _check_part(part, dest.name, want, expected_sha256)
    os.replace(part, dest)
    return {"path": str(dest), "bytes": size, "sha256": digest, "resumed_from": resumed_from}


# failures of a connection that a retry (resuming the .part) can get past
_TRANSIENT = (TimeoutError, socket.timeout, ConnectionError, http.client.HTTPException)  # noqa: UP041


@dataclass
class _Transfer:
    """The requests of one download_file call into ``part``: each ``once`` is one request, resumed from what
    the ``.part`` holds, and ``attempt`` counts the retries they have used."""

    url: str
    dest: Path
    part: Path
    retries: int
    timeout: float
    progress: bool
    chunk_size: int
    backoff: float
    attempt: int = 0
    total: int | None = None  # the object's length, once a server has said it

    def retry(self, sleep: bool = True) -> bool:
        """Use up one retry, after a pause that grows with each (``sleep``); False when none is left."""
        if self.attempt >= self.retries:
            return False
        self.attempt += 1
        if sleep:
            time.sleep(self.backoff * self.attempt)
        return True

    def once(self) -> bool:
        """One request: True when the ``.part`` holds the whole object, False to go round again."""
        have = self.part.stat().st_size if self.part.exists() else 0
        headers = {"User-Agent": "llm-data/1 (python urllib)", "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            resp = urllib.request.urlopen(urllib.request.Request(self.url, headers=headers), timeout=self.timeout)
        except ValueError as e:  # urllib: "unknown url type"
            raise DownloadError(f"{self.url}: not a URL urllib can fetch ({e})") from None
        except urllib.error.HTTPError as e:
            return self.after_http_error(e, have)
        except urllib.error.URLError as e:
            raise DownloadError(_offline_message(self.url, self.dest, e.reason)) from None
        except _TRANSIENT as e:
            if self.retry():
                return False
            raise DownloadError(_offline_message(self.url, self.dest, e)) from None
        with resp:
            mode = self.write_mode(resp, have)
            if mode is None:  # a server that answers a different range: start over
                self.part.unlink(missing_ok=True)
                return False
            done = self.receive(resp, mode, have if mode == "ab" else 0)
            if done is None:
                return False
        if self.total is not None and done < self.total:  # connection closed early without an exception
            if self.retry(sleep=False):
                return False
            raise DownloadError(
                f"download of {self.url} stopped at {done} of {self.total} bytes; rerun the same command to resume from {self.part}"
            )
        return True

    def after_http_error(self, e: urllib.error.HTTPError, have: int) -> bool:
        """True when a 416 says the ``.part`` is already whole, False to go round again; else DownloadError."""
        if e.code == 416 and have:  # nothing left to send: the .part is complete, or wrong
            cr = e.headers.get("Content-Range", "")
            self.total = int(cr.rsplit("/", 1)[1]) if "/" in cr and cr.rsplit("/", 1)[1].isdigit() else None
            if self.total == have:
                return True
            self.part.unlink()
            return False
        if e.code >= 500 and self.retry():
            return False
        raise DownloadError(f"{self.url}: HTTP {e.code} {e.reason}") from None

    def write_mode(self, resp: http.client.HTTPResponse, have: int) -> str | None:
        """"ab" to append a 206 answer that starts at ``have``, "wb" for a full body, None for another range;
        records the object's length in ``total``."""
        if resp.status == 206:
            cr = resp.headers.get("Content-Range", "")  # "bytes START-END/TOTAL"
            try:
                start = int(cr.split()[1].split("-")[0])
                self.total = int(cr.rsplit("/", 1)[1]) if not cr.endswith("/*") else None
            except (IndexError, ValueError):
                start = -1
            return "ab" if start == have else None
        length = resp.headers.get("Content-Length")
        self.total = int(length) if length and length.isdigit() else None
        return "wb"  # the server ignored Range (or we asked for none): full body

    def receive(self, resp: http.client.HTTPResponse, mode: str, have: int) -> int | None:
        """Stream the body into the ``.part`` with a progress line; the bytes it then holds, or None when the
        connection broke and a retry is left (without one: DownloadError, keeping the ``.part``)."""
        bar = _Progress(self.dest.name, self.total, have, self.progress)
        done = have
        try:
            with space_errors(self.part, note=" (the partial download is kept: free space and rerun to resume)"), \
                    open(self.part, mode) as f:
                while block := resp.read(self.chunk_size):
                    f.write(block)
                    done += len(block)
                    bar.update(done)
        except _TRANSIENT as e:
            bar.update(done, final=True)
            if self.retry():
                return None
            raise DownloadError(
                f"download of {self.url} interrupted at {_fmt_bytes(done)}"
                + (f" of {_fmt_bytes(self.total)}" if self.total else "")
                + f" ({type(e).__name__}); rerun the same command to resume from {self.part}"
            ) from None
        bar.update(done, final=True)
        return done


def _check_part(part: Path, name: str, want: int | None, expected_sha256: str | None) -> tuple[int, str]:
    """(size, sha256) of a finished ``.part``; a size or hash other than expected deletes it (DownloadError)."""
    size = part.stat().st_size
    if want is not None and size != want:
        part.unlink()
        raise DownloadError(f"{name}: downloaded {size} bytes but expected {want}; the file was corrupt and was deleted, rerun to fetch it again")
    digest = sha256_of(part)
    if expected_sha256 is not None and digest != expected_sha256.lower():
        part.unlink()
        raise DownloadError(
            f"{name}: sha256 {digest[:16]}... does not match the expected {expected_sha256[:16]}...; "
            "the corrupt download was deleted, rerun to fetch it again"
        )
    return size, digest


def gunzip_file(src: Path, dest: Path, progress: bool = True) -> int:
    """Decompress ``src`` into ``dest`` atomically (temp + rename); return the decompressed size."""
    bar = _Progress(f"unpack {src.name}", src.stat().st_size, 0, progress)
    n = 0
    try:
        with replacing(dest) as tmp, open(src, "rb") as raw, gzip.open(raw) as fin, open(tmp, "xb") as fout:
            while block := fin.read(1 << 22):
                fout.write(block)
                n += len(block)
                bar.update(raw.tell())
            bar.update(src.stat().st_size, final=True)
    except NoSpaceError:
        raise  # the archive is fine: free space and rerun
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DownloadError(f"{src}: cannot decompress ({e}); delete it and rerun the download") from None
    return n


def verify_existing(path: Path, expected: str | None, recorded: Path | None = None) -> None:
    """Raise DownloadError when a file that is already there does not have the expected sha256 (the sha256 of
    the downloaded object: for an unpacked .gz, the hash recorded in ``recorded`` when it was fetched).
    The file is kept: it may be the right one and the expected hash wrong."""
    if expected is None:
        return
    if recorded is not None:
        if not recorded.is_file():
            raise DownloadError(f"{path}: already there but its sha256 cannot be checked ({recorded} is missing); "
                                "the file is kept: delete it to download and check it again")
        words = recorded.read_text().split()  # "HEX  NAME", as fetch writes it
        digest = words[0] if words else ""
    else:
        digest = sha256_of(path)
    if digest != expected.lower():
        raise DownloadError(f"{path}: already there but its sha256 {digest[:16]}... does not match the expected "
                            f"{expected[:16]}...; the file is kept: delete it to download it again")


def fetch(remote: Remote, out_dir: Path, progress: bool = True, **kw) -> dict:
    """Download (and unpack ``.gz``) one remote file into ``out_dir``; skip it if already complete (after
    checking it against ``remote.sha256`` when one is given)."""
    final = out_dir / remote.filename
    target = out_dir / (remote.filename + ".gz") if remote.gz else final
    if final.exists():
        verify_existing(final, remote.sha256, out_dir / (target.name + ".sha256") if remote.gz else None)
        if progress:
            print(f"{final}: already downloaded ({_fmt_bytes(final.stat().st_size)}), skipped", file=sys.stderr)
        return {"path": str(final), "bytes": final.stat().st_size, "skipped": True}
    if remote.gz and target.exists():
        verify_existing(target, remote.sha256)
    if not (remote.gz and target.exists()):  # a finished .gz from an earlier run only needs unpacking
        record = out_dir / (target.name + ".sha256")
        recorded = _recorded_sha256(record) if remote.sha256 is None else None
        try:
            info = download_file(remote.url, target, remote.size, remote.sha256 or recorded, progress=progress, **kw)
        except DownloadError as e:
            if recorded is None or "sha256" not in str(e):
                raise
            raise DownloadError(f"{e} (expected: the hash recorded at the first download, in {record}; "
                                "if the host has changed the file, delete that record)") from None
        write_text(record, f"{info['sha256']}  {target.name}\n")
    else:
        info = {"path": str(target), "bytes": target.stat().st_size}
    if remote.gz:
        info["unpacked_bytes"] = gunzip_file(target, final, progress)
        target.unlink()
        info["path"] = str(final)
    return info


def _recorded_sha256(record: Path) -> str | None:
    """The hash in a ``FILE.sha256`` record ("HEX  NAME"), or None when there is none."""
    words = record.read_text().split() if record.is_file() else []
    return words[0] if words and re.fullmatch(r"[0-9a-f]{64}", words[0]) else None


# A WikiText article starts at a level-1 heading line " = Title = " (sections are " = = Section = = ").
_ARTICLE_HEADING = re.compile(r" = [^=].* = ")


def wikitext_articles(lines: Iterable[str]) -> Iterator[str]:
    """WikiText's lines (one parquet row each, newline included) joined into articles, each whitespace-stripped:
    a new article begins at every `` = Title = `` line."""
    article: list[str] = []
    for line in lines:
        if article and _ARTICLE_HEADING.fullmatch(line.rstrip("\n")):
            if text := "".join(article).strip():
                yield text
            article = []
        article.append(line)
    if text := "".join(article).strip():
        yield text


def _parquet_lines(paths: list[Path], bar: _Progress) -> Iterator[str]:
    """The ``text`` column of parquet files in order, read one record batch at a time."""
    pyarrow = pyarrow_module()
    done = 0
    for path in paths:
        size = path.stat().st_size
        try:
            pf = pyarrow.parquet.ParquetFile(path)
            groups = pf.num_row_groups
            for g in range(groups):
                for batch in pf.iter_batches(batch_size=4096, row_groups=[g], columns=["text"]):
                    yield from (v or "" for v in batch.column(0).to_pylist())
                bar.update(done + size * (g + 1) // groups)
        except (pyarrow.ArrowException, KeyError) as e:
            raise DownloadError(f"{path}: not a WikiText parquet file with a 'text' column ({e}); "
                                "delete it and rerun the download") from None
        done += size


def convert_wikitext(parquets: list[Path], dest: Path, progress: bool = True) -> dict:
    """Join WikiText parquet shards (in order: an article may continue into the next shard) into ``dest``:
    one article, then a line ``<|endoftext|>``, per article (atomically). Returns {path, articles, bytes}."""
    if pyarrow_module() is None:
        raise DownloadError(f"{parquets[0]}: reading WikiText's parquet needs pyarrow: uv sync --extra parquet "
                            "(or pip install pyarrow), then rerun (the download is kept)")
    bar = _Progress(f"convert {dest.name}", sum(p.stat().st_size for p in parquets), 0, progress)
    n = 0
    with replacing(dest) as tmp, open(tmp, "x", encoding="utf-8", newline="") as f:
        for article in wikitext_articles(_parquet_lines(parquets, bar)):
            f.write(f"{article}\n{EOT}\n")
            n += 1
    bar.update(bar.total or 0, final=True, extra=f"{n:,} articles")
    return {"path": str(dest), "articles": n, "bytes": dest.stat().st_size}


def convert(dataset: str, files: list[Path], out_dir: Path, progress: bool = True) -> list[Path]:
    """The text files ``prepare`` takes, made from a dataset's downloaded ``files``: WikiText's parquet shards
    become train.txt / valid.txt / test.txt (grouped by the shard name's split; redone only when missing),
    every other download is text already."""
    if not dataset.startswith("wikitext"):
        return files
    splits: dict[str, list[Path]] = {}
    for f in files:
        split = f.name.split("-")[0].removesuffix(".parquet")
        splits.setdefault({"validation": "valid"}.get(split, split), []).append(f)
    out = []
    for split, shards in splits.items():
        dest = out_dir / f"{split}.txt"
        if not dest.exists():
            info = convert_wikitext(shards, dest, progress)
            if progress:
                print(f"{dest}: {info['articles']:,} articles, {_fmt_bytes(info['bytes'])}", file=sys.stderr)
        out.append(dest)
    return out


def _with_mirror(url: str, mirror: str) -> str:
    parts = urllib.parse.urlsplit(url)
    m = urllib.parse.urlsplit(mirror if "://" in mirror else "https://" + mirror)
    return urllib.parse.urlunsplit((m.scheme, m.netloc, parts.path, parts.query, parts.fragment))


_VOCAB_HINT = {"wikitext-2": 8000, "wikitext-103": 32000, "tinystories": 10000, "owt": 32000}


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="python -m llm.data download", description="Download a public training corpus.")
    ap.add_argument("dataset", choices=sorted(DATASETS), help="wikitext-2 / wikitext-103: WikiText (raw) as articles; "
                    "tinystories: TinyStoriesV2-GPT4; owt: OpenWebText sample (CS336)")
    ap.add_argument("--out", default="data", help="parent directory; files go to OUT/DATASET/ (default data/)")
    ap.add_argument("--url", action="append", default=None, help="download this URL instead (repeatable; .gz is unpacked)")
    ap.add_argument("--mirror", default=None, help="replace the host, e.g. https://hf-mirror.com")
    ap.add_argument("--sha256", action="append", default=None, help="expected sha256 per file, in order (optional)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    remotes = _remotes(args)
    if isinstance(remotes, str):
        print(f"error: {remotes}", file=sys.stderr)
        return 2
    out_dir = Path(args.out) / args.dataset
    results = []
    try:
        for r in remotes:
            results.append(fetch(r, out_dir, progress=not args.quiet))
        texts = convert(args.dataset, [Path(x["path"]) for x in results], out_dir, progress=not args.quiet)
    except (DownloadError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"downloads": results, "text_files": [str(t) for t in texts]}, indent=2))
    train = [t for t in texts if "train" in t.name]
    valid = [t for t in texts if "valid" in t.name]
    if not args.quiet and len(train) == 1 and len(valid) == 1:
        print(f"next: uv run -m llm.data prepare --input {train[0]} --val-input {valid[0]} "
              f"--vocab-size {_VOCAB_HINT.get(args.dataset, 32000)} --out {out_dir}", file=sys.stderr)
    return 0


def _remotes(args) -> list[Remote] | str:
    """The files to fetch as the flags say, or one line saying what is wrong (before any download starts)."""
    remotes = DATASETS[args.dataset]
    for u in args.url or []:
        parts = urllib.parse.urlsplit(u)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return f"--url {u!r} is not an http(s) URL (e.g. https://host/path/file.txt)"
    if args.dataset.startswith("wikitext") and pyarrow_module() is None:
        return f"{args.dataset} comes as parquet, which needs pyarrow: uv sync --extra parquet (or pip install pyarrow)"
    if args.url:
        remotes = [Remote(u, Path(urllib.parse.urlsplit(u).path).name.removesuffix(".gz") or "download") for u in args.url]
    if args.mirror:
        remotes = [Remote(_with_mirror(r.url, args.mirror), r.filename, r.size, r.sha256) for r in remotes]
    if args.sha256:
        if len(args.sha256) != len(remotes):
            return f"got {len(args.sha256)} --sha256 values for {len(remotes)} files"
        remotes = [Remote(r.url, r.filename, r.size, h) for r, h in zip(remotes, args.sha256, strict=True)]
    return remotes


if __name__ == "__main__":
    raise SystemExit(main())

"""Token data: random training batches from memmapped arrays, validated opening, corpus preparation.

Layout of a prepared directory (see data/README.md)::

    DIR/train.npy, DIR/val.npy   1-D uint16 token ids (uint32 when the vocabulary exceeds 65,536)
    DIR/tokenizer/               BPE tokenizer trained on the training split (vocab.json, merges.txt)
    DIR/meta.json                vocab size, token counts, bytes/token, unigram entropy, source sha256

CLI::

    uv run -m llm.data generate --out data/demo/stories.txt [--size-mb 5 --seed 0]
    uv run -m llm.data prepare --input FILE|DIR|GLOB [--input ...] --vocab-size N --out DIR [--val-fraction 0.05 | --val-input FILE]
        [--doc-sep eot|blank-line] [--text-field text] [--text-column text] [--skip-bad] [--split hash|random]
    uv run -m llm.data demo                        # generate + prepare data/demo (what training runs)
    uv run -m llm.data download wikitext-2|wikitext-103|tinystories|owt [--out data/] [--url URL]
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import mmap
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llm import download
from llm.bpe import EOT
from llm.bpe.tokenizer import BpeTokenizer
from llm.bpe.train import check_workers, train_bpe
from llm.cli import Parser, add_num_workers
from llm.doc_split import SPLIT_METHODS, split_documents
from llm.fileio import check_writable, replacing, sha256_of, write_json
from llm.stories import GENERATOR_VERSION, generate_stories
from llm.text_sources import DOC_SEPS, SourceOptions, gather, is_plain_text, resolve_inputs

try:
    import fcntl
except ImportError:  # Windows: no advisory locks (see _dir_lock)
    fcntl = None

if TYPE_CHECKING:
    import torch

META_FORMAT = 1
_CHUNK = 1 << 22  # tokens per chunk in full passes: bounded memory (~32 MiB as int64)
_FULL_CHECK_MAX = 1 << 24  # open_tokens checks every id up to this many tokens, a fixed sample beyond


# ----------------------------------------------------------------------------- batches


def get_batch(
    dataset: np.ndarray,
    batch_size: int,
    context_length: int,
    device: str | torch.device,
    rng: np.random.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``batch_size`` windows of ``context_length + 1`` tokens; return inputs and next-token targets.

    x[b, t] = dataset[s_b + t], y[b, t] = dataset[s_b + t + 1], with starts s_b uniform over
    [0, len(dataset) - context_length - 1] (every start, including the last, is reachable).
    Works on ``np.memmap``: one vectorised gather of a (batch, context+1) index array reads only the
    touched pages, never the whole file. ``rng=None`` draws from NumPy's global RandomState, so
    ``np.random.seed`` makes it reproducible; pass a ``np.random.Generator`` for explicit control.
    Returns int64 tensors (batch, context_length) on ``device`` (pinned + non_blocking on CUDA).
    """
    import torch  # here, not at module level: the data CLIs and inspect_data.py start faster without it

    if isinstance(dataset, torch.Tensor):
        dataset = dataset.detach().cpu().numpy()
    if batch_size < 1 or context_length < 1:
        raise ValueError(f"batch_size and context_length must be >= 1, got {batch_size} and {context_length}")
    n = len(dataset)
    if n < context_length + 1:
        raise ValueError(
            f"dataset has {n} tokens but a batch needs context_length + 1 = {context_length + 1}; "
            "use a smaller context_length or more data"
        )
    high = n - context_length  # exclusive: the last start is n - context_length - 1
    starts = rng.integers(0, high, size=batch_size) if rng is not None else np.random.randint(0, high, size=batch_size)
    idx = starts.astype(np.int64)[:, None] + np.arange(context_length + 1, dtype=np.int64)
    windows = torch.from_numpy(np.asarray(dataset[idx]).astype(np.int64, copy=False))
    x = windows[:, :-1].contiguous()
    y = windows[:, 1:].contiguous()
    device = torch.device(device)
    if device.type == "cuda":
        # Pinned host memory lets the copy run asynchronously with the previous step's compute.
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# ----------------------------------------------------------------------------- token arrays


def open_tokens(path: str | os.PathLike, vocab_size: int | None = None) -> np.ndarray:
    """Open a 1-D integer ``.npy`` token array as a read-only memmap, after validating it.

    Checks: the file exists and is a readable .npy (not truncated), 1-D, integer dtype, non-empty,
    and (when ``vocab_size`` is given) ids in [0, vocab_size) on every token for arrays up to 16M
    tokens, otherwise on a deterministic sample of 64 blocks plus the first and last block.
    Raises FileNotFoundError / ValueError with one line that says what is wrong.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such token file (create it with `uv run -m llm.data prepare`)")
    if p.is_dir():
        raise ValueError(f"{p}: is a directory; pass the .npy file (e.g. {p / 'train.npy'})")
    try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/OSError/EOFError/UnpicklingError for bad files
        size = p.stat().st_size
        raise ValueError(f"{p}: not a valid .npy token array ({size} bytes; corrupt or truncated?): {e}") from None
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{p}: expected a single array (.npy), got {type(arr).__name__}")
    if arr.ndim != 1:
        raise ValueError(f"{p}: expected a 1-D token array, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{p}: expected integer token ids (uint16/uint32), got dtype {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"{p}: token array is empty")
    if vocab_size is not None:
        lo, hi, where = _sampled_range(arr)
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"{p}: token id {bad} (near position {where}) is outside [0, {vocab_size}); "
                "the array was encoded with a different tokenizer or vocab_size is wrong"
            )
    return arr


def _sampled_range(arr: np.ndarray, block: int = 1 << 16, blocks: int = 64) -> tuple[int, int, int]:
    """(min, max, position of the first offending extreme) over all of ``arr`` or a fixed sample."""
    n = len(arr)
    if n <= _FULL_CHECK_MAX:
        starts = range(0, n, _CHUNK)
        size = _CHUNK
    else:
        g = np.random.default_rng(0)  # fixed: the same blocks every time, so results are reproducible
        starts = sorted({0, n - block, *g.integers(0, n - block, size=blocks).tolist()})
        size = block
    lo, hi, lo_at, hi_at = None, None, 0, 0
    for s in starts:
        chunk = read_range(arr, s, s + size)
        cmin, cmax = int(chunk.min()), int(chunk.max())
        if lo is None or cmin < lo:
            lo, lo_at = cmin, s + int(chunk.argmin())
        if hi is None or cmax > hi:
            hi, hi_at = cmax, s + int(chunk.argmax())
    return lo, hi, (lo_at if lo < 0 else hi_at)


def read_range(arr: np.ndarray, start: int, stop: int) -> np.ndarray:
    """``arr[start:stop]`` as an in-memory array. For a memmap opened from a file (np.load with
    mmap_mode) it reads the bytes with a plain file read instead of touching the mapping, so a full
    pass over a large array keeps resident memory at one chunk rather than growing with the file."""
    stop = min(stop, len(arr))
    if isinstance(arr, np.memmap) and isinstance(arr.base, mmap.mmap) and arr.filename and arr.ndim == 1 and stop > start:
        with open(arr.filename, "rb") as f:
            f.seek(arr.offset + start * arr.itemsize)
            out = np.fromfile(f, dtype=arr.dtype, count=stop - start)
        if len(out) == stop - start:
            return out
    return np.asarray(arr[start:stop])


def token_counts(arr: np.ndarray, minlength: int = 0) -> np.ndarray:
    """Exact histogram of token ids in one chunked pass (bounded memory)."""
    counts = np.zeros(minlength, dtype=np.int64)
    for s in range(0, len(arr), _CHUNK):
        c = np.bincount(read_range(arr, s, s + _CHUNK).astype(np.int64, copy=False), minlength=minlength)
        if len(c) > len(counts):
            c[: len(counts)] += counts
            counts = c
        else:
            counts[: len(c)] += c
    return counts


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy in nats of the unigram distribution ``counts / counts.sum()``: the loss of a model
    that ignores context, i.e. the bar a language model has to get well below."""
    p = counts[counts > 0].astype(np.float64)
    p /= p.sum()
    return float(-(p * np.log(p)).sum())


# ----------------------------------------------------------------------------- preparation helpers


def sha256_file(path: str | os.PathLike, _cache: dict = {}) -> str:  # noqa: B006 (intentional memo)
    """sha256 of a file, memoised on (path, size, mtime) so idempotent reruns hash each file once."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _cache:
        _cache[key] = sha256_of(path)
    return _cache[key]


class DirLockBusy(ValueError):
    """Another live process holds a directory's lock (``_dir_lock(..., wait=False)``); the message names it."""


@contextlib.contextmanager
def _dir_lock(directory: Path, wait: bool = True) -> Iterator[None]:
    """Exclusive lock on DIR/.lock (flock): concurrent callers (e.g. torchrun ranks) prepare a directory only
    once, and a run directory holds one run at a time.

    ``wait``: block until the holder is done; else raise DirLockBusy at once, naming the holder. While held,
    the file records the owner's pid, host and start time, and release removes the file, so a record found
    on acquiring is the lock of a process that died holding it (the kernel drops a dead process's flock):
    that stale lock is taken over, with one line on stderr saying so. Directories the lock created are
    removed on release while still empty, so a caller that fails on its inputs leaves nothing behind.
    """
    if fcntl is None:  # Windows: no advisory locks; callers there run one process anyway
        directory.mkdir(parents=True, exist_ok=True)
        yield
        return
    created, d = [], directory  # the directory and the ancestors it lacks, innermost first
    while not d.exists() and d != d.parent:
        created.append(d)
        d = d.parent
    path = directory / ".lock"
    fd = _lock_acquire(path, wait)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # before unlocking: a waiter that then gets the old file sees it gone and retries
        os.close(fd)
        for d in created:
            try:
                d.rmdir()
            except OSError:  # not empty (or not ours any more): keep it and everything above it
                break


def _lock_acquire(path: Path, wait: bool) -> int:
    """An fd of ``path`` (created if missing) under an exclusive flock, with this process's record written in it."""
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # a failed holder removed the directory between mkdir and open
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            owner = _lock_owner(fd) or "another process"
            os.close(fd)
            raise DirLockBusy(f"{path.parent} is in use by {owner}") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed this file on release: lock the one at ``path`` now
    stale = _lock_owner(fd)
    if stale:
        _log(f"{path.parent}: taking over the stale lock of {stale}: that process ended without releasing it", quiet=False)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    return fd


def _lock_owner(fd: int) -> str:
    """The holder named by a lock file's record, as 'pid N (started T on HOST)'; "" when the file holds none."""
    text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if not text:
        return ""
    try:
        r = json.loads(text)
        return f"pid {r['pid']} (started {r['started']} on {r['host']})"
    except (ValueError, KeyError, TypeError):
        return f"another process (lock record {text[:80]!r})"


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def load_meta(out_dir: str | os.PathLike) -> dict:
    """Read DIR/meta.json and resolve its relative paths (``train``, ``val``, ``tokenizer_dir``) against DIR."""
    d = Path(out_dir)
    p = d / "meta.json"
    if not p.exists():
        raise FileNotFoundError(f"{p}: missing; run `uv run -m llm.data prepare --out {d} ...` first")
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e}); delete it and re-run prepare") from None
    for key in ("train", "val", "tokenizer_dir"):
        if key in meta:
            meta[key] = str(d / meta[key])
    meta["dir"] = str(d)
    return meta


# ----------------------------------------------------------------------------- prepare


def prepare(
    input_path: str | os.PathLike | list[str | os.PathLike],
    out_dir: str | os.PathLike,
    vocab_size: int,
    val_fraction: float = 0.05,
    val_input: str | os.PathLike | None = None,
    force: bool = False,
    special_tokens: tuple[str, ...] | list[str] = (EOT,),
    num_workers: int | None = None,
    quiet: bool = False,
    source_options: SourceOptions | None = None,
    split: str | None = None,
) -> dict:
    """Text -> tokenizer + ``train.npy`` / ``val.npy`` + ``meta.json`` in ``out_dir``.

    ``input_path``: one path or a list of files, directories (walked recursively, sorted) and globs, in
    any of the formats of llm.text_sources (.txt, .jsonl, .json, .csv, .tsv, optionally .gz/.xz/.bz2/.zst),
    read as ``source_options`` says. A single uncompressed .txt with the default options is read in
    place; anything else is first streamed into DIR/source.txt (step 0, "gather": bounded memory, see
    llm.text_sources), whose fingerprint covers every input's path, size and mtime and the options.

    Steps: (1) split whole documents into train/val text (skipped with ``val_input``) by ``split``: "hash"
    (a document's side from its hash, stable when inputs are added; exact duplicates dropped and counted) or
    "random" (a seeded sample, duplicates kept); None = "hash", except in a directory already split the
    random way (prepared before the hash split existed), which keeps its split (see llm.doc_split), (2) train the
    BPE tokenizer on the training text only (no val leakage into merges), (3) encode train, (4) encode
    val, (5) write meta.json. Each step writes to a temp path and renames, and records a fingerprint
    of its inputs in DIR/.prepare_state.json; a rerun skips every step whose fingerprint and outputs are
    present (idempotent), and an interrupted run redoes only the unfinished steps. ``force`` redoes all.
    Returns ``load_meta(out_dir)``.
    """
    out = Path(out_dir)
    options = source_options or SourceOptions()
    specs = list(input_path) if isinstance(input_path, (list, tuple)) else [input_path]
    files = resolve_inputs(specs, exclude=out)
    src = files[0] if len(files) == 1 and is_plain_text(files[0]) and options == SourceOptions() else out / "source.txt"
    _check_prepare_args(val_input, vocab_size, val_fraction, special_tokens, num_workers, options)
    if split not in (None, *SPLIT_METHODS):
        raise ValueError(f"split must be one of {', '.join(SPLIT_METHODS)}, got {split!r}")
    check_writable(out, what="out", is_dir=True)
    t_start = time.perf_counter()
    with _dir_lock(out):
        state_path = out / ".prepare_state.json"
        state = {} if force or not state_path.exists() else json.loads(state_path.read_text())
        gathered = files if src == out / "source.txt" else []
        _Prepare(src, out, vocab_size, val_fraction, val_input, list(special_tokens), num_workers, quiet, state,
                 inputs=gathered, options=options, split_method=_split_method(split, state, quiet)).run()
    meta = load_meta(out)
    _log(
        f"prepare: {out}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, vocab {meta['vocab_size']}, "
        f"{meta['bytes_per_token']:.2f} bytes/token, unigram entropy {meta['unigram_entropy']:.3f} nats "
        f"({time.perf_counter() - t_start:.1f}s)",
        quiet,
    )
    if meta.get("duplicate_documents"):
        _log(f"prepare: dropped {meta['duplicate_documents']:,} exact duplicate document(s) (kept the first copy)", quiet)
    if meta.get("skipped_bad_records"):
        first = "; ".join(json.loads((out / ".gather.json").read_text())["bad_examples"][:1])
        _log(f"prepare: skipped {meta['skipped_bad_records']:,} bad record(s) (--skip-bad); first: {first}", quiet)
    return meta


def _split_method(split: str | None, state: dict, quiet: bool) -> str:
    """The split method: as asked, else "hash", except for a directory whose recorded split predates it
    (a "split" fingerprint without "method"): that one keeps its seeded random split, saying so."""
    if split is not None:
        return split
    if "split" in state and "method" not in state["split"]:
        _log("prepare: split: this directory was split by a seeded random sample; keeping it "
             "(--split hash re-splits by document hash, stable when inputs are added, and drops duplicates)", quiet)
        return "random"
    return "hash"


def _check_prepare_args(
    val_input: str | os.PathLike | None,
    vocab_size: int,
    val_fraction: float,
    special_tokens: tuple[str, ...] | list[str],
    num_workers: int | None,
    options: SourceOptions,
) -> None:
    """prepare's arguments, checked before anything is written: one line saying what is wrong
    (the inputs themselves are checked by resolve_inputs)."""
    if options.doc_sep not in (None, *DOC_SEPS):
        raise ValueError(f"doc_sep must be one of {', '.join(DOC_SEPS)}, got {options.doc_sep!r}")
    if val_input is not None and not Path(val_input).is_file():
        raise FileNotFoundError(f"{val_input}: validation text file not found")
    if not isinstance(vocab_size, int) or vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size must be an integer >= 256 + {len(special_tokens)} special tokens, got {vocab_size}")
    if val_input is None and not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    check_workers(num_workers)  # here too, not only in the step that uses it: fail before the split runs


@dataclass
class _Prepare:
    """One prepare run inside the locked ``out`` directory: a method per step, each run through ``step``,
    which skips it when its fingerprint in ``state`` (DIR/.prepare_state.json) and its outputs are present."""

    src: Path
    out: Path
    vocab_size: int
    val_fraction: float
    val_input: str | os.PathLike | None
    special_tokens: list[str]
    num_workers: int | None
    quiet: bool
    state: dict
    split_info: dict = field(default_factory=dict)  # .split.json: documents per split, when prepare split them
    tok: BpeTokenizer | None = None  # loaded once, by the first step that needs the trained tokenizer
    # set by run() as the steps reach them
    source_sha: str = field(init=False)
    train_txt: Path = field(init=False)
    val_txt: Path = field(init=False)
    tok_dir: Path = field(init=False)
    train_sha: str = field(init=False)
    val_sha: str = field(init=False)
    tok_fp: dict = field(init=False)
    inputs: list[Path] = field(default_factory=list)  # files gathered into src (DIR/source.txt); empty: src is the input
    options: SourceOptions = field(default_factory=SourceOptions)
    inputs_fp: dict | None = None  # the gather step's fingerprint, when there is one
    split_method: str = "hash"  # see llm.doc_split

    def run(self) -> None:
        if self.inputs:
            self.gather()
        self.source_sha = sha256_file(self.src)
        if self.val_input is None:
            self.train_txt, self.val_txt = self.out / "train.txt", self.out / "val.txt"
            self.split()
        else:
            self.train_txt, self.val_txt = self.src, Path(self.val_input)
        self.tok_dir = self.out / "tokenizer"
        self.train_sha, self.val_sha = sha256_file(self.train_txt), sha256_file(self.val_txt)
        self.tok_fp = {"train_sha256": self.train_sha, "vocab_size": self.vocab_size, "special_tokens": self.special_tokens}
        self.step("tokenizer", self.tok_fp, [self.tok_dir], self.train_tokenizer)
        for split, text, sha in (("train", self.train_txt, self.train_sha), ("val", self.val_txt, self.val_sha)):
            fp = {"text_sha256": sha, "tokenizer": self.tok_fp}
            final = self.out / f"{split}.npy"
            self.step(f"encode_{split}", fp, [final], functools.partial(self.encode, text, final))
        meta_fp = {k: self.state.get(k) for k in ("split", "tokenizer", "encode_train", "encode_val")}
        self.step("meta", meta_fp, [self.out / "meta.json"], self.write_meta)

    def step(self, name: str, fingerprint: dict, outputs: list[Path], fn: Callable[[], None]) -> None:
        if self.state.get(name) == fingerprint and all(o.exists() for o in outputs):
            _log(f"prepare: {name}: up to date, skipped", self.quiet)
            return
        t0 = time.perf_counter()
        _log(f"prepare: {name} ...", self.quiet)
        state_path = self.out / ".prepare_state.json"
        self.state.pop(name, None)
        write_json(state_path, self.state)  # a crash mid-step must not leave a stale "done"
        fn()
        self.state[name] = fingerprint
        write_json(state_path, self.state)
        _log(f"prepare: {name}: done in {time.perf_counter() - t0:.1f}s", self.quiet)

    @property
    def separator(self) -> str:
        return self.special_tokens[0] if self.special_tokens else EOT

    def split(self) -> None:
        """Step 1 as a step: train.txt / val.txt and .split.json, whose document counts are read back either way."""
        fp = {"source_sha256": self.source_sha, "val_fraction": self.val_fraction, "separator": self.separator}
        if self.split_method == "random":
            fp["seed"] = 0  # the fingerprint such directories were prepared with, unchanged
        else:
            fp["method"] = self.split_method
        if self.inputs_fp is not None:  # gathered: the inputs and format options too, not only the text they made
            fp["inputs"] = self.inputs_fp
        self.step("split", fp, [self.train_txt, self.val_txt, self.out / ".split.json"], self.write_split)
        self.split_info = json.loads((self.out / ".split.json").read_text())

    def gather(self) -> None:
        """Step 0: every input's documents into DIR/source.txt (and counts into DIR/.gather.json)."""
        files = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in self.inputs]
        self.inputs_fp = {"files": files, "options": asdict(self.options), "separator": self.separator}
        self.step("gather", self.inputs_fp, [self.src, self.out / ".gather.json"], self.write_gather)

    def write_gather(self) -> None:
        info = gather(self.inputs, self.src, self.separator, self.options, progress=not self.quiet)
        write_json(self.out / ".gather.json", info)

    def write_split(self) -> None:
        info = split_documents(self.src, self.train_txt, self.val_txt, self.val_fraction, self.separator,
                               method=self.split_method, progress=not self.quiet)
        write_json(self.out / ".split.json", info)

    def train_tokenizer(self) -> None:
        vocab, merges = train_bpe(
            str(self.train_txt), self.vocab_size, self.special_tokens, num_workers=self.num_workers,
            progress=None if not self.quiet else False,
        )
        with replacing(self.tok_dir) as tmp:
            tmp.mkdir()
            BpeTokenizer(vocab, merges, self.special_tokens).save(str(tmp))
            if self.tok_dir.exists():
                shutil.rmtree(self.tok_dir)

    def tokenizer(self) -> BpeTokenizer:
        self.tok = self.tok or BpeTokenizer.load(str(self.tok_dir))
        return self.tok

    def encode(self, text: Path, final: Path) -> None:
        tok = self.tokenizer()
        with replacing(final) as tmp:
            tok.encode_file(str(text), str(tmp), num_workers=self.num_workers, progress=not self.quiet)
            open_tokens(tmp, tok.vocab_size)  # never publish an array the tokenizer could not have made

    def write_meta(self) -> None:
        tok = self.tokenizer()
        train = open_tokens(self.out / "train.npy", tok.vocab_size)
        val = open_tokens(self.out / "val.npy", tok.vocab_size)
        counts = token_counts(train, tok.vocab_size)
        specials = {s: tok.token_id(s) for s in self.special_tokens}
        eot_id = specials.get(EOT, next(iter(specials.values()), None))
        meta = {
            "format": META_FORMAT,
            "vocab_size": tok.vocab_size,
            "requested_vocab_size": self.vocab_size,
            "special_tokens": specials,
            "eot_id": eot_id,
            "dtype": str(train.dtype),
            "train": "train.npy",
            "val": "val.npy",
            "tokenizer_dir": "tokenizer",
            **self.corpus_stats(train, val, counts),
            **self.sources(),
        }
        if eot_id is not None and meta["train_documents"] is None:
            meta["train_documents"] = int(counts[eot_id])
            meta["val_documents"] = int(np.count_nonzero(np.asarray(val) == eot_id))
        write_json(self.out / "meta.json", meta)

    def corpus_stats(self, train: np.ndarray, val: np.ndarray, counts: np.ndarray) -> dict:
        """meta.json's sizes: tokens, text bytes, bytes per token, documents, unigram entropy, vocabulary use."""
        train_bytes, val_bytes = self.train_txt.stat().st_size, self.val_txt.stat().st_size
        return {
            "train_tokens": int(len(train)),
            "val_tokens": int(len(val)),
            "train_text_bytes": train_bytes,
            "val_text_bytes": val_bytes,
            "bytes_per_token": round(train_bytes / len(train), 4),
            "val_bytes_per_token": round(val_bytes / len(val), 4),
            "train_documents": self.split_info.get("train_documents"),
            "val_documents": self.split_info.get("val_documents"),
            "unigram_entropy": round(unigram_entropy(counts), 6),
            "unigram_entropy_bits": round(unigram_entropy(counts) / math.log(2), 6),
            "vocab_used": int((counts > 0).sum()),
        }

    def sources(self) -> dict:
        """meta.json's provenance: the input files, their sha256 and how val was split off."""
        given = self.val_input is not None
        return {
            "source": str(self.src),
            "source_sha256": self.source_sha,
            "val_source": str(self.val_input) if given else None,
            "val_source_sha256": self.val_sha if given else None,
            "val_fraction": None if given else self.val_fraction,
            "split_method": None if given else self.split_method,
            "split_seed": 0 if not given and self.split_method == "random" else None,
            "duplicate_documents": self.split_info.get("duplicate_documents", 0),
            "input_files": len(self.inputs) or 1,
            "skipped_bad_records": self.gather_info().get("skipped_bad", 0),
        }

    def gather_info(self) -> dict:
        path = self.out / ".gather.json"
        return json.loads(path.read_text()) if self.inputs and path.exists() else {}


def ensure_demo_data(
    out_dir: str | os.PathLike = "data/demo", vocab_size: int = 2048, size_mb: float = 5.0, seed: int = 0, quiet: bool = False
) -> dict:
    """Generate the built-in story corpus and prepare it, unless both are already done (idempotent).

    This is what the default training run calls. Regenerates the corpus when ``size_mb``, ``seed`` or
    the generator version changed; ``prepare`` then redoes only what depends on it. A directory holding
    prepared data that this function did not make is refused (ValueError), never overwritten.
    """
    stories = ensure_demo_stories(out_dir, size_mb=size_mb, seed=seed, quiet=quiet)
    return prepare(stories, out_dir, vocab_size, quiet=quiet)


def ensure_demo_stories(
    out_dir: str | os.PathLike = "data/demo", size_mb: float = 5.0, seed: int = 0, quiet: bool = False
) -> Path:
    """OUT_DIR/stories.txt, the built-in story corpus, generated unless it is already there for these
    settings (OUT_DIR/stories.json records them); the first half of ensure_demo_data, also what
    `python -m llm.bpe_tokenizer` trains on. Refuses a directory holding data it did not make."""
    out = Path(out_dir)
    stories = out / "stories.txt"
    info_path = out / "stories.json"
    want = {"size_mb": size_mb, "seed": seed, "generator_version": GENERATOR_VERSION}
    with _dir_lock(out):
        # stories.json marks a directory this function made; anything prepared there without it is someone's data
        theirs = [n for n in ("meta.json", ".prepare_state.json", "train.npy", "val.npy", "tokenizer")
                  if (out / n).exists()]
        if theirs and not info_path.exists():
            raise ValueError(
                f"{out} holds data ensure_demo_data did not make ({', '.join(theirs)}); the demo corpus is built "
                "only in a directory of its own (default data/demo)"
            )
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        fresh = stories.exists() and {k: info.get(k) for k in want} == want and info.get("sha256") == sha256_file(stories)
        if not fresh:
            _log(f"ensure_demo_data: generating {size_mb} MB of synthetic stories (seed {seed}) -> {stories}", quiet)
            stats = generate_stories(stories, size_mb=size_mb, seed=seed, progress=not quiet)
            stats["sha256"] = sha256_file(stories)
            write_json(info_path, stats)
    return stories


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="python -m llm.data", description="Generate, prepare and download training data.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="write the built-in synthetic story corpus")
    g.add_argument("--out", default="data/demo/stories.txt")
    g.add_argument("--size-mb", type=float, default=5.0, help="size in MB (10^6 bytes)")
    g.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("prepare", help="split, train the tokenizer, encode to train.npy/val.npy + meta.json")
    p.add_argument("--input", required=True, action="append",
                   help="training text: a file, directory or glob (repeatable); .txt .jsonl .json .csv .tsv, "
                        "optionally .gz/.xz/.bz2/.zst (see docs/data.md)")
    p.add_argument("--doc-sep", choices=DOC_SEPS, default=None,
                   help="how .txt documents are separated (default: a line <|endoftext|> when present, else blank lines)")
    p.add_argument("--text-field", default="text", help="JSON key holding the text (default text; 'messages' lists are joined)")
    p.add_argument("--text-column", default="text", help="CSV/TSV column holding the text (default text)")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed records (counted and reported) instead of stopping")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--vocab-size", type=int, required=True)
    grp = p.add_mutually_exclusive_group()
    grp.add_argument("--val-fraction", type=float, default=0.05, help="fraction of documents held out (default 0.05)")
    grp.add_argument("--val-input", default=None, help="use this file as validation text instead of splitting")
    p.add_argument("--split", choices=SPLIT_METHODS, default=None,
                   help="hash: a document's side from its hash (stable when inputs are added; exact duplicates dropped); "
                        "random: a seeded sample (default: hash, or what the directory was split with)")
    p.add_argument("--special-token", action="append", default=None, help=f"special token (repeatable; default {EOT})")
    add_num_workers(p)
    p.add_argument("--force", action="store_true", help="redo every step")

    d = sub.add_parser("demo", help="generate + prepare the built-in corpus (idempotent)")
    d.add_argument("--out", default="data/demo")
    d.add_argument("--vocab-size", type=int, default=2048)
    d.add_argument("--size-mb", type=float, default=5.0)
    d.add_argument("--seed", type=int, default=0)

    sub.add_parser("download", help="fetch WikiText-2/-103, TinyStories or the OpenWebText sample (see --help there)", add_help=False)

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["download"]:
        return download.main(argv[1:])
    args = ap.parse_args(argv)
    try:
        if args.cmd == "generate":
            stats = generate_stories(args.out, size_mb=args.size_mb, seed=args.seed)
            print(json.dumps(stats, indent=2))
        elif args.cmd == "prepare":
            meta = prepare(
                args.input, args.out, args.vocab_size, val_fraction=args.val_fraction, val_input=args.val_input,
                force=args.force, special_tokens=tuple(args.special_token or (EOT,)), num_workers=args.num_workers,
                source_options=SourceOptions(args.doc_sep, args.text_field, args.text_column, args.skip_bad),
                split=args.split,
            )
            print(json.dumps(meta, indent=2))
        elif args.cmd == "demo":
            meta = ensure_demo_data(args.out, vocab_size=args.vocab_size, size_mb=args.size_mb, seed=args.seed)
            print(json.dumps(meta, indent=2))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

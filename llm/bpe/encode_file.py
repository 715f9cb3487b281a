"""Encode a whole file to a .npy token array, chunks in parallel, output written in order.

Each worker reads and encodes its own byte range (cut at a safe place, see chunks.py) and sends
back a compact uint16/uint32 array; the parent streams the arrays, in order, into a temporary file
after a fixed-size .npy header, then patches the header with the final length and renames.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from llm.bpe.chunks import chunk_boundaries, iter_range_text
from llm.bpe.train import check_workers, mp_context
from llm.fileio import replacing
from llm.machine import usable_cores

_HEADER = 128  # bytes reserved for the .npy header (multiple of 64 as the format recommends)
_TASK_BYTES = 8 << 20
_BYTES_PER_WORKER = 16 << 20
_worker_tok = None  # the tokenizer, inherited by forked workers (or set by the initializer)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def default_file_workers(size: int) -> int:
    """All cores, but one per 16 MB: a process encodes ~40 MB/s, and a worker costs a fork plus its
    own cold piece table, which smaller files do not pay back."""
    return max(1, min(usable_cores(), 1 + size // _BYTES_PER_WORKER))


def _npy_header(dtype: np.dtype, n: int) -> bytes:
    d = "{'descr': '%s', 'fortran_order': False, 'shape': (%d,), }" % (dtype.str, n)
    body = d.ljust(_HEADER - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin-1")


def _init(tok) -> None:
    global _worker_tok
    _worker_tok = tok


def _encode_range(args: tuple[str, int, int]) -> np.ndarray:
    path, start, end = args
    tok = _worker_tok
    dtype = token_dtype(tok.vocab_size)
    parts = [tok.encode_to_array(text, dtype) for text in iter_range_text(path, start, end, tok.special_tokens)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def encode_file(tok, input_path, output_path, num_workers: int | None = None, progress: bool = True) -> int:
    check_workers(num_workers)
    path = os.fspath(input_path)
    if not os.path.isfile(path):
        raise ValueError(f"input file not found: {path}")
    out = Path(output_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = os.path.getsize(path)
    workers = num_workers or default_file_workers(size)
    tasks_n = max(workers, -(-size // _TASK_BYTES))
    tasks_n = -(-tasks_n // workers) * workers  # whole rounds keep all workers busy
    bounds = chunk_boundaries(path, tasks_n, tok.special_tokens)
    tasks = [(path, a, b) for a, b in zip(bounds, bounds[1:])]
    dtype = token_dtype(tok.vocab_size)

    global _worker_tok
    pool = None
    if workers > 1 and len(tasks) > 1:
        ctx = mp_context()
        if ctx.get_start_method() == "fork":
            _worker_tok = tok  # inherited, nothing to pickle
            pool = ctx.Pool(min(workers, len(tasks)))
        else:
            pool = ctx.Pool(min(workers, len(tasks)), initializer=_init, initargs=(tok,))
        results = pool.imap(_encode_range, tasks)
    else:
        _worker_tok = tok
        results = map(_encode_range, tasks)

    n = 0
    t0 = last = time.perf_counter()
    try:
        with replacing(out) as tmp, open(tmp, "xb") as f:
            f.write(b"\0" * _HEADER)
            for (_, a, b), arr in zip(tasks, results):
                f.write(arr.tobytes())
                n += len(arr)
                now = time.perf_counter()
                if progress and (now - last > 1.0 or b == size):
                    last = now
                    mbs = b / 1e6 / max(now - t0, 1e-9)
                    eta = (size - b) / 1e6 / max(mbs, 1e-9)
                    print(f"encode: {b / 1e6:.1f}/{size / 1e6:.1f} MB, {mbs:.1f} MB/s, {n:,} tokens, "
                          f"ETA {eta:.0f} s", file=sys.stderr, flush=True)
            f.seek(0)
            f.write(_npy_header(dtype, n))
    finally:
        if pool is not None:
            pool.terminate()
        _worker_tok = None
    return n

"""Byte-level BPE tokenizer (GPT-2 style), pure Python: train, encode, decode, stream, save/load.

    uv run -m llm.bpe_tokenizer train --input FILE --vocab-size N --special-token '<|endoftext|>' --out DIR
    uv run -m llm.bpe_tokenizer encode --tokenizer DIR --input FILE --output FILE.npy

The implementation lives in llm/bpe/ (one concept per file):
  gpt2_bytes.py   GPT-2's byte <-> printable-character mapping used by vocab.json / merges.txt
  pretokenize.py  GPT-2 regex, special-token splitting, safe cut points
  chunks.py       cutting a file into byte ranges, reading a range in bounded pieces
  train.py        train_bpe: parallel pre-token counting + exact incremental merges
  tokenizer.py    BpeTokenizer: encode / decode / encode_iterable / files
  encode_file.py  whole-file parallel encoding to .npy
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from llm.bpe.tokenizer import BpeTokenizer
from llm.bpe.train import train_bpe

__all__ = ["BpeTokenizer", "train_bpe", "main"]


def _train(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    vocab, merges = train_bpe(args.input, args.vocab_size, args.special_token, args.workers, progress=True)
    tok = BpeTokenizer(vocab, merges, args.special_token)
    tok.save(args.out)
    wall = time.perf_counter() - t0
    longest = max(vocab.values(), key=len)
    print(f"trained {len(merges):,} merges, vocab {len(vocab):,} -> {args.out}")
    print(f"longest token ({len(longest)} bytes): {longest.decode('utf-8', errors='replace')!r}")
    print(f"wall time {wall:.2f} s")
    return 0


def _encode(args: argparse.Namespace) -> int:
    tok = BpeTokenizer.load(args.tokenizer)
    size = Path(args.input).stat().st_size if Path(args.input).is_file() else 0
    t0 = time.perf_counter()
    n = tok.encode_file(args.input, args.output, args.workers)
    wall = time.perf_counter() - t0
    print(f"{n:,} tokens -> {args.output}")
    print(f"{size / max(n, 1):.2f} bytes/token, {size / 1e6 / max(wall, 1e-9):.1f} MB/s ({wall:.2f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llm.bpe_tokenizer", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a BPE vocabulary on a UTF-8 text file")
    t.add_argument("--input", required=True)
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--special-token", action="append", default=[], help="repeatable")
    t.add_argument("--out", required=True, help="directory for vocab.json, merges.txt, tokenizer_config.json")
    t.add_argument("--workers", type=int, default=None, help="default: all cores")
    e = sub.add_parser("encode", help="encode a UTF-8 text file to a .npy of token ids")
    e.add_argument("--tokenizer", required=True, help="directory written by `train` (or tok.save)")
    e.add_argument("--input", required=True)
    e.add_argument("--output", required=True)
    e.add_argument("--workers", type=int, default=None, help="default: all cores")
    args = ap.parse_args(argv)
    try:
        return _train(args) if args.cmd == "train" else _encode(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Byte-level BPE tokenizer (GPT-2 style), pure Python: train, encode, decode, stream, save/load.

    uv run -m llm.bpe_tokenizer                 # the built-in stories -> data/demo-tokenizer (2,048 tokens)
    uv run -m llm.bpe_tokenizer train --input FILE --vocab-size N --special-token '<|endoftext|>' --out DIR
    uv run -m llm.bpe_tokenizer encode --tokenizer-dir DIR --input FILE --out FILE.npy

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

from llm.bpe import EOT
from llm.bpe.tokenizer import BpeTokenizer
from llm.bpe.train import train_bpe
from llm.cli import Parser, add_num_workers, add_tokenizer_dir
from llm.data import ensure_demo_stories

__all__ = ["EOT", "BpeTokenizer", "train_bpe", "main"]

DEMO_DATA = "data/demo"  # where ensure_demo_data keeps the built-in stories (stories.txt)
DEMO_OUT = "data/demo-tokenizer"
DEMO_VOCAB = 2048  # the demo model's vocabulary


def _train(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    vocab, merges = train_bpe(args.input, args.vocab_size, args.special_token, args.num_workers, progress=True)
    tok = BpeTokenizer(vocab, merges, args.special_token)
    tok.save(args.out)
    wall = time.perf_counter() - t0
    longest = max(vocab.values(), key=len)
    print(f"trained {len(merges):,} merges, vocab {len(vocab):,} -> {args.out}")
    print(f"longest token ({len(longest)} bytes): {longest.decode('utf-8', errors='replace')!r}")
    print(f"wall time {wall:.2f} s")
    return 0


def _encode(args: argparse.Namespace) -> int:
    tok = BpeTokenizer.load(args.tokenizer_dir)
    size = Path(args.input).stat().st_size if Path(args.input).is_file() else 0
    t0 = time.perf_counter()
    n = tok.encode_file(args.input, args.out, args.num_workers)
    wall = time.perf_counter() - t0
    print(f"{n:,} tokens -> {args.out}")
    print(f"{size / max(n, 1):.2f} bytes/token, {size / 1e6 / max(wall, 1e-9):.1f} MB/s ({wall:.2f} s)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """No subcommand: train a tokenizer of the demo's size on the built-in stories, so the command shows
    what it does on data that is always at hand."""
    stories = ensure_demo_stories(DEMO_DATA, quiet=True)
    print(f"training a {DEMO_VOCAB:,}-token BPE on the built-in stories ({stories}) -> {DEMO_OUT}; "
          f"for your own text: train --input FILE --vocab-size N --out DIR")
    args = argparse.Namespace(input=str(stories), vocab_size=DEMO_VOCAB, special_token=[EOT], num_workers=None,
                              out=DEMO_OUT)
    return _train(args)


def build_parser() -> Parser:
    ap = Parser(prog="python -m llm.bpe_tokenizer", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    t = sub.add_parser("train", help="train a BPE vocabulary on a UTF-8 text file")
    t.add_argument("--input", required=True)
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--special-token", action="append", default=[], help="repeatable")
    t.add_argument("--out", required=True, help="directory for vocab.json, merges.txt, tokenizer_config.json")
    add_num_workers(t)
    e = sub.add_parser("encode", help="encode a UTF-8 text file to a .npy of token ids")
    add_tokenizer_dir(e, "directory written by `train` (or tok.save)", required=True)
    e.add_argument("--input", required=True)
    e.add_argument("--out", alias=("--output",), required=True, help="the .npy file to write")
    add_num_workers(e)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd is None:
            return _demo(args)
        return _train(args) if args.cmd == "train" else _encode(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

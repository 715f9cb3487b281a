"""Measure a CJK-aware pre-tokenizer against GPT-2's on Chinese text: bytes/token and a tiny model's loss.

    uv run python kernel/cjk_pretokenizer.py [--input zh.txt] [--vocab-size 4000] [--steps 150] [--out DIR]

GPT-2's pattern keeps a run of letters together (`` ?\\p{L}+``), and CJK ideographs are letters written
without spaces, so a whole Chinese clause (up to the next punctuation mark) is one pre-token and BPE may
merge across word boundaries inside it. The "cjk" variant cuts GPT-2's pre-tokens before and after every
Han character, so no token spans two characters.

Both variants use the same documents and the same hash split (llm.doc_split), the same vocabulary size,
and the same tiny model (d_model 96, 2 layers, 4 heads, context 128, batch 8) trained for the same steps
on CPU (equal compute). Losses per token
are not comparable across tokenizers, so the script reports validation loss in bits per byte of UTF-8
text: loss_nats_per_token / ln 2 / val_bytes_per_token (lower is better), from `llm.evaluate` over the
whole validation split. The input is a text file of documents separated by lines ``%`` (the fortune
format) or ``<|endoftext|>``; ANSI colour escapes are removed. Without --input it uses the fortunes-zh
package's Chinese file when installed (apt-get install fortunes-zh), else stops with a hint.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import regex

import llm.bpe.tokenizer as bpe_tokenizer
import llm.bpe.train as bpe_train
from llm.bpe import EOT
from llm.bpe.pretokenize import pretokenize
from llm.bpe.tokenizer import BpeTokenizer
from llm.bpe.train import train_bpe
from llm.doc_split import split_documents

DEFAULT_INPUT = Path("/usr/share/games/fortunes/chinese")
_HAN = regex.compile(r"(\p{Han})")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def cjk_pretokenize(text: str) -> list[str]:
    """GPT-2's pre-tokens, each cut before and after every Han character."""
    out = []
    for piece in pretokenize(text):
        if piece.isascii():
            out.append(piece)
        else:
            out.extend(p for p in _HAN.split(piece) if p)
    return out


def corpus(src: Path, dest: Path) -> int:
    text = _ANSI.sub("", src.read_text(encoding="utf-8"))
    docs = [d.strip() for d in re.split(r"\n%\n|<\|endoftext\|>", text) if d.strip()]
    dest.write_text("".join(f"{d}\n{EOT}\n" for d in docs), encoding="utf-8")
    return len(docs)


def build(variant: str, train_txt: Path, val_txt: Path, vocab_size: int, out: Path) -> dict:
    """Tokenizer trained on train_txt with the variant's pre-tokenizer; both splits encoded document by document."""
    fn = cjk_pretokenize if variant == "cjk" else pretokenize
    bpe_train.pretokenize = bpe_tokenizer.pretokenize = fn  # the training counts and the regex encode path
    try:
        t0 = time.perf_counter()
        vocab, merges = train_bpe(str(train_txt), vocab_size, [EOT], progress=False)
        tok = BpeTokenizer(vocab, merges, [EOT])
        train_s = time.perf_counter() - t0
        out.mkdir(parents=True, exist_ok=True)
        tok.save(str(out / "tokenizer"))
        stats = {"variant": variant, "train_seconds": round(train_s, 1)}
        for split, path in (("train", train_txt), ("val", val_txt)):
            text = path.read_text(encoding="utf-8")
            arr = np.array(_ids(tok, text), dtype=np.uint16)
            np.save(out / f"{split}.npy", arr)
            stats[f"{split}_tokens"] = int(len(arr))
            stats[f"{split}_bytes_per_token"] = round(len(text.encode()) / len(arr), 4)
        stats["unique_pretokens"] = len({p for d in train_txt.read_text().split(EOT) for p in fn(d)})
        return stats
    finally:
        bpe_train.pretokenize = bpe_tokenizer.pretokenize = pretokenize


def _ids(tok: BpeTokenizer, text: str) -> list[int]:
    """Ids through the regex path only (documents are short: no bulk piece table, which is GPT-2's)."""
    out: list[int] = []
    eot = tok.token_id(EOT)
    for doc in text.split(f"\n{EOT}\n"):
        if doc:
            out.extend(ord(c) for c in tok._encode_unit(doc + "\n"))
            out.append(eot)
    return out


MODEL = ["--d-model", "96", "--num-layers", "2", "--num-heads", "4", "--d-ff", "256", "--context-length", "128",
         "--batch-size", "8", "--lr", "3e-3"]


def train_and_eval(d: Path, vocab_size: int, steps: int, threads: int) -> dict:
    run = d / "run"
    cmd = [sys.executable, "-m", "llm.training", "--preset", "demo", *MODEL, "--train-data", str(d / "train.npy"),
           "--val-data", str(d / "val.npy"), "--tokenizer-dir", str(d / "tokenizer"), "--out-dir", str(run),
           "--vocab-size", str(vocab_size), "--max-steps", str(steps), "--no-sample", "--no-plot",
           "--no-prepare-demo-data", "--overwrite", "--threads", str(threads), "--device", "cpu",
           "--checkpoint-interval", "0", "--eval-interval", str(steps), "--log-interval", str(steps // 4)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    train_s = time.perf_counter() - t0
    ev = subprocess.run([sys.executable, "-m", "llm.evaluate", "--checkpoint", str(run), "--data", str(d / "val.npy"),
                         "--json", "--device", "cpu", "--threads", str(threads)], check=True, capture_output=True, text=True)
    return {"model_train_seconds": round(train_s, 1), **json.loads(ev.stdout)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    ap.add_argument("--vocab-size", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="work directory (default: a new temporary one)")
    args = ap.parse_args()
    if not args.input.is_file():
        sys.exit(f"error: {args.input}: no such file; pass --input zh.txt or apt-get install fortunes-zh")
    args.out = args.out or Path(tempfile.mkdtemp(prefix="cjk_pretokenizer_"))
    args.out.mkdir(parents=True, exist_ok=True)
    n = corpus(args.input, args.out / "all.txt")
    split = split_documents(args.out / "all.txt", args.out / "train.txt", args.out / "val.txt", 0.05, EOT)
    print(f"{n} documents -> {split}", file=sys.stderr)
    for variant in ("gpt2", "cjk"):
        st = build(variant, args.out / "train.txt", args.out / "val.txt", args.vocab_size, args.out / variant)
        ev = train_and_eval(args.out / variant, args.vocab_size, args.steps, args.threads)
        loss = ev["loss"]
        st.update(val_loss_nats_per_token=loss, val_bits_per_byte=round(loss / math.log(2) / st["val_bytes_per_token"], 4),
                  model_train_seconds=ev["model_train_seconds"])
        print(json.dumps(st), flush=True)


if __name__ == "__main__":
    main()

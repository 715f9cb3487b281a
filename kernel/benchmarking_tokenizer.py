"""Benchmark llm.bpe_tokenizer against HF `tokenizers` (training) and tiktoken (encoding).

    uv run python kernel/benchmarking_tokenizer.py [--input ../shared/data/kjv.txt] [--vocab-size 10000] [--runs 3]

References run in the same process, interleaved with ours, median of --runs; ratios are printed as
"ours / reference" for speeds (higher is better) so that the targets read directly:
  training wall time <= 1.0x HF tokenizers (printed as a time ratio, lower is better),
  encode, one process >= 0.5x tiktoken single-thread, whole file with all cores >= 1.0x,
  training peak memory <= 10x the corpus size (measured in a fresh subprocess).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAYON_RS_NUM_CPUS", str(len(os.sched_getaffinity(0))))  # HF threads = our workers

import tiktoken  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402

from llm.bpe.pretokenize import GPT2_PATTERN  # noqa: E402
from llm.bpe_tokenizer import BpeTokenizer, train_bpe  # noqa: E402

EOT = "<|endoftext|>"
REPO = Path(__file__).resolve().parents[1]

# ru_maxrss survives exec (it would report the benchmark's own peak), so the child reads VmHWM.
_MEM_CHILD = r"""
import os, resource, sys
def status(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field))
from llm.bpe_tokenizer import train_bpe
base = status("VmRSS:")
train_bpe(sys.argv[1], int(sys.argv[2]), ["<|endoftext|>"], num_workers=int(sys.argv[3]))
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(base, status("VmHWM:"), kids)
"""


def find_default_input() -> Path | None:
    for p in REPO.parents:
        if (p / "shared/data/kjv.txt").is_file():
            return p / "shared/data/kjv.txt"
    return None


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def hf_train(path: Path, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(path)], trainer)
    return tok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", type=Path, default=None, help="default: ../shared/data/kjv.txt")
    ap.add_argument("--vocab-size", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None, help="default: all cores")
    args = ap.parse_args(argv)
    path = args.input or find_default_input()
    if path is None or not path.is_file():
        print("error: corpus not found: pass --input FILE (default ../shared/data/kjv.txt)", file=sys.stderr)
        return 2
    workers = args.workers or len(os.sched_getaffinity(0))
    size = path.stat().st_size
    text = path.read_text(encoding="utf-8")
    print(f"corpus {path} ({size / 1e6:.2f} MB), vocab {args.vocab_size}, {workers} workers/threads, "
          f"{args.runs} runs (median)")

    # ---- training, interleaved
    t_ours, t_hf = [], []
    for r in range(args.runs):
        dt, (vocab, merges) = timed(lambda: train_bpe(path, args.vocab_size, [EOT], num_workers=workers))
        t_ours.append(dt)
        dt, _ = timed(lambda: hf_train(path, args.vocab_size))
        t_hf.append(dt)
        print(f"  train run {r}: ours {t_ours[-1]:.2f} s, HF tokenizers {t_hf[-1]:.2f} s", flush=True)
    mo, mh = statistics.median(t_ours), statistics.median(t_hf)
    print(f"train: ours {mo:.2f} s, HF tokenizers {mh:.2f} s -> time ratio ours/HF {mo / mh:.2f}x "
          f"(target <= 1.0x, must <= 2x)")

    # ---- peak memory of training (fresh interpreter so nothing else is counted)
    out = subprocess.run([sys.executable, "-c", _MEM_CHILD, str(path), str(args.vocab_size), str(workers)],
                         capture_output=True, text=True, check=True, cwd=REPO)
    base, me, kids = map(int, out.stdout.split())
    peak = max(me, kids)
    print(f"train peak RSS: {peak / 1e6:.1f} MB (interpreter+imports {base / 1e6:.1f} MB; workers "
          f"{kids / 1e6:.1f} MB) -> {(peak - base) / size:.1f}x corpus above baseline, "
          f"{peak / size:.1f}x absolute (target <= 10x)")

    # ---- encoding: same vocabulary in both (tiktoken built from our ranks)
    tok = BpeTokenizer(vocab, merges, [EOT])
    ranks = {b: i for i, b in vocab.items() if i != tok.token_id(EOT)}
    tik = tiktoken.Encoding(name="ours", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                            special_tokens={EOT: tok.token_id(EOT)})
    e_ours, e_tik, f_ours = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.runs):
            fresh = BpeTokenizer(vocab, merges, [EOT])  # cold pre-token cache, as for a new file
            dt, ids = timed(lambda: fresh.encode(text))
            e_ours.append(dt)
            dt, ref = timed(lambda: tik.encode(text, allowed_special="all"))
            e_tik.append(dt)
            if ids != ref:
                print("error: our ids differ from tiktoken's", file=sys.stderr)
                return 1
            fresh = BpeTokenizer(vocab, merges, [EOT])
            out_npy = Path(tmp) / "ids.npy"
            dt, n = timed(lambda: fresh.encode_file(path, out_npy, num_workers=workers, progress=False))
            f_ours.append(dt)
            assert n == len(ref)
            print(f"  encode run {r}: ours 1 proc {size / e_ours[-1] / 1e6:.1f} MB/s, tiktoken 1 thread "
                  f"{size / e_tik[-1] / 1e6:.1f} MB/s, ours encode_file {workers} procs "
                  f"{size / f_ours[-1] / 1e6:.1f} MB/s", flush=True)
    eo, et, fo = (statistics.median(x) for x in (e_ours, e_tik, f_ours))
    print(f"encode 1 process: ours {size / eo / 1e6:.1f} MB/s, tiktoken {size / et / 1e6:.1f} MB/s "
          f"-> {et / eo:.2f}x tiktoken (target >= 0.5x)")
    print(f"encode_file, {workers} processes: ours {size / fo / 1e6:.1f} MB/s -> {et / fo:.2f}x tiktoken "
          f"single-thread (target >= 1.0x); {len(ref):,} tokens, {size / len(ref):.2f} bytes/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak resident memory of `llm.data prepare` on a generated ~200 MB input (the memory bound of docs/data.md).

    uv run python kernel/benchmarking_prepare_memory.py [--size-mb 200] [--vocab-size 1024] [--workers 2] [--keep DIR]

Makes SIZE_MB of the built-in synthetic stories, writes them as JSON Lines (one {"text": ...} record per
story, so the format reader runs), then measures in fresh subprocesses (VmHWM of the process, ru_maxrss
of its largest worker; ru_maxrss alone would carry the parent's peak across exec):
  1. read + split: llm.text_sources.gather (JSONL -> source.txt) and llm.doc_split.split_documents
     (hash split + dedup): the streaming steps, whose peak must not grow with the input;
  2. the whole prepare (gather, split, BPE training, encoding, meta.json).
Prints one line per step: seconds, peak RSS of the process and of its largest worker, and the ratio to
the input size. The same steps on a 10x smaller input are run first, so the growth with size shows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llm.bpe import EOT
from llm.stories import generate_stories

_CHILD = r"""
import json, resource, sys
from pathlib import Path
def status(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field))
step, src, out, vocab, workers = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
out.mkdir(parents=True, exist_ok=True)
if step == "read":
    from llm.doc_split import split_documents
    from llm.text_sources import SourceOptions, gather
    gather([src], out / "source.txt", "<|endoftext|>", SourceOptions(), progress=False)
    info = split_documents(out / "source.txt", out / "train.txt", out / "val.txt", 0.05, "<|endoftext|>")
else:
    from llm.data import prepare
    info = prepare(src, out, vocab, num_workers=workers, quiet=True)
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"peak": status("VmHWM:"), "worker_peak": kids, "documents": info.get("train_documents")}))
"""


def make_input(size_mb: float, work: Path) -> Path:
    stories = work / "stories.txt"
    generate_stories(stories, size_mb=size_mb, seed=0, progress=False)
    src = work / "corpus.jsonl"
    with open(stories, encoding="utf-8") as f, open(src, "w", encoding="utf-8") as out:
        buf = ""
        while block := f.read(1 << 22):
            *docs, buf = (buf + block).split(f"\n{EOT}\n")
            out.writelines(json.dumps({"text": d}) + "\n" for d in docs if d.strip())
        if buf.strip():
            out.write(json.dumps({"text": buf.strip()}) + "\n")
    stories.unlink()
    return src


def measure(step: str, src: Path, out: Path, vocab: int, workers: int) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _CHILD, step, str(src), str(out), str(vocab), str(workers)],
                       check=True, capture_output=True, text=True)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["seconds"] = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=200.0)
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-full", action="store_true", help="measure only the streaming read + split")
    ap.add_argument("--keep", type=Path, default=None, help="work directory to keep (default: a temp dir)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="prepare_mem_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        for size in (args.size_mb / 10, args.size_mb):
            src = make_input(size, work)
            mb = src.stat().st_size / 1e6
            for step in ("read",) + (() if args.skip_full else ("prepare",)):
                r = measure(step, src, work / "out", args.vocab_size, args.workers)
                print(f"{step:8s} input {mb:7.1f} MB (JSONL): {r['seconds']:6.1f} s, peak RSS {r['peak'] / 1e6:6.1f} MB "
                      f"({r['peak'] / 1e6 / mb:.2f}x input), largest worker {r['worker_peak'] / 1e6:6.1f} MB", flush=True)
            src.unlink()
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

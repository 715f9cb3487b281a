"""Tune the Triton FlashAttention-2 launch (block sizes, warps, pipeline stages) on a GPU.

    python3 kernel/tune_flash_triton.py [--seq-lens 4096,8192,16384] [--head-dim 64] [--dtype bfloat16]

For each sequence length, every configuration in `CONFIGS` (or `--configs`) and
`F.scaled_dot_product_attention` run forward+backward on the same causal inputs, interleaved iteration by
iteration; the table gives each configuration's median time and its paired speed against sdpa (> 1: the
Triton kernels are faster). A configuration that does not compile or does not fit (Triton's
OutOfResources, for example) is reported and skipped. The last line names the configuration with the
best geometric-mean speed over the lengths: the block sizes and launch options to make the defaults of
`flash_attention_triton`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from kernel.bench_utils import DTYPES, interleaved_times, paired_speed_ratio, progress, resolve_device
from kernel.benchmarking_attention import make_inputs, run_pass

# (block_q, block_k, num_warps, num_stages): the current default first, then the usual FA2 shapes
CONFIGS = [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 4, 3), (128, 32, 4, 4),
           (64, 64, 4, 4), (128, 64, 8, 4)]


def parse_configs(text: str) -> list[tuple[int, int, int, int]]:
    """'64x64x4x3,128x64x8x3' -> [(64, 64, 4, 3), (128, 64, 8, 3)]"""
    configs = []
    for item in text.split(","):
        parts = item.strip().split("x")
        if len(parts) != 4 or not all(p.isdigit() for p in parts):
            raise ValueError(f"a config is block_q x block_k x num_warps x num_stages, like 128x64x8x3; got {item!r}")
        configs.append(tuple(int(p) for p in parts))
    return configs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", default="4096,8192,16384")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=16)
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--configs", default=None, help="comma list of BQxBKxWARPSxSTAGES (default: the built-in list)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device)
        if device.type != "cuda":
            raise ValueError("tuning needs a CUDA device (the CPU interpreter is for tests, far too slow to time)")
        from llm.fast.flash_attention_triton import flash_attention_triton

        dtype = DTYPES[args.dtype]
        configs = parse_configs(args.configs) if args.configs else CONFIGS
        seq_lens = [int(s) for s in args.seq_lens.split(",")]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def triton_fn(cfg):
        bq, bk, warps, stages = cfg
        return lambda q, k, v: flash_attention_triton(q, k, v, True, None, bq, bk, warps, stages)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    speeds: dict[tuple, list[float]] = {cfg: [] for cfg in configs}
    print("| seq | config (BQxBKxWxS) | median ms | speed vs sdpa |\n|---:|---|---:|---:|")
    for s in seq_lens:
        q, k, v, do = make_inputs(args.batch_size, args.num_heads, s, args.head_dim, device, dtype, seed=0)

        def call(fn):  # one forward+backward on this length's inputs
            return lambda: run_pass(fn, q, k, v, do, "fwd+bwd", device, dtype)

        calls = {}
        for cfg in list(speeds):
            run = call(triton_fn(cfg))
            try:
                run()  # compiles the config, untimed; one that fails is dropped for good
            except Exception as e:  # noqa: BLE001 - Triton raises its own types for resources and compilation
                print(f"| {s} | {'x'.join(map(str, cfg))} | failed: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''} | |")
                del speeds[cfg]
                continue
            calls[cfg] = run
        times = interleaved_times({**calls, "sdpa": call(sdpa)}, device, args.warmup, args.steps)
        ref = times["sdpa"]
        print(f"| {s} | sdpa | {statistics.median(ref) * 1e3:.3f} | 1.00x |")
        for cfg in calls:
            ratio = paired_speed_ratio(times[cfg], ref)
            speeds[cfg].append(ratio)
            print(f"| {s} | {'x'.join(map(str, cfg))} | {statistics.median(times[cfg]) * 1e3:.3f} | {ratio:.2f}x |")
        progress(f"tune: seq {s} done")
    if not speeds:  # a failed config is dropped at once, so the survivors ran at every length
        print("no configuration ran at every length")
        return 1
    gmeans = {cfg: statistics.geometric_mean(r) for cfg, r in speeds.items()}
    best = max(gmeans, key=gmeans.get)
    gm = gmeans[best]
    print(f"best: block_q={best[0]}, block_k={best[1]}, num_warps={best[2]}, num_stages={best[3]} "
          f"(geometric-mean speed vs sdpa {gm:.2f}x over seq {args.seq_lens})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark causal attention implementations: time (forward, forward+backward) and peak memory.

    uv run kernel/benchmarking_attention.py                                   # bounded CPU defaults
    uv run kernel/benchmarking_attention.py --device cuda --dtype bfloat16 --out   # 256..16k, to kernel/results/

Implementations (q, k, v `b h s d`, causal):
- ours:        llm.transformer.scaled_dot_product_attention with an (s s) bool mask (materialises P, saves it)
- ours_causal: llm.fast.attention.causal_attention, the model's training path (recomputes P in backward)
- flash:       llm.fast.flash_attention.flash_attention, FlashAttention-2 tiled in PyTorch
- flash_triton: llm/fast/flash_attention_triton.py (CUDA only; the CPU interpreter is for tests, not timing)
- naive:       softmax(mask(q kᵀ/√d)) v in torch ops, autograd through everything (the textbook version)
- sdpa:        F.scaled_dot_product_attention(is_causal=True), the reference the ratios are against
All implementations of one (d, s) point are interleaved iteration by iteration. Points whose estimated
time or memory exceed the budget are skipped and reported; on CUDA an out-of-memory error is caught,
reported as the OOM point, and larger sequence lengths for that implementation are not tried.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from kernel.bench_utils import (
    DTYPES,
    REPO,
    Eta,
    atomic_write_json,
    atomic_write_text,
    autocast,
    available_memory_bytes,
    exact_cpu_rss,
    measure_peak,
    fmt_bytes,
    machine_info,
    progress,
    resolve_device,
    summarize,
    timed,
)

PASSES = ("fwd", "fwd+bwd")
ALL_IMPLS = ("ours", "ours_causal", "flash", "flash_triton", "naive", "sdpa")
MATERIALISING = {"ours", "naive"}  # keep (b h s s) tensors alive for backward


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    s = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    mask = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v


def get_impl(name: str, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    if name == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if name == "naive":
        return naive_attention
    if name == "flash":
        from llm.fast.flash_attention import flash_attention

        return lambda q, k, v: flash_attention(q, k, v, True)
    if name == "ours":
        from llm.transformer import scaled_dot_product_attention

        masks: dict[int, torch.Tensor] = {}

        def ours(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            s = q.shape[-2]
            if s not in masks:
                masks.clear()
                masks[s] = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
            return scaled_dot_product_attention(q, k, v, masks[s])

        return ours
    if name == "ours_causal":
        from llm.fast.attention import causal_attention

        return causal_attention
    if name == "flash_triton":
        if device.type != "cuda":
            raise ValueError("flash_triton runs on CUDA only here (the CPU interpreter is for tests, far too slow to time)")
        from llm.fast.flash_attention_triton import flash_attention_triton

        return lambda q, k, v: flash_attention_triton(q, k, v, True)
    raise ValueError(f"unknown implementation {name!r}; choose from {', '.join(ALL_IMPLS)}")


def make_inputs(b: int, h: int, s: int, d: int, device: torch.device, dtype: torch.dtype, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (b, h, s, d)
    q, k, v, do = (torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(4))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do


def run_pass(fn, q, k, v, do, pass_: str, device: torch.device, dtype: torch.dtype) -> None:
    if pass_ == "fwd":
        with torch.no_grad(), autocast(device, dtype):
            fn(q, k, v)
        return
    with autocast(device, dtype):
        o = fn(q, k, v)
    torch.autograd.backward(o, do.to(o.dtype), inputs=[q, k, v])
    q.grad = k.grad = v.grad = None


def estimate(impl: str, b: int, h: int, s: int, d: int, elem: int, flops_per_s: float) -> tuple[float, float]:
    """(seconds for one fwd+bwd at the given throughput, peak extra bytes)."""
    flops = 4 * b * h * s * s * d * 3.5 / 2  # causal: half the square; backward ~2.5x forward
    mem = 4 * b * h * s * d * elem * 2
    if impl in MATERIALISING:
        mem += 4 * b * h * s * s * max(elem, 4)  # scores, mask result, probabilities, their gradient
    elif impl == "ours_causal":
        mem += 2 * min(b * h * s * s, 1 << 20) * 4 * 2
    return flops / flops_per_s, mem


def bench_point(impls: dict, args, device, dtype, d: int, s: int, skip: dict[str, str]) -> dict:
    """All live implementations at one (d, s), interleaved; returns {impl: {...}} including skips."""
    b, h = args.batch_size, args.num_heads
    elem = torch.finfo(dtype).bits // 8
    out: dict[str, dict] = {}
    live = {}
    for name, fn in impls.items():
        if name in skip:
            out[name] = {"skipped": skip[name]}
            continue
        secs, mem = estimate(name, b, h, s, d, elem, args.assumed_flops)
        steps = args.warmup + args.steps
        if secs * steps * len(PASSES) > args.max_seconds:
            out[name] = {"skipped": f"estimated {secs * steps * len(PASSES):.0f}s > --max-seconds {args.max_seconds:.0f}"}
        elif mem > 0.5 * available_memory_bytes(device):
            out[name] = {"skipped": f"needs ~{fmt_bytes(mem)} > 50% of available memory"}
        else:
            live[name] = fn
    if not live:
        return out
    q, k, v, do = make_inputs(b, h, s, d, device, dtype if device.type == "cuda" else torch.float32, args.seed)
    for pass_ in args.passes:
        times: dict[str, list[float]] = {n: [] for n in live}
        for it in range(args.warmup + args.steps):
            names = list(live) if it % 2 == 0 else list(live)[::-1]
            for name in names:
                if name not in live:
                    continue
                try:
                    t = timed(lambda: run_pass(live[name], q, k, v, do, pass_, device, dtype), device)
                except torch.cuda.OutOfMemoryError:
                    out[name] = {"oom": True}
                    skip[name] = f"out of memory at d={d}, s={s}"
                    del live[name]
                    gc.collect()
                    torch.cuda.empty_cache()
                    continue
                if it >= args.warmup:
                    times[name].append(t)
        for name, ts in times.items():
            if name in live and ts:
                out.setdefault(name, {})[pass_] = summarize(ts)
    return out


def memory_point(impls: dict, args, device, dtype, d: int, s: int, results: dict) -> None:
    """Peak memory of one fwd+bwd per implementation that was timed at this point (run after all timings:
    exact CPU accounting slows allocation down)."""
    names = [n for n in impls if "fwd+bwd" in results.get(n, {}) or "fwd" in results.get(n, {})]
    if not names:
        return
    q, k, v, do = make_inputs(args.batch_size, args.num_heads, s, d, device, dtype if device.type == "cuda" else torch.float32, args.seed)
    for name in names:
        if "fwd+bwd" not in args.passes:  # first backward call: library code paging in is not attention memory
            run_pass(impls[name], q, k, v, do, "fwd+bwd", device, dtype)
        m = measure_peak(lambda: run_pass(impls[name], q, k, v, do, "fwd+bwd", device, dtype), device)
        results[name]["peak_above_start_bytes"] = m["peak_bytes"]
        results[name]["peak_rss_above_start_bytes"] = m.get("peak_rss_bytes")


def to_markdown(data: dict) -> str:
    m = data["machine"]
    where = m.get("gpu") or f"{m.get('cpu', 'CPU')}, {m.get('threads')} threads"
    impls = data["impls"]
    lines = [
        f"# Causal attention benchmark: {where}",
        "",
        f"torch {m['torch']}, {data['dtype']}, batch {data['batch_size']} x {data['num_heads']} heads, "
        f"{data['warmup']} warmup + {data['steps']} timed, medians in ms; (x) = speed relative to sdpa (> 1: faster).",
        "Command: `uv run kernel/benchmarking_attention.py " + data.get("argv", "") + "`",
        "",
    ]
    for pass_ in data["passes"]:
        lines += [f"## {pass_}", "", "| d | seq | " + " | ".join(impls) + " |", "|---:|---:|" + "---:|" * len(impls)]
        for p in data["points"]:
            ref = p["results"].get("sdpa", {}).get(pass_)
            cells = []
            for name in impls:
                r = p["results"].get(name, {})
                if "oom" in r:
                    cells.append("OOM")
                elif "skipped" in r:
                    cells.append("skip")
                elif pass_ in r:
                    ms = r[pass_]["median_s"] * 1e3
                    rel = f" ({ref['median_s'] / r[pass_]['median_s']:.2f}x)" if ref and name != "sdpa" else ""
                    cells.append(f"{ms:.2f}{rel}")
                else:
                    cells.append("–")
            lines.append(f"| {p['d']} | {p['seq']} | " + " | ".join(cells) + " |")
        lines.append("")
    if any("peak_above_start_bytes" in r for p in data["points"] for r in p["results"].values()):
        what = "allocator peak" if data["machine"]["device"].startswith("cuda") else "peak of tensor memory allocated inside the call (exact, tracked per op)"
        lines += ["## peak memory above start, fwd+bwd", "", f"{what}; includes O, dQ, dK, dV and the saved activations.", "", "| d | seq | " + " | ".join(impls) + " |", "|---:|---:|" + "---:|" * len(impls)]
        for p in data["points"]:
            cells = [fmt_bytes(p["results"].get(n, {}).get("peak_above_start_bytes")) for n in impls]
            lines.append(f"| {p['d']} | {p['seq']} | " + " | ".join(cells) + " |")
        lines.append("")
    notes = sorted({f"{n}: {r['skipped']}" for p in data["points"] for n, r in p["results"].items() if "skipped" in r})
    if notes:
        lines += ["Skipped:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impls", default=None, help=f"comma list of {', '.join(ALL_IMPLS)} (default: all that run on the device)")
    p.add_argument("--head-dims", default="16,32,64,128")
    p.add_argument("--seq-lens", default=None, help="default CPU 256,512,1024,2048; CUDA 256..16384")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-heads", type=int, default=1)
    p.add_argument("--passes", default=",".join(PASSES))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="bfloat16: inputs in bf16 on CUDA, autocast on CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--memory", action="store_true", help="also measure peak memory of one fwd+bwd per implementation")
    p.add_argument("--max-seconds", type=float, default=None, help="skip points estimated to take longer (default CPU 30, CUDA 120)")
    p.add_argument("--assumed-flops", type=float, default=None, help="throughput used for the estimate (default CPU 5e10, CUDA 5e13)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", action="store_true", help="write kernel/results/attention_<device>.md and .json")
    p.add_argument("--results-dir", type=Path, default=REPO / "kernel" / "results")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        device = resolve_device(args.device)
        dtype = DTYPES[args.dtype]
        cuda = device.type == "cuda"
        names = args.impls.split(",") if args.impls else [n for n in ALL_IMPLS if cuda or n != "flash_triton"]
        impls = {n: get_impl(n, device) for n in names}
        head_dims = [int(x) for x in args.head_dims.split(",")]
        default_seqs = "256,512,1024,2048,4096,8192,16384" if cuda else "256,512,1024,2048"
        seqs = [int(x) for x in (args.seq_lens or default_seqs).split(",")]
        args.passes = [x for x in args.passes.split(",") if x]
        if any(x not in PASSES for x in args.passes):
            raise ValueError(f"--passes must be from {', '.join(PASSES)}")
        if min(head_dims + seqs) < 1 or args.steps < 1 or args.batch_size < 1 or args.num_heads < 1:
            raise ValueError("head dims, sequence lengths, --steps, --batch-size and --num-heads must be positive")
        args.max_seconds = args.max_seconds or (120.0 if cuda else 30.0)
        args.assumed_flops = args.assumed_flops or (5e13 if cuda else 5e10)
        info = machine_info(device)
        print(f"# {info} dtype={args.dtype}")
        points = []
        eta = Eta(len(head_dims) * len(seqs))
        for d in head_dims:
            skip: dict[str, str] = {}  # an OOM at some s skips larger s for that implementation
            for s in seqs:
                res = bench_point(impls, args, device, dtype, d, s, skip)
                points.append({"d": d, "seq": s, "results": res})
                progress(f"attention d={d} s={s}: {eta.tick()}")
        if args.memory:
            if device.type == "cpu":
                exact_cpu_rss()
            for p in points:
                memory_point(impls, args, device, dtype, p["d"], p["seq"], p["results"])
        data = {
            "machine": info, "dtype": args.dtype, "batch_size": args.batch_size, "num_heads": args.num_heads,
            "warmup": args.warmup, "steps": args.steps, "passes": args.passes, "impls": names, "points": points,
            "argv": " ".join(argv if argv is not None else sys.argv[1:]),
        }
        md = to_markdown(data)
        print(md)
        if args.out:
            tag = f"attention_{device.type}" + ("" if args.dtype == "float32" else f"_{args.dtype}")
            atomic_write_text(args.results_dir / f"{tag}.md", md)
            atomic_write_json(args.results_dir / f"{tag}.json", data)
            print(f"wrote {args.results_dir / (tag + '.md')} and .json")
        return 0
    except (ValueError, ImportError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

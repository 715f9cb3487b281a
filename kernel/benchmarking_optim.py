"""Benchmark: our AdamW step vs torch.optim.AdamW on a model preset's parameter shapes.

    uv run kernel/benchmarking_optim.py [--preset tinystories] [--rounds 7] [--steps 5] [--device cpu]

Every optimizer gets its own copy of the same parameters and gradients; rounds interleave the
optimizers (A B C D, A B C D, ...) so machine load hits them alike; we print the median time per
step and its ratio against torch.optim.AdamW(foreach=False) measured in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from llm.config import model_preset
from llm.optim import AdamW


def preset_shapes(name: str) -> list[tuple[int, ...]]:
    """Parameter shapes of `Transformer.from_config(model_preset(name))` (state-dict order)."""
    c = model_preset(name)
    kv = c.head_dim * (c.num_kv_heads or c.num_heads)
    layer = [(c.d_model, c.d_model), (kv, c.d_model), (kv, c.d_model), (c.d_model, c.d_model), (c.d_model,),
             (c.d_ff, c.d_model), (c.d_model, c.d_ff), (c.d_ff, c.d_model), (c.d_model,)]
    shapes = [(c.vocab_size, c.d_model)] + layer * c.num_layers + [(c.d_model,)]
    return shapes + ([] if c.tie_embeddings else [(c.vocab_size, c.d_model)])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tinystories")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=5, help="optimizer steps timed per round")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu = this process's CPU time: steadier on a shared machine, meaningful with --threads 1")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    shapes = preset_shapes(args.preset)
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=g) * 1e-3 for s in shapes]
    n = sum(t.numel() for t in init)
    print(f"{args.preset}: {len(shapes)} tensors, {n / 1e6:.1f}M parameters, device {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock", file=sys.stderr, flush=True)

    makers = {
        "torch AdamW foreach=False": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, foreach=False),
        "torch AdamW default": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1),
        "ours AdamW (default path)": lambda ps: AdamW(ps, lr=1e-3, weight_decay=0.1),
        "ours AdamW foreach=True": lambda ps: AdamW(ps, lr=1e-3, weight_decay=0.1, foreach=True),
        "ours AdamW foreach=False": lambda ps: AdamW(ps, lr=1e-3, weight_decay=0.1, foreach=False),
        # One fused C++/CUDA kernel: not something our tensor-op code can be, shown for scale.
        "torch AdamW fused=True (info)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, fused=True),
    }
    runs = {}
    for name, make in makers.items():
        ps = [torch.nn.Parameter(t.to(device)) for t in init]
        for prm, gr in zip(ps, grads):
            prm.grad = gr.to(device)
        opt = make(ps)
        opt.step()  # state allocation happens here, outside the timing
        runs[name] = (opt, [])
    for r in range(args.rounds):
        for name, (opt, times) in runs.items():
            _sync(device)
            t0 = clock()
            for _ in range(args.steps):
                opt.step()
            _sync(device)
            times.append((clock() - t0) / args.steps)
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    ref = statistics.median(runs["torch AdamW foreach=False"][1])
    print(f"{'optimizer':32s} {'median ms/step':>14s} {'speed vs torch foreach=False':>29s}")
    for name, (_, times) in runs.items():
        med = statistics.median(times)
        print(f"{name:32s} {med * 1e3:14.2f} {ref / med:28.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

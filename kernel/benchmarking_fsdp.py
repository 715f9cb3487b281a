"""One training step's speed and memory, plain (what DDP runs on each rank) against FSDP2 (llm.fsdp), with
and without activation checkpointing, next to the memory planner's estimate (llm.memory_plan).

    uv run kernel/benchmarking_fsdp.py --device cuda --preset small --batch-size 8     # bf16, one GPU
    uv run kernel/benchmarking_fsdp.py --device cpu --preset demo --batch-size 4 --steps 3

One process: FSDP runs over a one-rank process group (nccl on CUDA, gloo on the CPU), so nothing is
actually sharded (W = 1) and the states are as large as the plain model's; what this measures is the FSDP2
code path itself: bf16 parameters through MixedPrecisionPolicy, DTensor AdamW and clipping, the all-gather
and reduce-scatter calls, and their cost. The sharding itself (per-rank bytes with 2 ranks) is
tests/test_fsdp.py's. Each configuration runs alone (its peak memory is its own), `--warmup` untimed steps
then `--steps` timed ones; reported: median step time, tokens/s, peak allocated memory (CUDA) or the exact
tensor peak (CPU), and the planner's total for the same setting.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel.bench_utils import Eta, TensorMemoryTracker, progress, resolve_device, sync, timed  # noqa: E402
from llm.fileio import write_json  # noqa: E402
from llm.fsdp import apply_fsdp  # noqa: E402
from llm.hardware import autocast_context  # noqa: E402
from llm.memory_plan import plan  # noqa: E402
from llm.optim import gradient_clip  # noqa: E402
from llm.parallel import apply_activation_checkpointing, rank_state_bytes  # noqa: E402
from llm.train_config import train_preset  # noqa: E402
from llm.train_setup import build_model, build_optimizer  # noqa: E402


def one_config(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, fsdp: bool, ac: str) -> dict:
    """Build, warm up and time one configuration; its peak memory and state bytes."""
    cfg = train_preset(args.preset)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = build_model(cfg.model, device)
    apply_activation_checkpointing(model, ac)
    if fsdp:
        apply_fsdp(model, device, dtype)
    opt = build_optimizer(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = torch.randint(cfg.model.vocab_size, (2, args.batch_size, cfg.model.context_length), device=device)

    def step() -> float:
        with autocast_context(device, dtype):
            loss = model.loss(x, y)
        loss.backward()
        gradient_clip(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    losses = [step() for _ in range(args.warmup)]
    times = [timed(lambda: losses.append(step()), device) for _ in range(args.steps)]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        with TensorMemoryTracker() as tracker:
            step()
        peak = tracker.peak + sum(rank_state_bytes(params, opt)[k] for k in ("params", "optimizer"))
    states = rank_state_bytes(params, opt)
    est = plan(cfg.model, world_size=1, parallel="fsdp" if fsdp else "ddp", ac_mode=ac, batch=args.batch_size,
               gpu=device.type == "cuda")
    med = statistics.median(times)
    return {"mode": "fsdp" if fsdp else "plain", "ac": ac, "median_s": med,
            "tokens_per_s": args.batch_size * cfg.model.context_length / med, "peak_bytes": peak,
            "params_bytes": states["params"], "optimizer_bytes": states["optimizer"], "plan_total_bytes": est.total,
            "plan_activation_bytes": est.activations, "losses": losses}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--ac", default="none,full", help="activation checkpointing modes, comma-separated")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"), RANK="0",
                      WORLD_SIZE="1")
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    configs = [(fsdp, ac) for ac in args.ac.split(",") for fsdp in (False, True)]
    results, eta = [], Eta(len(configs))
    for fsdp, ac in configs:
        r = one_config(args, device, dtype, fsdp, ac)
        results.append(r)
        print(f"{r['mode']:>5} ac={ac:<5} | {1e3 * r['median_s']:8.1f} ms/step | {r['tokens_per_s']:10,.0f} tok/s | "
              f"peak {r['peak_bytes'] / 2**30:6.2f} GiB | plan {r['plan_total_bytes'] / 2**30:6.2f} GiB "
              f"(activations {r['plan_activation_bytes'] / 2**30:.2f}) | params {r['params_bytes'] / 2**20:.0f} MiB | "
              f"losses {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}", flush=True)
        progress(eta.tick())
        sync(device)
    dist.destroy_process_group()
    if args.json:
        write_json(args.json, {"device": str(device), "preset": args.preset, "batch_size": args.batch_size,
                               "torch": torch.__version__, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

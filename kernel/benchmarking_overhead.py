"""Loop overhead of a training preset: everything but forward/backward/optimizer-step (data, lr, clipping,
loss all-reduce, logging), plus eval and checkpoints amortised over the preset's intervals.

    uv run kernel/benchmarking_overhead.py [--preset demo] [--steps 8] [--repeats 3] [--out-dir runs/overhead]

Measured two ways in one process: (1) inside the loop, per step, the fwd/bwd/step part against the whole
step (robust on a busy machine: both halves see the same load); (2) per-step medians of the training loop
(llm.train_loop) against a bare fwd/bwd/step loop on the same model, interleaved repeats (noisy when others
load the CPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from llm.data import get_batch, open_tokens
from llm.distributed import DistInfo
from llm.hardware import autocast_context
from llm.machine import usable_cores
from llm.train_config import TrainConfig, merge, train_preset
from llm.train_loop import TrainResult, batch_rng, train
from llm.train_setup import build_model, build_optimizer, prepare_data, resolve_device, resolve_dtype


def bare_step_seconds(cfg: TrainConfig, device: torch.device, steps: int) -> float:
    """Median seconds of a bare step (two warm-up steps left out): one fixed batch already on the device,
    forward + backward over grad_accum micro-batches + optimizer step, nothing else."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, device, cfg.impl)
    opt = build_optimizer(model, cfg)
    tokens = open_tokens(cfg.train_data, vocab_size=cfg.model.vocab_size)
    x, y = get_batch(tokens, cfg.batch_size, cfg.model.context_length, device, rng=batch_rng(0, 0, 0))
    times = []
    for _ in range(steps + 2):
        sync()
        t0 = time.perf_counter()
        for _ in range(cfg.grad_accum):
            with autocast_context(device, resolve_dtype(cfg, device)):
                loss = model.loss(x, y)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def loop_run(cfg: TrainConfig, steps: int, out_dir: str) -> TrainResult:
    """The training loop for steps + 2 steps, one eval at the end, one checkpoint, timed per step."""
    n = steps + 2
    run_cfg = merge(cfg, {"out_dir": out_dir, "max_steps": n, "warmup_steps": min(cfg.warmup_steps, n),
                          "eval_interval": n, "checkpoint_interval": 0, "prepare_demo_data": False})
    return train(run_cfg, quiet=True, overwrite=True, profile=True)


def report(cfg: TrainConfig, ns: argparse.Namespace, bare: list[float], loop: list[float], inner: list[float],
           evals: list[float], ckpts: list[float]) -> None:
    med = statistics.median
    b, lp, ov, e, c = med(bare), med(loop), med(inner), med(evals), med(ckpts)
    compute = lp / (1 + ov)  # the fwd/bwd/step part of a loop step
    n_evals = -(-cfg.max_steps // cfg.eval_interval)  # every eval_interval, and at the end
    n_ckpts = (cfg.max_steps // cfg.checkpoint_interval if cfg.checkpoint_interval else 1) + n_evals  # + best.pt
    amort = (e * n_evals + c * n_ckpts) / (compute * cfg.max_steps)
    print(f"{cfg.preset} ({ns.repeats} repeats x {ns.steps} steps, medians):")
    print(f"  (1) in-loop: per-step overhead {100 * ov:.2f}% + eval {100 * e * n_evals / (compute * cfg.max_steps):.2f}% "
          f"({n_evals} x {e * 1e3:.0f} ms) + checkpoints {100 * c * n_ckpts / (compute * cfg.max_steps):.2f}% "
          f"(<= {n_ckpts} x {c * 1e3:.0f} ms) = {100 * (ov + amort):.2f}% of fwd/bwd/step time over {cfg.max_steps} steps")
    print(f"  (2) vs a bare loop: bare {b * 1e3:.0f} ms/step, training loop {lp * 1e3:.0f} ms/step -> "
          f"{100 * (lp / b - 1):+.2f}% per step, {100 * (lp / b - 1 + amort * compute / b):+.2f}% with eval/checkpoints")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--steps", type=int, default=8, help="timed steps per repeat (+2 warm-up)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out-dir", default="runs/overhead")
    ns = p.parse_args(argv)
    try:
        cfg = train_preset(ns.preset)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = resolve_device(cfg)
    prepare_data(cfg, DistInfo())
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads or usable_cores())
    bare, loop, inner, evals, ckpts = [], [], [], [], []
    for r in range(ns.repeats):
        bare.append(bare_step_seconds(cfg, device, ns.steps))
        res = loop_run(cfg, ns.steps, f"{ns.out_dir}/r{r}")
        steps = res.step_times[2:]  # two warm-up steps left out
        loop.append(statistics.median([w for w, _ in steps]))
        inner.append(statistics.median([(w - c) / c for w, c in steps]))
        evals.append(res.eval_seconds / max(1, res.eval_count))
        ckpts.append(res.ckpt_seconds / max(1, res.ckpt_count))
        print(f"repeat {r}: bare {bare[-1] * 1e3:.0f} ms/step | loop {loop[-1] * 1e3:.0f} ms/step | in-loop overhead "
              f"{100 * inner[-1]:.2f}% | eval {evals[-1] * 1e3:.0f} ms | checkpoint {ckpts[-1] * 1e3:.0f} ms",
              file=sys.stderr, flush=True)
    report(cfg, ns, bare, loop, inner, evals, ckpts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

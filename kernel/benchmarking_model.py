"""Benchmark our hand-written Transformer: forward, forward+backward and a full AdamW training step.

    uv run kernel/benchmarking_model.py --preset tiny --compare torch          # ours vs torch.nn, same run
    uv run kernel/benchmarking_model.py --preset tiny --compare torch --impl both   # + the reference model
    uv run kernel/benchmarking_model.py --preset small --device cuda --dtype bfloat16 --memory --profile
    uv run kernel/benchmarking_model.py --sweep --compare torch --batch-size 4  # sizes x contexts -> kernel/results/
    uv run kernel/benchmarking_model.py --preset tiny --context-length 1024 --batch-size 4 --memory \
        --activation-checkpointing full      # ours vs ours+ac (blocks recomputed in backward), interleaved

Phases (each timed with the device synchronised around it; `--warmup` untimed then `--steps` timed):
- forward: logits for a batch, no autograd (what generation and evaluation run);
- fwd+bwd: `zero_grad(set_to_none)`, loss, backward. Ours uses `model.loss(x, y)` (lm_head fused with
  the cross-entropy, never materialising the logits); the torch.nn model uses `F.cross_entropy(logits, y)`;
- step: fwd+bwd + optimizer step (ours: llm.optim.AdamW; torch.nn: torch.optim.AdamW).
`--impl` picks our model's implementation: "fast" (named `ours`), "reference" (only the llm/ops
Functions, named `reference`; its loss is lm_head then cross-entropy, unfused) or both.
`--compare torch` builds `kernel/torch_reference.TorchTransformer` (torch.nn + F.* + torch.optim.AdamW)
with the SAME weights and data, and interleaves the models iteration by iteration (alternating
which goes first), reporting speed = t_torch / t_ours as the median of the paired iterations (> 1: ours
is faster), likewise for the reference model and, with both, ours over the reference.
FLOPs: `ModelConfig.flops_per_token` (matmul FLOPs, 3x forward for training; the optimizer is not
counted); MFU = achieved / `llm.hardware.peak_flops` (GPU data sheets; CPU: a measured matmul).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from kernel.bench_utils import (
    DTYPES,
    REPO,
    Eta,
    atomic_write_json,
    atomic_write_text,
    autocast,
    available_memory_bytes,
    cuda_memory_history,
    exact_cpu_rss,
    measure_peak,
    fmt_bytes,
    interleaved_times,
    machine_info,
    paired_speed_ratio,
    progress,
    resolve_device,
    summarize,
    sync,
)
from llm.config import MODEL_PRESETS, ModelConfig, model_preset
from llm.fileio import check_writable, replacing
from llm.hardware import peak_flops
from llm.train_config import checkpoint_every

PHASES = ("forward", "fwd+bwd", "step")
SWEEP_CONTEXTS = (128, 256, 512, 1024)
TRACE_DIR = REPO / "kernel" / "traces"  # git-ignored
RESULTS_DIR = REPO / "kernel" / "results"


# ---------------------------------------------------------------- models
@dataclass
class Runner:
    """One implementation under test, with a callable per phase."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    dtype: torch.dtype
    compile: bool = False
    fns: dict[str, Callable[[torch.Tensor, torch.Tensor], object]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        fwd: Callable = self.model
        loss: Callable = self.model.loss
        if self.compile:
            fwd, loss = torch.compile(fwd), torch.compile(loss)

        def forward(x: torch.Tensor, y: torch.Tensor) -> object:
            with torch.no_grad(), autocast(self.device, self.dtype):
                return fwd(x)

        def fwd_bwd(x: torch.Tensor, y: torch.Tensor) -> object:
            self.optimizer.zero_grad(set_to_none=True)
            with autocast(self.device, self.dtype):
                out = loss(x, y)
            out.backward()
            return out

        def step(x: torch.Tensor, y: torch.Tensor) -> object:
            out = fwd_bwd(x, y)
            self.optimizer.step()
            return out

        self.fns = {"forward": forward, "fwd+bwd": fwd_bwd, "step": step}


RUNNER_NAMES = {"fast": "ours", "reference": "reference"}  # our model's implementations, as the results name them


def build_ours(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, attn_impl: str, compile: bool,
               impl: str = "fast", weights: dict | None = None, ac: str = "none") -> Runner:
    """Our model; with `ac` (an activation-checkpointing mode other than none) its blocks checkpointed
    (llm.parallel) and the runner named e.g. `ours+ac`."""
    from llm.optim import AdamW
    from llm.parallel import apply_activation_checkpointing
    from llm.transformer import Transformer

    model = Transformer.from_config(cfg, attn_impl=attn_impl, device=device, impl=impl)
    if weights is not None:
        model.load_state_dict(weights)
    name = RUNNER_NAMES[impl] + ("+ac" if apply_activation_checkpointing(model, ac) else "")
    return Runner(name, model, AdamW(model.parameters(), lr=1e-4), device, dtype, compile)


def build_reference(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, compile: bool, weights: dict | None) -> Runner:
    from kernel.torch_reference import TorchTransformer, torch_adamw

    model = TorchTransformer.from_config(cfg, device=device)
    if weights is not None:
        model.load_state_dict(weights)
    return Runner("torch", model, torch_adamw(model.parameters(), lr=1e-4), device, dtype, compile)


def build_runners(cfg: ModelConfig, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[Runner]:
    torch.manual_seed(args.seed)
    impls = ["fast", "reference"] if args.impl == "both" else [args.impl]
    runners: list[Runner] = []
    for impl in impls:  # the same weights for all
        weights = runners[0].model.state_dict() if runners else None
        runners.append(build_ours(cfg, device, dtype, args.attn_impl, args.compile, impl, weights))
        if args.activation_checkpointing != "none":  # the same model checkpointed, interleaved with the plain one
            weights = runners[0].model.state_dict()
            runners.append(build_ours(cfg, device, dtype, args.attn_impl, args.compile, impl, weights,
                                      args.activation_checkpointing))
    if args.compare == "torch":
        runners.append(build_reference(cfg, device, dtype, args.compile, runners[0].model.state_dict()))
    return runners


def random_batch(cfg: ModelConfig, batch: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(cfg.vocab_size, (batch, cfg.context_length + 1), generator=gen)
    return data[:, :-1].contiguous().to(device), data[:, 1:].contiguous().to(device)


# ---------------------------------------------------------------- measuring
def measure(runners: list[Runner], phase: str, x: torch.Tensor, y: torch.Tensor, warmup: int, steps: int) -> dict[str, list[float]]:
    """Interleaved: every iteration runs each runner once, alternating which goes first."""
    return interleaved_times({r.name: (lambda r=r: r.fns[phase](x, y)) for r in runners}, x.device, warmup, steps)


def phase_flops(cfg: ModelConfig, phase: str, tokens: int) -> float:
    return cfg.flops_per_token(training=phase != "forward", seq_len=cfg.context_length) * tokens


def summarize_phase(cfg: ModelConfig, phase: str, times: dict[str, list[float]], tokens: int, peak: float) -> dict:
    out: dict = {"phase": phase, "impls": {}}
    flops = phase_flops(cfg, phase, tokens)
    for name, ts in times.items():
        s = summarize(ts)
        achieved = flops / s["median_s"]
        s.update(tokens_per_s=tokens / s["median_s"], tflops=achieved / 1e12, mfu=achieved / peak if peak == peak else float("nan"))
        out["impls"][name] = s
    for name, base in (("ours", "torch"), ("reference", "torch"), ("ours", "reference"), ("ours+ac", "ours"),
                       ("reference+ac", "reference")):
        if name in times and base in times:
            out[f"speed_{name}_over_{base}"] = paired_speed_ratio(times[name], times[base])
    return out


def correctness_check(runners: list[Runner], x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Same weights, same batch: the losses must agree (a benchmark of a wrong model is worthless)."""
    losses = {}
    for r in runners:
        with torch.no_grad(), autocast(x.device, r.dtype):
            losses[r.name] = float(r.model.loss(x, y))
    return losses


def measure_memory(runners: list[Runner], phases: list[str], x: torch.Tensor, y: torch.Tensor, snapshot_dir: Path | None) -> dict:
    """Peak memory of one call per (runner, phase), measured one at a time (not interleaved)."""
    out: dict = {}
    device = x.device
    if device.type == "cpu":
        exact_cpu_rss()
    for r in runners:
        for phase in phases:
            snap = snapshot_dir / f"memory_{r.name}_{phase.replace('+', '_')}.pickle" if snapshot_dir and phase == "step" else None
            with cuda_memory_history(device, snap):
                m = measure_peak(lambda: r.fns[phase](x, y), device)
            shown = snap.relative_to(REPO) if snap and snap.is_relative_to(REPO) else snap  # no machine paths in results
            out[f"{r.name}/{phase}"] = {**m, "snapshot": str(shown) if snap else None}
    return out


GEMM = "matmul (GEMM)"
COMPILE_TARGET = 1.1  # the speed-up over the compiled torch.nn model that kernel/README.md aims at
# op-name fragment -> category, to say where time goes (first match wins)
CATEGORIES = [
    ("attention kernel", ("scaled_dot_product", "attention", "flash")),
    ("batched matmul", ("bmm",)),  # ours: attention's QKᵀ, PV and their gradients (torch's are inside its kernel)
    (GEMM, ("mm", "matmul", "linear")),  # the linear layers and the lm_head: the same FLOPs in both models
    ("softmax/CE", ("softmax", "cross_entropy", "nll", "logsumexp")),
    ("allocation", ("empty", "zeros", "ones", "fill_", "zero_", "full", "resize")),
    ("copy/layout", ("copy_", "contiguous", "clone", "to", "cat", "stack", "index", "transpose", "view", "reshape", "permute", "expand")),
    ("optimizer", ("_foreach", "lerp", "addcdiv", "addcmul", "adamw", "sqrt")),
]


def _categorize(name: str) -> str:
    low = name.lower()
    if "compiledfxgraph" in low:  # self time of a compiled graph = its Inductor-generated fused kernels
        return "inductor kernels"
    if not low.startswith("aten::"):
        return "python/autograd"
    op = low[len("aten::"):]
    for cat, frags in CATEGORIES:
        if any(f in op for f in frags):
            return cat
    return "elementwise/other"


def profile(runners: list[Runner], phase: str, x: torch.Tensor, y: torch.Tensor, steps: int, out_dir: Path, tag: str, rows: int) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    device = x.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    for r in runners:
        r.fns[phase](x, y)  # warm
        sync(device)
        with torch_profile(activities=activities, record_shapes=False) as prof:
            for _ in range(steps):
                r.fns[phase](x, y)
            sync(device)
        trace = out_dir / f"trace_{tag}_{r.name}_{phase.replace('+', '_')}.json"
        prof.export_chrome_trace(str(trace))
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        averages = prof.key_averages()
        print(f"\n## profile: {r.name}, {phase}, {steps} iterations (chrome trace: {trace}, open in https://ui.perfetto.dev)")
        print(averages.table(sort_by=key, row_limit=rows))
        cats: dict[str, float] = {}
        for evt in averages:
            us = getattr(evt, key, 0.0) or 0.0
            cats[_categorize(evt.key)] = cats.get(_categorize(evt.key), 0.0) + us
        total = sum(cats.values()) or 1.0
        # our autograd Functions (and their backward nodes) with everything they call: which primitive costs what
        fns = sorted((e for e in averages if not e.key.startswith(("aten::", "autograd::", "ProfilerStep", "[memory]", "cudaDevice")) and e.key.endswith(("Fn", "Backward", "Backward0", "Backward1"))),
                     key=lambda e: -e.cpu_time_total)[:rows]
        if fns:
            print("top autograd nodes by total CPU time incl. children (ms/iteration): " + ", ".join(f"{e.key} {e.cpu_time_total / steps / 1e3:.1f}" for e in fns))
        summary[r.name] = {k: v / steps / 1e3 for k, v in sorted(cats.items(), key=lambda kv: -kv[1])}
        summary[r.name]["_total_ms"] = total / steps / 1e3
        summary[r.name]["_trace"] = str(trace)
    if len(summary) > 1:
        first = runners[0].name
        cats = sorted({c for s in summary.values() for c in s if not c.startswith("_")}, key=lambda c: -summary[first].get(c, 0.0))
        print(f"\n## where the time goes, {phase}: self time per iteration (ms)")
        print("| category | " + " | ".join(summary) + " |")
        print("|---|" + "---:|" * len(summary))
        for c in cats + ["_total_ms"]:
            print(f"| {c.strip('_')} | " + " | ".join(f"{s.get(c, 0.0):.1f}" for s in summary.values()) + " |")
        if "torch" in summary:
            print(gemm_ceiling(summary[first], summary["torch"]))
    return summary


def gemm_ceiling(ours: dict[str, float], torch_: dict[str, float]) -> str:
    """The best speed-up ours could show: both models run the same GEMMs (linear layers, lm_head), which
    run near the matmul peak, so ours can at most be t_torch / t_ours_GEMM faster, with all else free."""
    g, total = ours.get(GEMM, 0.0), torch_["_total_ms"]
    if g <= 0:
        return ""
    budget = total / COMPILE_TARGET - g
    target = (f"{COMPILE_TARGET:.2f}x needs all else in {budget:.1f} ms" if budget > 0
              else f"{COMPILE_TARGET:.2f}x is out of reach: our GEMMs alone take longer")
    return (
        f"GEMMs: ours {g:.1f} ms, torch {torch_.get(GEMM, 0.0):.1f} ms; everything else: ours {ours['_total_ms'] - g:.1f} ms, "
        f"torch {total - torch_.get(GEMM, 0.0):.1f} ms. Ceiling ours/torch with its GEMMs as they are and all else free: "
        f"{total / g:.2f}x; {target}."
    )


# ---------------------------------------------------------------- reporting
def format_run(result: dict) -> str:
    lines = [
        "| phase | impl | mean ± std (ms) | median (ms) | tokens/s | TFLOP/s | MFU |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for ph in result["phases"]:
        for name, s in ph["impls"].items():
            lines.append(
                f"| {ph['phase']} | {name} | {s['mean_s'] * 1e3:.1f} ± {s['std_s'] * 1e3:.1f} | {s['median_s'] * 1e3:.1f} | "
                f"{s['tokens_per_s']:,.0f} | {s['tflops']:.3f} | {s['mfu'] * 100:.1f}% |"
            )
    lines.append("")
    for key in ("speed_ours_over_torch", "speed_reference_over_torch", "speed_ours_over_reference",
                "speed_ours+ac_over_ours", "speed_reference+ac_over_reference"):
        ratios = [(ph["phase"], ph[key]) for ph in result["phases"] if key in ph]
        if ratios:
            a, b = key.removeprefix("speed_").split("_over_")
            lines.append(f"speed {a}/{b} (median of paired t_{b}/t_{a}; > 1 = {a} faster): " + ", ".join(f"{p} {r:.2f}x" for p, r in ratios))
    return "\n".join(lines).rstrip()


def run_once(cfg: ModelConfig, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, peak: float, tag: str) -> dict:
    runners = build_runners(cfg, args, device, dtype)
    x, y = random_batch(cfg, args.batch_size, device, args.seed)
    tokens = x.numel()
    result: dict = {"config": cfg.to_dict(), "batch_size": args.batch_size, "tokens_per_batch": tokens, "phases": []}
    if len(runners) > 1:
        result["loss_check"] = losses = correctness_check(runners, x, y)
        first = runners[0].name
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        for name, loss in losses.items():
            rel = abs(loss - losses[first]) / max(abs(losses[first]), 1e-12)
            if not rel <= tol:
                raise ValueError(f"{first} and {name} disagree on the loss with the same weights: {losses} (rel {rel:.2e})")
    for phase in args.phases:
        progress(f"[{tag}] timing {phase}: {args.warmup} warmup + {args.steps} steps x {len(runners)} impl(s)")
        times = measure(runners, phase, x, y, args.warmup, args.steps)
        result["phases"].append(summarize_phase(cfg, phase, times, tokens, peak))
    if args.memory:
        result["memory"] = measure_memory(runners, args.phases, x, y, TRACE_DIR if device.type == "cuda" else None)
    if args.profile:
        result["profile"] = profile(runners, args.profile_phase, x, y, args.profile_steps, TRACE_DIR, tag, args.profile_rows)
    del runners
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------- sweep
def estimate(cfg: ModelConfig, batch: int, peak: float, n_impls: int, phases: list[str], warmup: int, steps: int) -> tuple[float, float]:
    """(seconds for the whole measurement at ~30% MFU, bytes of the larger model's working set)."""
    tokens = batch * cfg.context_length
    per_iter = sum(phase_flops(cfg, p, tokens) for p in phases) / (0.3 * peak)
    seconds = per_iter * (warmup + steps + 2) * n_impls
    L, d, T, V = cfg.num_layers, cfg.d_model, cfg.context_length, cfg.vocab_size
    params = cfg.num_params() * 4 * 4  # weights, grads, AdamW m and v (fp32)
    acts = 4 * batch * T * (L * (20 * d + 4 * cfg.d_ff + 2 * cfg.num_heads * T) + 3 * V)  # (b h T T) scores if materialised
    return seconds, params + acts


def sweep(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, peak: float, peak_src: str) -> dict:
    sizes = args.sweep_sizes.split(",")
    for s in sizes:
        model_preset(s)  # validates the name
    contexts = [int(c) for c in args.sweep_contexts.split(",")]
    budget = args.max_seconds
    n_impls = 2 if args.compare == "torch" else 1
    points, skipped = [], []
    calib: list[float] = []  # measured / estimated seconds of the points run so far: the estimate learns the machine
    todo = [(size, T) for size in sizes for T in contexts]
    eta = Eta(len(todo))
    for size, T in todo:
        cfg = ModelConfig(**{**config_from_args(args, size).to_dict(), "context_length": T})
        secs, mem = estimate(cfg, args.batch_size, peak, n_impls, args.phases, args.warmup, args.steps)
        secs *= statistics.median(calib) if calib else 1.0
        avail = available_memory_bytes(device)
        reason = None
        if secs > budget:
            reason = f"estimated {secs:.0f}s > --max-seconds {budget:.0f}s"
        elif mem > 0.6 * avail:
            reason = f"estimated {fmt_bytes(mem)} > 60% of available {fmt_bytes(avail)}"
        if reason:
            skipped.append({"size": size, "context": T, "reason": reason})
            progress(f"sweep: skipping {size} @ {T}: {reason} ({eta.tick()})")
            continue
        progress(f"sweep: {size} @ context {T} (estimated {secs:.0f}s)")
        t0 = time.perf_counter()
        try:
            res = run_once(cfg, args, device, dtype, peak, f"{size}-{T}")
        except torch.cuda.OutOfMemoryError as e:  # only raised on CUDA
            skipped.append({"size": size, "context": T, "reason": f"out of memory: {str(e).splitlines()[0]}"})
            progress(f"sweep: {size} @ {T}: out of memory, skipped")
            gc.collect()
            torch.cuda.empty_cache()
            continue
        raw = secs / (statistics.median(calib) if calib else 1.0)
        calib.append((time.perf_counter() - t0) / max(raw, 1e-9))
        res.update(size=size, context=T)
        points.append(res)
        progress(f"sweep: done {size} @ {T} ({eta.tick()})")
    return {
        "machine": machine_info(device),
        "dtype": str(dtype).removeprefix("torch."),
        "compile": args.compile,
        "peak_flops": peak,
        "peak_source": peak_src,
        "batch_size": args.batch_size,
        "warmup": args.warmup,
        "steps": args.steps,
        "points": points,
        "skipped": skipped,
    }


def sweep_markdown(data: dict) -> str:
    m = data["machine"]
    where = m.get("gpu") or f"{m.get('cpu', 'CPU')}, {m.get('threads')} threads"
    lines = [
        f"# Model benchmark sweep: {where}",
        "",
        f"torch {m['torch']}, {data['dtype']}, compile={data['compile']}, batch {data['batch_size']}, "
        f"{data['warmup']} warmup + {data['steps']} timed steps, peak {data['peak_flops'] / 1e12:.3f} TFLOP/s ({data['peak_source']}).",
        "Medians; speed = median of paired t_torch / t_ours (> 1: ours faster), both models interleaved in one process.",
        "Command: `uv run kernel/benchmarking_model.py " + data.get("argv", "") + "`",
        "",
        "| size | context | phase | ours (ms) | ours tokens/s | ours MFU | torch (ms) | torch tokens/s | speed ours/torch |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in data["points"]:
        for ph in p["phases"]:
            o = ph["impls"]["ours"]
            t = ph["impls"].get("torch")
            tcols = f"{t['median_s'] * 1e3:.1f} | {t['tokens_per_s']:,.0f}" if t else "– | –"
            ratio = f"{ph['speed_ours_over_torch']:.2f}x" if "speed_ours_over_torch" in ph else "–"
            lines.append(
                f"| {p['size']} | {p['context']} | {ph['phase']} | {o['median_s'] * 1e3:.1f} | {o['tokens_per_s']:,.0f} | "
                f"{o['mfu'] * 100:.1f}% | {tcols} | {ratio} |"
            )
    if data["skipped"]:
        lines += ["", "Skipped:", ""] + [f"- {s['size']} @ {s['context']}: {s['reason']}" for s in data["skipped"]]
    return "\n".join(lines) + "\n"


def sweep_plot(data: dict, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (`uv sync --extra plot`, or `pip install matplotlib`)"
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    sizes = sorted({p["size"] for p in data["points"]}, key=list(MODEL_PRESETS).index)
    for i, size in enumerate(sizes):
        pts = [p for p in data["points"] if p["size"] == size]
        ctx = [p["context"] for p in pts]
        step = [next(ph for ph in p["phases"] if ph["phase"] == data["plot_phase"]) for p in pts]
        color = f"C{i}"
        ax.plot(ctx, [s["impls"]["ours"]["tokens_per_s"] for s in step], "o-", color=color, label=f"{size} ours")
        if all("torch" in s["impls"] for s in step):
            ax.plot(ctx, [s["impls"]["torch"]["tokens_per_s"] for s in step], "x--", color=color, label=f"{size} torch.nn")
        for j, phase in enumerate(("forward", "fwd+bwd", "step")):
            r = [next((ph.get("speed_ours_over_torch") for ph in p["phases"] if ph["phase"] == phase), None) for p in pts]
            if all(v is not None for v in r):
                ax2.plot(ctx, r, ["s:", "^--", "o-"][j], color=color, label=f"{size} {phase}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length")
    ax.set_ylabel(f"tokens/s ({data['plot_phase']})")
    m = data["machine"]
    ax.set_title(f"{data['plot_phase']} throughput, {m.get('gpu') or 'CPU'}, {data['dtype']}, batch {data['batch_size']}")
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("context length")
    ax2.set_ylabel("speed ours / torch.nn (> 1: ours faster)")
    ax2.set_title("paired, interleaved ratio (robust to machine load)")
    ax2.grid(True, which="both", alpha=0.3)
    if ax2.lines[1:]:
        ax2.legend(fontsize=7, ncol=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with replacing(path, tmp=path.with_suffix(".tmp.png")) as tmp:  # savefig takes the format from ".png"
            fig.savefig(tmp, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return f"plot: {path}"


# ---------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=list(MODEL_PRESETS), help="model size (default tiny)")
    for flag, typ in (("vocab-size", int), ("context-length", int), ("d-model", int), ("d-ff", int), ("num-layers", int), ("num-heads", int), ("num-kv-heads", int), ("rope-theta", float)):
        p.add_argument(f"--{flag}", type=typ, default=None, help="override the preset")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per phase")
    p.add_argument("--steps", type=int, default=5, help="timed iterations per phase")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {', '.join(PHASES)}")
    p.add_argument("--compare", choices=["none", "torch"], default="none", help="also run the torch.nn reference, interleaved")
    p.add_argument("--impl", choices=["fast", "reference", "both"], default="fast",
                   help="our model's implementation: fast (llm/fast, 'ours'), reference (only llm/ops) or both, interleaved")
    p.add_argument("--activation-checkpointing", default="none", metavar="MODE",
                   help="also run our model with its blocks checkpointed (none | full | every-K), named +ac, "
                        "interleaved with the plain one")
    p.add_argument("--attn-impl", default="auto", help="the fast model's causal attention: auto | ours | flash | triton")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="bfloat16 = autocast, fp32 weights")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (30-40 s per model on CPU)")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--memory", action="store_true", help="peak memory per phase (CPU: peak RSS; CUDA: allocator peak + snapshot)")
    p.add_argument("--profile", action="store_true", help="torch.profiler chrome trace + top ops table")
    p.add_argument("--profile-phase", default="step", choices=list(PHASES))
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--profile-rows", type=int, default=15)
    p.add_argument("--peak-flops", type=float, default=None, help="override the peak FLOP/s used for MFU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    p.add_argument("--sweep", action="store_true", help="sizes x contexts; writes kernel/results/ and img/")
    p.add_argument("--sweep-sizes", default=None, help="comma list of presets (default: CPU demo,tiny,tinystories,small; CUDA all); size flags given apply to each")
    p.add_argument("--sweep-contexts", default=",".join(map(str, SWEEP_CONTEXTS)))
    p.add_argument("--max-seconds", type=float, default=None, help="skip sweep points estimated to take longer (default CPU 60, CUDA 600)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--img-dir", type=Path, default=REPO / "img")
    return p


def config_from_args(args: argparse.Namespace, preset: str | None = None) -> ModelConfig:
    """The preset with any size flags given on the command line applied on top."""
    d = model_preset(preset or args.preset).to_dict()
    for key in ("vocab_size", "context_length", "d_model", "d_ff", "num_layers", "num_heads", "num_kv_heads", "rope_theta"):
        if getattr(args, key) is not None:
            d[key] = getattr(args, key)
    if args.d_model is not None and args.d_ff is None:
        d["d_ff"] = None  # re-derive from the new d_model
    return ModelConfig(**d)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.phases = [ph.strip() for ph in args.phases.split(",") if ph.strip()]
        bad = [ph for ph in args.phases if ph not in PHASES]
        if bad or not args.phases:
            raise ValueError(f"unknown phase(s) {bad}; choose from {', '.join(PHASES)}")
        if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
            raise ValueError("need --steps >= 1, --warmup >= 0, --batch-size >= 1")
        checkpoint_every(args.activation_checkpointing)  # an unknown mode is one line now, not after a model is built
        if args.json is not None:  # outputs checked now, not after minutes of timing
            check_writable(args.json, what="--json", is_dir=False)
        if args.sweep:
            check_writable(args.results_dir, what="--results-dir", is_dir=True)
            check_writable(args.img_dir, what="--img-dir", is_dir=True)
        if args.threads:
            torch.set_num_threads(args.threads)
        device = resolve_device(args.device)
        dtype = DTYPES[args.dtype]
        cfg = config_from_args(args)
        peak, peak_src = peak_flops(device, dtype, args.peak_flops)
        if device.type == "cpu" and args.peak_flops is None:
            # best of many: on a shared machine a short probe can land in a busy moment and make MFU read > 100%
            from llm.hardware import measure_cpu_matmul_flops

            peak = max(peak, measure_cpu_matmul_flops(1024, 25))
            peak_src += f", best of 30 probes with {torch.get_num_threads()} thread(s)"
        info = machine_info(device)
        print(f"# {info}  dtype={args.dtype} compile={args.compile} peak={peak / 1e12:.3f} TFLOP/s ({peak_src})")
        if args.sweep:
            if args.impl != "fast":
                raise ValueError("--sweep measures the fast model only; drop --impl")
            if args.sweep_sizes is None:
                args.sweep_sizes = ",".join(MODEL_PRESETS) if device.type == "cuda" else "demo,tiny,tinystories,small"
            if args.max_seconds is None:
                args.max_seconds = 600.0 if device.type == "cuda" else 60.0
            data = sweep(args, device, dtype, peak, peak_src)
            data["argv"] = " ".join(argv if argv is not None else sys.argv[1:])
            data["plot_phase"] = "step" if "step" in args.phases else args.phases[-1]
            tag = f"sweep_{device.type}" + ("" if args.dtype == "float32" else f"_{args.dtype}") + ("_compile" if args.compile else "")
            md = sweep_markdown(data)
            atomic_write_text(args.results_dir / f"{tag}.md", md)
            atomic_write_json(args.results_dir / f"{tag}.json", data)
            print(md)
            print(f"wrote {args.results_dir / (tag + '.md')} and .json; " + sweep_plot(data, args.img_dir / f"{tag}.png"))
            return 0
        params = cfg.num_params()
        print(f"# model: {args.preset} {cfg.to_dict()}  params {params / 1e6:.2f}M  batch {args.batch_size} x {cfg.context_length} tokens")
        result = run_once(cfg, args, device, dtype, peak, args.preset)
        result.update(machine=info, dtype=args.dtype, compile=args.compile, peak_flops=peak, peak_source=peak_src)
        if "loss_check" in result:
            print("# same weights, same batch: loss " + ", ".join(f"{k} {v:.6f}" for k, v in result["loss_check"].items()))
        print(format_run(result))
        if "memory" in result:
            cpu = device.type == "cpu"
            print("\n| impl/phase | peak memory above start |" + (" peak RSS above start |\n|---|---:|---:|" if cpu else "\n|---|---:|"))
            for k, v in result["memory"].items():
                print(f"| {k} | {fmt_bytes(v['peak_bytes'])} |" + (f" {fmt_bytes(v['peak_rss_bytes'])} |" if cpu else "") + (f" snapshot {v['snapshot']}" if v["snapshot"] else ""))
            print("(CUDA: allocator peak. CPU: exact peak of tensors allocated inside one call, tracked per op; "
                  "RSS is coarse: the allocator keeps freed pages)")
        if args.json:
            atomic_write_json(args.json, result)
        return 0
    except (ValueError, ImportError, OSError) as e:  # OSError: a results file that cannot be written
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

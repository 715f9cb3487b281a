"""LoRA against full fine-tuning and the base model, measured in one process, interleaved, medians.

    uv run python kernel/benchmarking_lora.py                    # demo preset, CPU, rank 8, all projections
    uv run python kernel/benchmarking_lora.py --targets q,v --rank 16 --out kernel/results/lora_qv.md
    uv run python kernel/benchmarking_lora.py --device cuda --preset small

Random weights (speed does not depend on what the model learnt). Reports:
- trainable parameters with the chosen rank and targets, as a fraction of the model, for every preset
  (counted on the meta device: no memory, no time),
- one training step (forward + backward + AdamW step) of the LoRA model vs full fine-tuning of the same
  model, each timed alternately in the same loop; the ratio is the median of the per-iteration ratios,
- decode tokens/s (batch 1, KV cache, greedy) of the base model, the LoRA model merged (merge_lora), and
  unmerged (the general path), alternating repeats.
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

from kernel.bench_utils import autocast, interleaved_times, paired_speed_ratio, resolve_device, sync
from llm.cli import Parser
from llm.config import MODEL_PRESETS, model_preset
from llm.decoding import iter_tokens
from llm.fileio import write_text
from llm.lora import LoraConfig, apply_lora, merge_lora
from llm.optim import AdamW
from llm.sampling import SamplingConfig
from llm.transformer import Transformer

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "lora_cpu.md"


def trainable_fractions(config: LoraConfig) -> list[tuple[str, int, int]]:
    """(preset, trainable, total parameters) with `config` applied, for every preset, on the meta device."""
    rows = []
    for name, cfg in MODEL_PRESETS.items():
        model = Transformer.from_config(cfg, device="meta")
        trainable = sum(p.numel() for p in apply_lora(model, config))
        rows.append((name, trainable, sum(p.numel() for p in model.parameters())))
    return rows


def _train_step(model: Transformer, opt: AdamW, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> None:
    opt.zero_grad(set_to_none=True)
    with autocast(device, torch.bfloat16 if device.type == "cuda" else torch.float32):
        loss = model.loss(x, y)
    loss.backward()
    opt.step()


def step_times(cfg, config: LoraConfig, args, device: torch.device) -> dict[str, list[float]]:
    """Seconds per training step of the LoRA model and of full fine-tuning, interleaved."""
    full = Transformer.from_config(cfg, device=device).train()
    lora = Transformer.from_config(cfg, device=device).train()
    lora.load_state_dict(full.state_dict())
    opts = {"full": AdamW(full.parameters(), lr=1e-4), "lora": AdamW(apply_lora(lora, config), lr=1e-4)}
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device)
    y = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device)
    models = {"full": full, "lora": lora}
    fns = {k: (lambda k=k: _train_step(models[k], opts[k], x, y, device)) for k in models}
    return interleaved_times(fns, device, args.warmup, args.steps)


def _decode_seconds(model: Transformer, prompt: list[int], n: int, device: torch.device) -> float:
    """Seconds for the n - 1 tokens after the first (the prefill is left out): decode only."""
    toks = iter_tokens(model, [prompt], SamplingConfig(temperature=0.0), max_new_tokens=n)
    next(toks)
    sync(device)
    t0 = time.perf_counter()
    for _ in toks:
        pass
    sync(device)
    return time.perf_counter() - t0


def decode_rates(cfg, config: LoraConfig, args, device: torch.device) -> dict[str, float]:
    """Median decode tokens/s of the base, the merged LoRA and the unmerged LoRA model, repeats alternating."""
    base = Transformer.from_config(cfg, device=device).eval()
    models = {"base": base}
    for kind in ("merged", "unmerged"):
        m = Transformer.from_config(cfg, device=device)
        m.load_state_dict(base.state_dict())
        apply_lora(m, config)
        with torch.no_grad():  # a trained adapter: B is no longer zero
            for p in m.parameters():
                if p.requires_grad:
                    p.normal_(0.0, 0.02)
        if kind == "merged":
            merge_lora(m)
        models[kind] = m.eval()
    prompt = torch.randint(0, cfg.vocab_size, (min(16, cfg.context_length // 2),), generator=torch.Generator().manual_seed(2)).tolist()
    n = min(args.new_tokens, cfg.context_length - len(prompt))
    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(args.repeats + 1):  # the first round warms up
        for k in models if r % 2 else list(models)[::-1]:
            t = _decode_seconds(models[k], prompt, n, device)
            if r:
                times[k].append(t)
    return {k: (n - 1) / statistics.median(v) for k, v in times.items()}


def report(args, config: LoraConfig, fractions, steps, rates, device: torch.device) -> str:
    """The results as Markdown."""
    lines = [f"# LoRA benchmark: {args.preset}, {device}, {torch.get_num_threads()} threads", "",
             f"`uv run python kernel/benchmarking_lora.py {' '.join(args.argv)}`".replace(" `", "`"), "",
             f"LoRA rank {config.rank}, alpha {config.alpha:g}, targets {', '.join(config.targets)}.", "",
             "## Trainable parameters (target <= 3%)", "", "| preset | trainable | total | fraction |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {t:,} | {tot:,} | {100 * t / tot:.2f}% |" for n, t, tot in fractions]
    med = {k: statistics.median(v) for k, v in steps.items()}
    ratio = 1.0 / paired_speed_ratio(steps["lora"], steps["full"])  # median of t_lora / t_full
    lines += ["", f"## Training step (batch {args.batch_size} x {args.seq_len} tokens, AdamW; target <= 0.8x)", "",
              "| run | median step | tokens/s |", "|---|---:|---:|"]
    lines += [f"| {k} | {1e3 * v:.1f} ms | {args.batch_size * args.seq_len / v:,.0f} |" for k, v in med.items()]
    lines += ["", f"LoRA step / full fine-tuning step: **{ratio:.2f}x** (median of {args.steps} interleaved pairs)"]
    lines += ["", f"## Decode (batch 1, KV cache, greedy, {args.new_tokens} new tokens, median of {args.repeats})", "",
              "| model | tokens/s | vs base |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:,.1f} | {v / rates['base']:.2f}x |" for k, v in rates.items()]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="demo", choices=list(MODEL_PRESETS))
    p.add_argument("--rank", type=int, default=LoraConfig.rank)
    p.add_argument("--alpha", type=float, default=LoraConfig.alpha)
    p.add_argument("--targets", default=",".join(LoraConfig().targets), help="projections or aliases, e.g. q,v")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed training steps of each model")
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3, help="decode repeats of each model")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; 1 on a busy machine)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="Markdown report (default kernel/results/lora_cpu.md)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if min(args.batch_size, args.seq_len, args.steps, args.repeats, args.rank) < 1 or args.new_tokens < 2:
        p.error("--batch-size, --seq-len, --steps, --repeats, --rank >= 1 and --new-tokens >= 2 please")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = LoraConfig(rank=args.rank, alpha=args.alpha, targets=args.targets)
        device = resolve_device(args.device)
        cfg = model_preset(args.preset)
        if args.seq_len > cfg.context_length:
            raise ValueError(f"--seq-len {args.seq_len} exceeds the context length {cfg.context_length}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fractions = trainable_fractions(config)
    print(f"training steps: {args.warmup} + {args.steps} of each model ...", file=sys.stderr, flush=True)
    steps = step_times(cfg, config, args, device)
    print(f"decoding: {args.repeats} + 1 repeats of 3 models ...", file=sys.stderr, flush=True)
    rates = decode_rates(cfg, config, args, device)
    text = report(args, config, fractions, steps, rates, device)
    print(text, end="")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

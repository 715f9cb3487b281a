"""Quantized inference (#16): linear-weight bytes, checkpoint size, batch-1 KV-cache decode speed and
(with --checkpoint) perplexity, fp32 against int8 (each kernel: compiled, chunked, and aten's
_weight_int8pack_mm where present) and int4, measured interleaved in one run.

    uv run python kernel/benchmarking_quant.py --presets tinystories small --tokens 32 --steps 5
    uv run python kernel/benchmarking_quant.py --presets --checkpoint runs/demo --max-tokens 20000
    uv run python kernel/benchmarking_quant.py --presets tinystories small --matmul   # per GEMV shape

Decode speed uses random weights (speed does not depend on them); perplexity needs a trained checkpoint
(its recorded validation split). --matmul times one batch-1 product per merged decode-step shape (W_qkv, W_o,
W_13, W_2): fp32 as the decode step runs it (torch.mm with the (in out) copy) against each int8 kernel,
cycling through copies of MATMUL_BYTES per variant so that the weights come from DRAM as in a real step.
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel.bench_utils import interleaved_times, paired_speed_ratio  # noqa: E402
from llm import quant  # noqa: E402
from llm.checkpoint import load_model, read_checkpoint  # noqa: E402
from llm.config import MODEL_PRESETS  # noqa: E402
from llm.evaluate import evaluate_tokens, load_tokens  # noqa: E402
from llm.fast import decode_step as ds  # noqa: E402
from llm.transformer import Transformer  # noqa: E402

CPU = torch.device("cpu")
MATMUL_BYTES = 96 << 20  # weights cycled through per variant in --matmul: three times this CPU's 32 MiB L3


def variants(model: Transformer) -> dict[str, Transformer]:
    """fp32, int8 (aten kernel where present, and chunked), int4 group 64: copies of one model."""
    out = {"fp32": model, "int8": quant.quantize_model(copy.deepcopy(model), 8)}
    out["int4-g64"] = quant.quantize_model(copy.deepcopy(model), 4, 64)
    return out


def state_bytes(model: Transformer) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def decoder(model: Transformer, tokens: int):
    """A call that decodes `tokens` tokens at batch 1 through the KV-cache decode step. The step's merged
    weights are built on the first call and handed to every later call's fresh cache: building them (for
    fp32 a transposed copy of every matrix) happens once per generation, not per token, and would otherwise
    dominate a short timed run."""
    kept = {}

    def run() -> None:
        cache = model.new_kv_cache(1, tokens + 1)
        cache.decode_weights = kept.get("w")
        with torch.inference_mode():
            w = kept["w"] = ds.weights(model, cache)
            logits = model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)[:, -1]
            for _ in range(tokens):
                logits = ds.decode_step(w, logits.argmax(-1), cache)
    return run


def bench_preset(name: str, tokens: int, steps: int) -> None:
    torch.manual_seed(0)
    models = variants(Transformer.from_config(MODEL_PRESETS[name]).eval())
    fp_bytes = quant.linear_weight_bytes(models["fp32"])
    fns = {k: decoder(m, tokens) for k, m in models.items()}
    for kernel in quant.INT8_KERNELS:  # the same int8 model through each kernel ("int8": the default)
        if kernel != quant.INT8_KERNEL and (kernel != "aten" or quant.HAS_INT8PACK):
            fns[f"int8-{kernel}"] = _with_kernel(fns["int8"], kernel, quant.quant_matmul)
    times = interleaved_times(fns, CPU, warmup=1, steps=steps)
    print(f"\n{name}: {sum(p.numel() for p in models['fp32'].parameters()):,} fp32 parameters, "
          f"batch-1 decode of {tokens} tokens, {steps} interleaved runs, {torch.get_num_threads()} threads")
    print(f"{'variant':<14}{'lin bytes':>12}{'ratio':>8}{'state':>12}{'tok/s':>9}{'speed vs fp32':>15}")
    for k, t in times.items():
        m = models[k.split("-")[0] if k.startswith("int8") else k]
        lb = quant.linear_weight_bytes(m)
        print(f"{k:<14}{lb:>12,}{lb / fp_bytes:>8.3f}{state_bytes(m):>12,}{tokens / np.median(t):>9.1f}"
              f"{paired_speed_ratio(t, times['fp32']):>14.2f}x")


def _with_kernel(run, kernel: str, default):
    """`run` with quant_matmul's int8 kernel forced to `kernel` (the decode step calls it by name)."""
    def forced() -> None:
        ds.quant_matmul = lambda x, w: default(x, w, kernel)
        try:
            run()
        finally:
            ds.quant_matmul = default
    return forced


def bench_matmul(name: str, steps: int, calls: int = 20) -> None:
    """Microseconds per batch-1 product on the merged decode-step shapes, every kernel interleaved."""
    c = MODEL_PRESETS[name]
    heads = c.num_kv_heads or c.num_heads
    kv = 2 * heads * (c.d_model // c.num_heads)
    shapes = {"W_qkv": (c.d_model + kv, c.d_model), "W_o": (c.d_model, c.d_model),
              "W_13": (2 * c.d_ff, c.d_model), "W_2": (c.d_model, c.d_ff)}
    kernels = [k for k in quant.INT8_KERNELS if k != "aten" or quant.HAS_INT8PACK]
    print(f"\n{name}: µs per batch-1 product (median of {steps} interleaved runs of {calls} calls), "
          f"{torch.get_num_threads()} threads")
    print(f"{'shape':<8}{'out x in':>12}{'fp32 mm':>10}" + "".join(f"{k:>10}" for k in kernels)
          + "".join(f"{'x ' + k:>12}" for k in kernels))
    for label, (o, i) in shapes.items():
        torch.manual_seed(0)
        fp = [torch.randn(i, o) for _ in range(max(2, MATMUL_BYTES // (4 * o * i)))]  # (in out), as decoded
        qs = [quant.quantize(torch.randn(o, i), 8) for _ in range(max(2, MATMUL_BYTES // (o * i)))]
        x = torch.randn(1, i)
        fns = {"fp32": _cycle(lambda w: torch.mm(x, w), fp, calls)}
        fns.update({k: _cycle(lambda w, k=k: quant.quant_matmul(x, w, k), qs, calls) for k in kernels})
        with torch.inference_mode():
            med = {k: float(np.median(t)) / calls * 1e6 for k, t in interleaved_times(fns, CPU, 1, steps).items()}
        print(f"{label:<8}{f'{o}x{i}':>12}{med['fp32']:>10.0f}" + "".join(f"{med[k]:>10.0f}" for k in kernels)
              + "".join(f"{med['fp32'] / med[k]:>11.2f}x" for k in kernels))


def _cycle(fn, weights: list, calls: int):
    """`calls` calls of fn, each on the next of `weights` (round robin across calls of the result)."""
    state = {"i": 0}

    def run() -> None:
        for _ in range(calls):
            state["i"] = (state["i"] + 1) % len(weights)
            fn(weights[state["i"]])
    return run


def bench_perplexity(checkpoint: str, max_tokens: int) -> None:
    ppl = {}
    for q in (None, "int8", "int4"):
        model, tok, path = load_model(checkpoint, device="cpu", quantize=q)
        data = (read_checkpoint(path).get("train_config") or {}).get("val_data")
        found = [c for c in (Path(data), *(p / data for p in path.parents)) if c.is_file()]
        tokens = load_tokens(str(found[0]), tok, model.config.vocab_size, max_tokens)
        ppl[q or "fp32"] = evaluate_tokens(model, tokens)["perplexity"]
    print(f"\nperplexity on {len(tokens):,} validation tokens of {path}:")
    for k, v in ppl.items():
        print(f"  {k:<6}{v:10.4f}  {v / ppl['fp32']:.4f}x fp32")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="*", default=["tinystories", "small"])
    p.add_argument("--tokens", type=int, default=32, help="tokens decoded per timed run")
    p.add_argument("--steps", type=int, default=5, help="interleaved timed runs per variant")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--matmul", action="store_true", help="time single products per shape instead of decoding")
    p.add_argument("--checkpoint", default=None, help="trained checkpoint: also compare perplexity")
    p.add_argument("--max-tokens", type=int, default=None, help="validation tokens for perplexity")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, _weight_int8pack_mm {'present' if quant.HAS_INT8PACK else 'absent'}, "
          f"default int8 kernel {quant.INT8_KERNEL!r}, load average {os.getloadavg()[0]:.2f}")
    for name in args.presets:
        if args.matmul:
            bench_matmul(name, args.steps)
        else:
            bench_preset(name, args.tokens, args.steps)
    if args.checkpoint:
        bench_perplexity(args.checkpoint, args.max_tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

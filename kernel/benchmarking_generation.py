"""KV-cache decoding vs full recomputation, measured in one process, interleaved, median of repeats.

    uv run python kernel/benchmarking_generation.py                     # demo model, CPU, 512 new tokens
    uv run python kernel/benchmarking_generation.py --context-length 1024   # same shape, no window slides
    uv run python kernel/benchmarking_generation.py --device cuda --json out.json

Random weights (speed does not depend on what the model learnt). Reports:
- prefill tokens/s: the prompt in one forward pass into a fresh cache (batch 1),
- decode tokens/s, batch 1: new tokens after the first, with the KV cache (llm.fast.decode_step's one-token step)
  and with full recomputation (the whole window through Transformer.forward every step), and their ratio;
  both through llm.decoding.iter_tokens, so both sample alike and run under inference mode,
- batch-8 throughput with the cache (8 rows x new tokens / time).
With the `demo` preset's 256-token context, 64 + 512 tokens outgrow the window: both paths slide it the same
way (llm.decoding keeps the last 3/4 and re-prefills), and the cached timings include those re-prefills.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from llm.config import model_preset
from llm.decoding import iter_tokens, last_logits
from llm.sampling import SamplingConfig
from llm.transformer import Transformer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_generation(model, prompts, n_new: int, *, use_cache: bool, device: torch.device) -> tuple[float, float]:
    """(seconds to the first new token, seconds for the remaining n_new - 1) for one generation call."""
    cfg = SamplingConfig(temperature=1.0, top_k=50)
    gen = torch.Generator(device=device).manual_seed(0)
    _sync(device)
    t0 = time.perf_counter()
    t_first = None
    for i, _ in enumerate(iter_tokens(model, prompts, cfg, max_new_tokens=n_new, generator=gen, use_cache=use_cache)):
        if i == 0:
            _sync(device)
            t_first = time.perf_counter()
    _sync(device)
    return t_first - t0, time.perf_counter() - t_first


@torch.no_grad()
def time_prefill(model, prompt: torch.Tensor, device: torch.device) -> float:
    cache = model.new_kv_cache(prompt.shape[0])
    _sync(device)
    t0 = time.perf_counter()
    last_logits(model, prompt, None, cache)  # what generation runs: last position's logits only
    _sync(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--context-length", type=int, default=None, help="override the preset's context length")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="batch size of the throughput run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--skip-full", action="store_true", help="skip full recomputation (slow on CPU)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    try:
        cfg = model_preset(args.preset)
        if args.context_length:
            cfg.context_length = args.context_length
        if args.prompt_len < 1 or args.new_tokens < 2 or args.repeats < 1 or args.batch < 1:
            raise ValueError("--prompt-len >= 1, --new-tokens >= 2, --repeats >= 1 and --batch >= 1 please")
        if args.prompt_len > cfg.context_length:
            raise ValueError(f"--prompt-len {args.prompt_len} exceeds the context length {cfg.context_length}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Transformer.from_config(cfg, device=device).eval()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=g)
    prompts1 = prompt.tolist()
    prompts_b = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt_len), generator=g).tolist()
    n = args.new_tokens
    slides = max(0, args.prompt_len + n - 1 - cfg.context_length) > 0
    print(f"{args.preset} shape: d_model {cfg.d_model}, {cfg.num_layers} layers, {cfg.num_heads} heads, vocab "
          f"{cfg.vocab_size}, context {cfg.context_length}; {cfg.num_params() / 1e6:.1f}M params; {device}, "
          f"{torch.get_num_threads()} threads; prompt {args.prompt_len}, {n} new tokens"
          + ("; window slides (3/4 kept)" if slides else ""), file=sys.stderr, flush=True)

    # warm-up (first-call imports, allocator)
    time_generation(model, prompts1, 4, use_cache=True, device=device)
    time_generation(model, prompts1, 4, use_cache=False, device=device)
    res: dict[str, list[float]] = {"prefill_s": [], "cache_first_s": [], "cache_decode_s": [], "full_decode_s": [],
                                   "batch_decode_s": [], "batch_first_s": []}
    for r in range(args.repeats):
        t0 = time.perf_counter()
        res["prefill_s"].append(time_prefill(model, prompt.to(device), device))
        first, decode = time_generation(model, prompts1, n, use_cache=True, device=device)
        res["cache_first_s"].append(first)
        res["cache_decode_s"].append(decode)
        if not args.skip_full:
            res["full_decode_s"].append(time_generation(model, prompts1, n, use_cache=False, device=device)[1])
        first, decode = time_generation(model, prompts_b, n, use_cache=True, device=device)
        res["batch_first_s"].append(first)
        res["batch_decode_s"].append(decode)
        print(f"repeat {r + 1}/{args.repeats}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)

    med = {k: statistics.median(v) for k, v in res.items() if v}
    out = {
        "preset": args.preset, "context_length": cfg.context_length, "prompt_len": args.prompt_len, "new_tokens": n,
        "device": str(device), "threads": torch.get_num_threads(), "repeats": args.repeats,
        "prefill_tokens_per_s": args.prompt_len / med["prefill_s"],
        "cache_decode_tokens_per_s": (n - 1) / med["cache_decode_s"],
        "cache_total_tokens_per_s": n / (med["cache_first_s"] + med["cache_decode_s"]),
        f"batch{args.batch}_decode_tokens_per_s": args.batch * (n - 1) / med["batch_decode_s"],
        f"batch{args.batch}_total_tokens_per_s": args.batch * n / (med["batch_first_s"] + med["batch_decode_s"]),
    }
    if "full_decode_s" in med:
        out["full_decode_tokens_per_s"] = (n - 1) / med["full_decode_s"]
        out["cache_vs_full_speedup"] = med["full_decode_s"] / med["cache_decode_s"]
    print(f"prefill (batch 1, {args.prompt_len} tokens):   {out['prefill_tokens_per_s']:10,.0f} tokens/s")
    print(f"decode, KV cache (batch 1):       {out['cache_decode_tokens_per_s']:10,.1f} tokens/s")
    if "full_decode_s" in med:
        print(f"decode, full recompute (batch 1): {out['full_decode_tokens_per_s']:10,.1f} tokens/s")
        print(f"KV-cache speed-up:                {out['cache_vs_full_speedup']:10.1f}x")
    print(f"decode, KV cache (batch {args.batch}):       {out[f'batch{args.batch}_decode_tokens_per_s']:10,.1f} tokens/s "
          f"({out[f'batch{args.batch}_decode_tokens_per_s'] / out['cache_decode_tokens_per_s']:.1f}x batch 1)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

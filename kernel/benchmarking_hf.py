"""Our generation and perplexity against Hugging Face transformers on the same exported weights.

    uv run kernel/benchmarking_hf.py                      # demo + tinystories shapes, CPU fp32, 1 thread
    uv run kernel/benchmarking_hf.py --shapes demo --repeats 3 --threads 2 --out /tmp/hf.md

For each shape our checkpoint (runs/demo's weights for the demo shape when that run exists, random weights
otherwise: decode speed does not depend on what a model learnt) is exported with llm.export and loaded by
`transformers.AutoModelForCausalLM` from that directory. Then, in one process:

- batch-1 KV-cache decode, greedy, NEW_TOKENS new tokens after a PROMPT-token prompt, never stopping at
  <|endoftext|> (--ignore-eos semantics): ours through llm.decoding.iter_tokens (what `llm.generating`
  runs), theirs through `model.generate(do_sample=False)` with its default dynamic KV cache. The two run
  alternately (order flipping each repeat); the decode time is from the first new token to the last, so
  tokens/s = (NEW_TOKENS - 1) / time; medians over the repeats and the median of the paired ratios.
  Whether both produced the same greedy tokens is reported too (random weights can hold near-ties).
- perplexity on the same tokens (data/demo/val.npy with runs/demo's weights, else seeded random ids),
  disjoint windows of the context length: ours with llm.evaluate.evaluate_tokens, theirs as transformers' own loss
  (`model(ids, labels=...)`) summed over the same windows. They must agree within 1e-4 relative.

The context is set to PROMPT + NEW_TOKENS (16 + 256 by default) so that no window slides in either
(transformers does not slide one); the weights do not depend on it. Results: a markdown table in kernel/results/hf_cpu.md.
transformers is a development dependency: without it this script says so in one line.
"""

from __future__ import annotations

import argparse
import importlib
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from kernel.bench_utils import REPO, Eta, atomic_write_text, machine_info, paired_speed_ratio, progress
from llm.checkpoint import read_checkpoint, resolve_checkpoint, save_checkpoint
from llm.config import ModelConfig, model_preset
from llm.decoding import iter_tokens
from llm.evaluate import evaluate_tokens
from llm.export import export_checkpoint
from llm.sampling import SamplingConfig
from llm.transformer import Transformer

DEMO_RUN = REPO / "runs" / "demo"
DEMO_VAL = REPO / "data" / "demo" / "val.npy"
PPL_REL_TOL = 1e-4


class _Clock:
    """A transformers streamer that only notes when each batch of tokens arrives (the prompt comes first)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def ours_decode(model: Transformer, prompt: list[int], n: int) -> tuple[float, list[int]]:
    """(seconds from the first new token to the last, the n greedy tokens)."""
    out, t_first = [], 0.0
    for i, tok in enumerate(iter_tokens(model, [prompt], SamplingConfig(temperature=0.0), max_new_tokens=n)):
        out.append(int(tok[0]))
        if i == 0:
            t_first = time.perf_counter()
    return time.perf_counter() - t_first, out


def hf_decode(hf, prompt: list[int], n: int) -> tuple[float, list[int]]:
    """The same for transformers' generate (greedy, KV cache, no end-of-text stop)."""
    clock = _Clock()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        seq = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          pad_token_id=0, streamer=clock)  # the export has no eos_token_id: no early stop
    assert seq.shape[1] == len(prompt) + n and len(clock.times) == n + 1, "the prompt, then one call per token"
    return clock.times[-1] - clock.times[1], seq[0, len(prompt):].tolist()


def hf_perplexity(hf, tokens: np.ndarray, ctx: int) -> float:
    """exp(mean loss) from transformers' own loss over disjoint windows of ctx inputs (as evaluate_tokens
    with stride = ctx scores them: every token after the first exactly once)."""
    nll, n = 0.0, 0
    with torch.inference_mode():
        for begin in range(0, len(tokens) - 1, ctx):
            window = torch.from_numpy(np.asarray(tokens[begin : begin + ctx + 1], dtype=np.int64))[None]
            scored = window.shape[1] - 1
            loss = hf(window, labels=window).loss  # labels shifted inside: position t predicts t + 1
            nll += float(loss.double()) * scored
            n += scored
    return math.exp(nll / n)


def build_pair(shape: str, ctx: int, tf, tmp: Path) -> tuple[Transformer, object, str]:
    """(our model, transformers' model from our export, where the weights came from)."""
    cfg = model_preset(shape)
    source = "random"
    state = None
    if shape == "demo" and DEMO_RUN.is_dir():
        ckpt = read_checkpoint(resolve_checkpoint(DEMO_RUN))
        if ModelConfig.from_dict(dict(ckpt["model_config"])) == cfg:
            state, source = ckpt["model"], f"{resolve_checkpoint(DEMO_RUN).relative_to(REPO)}"
    cfg = ModelConfig(**{**cfg.to_dict(), "context_length": ctx})
    torch.manual_seed(0)
    model = Transformer.from_config(cfg).eval()
    if state is not None:
        model.load_state_dict(state)
    save_checkpoint(model, None, 0, tmp / f"{shape}.pt", extra={"model_config": cfg.to_dict()})
    out = export_checkpoint(tmp / f"{shape}.pt", tmp / f"{shape}-hf")
    hf = tf.AutoModelForCausalLM.from_pretrained(out, local_files_only=True, torch_dtype=torch.float32).eval()
    return model, hf, source


def bench_shape(shape: str, args, tf, tmp: Path, eta: Eta) -> dict:
    model, hf, source = build_pair(shape, args.prompt + args.new_tokens, tf, tmp)
    cfg = model.config
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    ours_decode(model, prompt, 8)  # warm-up: first-call work out of the timings
    hf_decode(hf, prompt, 8)
    times: dict[str, list[float]] = {"ours": [], "transformers": []}
    tokens: dict[str, list[int]] = {}
    for r in range(args.repeats):
        order = ("ours", "transformers") if r % 2 == 0 else ("transformers", "ours")
        for name in order:
            t, toks = (ours_decode(model, prompt, args.new_tokens) if name == "ours"
                       else hf_decode(hf, prompt, args.new_tokens))
            times[name].append(t)
            tokens[name] = toks
        progress(f"{shape}: repeat {r + 1}/{args.repeats}, ours {times['ours'][-1]:.2f}s, transformers "
                 f"{times['transformers'][-1]:.2f}s ({eta.tick()})")
    same = next((i for i, (a, b) in enumerate(zip(tokens["ours"], tokens["transformers"])) if a != b), args.new_tokens)
    real = source != "random" and DEMO_VAL.is_file()  # the demo run's weights: score its validation split
    data = np.load(DEMO_VAL, mmap_mode="r")[: args.ppl_tokens] if real else None
    if data is None:
        data = np.random.default_rng(2).integers(0, cfg.vocab_size, args.ppl_tokens)
    ours_ppl = evaluate_tokens(model, data, context_length=args.prompt + args.new_tokens,
                               stride=args.prompt + args.new_tokens)["perplexity"]
    hf_ppl = hf_perplexity(hf, data, args.prompt + args.new_tokens)
    progress(f"{shape}: perplexity ours {ours_ppl:.6f}, transformers {hf_ppl:.6f} ({eta.tick()})")
    n = args.new_tokens - 1
    return {
        "shape": shape, "weights": source, "params_m": cfg.num_params() / 1e6,
        "ours_tok_s": n / statistics.median(times["ours"]), "hf_tok_s": n / statistics.median(times["transformers"]),
        "ratio": paired_speed_ratio(times["ours"], times["transformers"]), "same_tokens": same,
        "ours_ppl": ours_ppl, "hf_ppl": hf_ppl, "ppl_rel": abs(ours_ppl - hf_ppl) / hf_ppl,
        "ppl_tokens": len(data) - 1, "ppl_data": "data/demo/val.npy" if real else "random ids",
    }


def report(rows: list[dict], args, tf) -> str:
    info = machine_info(torch.device("cpu"))
    lines = [
        f"# Decode and perplexity, ours vs transformers {tf.__version__}: {info.get('cpu', 'CPU')}, "
        f"{torch.get_num_threads()} thread(s)", "",
        f"torch {torch.__version__}, fp32, batch 1, greedy, prompt {args.prompt} + {args.new_tokens} new tokens "
        f"(no stop at end of text), {args.repeats} interleaved repeats, medians; ratio = median of paired "
        "t(transformers) / t(ours) (> 1: ours faster).",
        f"Command: `{' '.join(['uv run kernel/benchmarking_hf.py', *args.argv])}`", "",
        "| shape | weights | params | ours decode tok/s | transformers tok/s | ratio | same greedy tokens "
        "| ppl ours | ppl transformers | rel. diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['weights']} | {r['params_m']:.1f}M | {r['ours_tok_s']:,.1f} | {r['hf_tok_s']:,.1f} "
            f"| **{r['ratio']:.2f}x** | {r['same_tokens']}/{args.new_tokens} | {r['ours_ppl']:.6g} | {r['hf_ppl']:.6g} "
            f"| {r['ppl_rel']:.1e} |")
    lines += ["", f"Perplexity over {rows[0]['ppl_tokens']} scored tokens ({', '.join(sorted({r['ppl_data'] for r in rows}))}), "
              f"disjoint windows of {args.prompt + args.new_tokens}; agreement target: relative difference "
              f"< {PPL_REL_TOL:g}. Decode target: ratio >= 1.5."]
    if args.note:
        lines += ["", args.note]
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="demo,tinystories", help="comma-separated model presets")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens (random ids)")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ppl-tokens", type=int, default=8192, help="tokens the perplexity is computed on")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    p.add_argument("--note", default=None, help="a closing note for the results file (the machine's state)")
    p.add_argument("--out", default=str(REPO / "kernel" / "results" / "hf_cpu.md"), help="markdown results file")
    args = p.parse_args(argv)
    given = list(sys.argv[1:] if argv is None else argv)
    args.argv = [a for i, a in enumerate(given)  # the command as run, less the note
                 if not a.startswith("--note") and not (i and given[i - 1] == "--note")]
    if args.prompt < 1 or args.new_tokens < 2 or args.repeats < 1 or args.ppl_tokens < 2:
        p.error("--prompt >= 1, --new-tokens >= 2, --repeats >= 1 and --ppl-tokens >= 2 please")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        tf = importlib.import_module("transformers")
    except ImportError:
        print("error: transformers is not installed; it is a development dependency: run `uv sync` (dev group "
              "included by default) to compare against it", file=sys.stderr)
        return 2
    tf.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    shapes = [s for s in args.shapes.split(",") if s]
    try:
        for s in shapes:
            model_preset(s)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    eta = Eta(len(shapes) * (args.repeats + 1))
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench_shape(s, args, tf, Path(tmp), eta) for s in shapes]
    text = report(rows, args, tf)
    print(text)
    atomic_write_text(Path(args.out), text)
    bad = [r["shape"] for r in rows if not r["ppl_rel"] < PPL_REL_TOL]
    if bad:
        print(f"error: perplexities disagree beyond {PPL_REL_TOL:g} relative for {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

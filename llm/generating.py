"""Generate text from a trained checkpoint: the command line (`python -m llm.generating`, `python -m llm generate`).

    uv run -m llm.generating                                  # a story from runs/demo, "Once upon a time"
    uv run -m llm.generating --checkpoint runs/demo --prompt "Once upon a time" --temperature 0.8 --top-p 0.9
    uv run -m llm.generating --checkpoint runs/demo --interactive

The decoding itself (KV cache, samplers, beam search, streaming text) is llm.decoding, the REPL llm.repl,
loading a checkpoint llm.checkpoint.load_model; their public names are importable from here as well.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from llm.checkpoint import checkpoint_or_default_run, load_model
from llm.cli import Parser, add_device, add_quantize, add_tokenizer_dir
from llm.decoding import (
    GenerationOptions,
    TextStream,
    beam_generate,
    beam_texts,
    generate,
    generate_batch,
    iter_tokens,
    stream,
)
from llm.hardware import THREADS_HELP, device_from_name, model_device, set_threads
from llm.quant import prepare_decode
from llm.repl import repl
from llm.sampling import SamplingConfig

__all__ = ["GenerationOptions", "TextStream", "beam_generate", "beam_texts", "generate", "generate_batch",
           "iter_tokens", "load_model", "main", "repl", "stream"]

DEFAULT_PROMPT = "Once upon a time"


def build_parser() -> Parser:
    p = Parser(prog="python -m llm.generating", description="Generate text from a trained checkpoint.")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint file, or a run directory (uses best.pt / newest step); default: the default "
                   "training run, runs/demo")
    p.add_argument("--prompt", default=None, help=f"text to continue (default {DEFAULT_PROMPT!r})")
    add_tokenizer_dir(p, "tokenizer directory (default: the one recorded in the checkpoint)")
    add_sampling_flags(p)
    p.add_argument("--num-samples", type=int, default=1, help="completions generated together in one batch")
    add_device(p)
    add_quantize(p)
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--interactive", action="store_true", help="REPL: type prompts, /temp /topk /topp /reset /quit")
    return p


def add_sampling_flags(p: Parser) -> None:
    """The length and sampler flags, read back by options_from_args (llm.chat takes the same)."""
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--stop", action="append", default=[], help="stop when this string appears (repeatable)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="go on past <|endoftext|> to --max-new-tokens (long samples, decode benchmarks)")
    p.add_argument("--min-new-tokens", type=int, default=0, help="<|endoftext|> cannot end the text before this")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--num-beams", type=int, default=1, help="> 1: beam search (deterministic)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam score = log p / length ** this")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole window every step (for comparison)")


class SlideNote:
    """on_slide for the CLI: one note on stderr the first time the context window slides."""

    def __init__(self, context_length: int) -> None:
        self.context_length, self.slides = context_length, 0

    def __call__(self, kept: int, dropped: int) -> None:
        if not self.slides:
            print(f"\n[note: context window of {self.context_length} tokens is full; sliding it, "
                  f"the model now sees only the last {kept} tokens]", file=sys.stderr, flush=True)
        self.slides += 1


def options_from_args(args) -> GenerationOptions:
    """The flags as one GenerationOptions (its on_slide is set once the model is loaded); ValueError for a
    bad value, named as its flag where the flag is the CLI's own."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    sampling = SamplingConfig(
        temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty, num_beams=args.num_beams, length_penalty=args.length_penalty,
    )
    if not 0 <= args.min_new_tokens <= args.max_new_tokens:
        raise ValueError(f"--min-new-tokens must be in [0, --max-new-tokens={args.max_new_tokens}], got {args.min_new_tokens}")
    return GenerationOptions(args.max_new_tokens, args.stop, args.seed, not args.no_cache, None, sampling,
                             ignore_eos=args.ignore_eos, min_new_tokens=args.min_new_tokens)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        opts = options_from_args(args)
        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
        prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
        if not args.interactive and not prompt:
            raise ValueError("empty prompt: pass --prompt TEXT (or --interactive)")
        set_threads(args.threads)
        device_from_name(args.device)  # an unusable device: one line before the checkpoint is read
        model, tokenizer, path = load_model(checkpoint_or_default_run(args.checkpoint), device=args.device,
                                            tokenizer_dir=args.tokenizer_dir, quantize=args.quantize)
        prepare_decode(model)
        ctx = model.config.context_length
        opts = opts.replace(on_slide=SlideNote(ctx))
        print(f"[{path}: {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"{'KV cache' if opts.use_cache else 'no cache'}, {model_device(model)}]", file=sys.stderr, flush=True)
        if args.interactive:
            return repl(model, tokenizer, opts)
        if opts.sampling.num_beams > 1 and len(tokenizer.encode(prompt)) + opts.max_new_tokens > ctx:
            print(f"[note: beam search stays inside the {ctx}-token context window: fewer than "
                  f"{opts.max_new_tokens} new tokens]", file=sys.stderr, flush=True)
        write_completions(model, tokenizer, prompt, opts, args.num_samples)
        return 0
    except (ValueError, OSError) as e:  # OSError: an unreadable checkpoint or tokenizer file
        print(f"error: {e}", file=sys.stderr)
        return 2


def write_completions(model, tokenizer, prompt: str, opts: GenerationOptions, num_samples: int) -> None:
    """One sample streams as it is produced; several are a batch (or the best beams), printed one by one."""
    if num_samples == 1:
        sys.stdout.write(prompt)
        sys.stdout.flush()
        try:
            for piece in stream(model, tokenizer, prompt, opts):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
    elif opts.sampling.num_beams > 1:  # several samples of a deterministic search: its best hypotheses
        outs = beam_texts(model, tokenizer, prompt, opts, num_return=num_samples)
        for i, out in enumerate(outs):
            print(f"--- beam {i + 1}/{len(outs)} ---\n{prompt}{out}")
    else:
        outs = generate_batch(model, tokenizer, [prompt] * num_samples, opts)
        for i, out in enumerate(outs):
            print(f"--- sample {i + 1}/{len(outs)} ---\n{prompt}{out}")


if __name__ == "__main__":
    raise SystemExit(main())

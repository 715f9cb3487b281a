"""Perplexity of a checkpoint on a token array or a text file, over the whole file.

    uv run -m llm.evaluate                                             # runs/demo on its validation split
    uv run -m llm.evaluate --checkpoint runs/demo                      # its validation split (train_config.val_data)
    uv run -m llm.evaluate --checkpoint runs/demo --data data/demo/val.npy --stride 128 --json
    uv run -m llm.evaluate --checkpoint runs/demo --data some.txt        # tokenised on the fly

Strided sliding window (as Hugging Face's perplexity guide): windows of `context_length` tokens start every
`stride` tokens; each window scores only the targets the previous window did not, so every token is scored
exactly once, with at least context_length - stride tokens of context (except near the start).
stride = context_length: disjoint windows (fastest, least context); stride = 1: every token sees a full window.

    mean loss = (1/N) sum_t -log p(x_t | x_<t within its window)    (nats per token)
    perplexity = exp(mean loss)
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from llm.checkpoint import checkpoint_or_default_run, load_model, read_checkpoint
from llm.cli import Parser, add_device, add_quantize, add_tokenizer_dir
from llm.data import open_tokens
from llm.hardware import THREADS_HELP, device_from_name, inference_autocast, model_device, set_threads

NPY_MAGIC = b"\x93NUMPY"  # the first bytes of every .npy file


def token_log_probs(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(target) per position: x_y - max x - log sum_j exp(x_j - max x); logits (... v), targets (...)."""
    logits = logits.float()
    m = logits.amax(dim=-1, keepdim=True)
    lse = (logits - m).exp().sum(dim=-1, keepdim=True).log() + m
    return (logits.gather(-1, targets[..., None].long()) - lse).squeeze(-1)


def windows(n_tokens: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored): the model reads tokens[begin:end] and scores the last n_scored of the
    targets tokens[begin+1:end+1]. Every target index 1..n_tokens-1 is scored exactly once."""
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score, got {n_tokens}")
    if not 1 <= stride <= context_length:
        raise ValueError(f"stride must be in [1, context_length={context_length}], got {stride}")
    out, prev_end, last = [], 0, n_tokens - 1  # inputs end at index last (its target is the final token)
    for begin in range(0, last, stride):
        end = min(begin + context_length, last)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == last:
            break
    return out


@torch.no_grad()
def evaluate_tokens(
    model: torch.nn.Module,
    tokens: np.ndarray | Tensor | Sequence[int],
    *,
    context_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """{"loss", "perplexity", "tokens" (scored), "windows", "context_length", "stride", "seconds", "tokens_per_s"}.
    context_length defaults to the model's, stride to context_length // 2 (None means the default; 0 is an error)."""
    model.eval()
    device = model_device(model)
    ctx = model.config.context_length if context_length is None else context_length
    if ctx > model.config.context_length or ctx < 1:
        raise ValueError(f"context_length must be in [1, {model.config.context_length}] (the model's), got {ctx}")
    stride = max(1, ctx // 2) if stride is None else stride
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    arr = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens.cpu() if isinstance(tokens, Tensor) else tokens)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(f"tokens must be a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
    wins = windows(len(arr), ctx, stride)
    total_scored = sum(w[2] for w in wins)
    vocab = model.config.vocab_size
    nll, scored, t0, last_print = 0.0, 0, time.perf_counter(), 0.0
    # windows of equal length share a batch (only the last one can be shorter)
    groups: list[list[tuple[int, int, int]]] = []
    for w in wins:
        if groups and len(groups[-1]) < batch_size and groups[-1][0][1] - groups[-1][0][0] == w[1] - w[0]:
            groups[-1].append(w)
        else:
            groups.append([w])
    for group in groups:
        x = torch.from_numpy(np.stack([np.asarray(arr[b : e + 1], dtype=np.int64) for b, e, _ in group])).to(device)
        if int(x.max()) >= vocab or int(x.min()) < 0:
            raise ValueError(f"token ids must be in [0, {vocab}) for this model, found {int(x.min())}..{int(x.max())}")
        with inference_autocast(device):
            logits = model(x[:, :-1])
        lp = token_log_probs(logits, x[:, 1:])  # (b L)
        length = lp.shape[1]
        keep = torch.arange(length, device=device)[None, :] >= torch.tensor(
            [length - n for _, _, n in group], device=device)[:, None]  # the last n of each window
        nll -= float(lp[keep].double().sum())
        scored += int(keep.sum())
        if progress:
            now = time.perf_counter()
            if now - last_print > 1.0 or scored == total_scored:
                last_print = now
                rate = scored / max(now - t0, 1e-9)
                eta = (total_scored - scored) / max(rate, 1e-9)
                print(f"\revaluating: {100 * scored / total_scored:5.1f}% ({scored:,}/{total_scored:,} tokens) "
                      f"{rate:,.0f} tok/s ETA {eta:.0f}s   ", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t0
    loss = nll / scored
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": scored, "windows": len(wins),
            "context_length": ctx, "stride": stride, "seconds": seconds, "tokens_per_s": scored / max(seconds, 1e-9)}


def load_tokens(path: str | Path, tokenizer, vocab_size: int, max_tokens: int | None = None) -> np.ndarray:
    """A .npy token array (memmapped, validated; recognised by its magic bytes whatever the file is called)
    or a UTF-8 text file tokenised with `tokenizer`. Anything else is a ValueError with one line: scoring
    binary data as if it were text gives a perplexity that means nothing."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"data file not found: {p}")
    if p.is_dir():
        raise ValueError(f"{p}: is a directory; pass a .npy token array or a text file (e.g. {p / 'val.npy'})")
    with open(p, "rb") as f:
        head = f.read(1 << 16)
    if p.suffix == ".npy" or head.startswith(NPY_MAGIC):
        arr = open_tokens(p, vocab_size)
        return arr[:max_tokens] if max_tokens else arr
    if b"\0" in head:
        raise ValueError(f"{p}: binary data, neither a .npy token array nor text (save raw token ids with np.save)")
    print(f"tokenising {p} ...", file=sys.stderr, flush=True)
    ids: list[int] = []
    try:
        with open(p, encoding="utf-8") as f:
            for tok in tokenizer.encode_iterable(f):
                ids.append(tok)
                if max_tokens and len(ids) >= max_tokens:
                    break
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 text ({e.reason}) and not a .npy token array") from None
    return np.asarray(ids, dtype=np.int64)


def main(argv: Sequence[str] | None = None) -> int:
    p = Parser(prog="python -m llm.evaluate", description="Perplexity of a checkpoint on a token file.")
    p.add_argument("--checkpoint", default=None, help="checkpoint file or run directory (default: runs/demo)")
    p.add_argument("--data", help=".npy token array or a text file (default: the run's validation split)")
    add_tokenizer_dir(p, "tokenizer directory (default: the checkpoint's)")
    p.add_argument("--context-length", type=int, default=None, help="window length (default: the model's)")
    p.add_argument("--stride", type=int, default=None, help="window step (default: context_length // 2)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    add_device(p)
    add_quantize(p)
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = p.parse_args(argv)
    try:
        set_threads(args.threads)
        device_from_name(args.device)  # an unusable device: one line before the checkpoint is read
        if args.max_tokens is not None and args.max_tokens < 2:
            raise ValueError(f"--max-tokens must be >= 2, got {args.max_tokens}")
        model, tokenizer, path = load_model(checkpoint_or_default_run(args.checkpoint), device=args.device,
                                            tokenizer_dir=args.tokenizer_dir, quantize=args.quantize)
        data = args.data
        if data is None:
            train_cfg = read_checkpoint(path).get("train_config") or {}
            data = train_cfg.get("val_data") if isinstance(train_cfg, dict) else None
            if not data:
                raise ValueError(f"{path} records no validation data; pass --data FILE")
            # recorded relative to the directory training ran in: look there too (above the run dir)
            found = [c for c in (Path(data), *(q / data for q in path.parents)) if c.is_file()]
            data = str(found[0]) if found else data
        tokens = load_tokens(data, tokenizer, model.config.vocab_size, args.max_tokens)
        result = evaluate_tokens(model, tokens, context_length=args.context_length, stride=args.stride,
                                 batch_size=args.batch_size, progress=True)
        result.update(checkpoint=str(path), data=str(data))
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{data}: loss {result['loss']:.4f} nats/token, perplexity {result['perplexity']:.2f} over "
                  f"{result['tokens']:,} tokens (window {result['context_length']}, stride {result['stride']}; "
                  f"{result['tokens_per_s']:,.0f} tokens/s)")
        return 0
    except (ValueError, OSError) as e:  # OSError: an unreadable file or directory
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

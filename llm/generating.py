"""Text generation: prefill the prompt once, then one token per step through a KV cache.

    uv run -m llm.generating --checkpoint runs/demo --prompt "Once upon a time" --temperature 0.8 --top-p 0.9
    uv run -m llm.generating --checkpoint runs/demo --interactive

Python API:
    generate(model, tokenizer, prompt, **sampling) -> str        the completion (prompt not included)
    stream(model, tokenizer, prompt, **sampling) -> Iterator[str] the same, piece by piece as it is produced
    generate_batch(model, tokenizer, prompts, **sampling) -> list[str]   left-padded batch, one result per prompt
    iter_tokens(model, prompt_ids, cfg, ...) -> Iterator[Tensor (b,)]    the token-level loop underneath
    beam_generate(model, prompt_ids, cfg, ...) -> list[Hypothesis]    beam_texts(...) -> list[str] (best first)

Sampling keywords (see llm.sampling.SamplingConfig): temperature (0 = greedy), top_k, top_p, min_p,
repetition_penalty, frequency_penalty, presence_penalty, num_beams, length_penalty; plus max_new_tokens,
stop (strings), seed, use_cache.

Context window: the model sees at most `context_length` tokens. When prompt + completion outgrow it, the
window slides: we keep the last 3/4 of the context and re-prefill the cache from there (RoPE positions
restart at 0 in the new window), so the slide costs one prefill every context_length/4 tokens instead of a
full recompute every step. The no-cache path slides the same way, so both see exactly the same tokens.
Beam search stays inside one window (its new tokens are capped at what fits).
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from llm.fast import decode_step
from llm.hardware import THREADS_HELP, set_threads
from llm.kv_cache import KVCache
from llm.sampling import Hypothesis, SamplingConfig, beam_search, sample_next, token_counts

EOT = "<|endoftext|>"
SAMPLING_KEYS = {f for f in SamplingConfig.__dataclass_fields__}


# --------------------------------------------------------------------------------------------- helpers


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _context_length(model: torch.nn.Module) -> int:
    cfg = getattr(model, "config", None)
    return int(cfg.context_length if cfg is not None else model.context_length)


def _vocab_size(model: torch.nn.Module) -> int:
    cfg = getattr(model, "config", None)
    return int(cfg.vocab_size if cfg is not None else model.vocab_size)


def _autocast(device: torch.device):
    """bf16 autocast on CUDA (as in training); plain fp32 on CPU where bf16 is slower."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _forward(model, ids: Tensor, mask: Tensor | None, cache, *, last_only: bool) -> Tensor:
    """Logits of the last position (b v) float32. `mask` (b, cached + new) marks real tokens; None = no padding.

    Runs under inference mode (cheaper per op than no_grad: no version counters, no view tracking), for the
    cached and the recomputing path alike; the logits come back as an ordinary tensor that callers may edit."""
    with torch.inference_mode():
        logits = _forward_inference(model, ids, mask, cache, last_only=last_only)
    return logits.clone()


def _forward_inference(model, ids: Tensor, mask: Tensor | None, cache, *, last_only: bool) -> Tensor:
    if last_only and mask is None and ids.shape[1] == 1 and isinstance(cache, KVCache):
        weights = decode_step.weights(model, cache)
        if weights is not None:  # a plain decode step: the lean one-token path (same function, far fewer ops)
            return decode_step.decode_step(weights, ids[:, 0], cache).float()
    positions = None
    if mask is not None:  # left padding: each row's first real token is position 0
        positions = (mask.long().cumsum(-1) - 1).clamp_(min=0)[:, -ids.shape[1] :]
    with _autocast(ids.device):
        if last_only and hasattr(model, "hidden") and hasattr(model, "lm_head"):
            # only the last position's logits are needed: skip lm_head for the rest of a prefill
            h = model.hidden(ids, token_positions=positions, kv_cache=cache, attention_mask=mask)
            return model.lm_head(h[:, -1]).float()
        logits = model(ids, token_positions=positions, kv_cache=cache, attention_mask=mask)
    return logits[:, -1].float() if last_only else logits.float()


def _new_cache(model, batch: int, max_len: int):
    if hasattr(model, "new_kv_cache"):
        return model.new_kv_cache(batch, max_len=max_len)
    raise ValueError("this model has no KV cache (model.new_kv_cache); use use_cache=False / --no-cache")


def _reorder_cache(cache, index: Tensor) -> None:
    """Beam search: row i of the new cache is row index[i] of the old one (KVCache keeps (L b h t d) buffers)."""
    if hasattr(cache, "reorder"):
        cache.reorder(index)
        return
    cache.k = cache.k.index_select(1, index)
    cache.v = cache.v.index_select(1, index)
    cache.batch = int(index.numel())


def window_keep(context_length: int) -> int:
    """Tokens kept when the window slides: 3/4 of the context (room for context_length/4 new tokens)."""
    return max(1, context_length - context_length // 4)


def _sampling_config(sampling: dict[str, Any]) -> SamplingConfig:
    unknown = set(sampling) - SAMPLING_KEYS
    if unknown:
        raise TypeError(f"unknown sampling options: {sorted(unknown)}; known: {sorted(SAMPLING_KEYS)}")
    return SamplingConfig(**sampling)


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


# --------------------------------------------------------------------------------------- the token loop


@torch.no_grad()
def iter_tokens(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    *,
    max_new_tokens: int,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    vocab_limit: int | None = None,
    on_slide: Callable[[int, int], None] | None = None,
    on_logits: Callable[[Tensor], None] | None = None,
) -> Iterator[Tensor]:
    """Yield the next token of every row, (b,) int64, `max_new_tokens` times (the caller stops early).

    Prompts of unequal length are left-padded: the batch shares one time axis, so row i's tokens sit at the
    right end and `attention_mask` hides the padding; positions count real tokens only, so each row sees
    exactly what it would see alone. `vocab_limit` forbids ids >= it (a model vocab padded past the
    tokenizer's). `on_slide(kept, dropped)` reports a window slide; `on_logits` sees each step's raw logits.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: give at least one token")
    model.eval()
    device = _device(model)
    ctx, vocab = _context_length(model), _vocab_size(model)
    b, longest = len(prompts), max(len(p) for p in prompts)
    total = longest + max_new_tokens
    seq = torch.zeros(b, total, dtype=torch.long, device=device)
    real = torch.zeros(b, total, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        seq[i, longest - len(p) : longest] = torch.as_tensor(list(p), dtype=torch.long)
        real[i, longest - len(p) : longest] = True
    if int(seq.max()) >= vocab or int(seq.min()) < 0:
        raise ValueError(f"prompt token ids must be in [0, {vocab})")
    padded = not bool(real[:, :longest].all())
    context_counts = token_counts(seq[:, :longest], vocab, real[:, :longest]) if cfg.repetition_penalty != 1.0 else None
    generated_counts = (
        torch.zeros(b, vocab, device=device) if (cfg.frequency_penalty != 0.0 or cfg.presence_penalty != 0.0) else None
    )
    ones = torch.ones(b, 1, device=device)
    cur, start = longest, 0  # tokens so far; first column the model sees
    cache, cache_start = None, -1
    keep = window_keep(ctx)
    for _ in range(max_new_tokens):
        if cur - start > ctx:
            start = cur - keep
            if on_slide is not None:
                on_slide(keep, start)
        mask = real[:, start:cur] if padded else None
        if not use_cache:
            logits = _forward(model, seq[:, start:cur], mask, None, last_only=True)
        elif cache is None or cache_start != start:  # prefill (first step, or after a slide)
            if cache is not None and hasattr(cache, "reset"):
                cache.reset()  # reuse the buffers: a slide only rewinds the write position
            else:
                cache = _new_cache(model, b, ctx)
            cache_start = start
            logits = _forward(model, seq[:, start:cur], mask, cache, last_only=True)
        else:  # decode: only the newest token goes through the model
            logits = _forward(model, seq[:, cur - 1 : cur], mask, cache, last_only=True)
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits[:, vocab_limit:] = float("-inf")
        if on_logits is not None:
            on_logits(logits)
        nxt = sample_next(logits, cfg, generator, context_counts, generated_counts)
        seq[:, cur], real[:, cur] = nxt, True
        cur += 1
        if context_counts is not None:
            context_counts.scatter_add_(1, nxt[:, None], ones)
        if generated_counts is not None:
            generated_counts.scatter_add_(1, nxt[:, None], ones)
        yield nxt


@torch.no_grad()
def beam_generate(
    model: torch.nn.Module,
    prompt: Sequence[int],
    cfg: SamplingConfig,
    *,
    max_new_tokens: int,
    eos_id: int | None = None,
    use_cache: bool = True,
    vocab_limit: int | None = None,
    num_return: int = 1,
    on_slide: Callable[[int, int], None] | None = None,
) -> list[Hypothesis]:
    """Beam search (llm.sampling.beam_search) over the model for one prompt. With the cache, the prompt is
    prefilled once and the cache rows follow their beams (reordered by parent each step)."""
    if len(prompt) == 0:
        raise ValueError("empty prompt: give at least one token")
    model.eval()
    device = _device(model)
    ctx = _context_length(model)
    prompt = list(prompt)
    if len(prompt) >= ctx:  # leave room for at least a quarter window of new tokens
        dropped = len(prompt) - window_keep(ctx)
        prompt = prompt[dropped:]
        if on_slide is not None:
            on_slide(len(prompt), dropped)
    max_new_tokens = min(max_new_tokens, ctx - len(prompt))
    state: dict[str, Any] = {}

    def limit(logits: Tensor) -> Tensor:
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits[:, vocab_limit:] = float("-inf")
        return logits

    def step(tokens: Tensor | None, parents: Tensor | None) -> Tensor:
        if tokens is None:
            state["seqs"] = torch.tensor([prompt], dtype=torch.long, device=device)
            state["cache"] = _new_cache(model, 1, ctx) if use_cache else None
            return limit(_forward(model, state["seqs"], None, state["cache"], last_only=True))
        parents, tokens = parents.to(device), tokens.to(device)
        state["seqs"] = torch.cat([state["seqs"][parents], tokens[:, None]], dim=1)
        if state["cache"] is None:
            return limit(_forward(model, state["seqs"], None, None, last_only=True))
        _reorder_cache(state["cache"], parents)
        return limit(_forward(model, tokens[:, None], None, state["cache"], last_only=True))

    return beam_search(
        step,
        num_beams=cfg.num_beams,
        max_new_tokens=max_new_tokens,
        eos_id=eos_id,
        length_penalty=cfg.length_penalty,
        num_return=num_return,
    )


# ------------------------------------------------------------------------------------------ text level


class TextStream:
    """Token ids -> printable text pieces.

    A BPE token is a byte string, and one UTF-8 character may be split across tokens, so bytes go through an
    incremental UTF-8 decoder that holds an incomplete character back until its last byte arrives. Text that
    might be the start of a stop string is held back too, so a stop string is never half-printed.
    """

    def __init__(self, token_bytes: Callable[[int], bytes], stop: Sequence[str] = ()) -> None:
        self.token_bytes = token_bytes
        self.stop = [s for s in stop if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything decoded so far (cut at a stop string)
        self.emitted = 0  # characters of self.text already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        self.text += self.decoder.decode(self.token_bytes(token_id))
        return self._release(final=False)

    def finish(self) -> str:
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        if self.stop and not self.stopped:
            lo = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [i for i in (self.text.find(s, lo) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[: min(hits)], True
        end = len(self.text)
        if not final and not self.stopped:  # hold back a tail that could still become a stop string
            hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            end -= hold
        out = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out


def token_bytes_fn(tokenizer) -> Callable[[int], bytes]:
    """id -> bytes of that token: the tokenizer's vocab when it exposes one (exact for split characters)."""
    vocab = getattr(tokenizer, "vocab", None)
    if isinstance(vocab, dict) and vocab and isinstance(next(iter(vocab.values())), bytes):
        return lambda i: vocab.get(i, b"")  # ids without bytes (holes) print nothing
    if hasattr(tokenizer, "decode_bytes"):
        return lambda i: tokenizer.decode_bytes([i])
    return lambda i: tokenizer.decode([i]).encode("utf-8")


def eos_id_of(tokenizer) -> int | None:
    try:
        return int(tokenizer.token_id(EOT))
    except (KeyError, ValueError, AttributeError):
        return None


def check_compatible(model: torch.nn.Module, tokenizer) -> int | None:
    """Raise if the tokenizer can produce ids the model does not know; return a vocab limit when the model's
    vocabulary is larger than the tokenizer's (padded): those extra ids must never be sampled."""
    n_tok, n_model = int(tokenizer.vocab_size), _vocab_size(model)
    if n_tok > n_model:
        raise ValueError(f"tokenizer has {n_tok} tokens but the model only {n_model}: they do not belong together")
    return n_tok if n_tok < n_model else None


def _encode_prompt(tokenizer, prompt: str) -> list[int]:
    if not isinstance(prompt, str) or prompt == "":
        raise ValueError("empty prompt: give some text to continue")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    return ids


@dataclass
class GenerationOptions:
    max_new_tokens: int = 256
    stop: Sequence[str] = ()
    seed: int | None = None
    use_cache: bool = True
    on_slide: Callable[[int, int], None] | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    @classmethod
    def from_kwargs(cls, max_new_tokens=256, stop=(), seed=None, use_cache=True, on_slide=None, **sampling):
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        stop = [stop] if isinstance(stop, str) else list(stop or ())
        return cls(max_new_tokens, stop, seed, use_cache, on_slide, _sampling_config(sampling))


def stream(model: torch.nn.Module, tokenizer, prompt: str, **kwargs) -> Iterator[str]:
    """Yield the completion of `prompt` piece by piece as tokens arrive; stops at <|endoftext|>, a stop
    string (not included) or max_new_tokens. Keywords: see the module docstring. Bad input raises here,
    before the first piece."""
    opts = GenerationOptions.from_kwargs(**kwargs)
    ids = _encode_prompt(tokenizer, prompt)
    limit = check_compatible(model, tokenizer)
    if opts.sampling.num_beams > 1:  # the search must finish before its best hypothesis is known
        return iter(beam_texts(model, tokenizer, prompt, **kwargs)[:1])
    return _stream(model, tokenizer, ids, opts, limit)


def _stream(model, tokenizer, ids: list[int], opts: GenerationOptions, limit: int | None) -> Iterator[str]:
    eos = eos_id_of(tokenizer)
    text = TextStream(token_bytes_fn(tokenizer), opts.stop)
    gen = _generator(opts.seed, _device(model))
    steps = iter_tokens(model, [ids], opts.sampling, max_new_tokens=opts.max_new_tokens, generator=gen,
                        use_cache=opts.use_cache, vocab_limit=limit, on_slide=opts.on_slide)
    try:
        for nxt in steps:
            tok = int(nxt[0])
            if tok == eos:
                break
            piece = text.push(tok)
            if piece:
                yield piece
            if text.stopped:
                break
        rest = text.finish()
        if rest:
            yield rest
    finally:
        steps.close()


def beam_texts(model: torch.nn.Module, tokenizer, prompt: str, *, num_return: int = 1, **kwargs) -> list[str]:
    """The best `num_return` beam-search completions of `prompt`, best first (needs num_beams > 1)."""
    opts = GenerationOptions.from_kwargs(**kwargs)
    ids = _encode_prompt(tokenizer, prompt)
    limit = check_compatible(model, tokenizer)
    eos = eos_id_of(tokenizer)
    hyps = beam_generate(model, ids, opts.sampling, max_new_tokens=opts.max_new_tokens, eos_id=eos,
                         use_cache=opts.use_cache, vocab_limit=limit, num_return=num_return, on_slide=opts.on_slide)
    outs = []
    for h in hyps:
        text = TextStream(token_bytes_fn(tokenizer), opts.stop)
        for t in h.tokens:
            if t == eos or text.stopped:
                break
            text.push(t)
        text.finish()
        outs.append(text.text)
    return outs


def generate(model: torch.nn.Module, tokenizer, prompt: str, **kwargs) -> str:
    """The completion of `prompt` as one string (see `stream`)."""
    return "".join(stream(model, tokenizer, prompt, **kwargs))


def generate_batch(model: torch.nn.Module, tokenizer, prompts: Sequence[str], **kwargs) -> list[str]:
    """Complete several prompts in one left-padded batch; result i equals generate(prompts[i]) (for greedy
    decoding exactly; sampled rows draw from one shared generator). With num_beams > 1 prompts run one by one."""
    opts = GenerationOptions.from_kwargs(**kwargs)
    if not prompts:
        raise ValueError("no prompts given")
    if opts.sampling.num_beams > 1:
        return [generate(model, tokenizer, p, **kwargs) for p in prompts]
    ids = [_encode_prompt(tokenizer, p) for p in prompts]
    limit = check_compatible(model, tokenizer)
    eos = eos_id_of(tokenizer)
    streams = [TextStream(token_bytes_fn(tokenizer), opts.stop) for _ in prompts]
    done = [False] * len(prompts)
    gen = _generator(opts.seed, _device(model))
    steps = iter_tokens(model, ids, opts.sampling, max_new_tokens=opts.max_new_tokens, generator=gen,
                        use_cache=opts.use_cache, vocab_limit=limit, on_slide=opts.on_slide)
    for nxt in steps:
        for i, tok in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if tok == eos:
                done[i] = True
            else:
                streams[i].push(tok)
                done[i] = streams[i].stopped
        if all(done):
            break
    steps.close()
    for s in streams:
        s.finish()
    return [s.text for s in streams]


# ------------------------------------------------------------------------------------------- loading


def load_model(checkpoint: str | Path, *, device: str | torch.device | None = None, tokenizer_dir: str | Path | None = None):
    """(model, tokenizer, checkpoint path) from a checkpoint file or a run directory; ValueError with one
    clear line for anything missing or inconsistent."""
    from llm.bpe_tokenizer import BpeTokenizer
    from llm.checkpoint import CheckpointError, read_checkpoint, resolve_checkpoint
    from llm.config import ModelConfig
    from llm.transformer import Transformer

    src = Path(checkpoint)
    if not src.exists():
        raise ValueError(f"checkpoint not found: {src}")
    try:
        path = Path(resolve_checkpoint(src))
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(str(e).splitlines()[0] if str(e) else f"no checkpoint in {src}") from None
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as e:  # already one line naming the file
        raise ValueError(str(e)) from None
    except Exception as e:  # a truncated/foreign file: torch raises many types
        raise ValueError(f"cannot read checkpoint {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"{path} is not a model checkpoint of this project (needs 'model' and 'model_config')")
    try:
        cfg = ModelConfig.from_dict(dict(ckpt["model_config"]))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: incompatible model_config: {e}") from None
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = Transformer.from_config(cfg, device=dev)
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise ValueError(f"{path}: weights do not match its model_config ({first})") from None
    model.eval()
    tok_dir = _find_tokenizer_dir(tokenizer_dir or ckpt.get("tokenizer_dir"), path)
    try:
        tokenizer = BpeTokenizer.load(tok_dir)
    except Exception as e:
        raise ValueError(f"cannot load tokenizer from {tok_dir}: {e}") from None
    check_compatible(model, tokenizer)
    return model, tokenizer, path


def _find_tokenizer_dir(given: str | Path | None, ckpt_path: Path) -> Path:
    if given is None:
        raise ValueError(f"{ckpt_path} records no tokenizer_dir; pass --tokenizer DIR")
    given = Path(given)
    # relative paths were written relative to the project root at training time; also try the run dir
    candidates = [given] if given.is_absolute() else [given, *(p / given for p in ckpt_path.parents)]
    for c in candidates:
        if (c / "vocab.json").exists():
            return c
    raise ValueError(f"tokenizer directory {given} not found (needs vocab.json + merges.txt); pass --tokenizer DIR")


# ---------------------------------------------------------------------------------------------- REPL

REPL_HELP = """commands: /temp X  /topk K (0 = off)  /topp P (1 = off)  /minp P (0 = off)  /max N  /settings
          /reset (forget the conversation)  /quit   — Ctrl-C stops the current generation"""


def repl(
    model: torch.nn.Module,
    tokenizer,
    options: GenerationOptions,
    *,
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
    history: bool = True,
) -> int:
    """Interactive loop: each line is a prompt (appended to the conversation so far when `history`), the
    completion streams back. Slash-commands change the sampler; Ctrl-C stops only the current generation."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    interactive = stdin is sys.stdin and stdin.isatty()
    conversation = ""
    cfg = options.sampling

    def say(msg: str = "", end: str = "\n") -> None:
        stdout.write(msg + end)
        stdout.flush()

    def read() -> str | None:
        if interactive:
            try:
                return input("> ")
            except EOFError:
                return None
        say("> ", end="")
        line = stdin.readline()
        return None if line == "" else line.rstrip("\n")

    say(REPL_HELP)
    while True:
        try:
            line = read()
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, like Python's REPL
            say()
            continue
        if line is None or line.strip() in ("/quit", "/exit"):
            say()
            return 0
        if not line.strip():
            continue
        if line.startswith("/"):
            cmd, _, arg = line.strip().partition(" ")
            try:
                if cmd == "/reset":
                    conversation = ""
                    say("(conversation cleared)")
                elif cmd == "/settings":
                    say(f"({_describe(cfg, options)})")
                elif cmd == "/help":
                    say(REPL_HELP)
                elif cmd in ("/temp", "/topk", "/topp", "/minp", "/max"):
                    cfg, options = _repl_set(cmd, arg, cfg, options)
                    say(f"({_describe(cfg, options)})")
                else:
                    say(f"error: unknown command {cmd}; /help lists them")
            except ValueError as e:
                say(f"error: {e}")
            continue
        prompt = conversation + line
        pieces: list[str] = []
        try:
            for piece in stream(model, tokenizer, prompt, max_new_tokens=options.max_new_tokens, stop=options.stop,
                                seed=options.seed, use_cache=options.use_cache, **_kwargs(cfg)):
                pieces.append(piece)
                stdout.write(piece)
                stdout.flush()
            say()
        except KeyboardInterrupt:
            say(" [stopped]")
        except ValueError as e:
            say(f"error: {e}")
            continue
        if history:
            conversation = prompt + "".join(pieces) + "\n"


def _kwargs(cfg: SamplingConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in SAMPLING_KEYS}


def _repl_set(cmd: str, arg: str, cfg: SamplingConfig, options: GenerationOptions):
    try:
        value = float(arg) if cmd in ("/temp", "/topp", "/minp") else int(arg)
    except ValueError:
        raise ValueError(f"{cmd} needs a number, got {arg!r}") from None
    if cmd == "/temp":
        return cfg.replace(temperature=value), options
    if cmd == "/topk":
        return cfg.replace(top_k=value or None), options
    if cmd == "/topp":
        return cfg.replace(top_p=None if value == 1.0 else value), options
    if cmd == "/minp":
        return cfg.replace(min_p=value or None), options
    if value < 1:
        raise ValueError(f"/max needs a positive integer, got {arg}")
    options.max_new_tokens = value
    return cfg, options


def _describe(cfg: SamplingConfig, options: GenerationOptions) -> str:
    mode = "greedy" if cfg.greedy else f"temperature {cfg.temperature:g}"
    parts = [mode, f"top-k {cfg.top_k or 'off'}", f"top-p {cfg.top_p or 'off'}", f"min-p {cfg.min_p or 'off'}",
             f"max {options.max_new_tokens} tokens"]
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llm.generating", description="Generate text from a trained checkpoint.")
    p.add_argument("--checkpoint", required=True, help="checkpoint file, or a run directory (uses best.pt / newest step)")
    p.add_argument("--prompt", help="text to continue (required unless --interactive)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the one recorded in the checkpoint)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--stop", action="append", default=[], help="stop when this string appears (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--num-samples", type=int, default=1, help="completions generated together in one batch")
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
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--interactive", action="store_true", help="REPL: type prompts, /temp /topk /topp /reset /quit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sampling = SamplingConfig(
            temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k, top_p=args.top_p,
            min_p=args.min_p, repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
            presence_penalty=args.presence_penalty, num_beams=args.num_beams, length_penalty=args.length_penalty,
        )
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
        if not args.interactive and not args.prompt:
            raise ValueError("empty prompt: pass --prompt TEXT (or --interactive)")
        set_threads(args.threads)
        model, tokenizer, path = load_model(args.checkpoint, device=args.device, tokenizer_dir=args.tokenizer)
        slid = []

        def on_slide(kept: int, dropped: int) -> None:
            if not slid:
                print(f"\n[note: context window of {_context_length(model)} tokens is full; sliding it, "
                      f"the model now sees only the last {kept} tokens]", file=sys.stderr, flush=True)
            slid.append(dropped)

        opts = GenerationOptions(args.max_new_tokens, args.stop, args.seed, not args.no_cache, on_slide, sampling)
        print(f"[{path}: {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"{'KV cache' if opts.use_cache else 'no cache'}, {_device(model)}]", file=sys.stderr, flush=True)
        if args.interactive:
            return repl(model, tokenizer, opts)
        ctx = _context_length(model)
        if sampling.num_beams > 1 and len(tokenizer.encode(args.prompt)) + args.max_new_tokens > ctx:
            print(f"[note: beam search stays inside the {ctx}-token context window: fewer than "
                  f"{args.max_new_tokens} new tokens]", file=sys.stderr, flush=True)
        kwargs = dict(max_new_tokens=opts.max_new_tokens, stop=opts.stop, seed=opts.seed, use_cache=opts.use_cache,
                      on_slide=on_slide, **_kwargs(sampling))
        if args.num_samples == 1:
            sys.stdout.write(args.prompt)
            sys.stdout.flush()
            try:
                for piece in stream(model, tokenizer, args.prompt, **kwargs):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            except KeyboardInterrupt:
                sys.stdout.write(" [stopped]")
            sys.stdout.write("\n")
        elif sampling.num_beams > 1:  # several samples of a deterministic search: its best hypotheses
            outs = beam_texts(model, tokenizer, args.prompt, num_return=args.num_samples, **kwargs)
            for i, out in enumerate(outs):
                print(f"--- beam {i + 1}/{len(outs)} ---\n{args.prompt}{out}")
        else:
            outs = generate_batch(model, tokenizer, [args.prompt] * args.num_samples, **kwargs)
            for i, out in enumerate(outs):
                print(f"--- sample {i + 1}/{len(outs)} ---\n{args.prompt}{out}")
        return 0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

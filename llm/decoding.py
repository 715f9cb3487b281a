"""Text generation: prefill the prompt once, then one token per step through a KV cache.

Python API:
    generate(model, tokenizer, prompt, options) -> str        the completion (prompt not included)
    stream(model, tokenizer, prompt, options) -> Iterator[str] the same, piece by piece as it is produced
    stream_ids(model, tokenizer, ids, options, end_ids) -> Iterator[str]  from token ids (a chat template's)
    generate_batch(model, tokenizer, prompts, options) -> list[str]   left-padded batch, one result per prompt
    beam_texts(model, tokenizer, prompt, options, num_return=N) -> list[str]   beam search, best first
    iter_tokens(model, prompt_ids, sampling, ...) -> Iterator[Tensor (b,)]     the token-level loop underneath
    beam_generate(model, prompt_ids, sampling, ...) -> list[Hypothesis]

`options` is one GenerationOptions: max_new_tokens, stop (strings), seed, use_cache, on_slide and `sampling`,
a llm.sampling.SamplingConfig (temperature (0 = greedy), top_k, top_p, min_p, repetition_penalty,
frequency_penalty, presence_penalty, num_beams, length_penalty). Instead of `options`, the text-level
functions take those settings as keywords too: generate(model, tok, "Once", max_new_tokens=50, top_k=20).

Context window: the model sees at most `context_length` tokens. When prompt + completion outgrow it, the
window slides: we keep the last 3/4 of the context and re-prefill the cache from there (RoPE positions
restart at 0 in the new window), so the slide costs one prefill every context_length/4 tokens instead of a
full recompute every step. The no-cache path slides the same way, so both see exactly the same tokens.
Beam search stays inside one window (its new tokens are capped at what fits).
"""

from __future__ import annotations

import codecs
import dataclasses
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from llm.fast import decode_step
from llm.bpe import EOT
from llm.hardware import inference_autocast, model_device
from llm.kv_cache import KVCache
from llm.sampling import Hypothesis, SamplingConfig, beam_search, sample_next, token_counts
from llm.transformer import Transformer

SAMPLING_KEYS = frozenset(f.name for f in dataclasses.fields(SamplingConfig))


# ------------------------------------------------------------------------------------------- settings


@dataclass
class GenerationOptions:
    """Everything one generation call is told, from the CLI or the REPL down to the token loop."""

    max_new_tokens: int = 256
    stop: Sequence[str] = ()  # stop when one of these strings appears (it is not included)
    seed: int | None = None  # seed of the sampler's generator (None: torch's global one)
    use_cache: bool = True  # False: recompute the whole window every step (for comparison)
    on_slide: Callable[[int, int], None] | None = None  # on_slide(kept, dropped) when the window slides
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    ignore_eos: bool = False  # go on past <|endoftext|> (it is printed) up to max_new_tokens
    min_new_tokens: int = 0  # <|endoftext|> cannot be sampled before this many new tokens

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {n!r}")
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        m = self.min_new_tokens
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= n:
            raise ValueError(f"min_new_tokens must be an integer in [0, max_new_tokens={n}], got {m!r}")
        if (self.ignore_eos or m) and self.sampling.num_beams > 1:
            raise ValueError("--ignore-eos / --min-new-tokens are for sampling and greedy decoding, not beam search")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> GenerationOptions:
        """Keywords of this class and of SamplingConfig, flat: max_new_tokens=50, top_k=20, ..."""
        sampling = {k: kwargs.pop(k) for k in list(kwargs) if k in SAMPLING_KEYS}
        unknown = set(kwargs) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown sampling options: {sorted(unknown)}; known: {sorted(SAMPLING_KEYS)}")
        return cls(**kwargs, sampling=SamplingConfig(**sampling))

    def replace(self, **changes: Any) -> GenerationOptions:
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """One line for the REPL: the sampler and the length."""
        cfg = self.sampling
        mode = "greedy" if cfg.greedy else f"temperature {cfg.temperature:g}"
        return ", ".join([mode, f"top-k {cfg.top_k or 'off'}", f"top-p {cfg.top_p or 'off'}",
                          f"min-p {cfg.min_p or 'off'}", f"max {self.max_new_tokens} tokens"])


def options_of(options: GenerationOptions | None, kwargs: dict[str, Any]) -> GenerationOptions:
    """The options of a text-level call: the object given, or one made of the keywords (not both)."""
    if options is None:
        return GenerationOptions.from_kwargs(**kwargs)
    if kwargs:
        raise TypeError(f"give GenerationOptions or keywords, not both (got {sorted(kwargs)} besides options)")
    return options


# ------------------------------------------------------------------------------------------ one forward


def last_logits(model: torch.nn.Module, ids: Tensor, mask: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
    """Logits of the last position (b v) float32. `mask` (b, cached + new) marks real tokens; None = no padding.

    Runs under inference mode (cheaper per op than no_grad: no version counters, no view tracking), for the
    cached and the recomputing path alike; the logits come back as an ordinary tensor that callers may edit."""
    with torch.inference_mode():
        logits = _last_logits_inference(model, ids, mask, cache)
    return logits.clone()


def _last_logits_inference(model: torch.nn.Module, ids: Tensor, mask: Tensor | None, cache: KVCache | None) -> Tensor:
    if mask is None and ids.shape[1] == 1 and isinstance(cache, KVCache):
        weights = decode_step.weights(model, cache)
        if weights is not None:  # a plain decode step: the lean one-token path (same function, far fewer ops)
            return decode_step.decode_step(weights, ids[:, 0], cache).float()
    positions = None
    if mask is not None:  # left padding: each row's first real token is position 0
        positions = (mask.long().cumsum(-1) - 1).clamp_(min=0)[:, -ids.shape[1] :]
    with inference_autocast(ids.device):
        if isinstance(model, Transformer):  # only the last position's logits: skip lm_head for the rest
            h = model.hidden(ids, token_positions=positions, kv_cache=cache, attention_mask=mask)
            return model.lm_head(h[:, -1]).float()
        logits = model(ids, token_positions=positions, kv_cache=cache, attention_mask=mask)
    return logits[:, -1].float()


def window_keep(context_length: int) -> int:
    """Tokens kept when the window slides: 3/4 of the context (room for context_length/4 new tokens)."""
    return max(1, context_length - context_length // 4)


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


def _limit_vocab(logits: Tensor, vocab_limit: int | None) -> Tensor:
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits[:, vocab_limit:] = float("-inf")
    return logits


# --------------------------------------------------------------------------------------- the token loop


def _left_pad(prompts: Sequence[Sequence[int]], total: int, vocab: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(tokens, real) (b total): each prompt at the right end of its first max-length columns."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: give at least one token")
    longest = max(len(p) for p in prompts)
    seq = torch.zeros(len(prompts), total, dtype=torch.long, device=device)
    real = torch.zeros(len(prompts), total, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        seq[i, longest - len(p) : longest] = torch.as_tensor(list(p), dtype=torch.long)
        real[i, longest - len(p) : longest] = True
    if int(seq.max()) >= vocab or int(seq.min()) < 0:
        raise ValueError(f"prompt token ids must be in [0, {vocab})")
    return seq, real


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
    eos_id: int | None = None,
    min_new_tokens: int = 0,
) -> Iterator[Tensor]:
    """Yield the next token of every row, (b,) int64, `max_new_tokens` times (the caller stops early).

    Prompts of unequal length are left-padded: the batch shares one time axis, so row i's tokens sit at the
    right end and `attention_mask` hides the padding; positions count real tokens only, so each row sees
    exactly what it would see alone. `vocab_limit` forbids ids >= it (a model vocab padded past the
    tokenizer's). `on_slide(kept, dropped)` reports a window slide; `on_logits` sees each step's raw logits.
    `eos_id` cannot be sampled in the first `min_new_tokens` steps (its logit is set to −inf).
    """
    model.eval()
    device = model_device(model)
    ctx, vocab = model.config.context_length, model.config.vocab_size
    longest = max((len(p) for p in prompts), default=0)
    seq, real = _left_pad(prompts, longest + max_new_tokens, vocab, device)
    b = seq.shape[0]
    padded = not bool(real[:, :longest].all())
    context_counts = token_counts(seq[:, :longest], vocab, real[:, :longest]) if cfg.repetition_penalty != 1.0 else None
    generated_counts = (
        torch.zeros(b, vocab, device=device) if (cfg.frequency_penalty != 0.0 or cfg.presence_penalty != 0.0) else None
    )
    ones = torch.ones(b, 1, device=device)
    cur, start = longest, 0  # tokens so far; first column the model sees
    cache, cache_start = None, -1
    keep = window_keep(ctx)
    for step in range(max_new_tokens):
        if cur - start > ctx:
            start = cur - keep
            if on_slide is not None:
                on_slide(keep, start)
        mask = real[:, start:cur] if padded else None
        if not use_cache:
            logits = last_logits(model, seq[:, start:cur], mask)
        elif cache is None or cache_start != start:  # prefill (first step, or after a slide)
            if cache is None:
                cache = model.new_kv_cache(b, max_len=ctx)
            else:
                cache.reset()  # reuse the buffers: a slide only rewinds the write position
            cache_start = start
            logits = last_logits(model, seq[:, start:cur], mask, cache)
        else:  # decode: only the newest token goes through the model
            logits = last_logits(model, seq[:, cur - 1 : cur], mask, cache)
        _limit_vocab(logits, vocab_limit)
        if eos_id is not None and step < min_new_tokens:
            logits[:, eos_id] = float("-inf")
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


class _BeamModel:
    """The `step` of llm.sampling.beam_search over the model: the first call prefills the prompt, each later
    one appends every beam's new token; with a cache, its rows follow their beams (reordered by parent)."""

    def __init__(self, model: torch.nn.Module, prompt: list[int], use_cache: bool, vocab_limit: int | None) -> None:
        self.model, self.prompt, self.use_cache, self.vocab_limit = model, prompt, use_cache, vocab_limit
        self.device = model_device(model)
        self.seqs: Tensor | None = None
        self.cache: KVCache | None = None

    def __call__(self, tokens: Tensor | None, parents: Tensor | None) -> Tensor:
        if tokens is None or parents is None or self.seqs is None:  # the first call: the prompt alone
            self.seqs = torch.tensor([self.prompt], dtype=torch.long, device=self.device)
            if self.use_cache:
                self.cache = self.model.new_kv_cache(1, max_len=self.model.config.context_length)
            return _limit_vocab(last_logits(self.model, self.seqs, None, self.cache), self.vocab_limit)
        parents, tokens = parents.to(self.device), tokens.to(self.device)
        self.seqs = torch.cat([self.seqs[parents], tokens[:, None]], dim=1)
        if self.cache is None:
            return _limit_vocab(last_logits(self.model, self.seqs), self.vocab_limit)
        self.cache.reorder(parents)
        return _limit_vocab(last_logits(self.model, tokens[:, None], None, self.cache), self.vocab_limit)


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
    ctx = model.config.context_length
    prompt = list(prompt)
    if len(prompt) >= ctx:  # leave room for at least a quarter window of new tokens
        dropped = len(prompt) - window_keep(ctx)
        prompt = prompt[dropped:]
        if on_slide is not None:
            on_slide(len(prompt), dropped)
    return beam_search(
        _BeamModel(model, prompt, use_cache, vocab_limit),
        num_beams=cfg.num_beams,
        max_new_tokens=min(max_new_tokens, ctx - len(prompt)),
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
    """id -> bytes of that token, from the tokenizer's vocab (exact for characters split across tokens);
    ids without bytes (holes in the vocabulary) print nothing."""
    return lambda i: tokenizer.vocab.get(i, b"")


def eos_id_of(tokenizer) -> int | None:
    """The id of the end-of-text token, where the tokenizer has one (generation stops at it)."""
    try:
        return int(tokenizer.token_id(EOT))
    except ValueError:
        return None


def check_compatible(model: torch.nn.Module, tokenizer) -> int | None:
    """Raise if the tokenizer can produce ids the model does not know; return a vocab limit when the model's
    vocabulary is larger than the tokenizer's (padded): those extra ids must never be sampled."""
    n_tok, n_model = int(tokenizer.vocab_size), model.config.vocab_size
    if n_tok > n_model:
        raise ValueError(f"tokenizer has {n_tok} tokens but the model only {n_model}: they do not belong together")
    return n_tok if n_tok < n_model else None


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    if not isinstance(prompt, str) or prompt == "":
        raise ValueError("empty prompt: give some text to continue")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    return ids


def stream(model: torch.nn.Module, tokenizer, prompt: str, options: GenerationOptions | None = None,
           **kwargs: Any) -> Iterator[str]:
    """Yield the completion of `prompt` piece by piece as tokens arrive; stops at <|endoftext|>, a stop
    string (not included) or max_new_tokens. Bad input raises here, before the first piece."""
    opts = options_of(options, kwargs)
    ids = encode_prompt(tokenizer, prompt)
    limit = check_compatible(model, tokenizer)
    if opts.sampling.num_beams > 1:  # the search must finish before its best hypothesis is known
        return iter(beam_texts(model, tokenizer, prompt, opts)[:1])
    if (opts.ignore_eos or opts.min_new_tokens) and eos_id_of(tokenizer) is None:
        raise ValueError("--ignore-eos / --min-new-tokens need a tokenizer with <|endoftext|>")
    return _stream(model, tokenizer, ids, opts, limit)


def stream_ids(model: torch.nn.Module, tokenizer, ids: Sequence[int], options: GenerationOptions,
               end_ids: Sequence[int] = ()) -> Iterator[str]:
    """Like `stream`, for a prompt given as token ids (a chat template's), ending also at any of `end_ids`
    (the template's end of turn first: --min-new-tokens forbids it instead of <|endoftext|>). Beam search
    yields its best hypothesis at once."""
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    limit = check_compatible(model, tokenizer)
    end_ids = tuple(end_ids)
    if options.sampling.num_beams > 1:
        ends = {eos_id_of(tokenizer), *end_ids} - {None}
        (best,) = beam_generate(model, list(ids), options.sampling, max_new_tokens=options.max_new_tokens,
                                eos_id=end_ids[0] if end_ids else eos_id_of(tokenizer),
                                use_cache=options.use_cache, vocab_limit=limit, num_return=1, on_slide=options.on_slide)
        text = TextStream(token_bytes_fn(tokenizer), options.stop)
        pieces = [text.push(t) for t in itertools.takewhile(lambda t: t not in ends, best.tokens)]
        return iter(["".join(pieces) + text.finish()])
    return _stream(model, tokenizer, list(ids), options, limit, end_ids)


def _stream(model, tokenizer, ids: list[int], opts: GenerationOptions, limit: int | None,
            end_ids: tuple[int, ...] = ()) -> Iterator[str]:
    eos = eos_id_of(tokenizer)
    ends = {eos, *end_ids} - {None}
    text = TextStream(token_bytes_fn(tokenizer), opts.stop)
    gen = _generator(opts.seed, model_device(model))
    steps = iter_tokens(model, [ids], opts.sampling, max_new_tokens=opts.max_new_tokens, generator=gen,
                        use_cache=opts.use_cache, vocab_limit=limit, on_slide=opts.on_slide,
                        eos_id=end_ids[0] if end_ids else eos, min_new_tokens=opts.min_new_tokens)
    try:
        for nxt in steps:
            tok = int(nxt[0])
            if tok in ends and not opts.ignore_eos:
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


def beam_texts(model: torch.nn.Module, tokenizer, prompt: str, options: GenerationOptions | None = None, *,
               num_return: int = 1, **kwargs: Any) -> list[str]:
    """The best `num_return` beam-search completions of `prompt`, best first (needs num_beams > 1)."""
    opts = options_of(options, kwargs)
    ids = encode_prompt(tokenizer, prompt)
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


def generate(model: torch.nn.Module, tokenizer, prompt: str, options: GenerationOptions | None = None,
             **kwargs: Any) -> str:
    """The completion of `prompt` as one string (see `stream`)."""
    return "".join(stream(model, tokenizer, prompt, options, **kwargs))


def generate_batch(model: torch.nn.Module, tokenizer, prompts: Sequence[str], options: GenerationOptions | None = None,
                   **kwargs: Any) -> list[str]:
    """Complete several prompts in one left-padded batch; result i equals generate(prompts[i]) (for greedy
    decoding exactly; sampled rows draw from one shared generator). With num_beams > 1 prompts run one by one."""
    opts = options_of(options, kwargs)
    if not prompts:
        raise ValueError("no prompts given")
    if opts.sampling.num_beams > 1:
        return [generate(model, tokenizer, p, opts) for p in prompts]
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    limit = check_compatible(model, tokenizer)
    eos = eos_id_of(tokenizer)
    streams = [TextStream(token_bytes_fn(tokenizer), opts.stop) for _ in prompts]
    done = [False] * len(prompts)
    gen = _generator(opts.seed, model_device(model))
    steps = iter_tokens(model, ids, opts.sampling, max_new_tokens=opts.max_new_tokens, generator=gen,
                        use_cache=opts.use_cache, vocab_limit=limit, on_slide=opts.on_slide, eos_id=eos,
                        min_new_tokens=opts.min_new_tokens)
    for nxt in steps:
        for i, tok in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if tok == eos and not opts.ignore_eos:
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

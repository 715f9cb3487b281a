"""From next-token logits to the next token: logit processors, samplers and beam search.

Everything here works on the logits of the last position, shape (b v), under `torch.no_grad()`: nothing is
differentiated, so these are plain tensor functions (no autograd.Function needed).

A sampling step applies, in this order (the order Hugging Face's `generate` uses):

    logits ─ repetition penalty (CTRL) ─ frequency/presence penalties (OpenAI) ─ / temperature
           ─ top-k ─ top-p ─ min-p ─ softmax ─ draw one token (or argmax when temperature == 0)

Filters never change the surviving logits, they set the others to -inf, so they compose freely.
Beam search (`beam_search`) is separate: it keeps the `num_beams` most likely continuations instead of
drawing one, and is deterministic.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------- config


@dataclass
class SamplingConfig:
    """All knobs of one generation call; `validate()` turns nonsense into one clear ValueError."""

    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # nucleus: keep the smallest set whose probability mass reaches p
    min_p: float | None = None  # keep tokens with p >= min_p * p_max
    repetition_penalty: float = 1.0  # CTRL: >1 discourages any token already in the context
    frequency_penalty: float = 0.0  # OpenAI: subtract alpha_f * count of the token in the completion
    presence_penalty: float = 0.0  # OpenAI: subtract alpha_p once the token occurs in the completion
    num_beams: int = 1  # > 1: beam search (deterministic; the sampling options above are not used)
    length_penalty: float = 1.0  # beam score = sum log p / length ** length_penalty

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def finite(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            return float(v)

        if finite("temperature") < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer, got {self.top_k!r}")
        if self.top_p is not None and not (0.0 < finite("top_p") <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not (0.0 <= finite("min_p") <= 1.0):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if finite("repetition_penalty") <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        finite("frequency_penalty")
        finite("presence_penalty")
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ValueError(f"num_beams must be a positive integer, got {self.num_beams!r}")
        finite("length_penalty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def replace(self, **changes) -> "SamplingConfig":
        return SamplingConfig(**{**asdict(self), **changes})


# ------------------------------------------------------------------------------------------ primitives


def softmax(logits: Tensor, dim: int = -1) -> Tensor:
    """p_i = exp(x_i - max x) / sum_j exp(x_j - max x); subtracting the max keeps exp from overflowing.
    -inf logits get probability exactly 0 (as long as one logit is finite)."""
    x = logits - logits.amax(dim=dim, keepdim=True)
    e = x.exp()
    return e / e.sum(dim=dim, keepdim=True)


def log_softmax(logits: Tensor, dim: int = -1) -> Tensor:
    """log p_i = x_i - max x - log sum_j exp(x_j - max x)."""
    x = logits - logits.amax(dim=dim, keepdim=True)
    return x - x.exp().sum(dim=dim, keepdim=True).log()


def token_counts(token_ids: Tensor, vocab_size: int, mask: Tensor | None = None) -> Tensor:
    """counts (b v) float: how often each vocabulary id occurs in each row of token_ids (b t).
    `mask` (b t) bool leaves out padding (False = ignore)."""
    counts = torch.zeros(token_ids.shape[0], vocab_size, device=token_ids.device)
    ones = torch.ones_like(token_ids, dtype=counts.dtype) if mask is None else mask.to(counts.dtype)
    return counts.scatter_add_(1, token_ids.long(), ones)


# ------------------------------------------------------------------------------------------ processors


def apply_repetition_penalty(logits: Tensor, counts: Tensor, penalty: float) -> Tensor:
    """CTRL (Keskar et al. 2019), as implemented by Hugging Face: for every token already present
    (counts > 0), divide its logit by `penalty` if positive and multiply it if negative, so a penalty > 1
    always makes a seen token less likely."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(counts > 0, penalized, logits)


def apply_frequency_presence_penalty(logits: Tensor, counts: Tensor, frequency: float, presence: float) -> Tensor:
    """OpenAI's formula: mu_j <- mu_j - c_j * alpha_frequency - [c_j > 0] * alpha_presence, where c_j counts
    how often token j was generated so far."""
    if frequency == 0.0 and presence == 0.0:
        return logits
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """p ∝ exp(x / T): T < 1 sharpens, T > 1 flattens. T == 0 is greedy and handled by the caller."""
    return logits if temperature in (0.0, 1.0) else logits / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep exactly the k largest logits per row (ties broken by torch.topk), the rest -> -inf."""
    if k >= logits.shape[-1]:
        return logits
    idx = logits.topk(k, dim=-1).indices
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, True)
    return logits.masked_fill(~keep, NEG_INF)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus sampling (Holtzman et al. 2020): sort by probability and keep the shortest prefix whose mass
    reaches p, i.e. token i (in sorted order) survives iff the mass of the tokens before it is < p.
    The most likely token always survives."""
    if p >= 1.0:
        return logits
    probs, order = softmax(logits).sort(dim=-1, descending=True)
    mass_before = probs.cumsum(dim=-1) - probs
    remove_sorted = mass_before >= p
    remove = torch.zeros_like(remove_sorted).scatter_(-1, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """min-p (Nguyen et al. 2024): keep tokens with p_i >= min_p * max_j p_j; the cut scales with the model's
    confidence. In logit space: x_i >= max x + log(min_p)."""
    if min_p <= 0.0:
        return logits
    probs = softmax(logits)
    keep = probs >= min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(~keep, NEG_INF)


def _penalize(logits: Tensor, cfg: SamplingConfig, context_counts: Tensor | None, generated_counts: Tensor | None) -> Tensor:
    """The penalties of process_logits (float32 logits out)."""
    logits = logits.float()
    if cfg.repetition_penalty != 1.0 and context_counts is not None:
        logits = apply_repetition_penalty(logits, context_counts, cfg.repetition_penalty)
    if generated_counts is not None:
        logits = apply_frequency_presence_penalty(logits, generated_counts, cfg.frequency_penalty, cfg.presence_penalty)
    return logits


def process_logits(
    logits: Tensor,
    cfg: SamplingConfig,
    context_counts: Tensor | None = None,
    generated_counts: Tensor | None = None,
) -> Tensor:
    """Apply every configured processor to logits (b v) (float32). `context_counts` (b v): occurrences in
    prompt + completion (repetition penalty, as Hugging Face); `generated_counts` (b v): occurrences in the
    completion only (frequency/presence penalties, as OpenAI)."""
    logits = _penalize(logits, cfg, context_counts, generated_counts)
    if cfg.greedy:
        return logits  # filters cannot change the argmax
    logits = apply_temperature(logits, cfg.temperature)
    if cfg.top_k is not None:
        logits = top_k_filter(logits, cfg.top_k)
    if cfg.top_p is not None:
        logits = top_p_filter(logits, cfg.top_p)
    if cfg.min_p is not None:
        logits = min_p_filter(logits, cfg.min_p)
    return logits


# -------------------------------------------------------------------------------------------- samplers


def greedy(logits: Tensor) -> Tensor:
    """(b v) -> (b,) the most likely token (the first one on ties)."""
    return logits.argmax(dim=-1)


def sample_from_logits(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """(b v) -> (b,) one draw from softmax(logits) per row by inverting the CDF: u ~ U[0, total), pick the
    first i with cdf_i > u. Tokens with probability 0 (logit -inf) own an empty interval and are never drawn."""
    probs = softmax(logits.float())
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device, generator=generator) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    return idx.clamp_(max=logits.shape[-1] - 1)


def sample_top_k(logits: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """(b v) -> (b,): the token sample_from_logits(top_k_filter(logits, k)) draws (same generator state,
    same inverse CDF in vocabulary order; only a draw within float rounding of a CDF step could differ),
    computed on the k survivors instead of the whole vocabulary: a handful of ops on (b k) instead of a
    mask, a softmax and a cumsum over (b v)."""
    vals, idx = logits.topk(k, dim=-1)  # sorted: vals[:, :1] is the row max
    weights = (vals - vals[:, :1]).exp_()  # exp(x - max): unnormalised probabilities
    idx, order = idx.sort(dim=-1)  # back to vocabulary order, as the full-vocabulary CDF runs
    cdf = weights.gather(-1, order).cumsum_(-1)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device, generator=generator) * cdf[:, -1:]
    j = torch.searchsorted(cdf, u, right=True).clamp_(max=k - 1)
    return idx.gather(-1, j).squeeze_(-1)


def sample_next(
    logits: Tensor,
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
    context_counts: Tensor | None = None,
    generated_counts: Tensor | None = None,
) -> Tensor:
    """One sampling step: (b v) logits -> (b,) int64 next tokens."""
    if not cfg.greedy and cfg.top_p is None and cfg.min_p is None and cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        # top-k is the only filter: draw among the k survivors directly (the same token, fewer ops)
        scaled = apply_temperature(_penalize(logits, cfg, context_counts, generated_counts), cfg.temperature)
        return sample_top_k(scaled, cfg.top_k, generator)
    processed = process_logits(logits, cfg, context_counts, generated_counts)
    return greedy(processed) if cfg.greedy else sample_from_logits(processed, generator)


# ----------------------------------------------------------------------------------------- beam search


@dataclass(order=True)
class Hypothesis:
    """A finished beam. score = logprob / length ** length_penalty (what beams are ranked by)."""

    score: float
    logprob: float = field(compare=False)
    tokens: list[int] = field(compare=False)


# step(last_tokens, parents) -> logits (n v) of the next token for each of the n live beams.
# First call: (None, None) -> logits (1 v) after the prompt. Later: last_tokens (n,) are the tokens just
# appended and parents (n,) the index of the beam (in the previous call's rows) each row extends, so a
# KV cache can be reordered with cache[parents] before the new tokens go in.
BeamStep = Callable[[Tensor | None, Tensor | None], Tensor]


def beam_search(
    step: BeamStep,
    *,
    num_beams: int,
    max_new_tokens: int,
    eos_id: int | None = None,
    length_penalty: float = 1.0,
    num_return: int = 1,
) -> list[Hypothesis]:
    """Keep the `num_beams` most likely unfinished continuations; return the best `num_return` finished ones.

    At each step every live beam is extended by every token. Extending with `eos_id` finishes a hypothesis
    (length counts the eos); the best `num_beams` non-eos extensions live on. At `max_new_tokens` the live
    beams finish too. Ranking uses score = sum log p / length ** length_penalty (length = generated tokens).
    We stop early only when no live beam can beat the worst kept hypothesis any more: log p only decreases,
    so a live beam's best reachable score is max over L in {next length, max length} of logprob / L ** alpha.
    With num_beams >= (V - 1) ** (max_new_tokens - 1) nothing is ever pruned: this is exhaustive search.
    """
    if num_beams < 1 or max_new_tokens < 1 or num_return < 1:
        raise ValueError("num_beams, max_new_tokens and num_return must be >= 1")
    keep = max(num_beams, num_return)
    finished: list[Hypothesis] = []  # min-heap on score: finished[0] is the worst kept

    def add(h: Hypothesis) -> None:
        if len(finished) < keep:
            heapq.heappush(finished, h)
        elif h.score > finished[0].score:
            heapq.heapreplace(finished, h)

    logits = step(None, None)
    vocab = logits.shape[-1]
    beams: list[list[int]] = [[]]
    scores = torch.zeros(1, dtype=torch.float64)
    for t in range(max_new_tokens):
        length = t + 1
        norm = length**length_penalty
        cand = scores[:, None] + log_softmax(logits.double()).cpu()  # (n v) total log-prob of each extension
        if eos_id is not None:
            for i, s in enumerate(cand[:, eos_id].tolist()):
                if s > NEG_INF:
                    add(Hypothesis(s / norm, s, beams[i] + [eos_id]))
            cand[:, eos_id] = NEG_INF
        last = t == max_new_tokens - 1
        width = min(keep if last else num_beams, int(torch.isfinite(cand).sum()))
        if width == 0:
            break
        top = cand.flatten().topk(width)
        parents, tokens = top.indices // vocab, top.indices % vocab
        beams = [beams[p] + [tok] for p, tok in zip(parents.tolist(), tokens.tolist())]
        scores = top.values
        if last:
            for b, s in zip(beams, scores.tolist()):
                add(Hypothesis(s / norm, s, b))
            break
        if len(finished) >= keep:
            best_reachable = max(
                float(scores.max()) / (length + 1) ** length_penalty, float(scores.max()) / max_new_tokens**length_penalty
            )
            if best_reachable <= finished[0].score:
                break
        logits = step(tokens, parents)
    return sorted(finished, reverse=True)[:num_return]

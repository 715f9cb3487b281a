"""Each logit processor and sampler against a straightforward reference written here (python floats / float64,
torch built-ins); beam search against exhaustive enumeration."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from llm.sampling import (
    SamplingConfig,
    apply_frequency_presence_penalty,
    apply_repetition_penalty,
    beam_search,
    greedy,
    log_softmax,
    min_p_filter,
    process_logits,
    sample_from_logits,
    sample_next,
    softmax,
    token_counts,
    top_k_filter,
    top_p_filter,
)


def fixed_logits(b: int = 4, v: int = 40, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, v, generator=g) * 2.0


def probs_ref(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(x - m) for x in row]
    s = sum(e)
    return [x / s for x in e]


def kept(out: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(out)


def assert_filter(out: torch.Tensor, logits: torch.Tensor, keep_ref: torch.Tensor) -> None:
    assert torch.equal(kept(out), keep_ref), "kept set differs from the reference"
    assert torch.equal(out[keep_ref], logits[keep_ref]), "surviving logits must not change"


# --------------------------------------------------------------------------------------- primitives


def test_softmax_and_log_softmax_match_torch(ref_snapshot) -> None:
    x = fixed_logits()
    x[0, :5] = float("-inf")
    stored = ref_snapshot({"p": torch.softmax(x.double(), -1), "lp": torch.log_softmax(x.double(), -1)}, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(softmax(x).double(), stored["p"], rtol=1e-5, atol=1e-7)
    fin = torch.isfinite(stored["lp"])
    torch.testing.assert_close(log_softmax(x).double()[fin], stored["lp"][fin], rtol=1e-5, atol=1e-5)
    assert (softmax(x)[0, :5] == 0).all()


def test_greedy_is_argmax(ref_snapshot) -> None:
    x = fixed_logits()
    ref = torch.tensor([max(range(x.shape[1]), key=lambda j: row[j]) for row in x.tolist()])
    stored = ref_snapshot({"argmax": ref})
    assert torch.equal(greedy(x), stored["argmax"])
    assert torch.equal(sample_next(x, SamplingConfig(temperature=0.0)), stored["argmax"])


# --------------------------------------------------------------------------------------- filters


@pytest.mark.parametrize("k", [1, 3, 17, 40, 100])
def test_top_k_keeps_exactly_the_k_largest(ref_snapshot, k: int) -> None:
    x = fixed_logits()
    keep = torch.zeros_like(x, dtype=torch.bool)
    for i, row in enumerate(x.tolist()):
        for j in sorted(range(len(row)), key=lambda j: -row[j])[:k]:
            keep[i, j] = True
    stored = ref_snapshot({"keep": keep})
    out = top_k_filter(x, k)
    assert_filter(out, x, stored["keep"])
    assert kept(out).sum(-1).tolist() == [min(k, x.shape[1])] * x.shape[0]


def top_p_reference(x: torch.Tensor, p: float) -> torch.Tensor:
    keep = torch.zeros_like(x, dtype=torch.bool)
    for i, row in enumerate(x.double().tolist()):
        probs = probs_ref(row)
        mass = 0.0
        for j in sorted(range(len(row)), key=lambda j: -probs[j]):
            assert abs(mass - p) > 1e-6, "test logits too close to the boundary"
            if mass >= p:
                break
            keep[i, j] = True
            mass += probs[j]
    return keep


@pytest.mark.parametrize("p", [0.05, 0.3, 0.77, 0.95, 1.0])
def test_top_p_keeps_the_smallest_set_reaching_p(ref_snapshot, p: float) -> None:
    x = fixed_logits()
    stored = ref_snapshot({"keep": top_p_reference(x, p)})
    out = top_p_filter(x, p)
    assert_filter(out, x, stored["keep"])
    if p < 1:  # the kept mass reaches p, and dropping the least likely kept token falls below it
        probs = torch.softmax(x.double(), -1)
        mass = (probs * stored["keep"]).sum(-1)
        smallest = torch.where(stored["keep"], probs, torch.inf).amin(-1)
        assert (mass >= p).all() and (mass - smallest < p).all()


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.2, 0.9, 1.0])
def test_min_p_keeps_tokens_above_the_scaled_max(ref_snapshot, min_p: float) -> None:
    x = fixed_logits()
    keep = torch.zeros_like(x, dtype=torch.bool)
    for i, row in enumerate(x.double().tolist()):
        probs = probs_ref(row)
        for j, q in enumerate(probs):
            keep[i, j] = q >= min_p * max(probs)
    stored = ref_snapshot({"keep": keep})
    assert_filter(min_p_filter(x, min_p), x, stored["keep"])


def test_temperature_scales_the_distribution(ref_snapshot) -> None:
    x = fixed_logits()
    stored = ref_snapshot({"p05": torch.softmax(x.double() / 0.5, -1), "p2": torch.softmax(x.double() / 2.0, -1)})
    for t, key in ((0.5, "p05"), (2.0, "p2")):
        out = process_logits(x, SamplingConfig(temperature=t))
        torch.testing.assert_close(softmax(out).double(), stored[key], rtol=1e-5, atol=1e-7)


def test_filters_compose_in_order(ref_snapshot) -> None:
    x = fixed_logits()
    cfg = SamplingConfig(temperature=0.7, top_k=12, top_p=0.8, min_p=0.1)
    # reference: temperature, then top-k, then top-p on the survivors, then min-p
    y = x / 0.7
    keep = torch.zeros_like(x, dtype=torch.bool)
    for i, row in enumerate(y.double().tolist()):
        topk = sorted(range(len(row)), key=lambda j: -row[j])[:12]
        sub = probs_ref([row[j] for j in topk])
        mass, nucleus = 0.0, []
        for j, q in zip(topk, sub):
            if mass >= 0.8:
                break
            nucleus.append((j, q))
            mass += q
        pmax = max(q for _, q in nucleus) / mass
        for j, q in nucleus:
            keep[i, j] = q / mass >= 0.1 * pmax
    stored = ref_snapshot({"keep": keep})
    out = process_logits(x, cfg)
    assert_filter(out, y, stored["keep"])


# --------------------------------------------------------------------------------------- penalties


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_follows_ctrl(ref_snapshot, penalty: float) -> None:
    x = fixed_logits(b=2, v=10)
    context = torch.tensor([[1, 3, 3, 7], [0, 9, 2, 2]])
    ref = x.clone()
    for i, row in enumerate(context.tolist()):
        for j in set(row):  # CTRL: divide positive logits, multiply negative ones, once per distinct token
            v = x[i, j].item()
            ref[i, j] = v / penalty if v > 0 else v * penalty
    stored = ref_snapshot({"y": ref})
    counts = token_counts(context, 10)
    out = apply_repetition_penalty(x, counts, penalty)
    torch.testing.assert_close(out, stored["y"])
    assert (x[:, :] > 0).any() and (x[:, :] < 0).any()  # both branches exercised


def test_frequency_and_presence_penalties_follow_openai(ref_snapshot) -> None:
    x = fixed_logits(b=2, v=10)
    generated = torch.tensor([[4, 4, 4, 1], [5, 6, 6, 5]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    ref = x.clone()
    for i, (row, m) in enumerate(zip(generated.tolist(), mask.tolist())):
        c = [0] * 10
        for tok, keep in zip(row, m):
            c[tok] += keep
        for j in range(10):
            ref[i, j] = x[i, j] - c[j] * 0.5 - (1.0 if c[j] > 0 else 0.0) * 0.25
    stored = ref_snapshot({"y": ref})
    counts = token_counts(generated, 10, mask)
    assert counts[1, 5] == 1 and counts[0, 4] == 3
    torch.testing.assert_close(apply_frequency_presence_penalty(x, counts, 0.5, 0.25), stored["y"])
    cfg = SamplingConfig(temperature=0.0, frequency_penalty=0.5, presence_penalty=0.25)
    torch.testing.assert_close(process_logits(x, cfg, generated_counts=counts), stored["y"])


# --------------------------------------------------------------------------------------- sampling


def test_sampling_frequencies_match_the_probabilities(ref_snapshot) -> None:
    x = torch.tensor([[2.0, 0.5, -1.0, 1.5, float("-inf"), 0.0]])
    stored = ref_snapshot({"p": torch.softmax(x.double(), -1)})
    n = 40_000
    g = torch.Generator().manual_seed(123)
    draws = sample_from_logits(x.expand(n, -1), generator=g)
    freq = torch.bincount(draws, minlength=6).double() / n
    sigma = (stored["p"] * (1 - stored["p"]) / n).sqrt()
    assert (freq - stored["p"]).abs().le(5 * sigma + 1e-12).all(), (freq, stored["p"])
    assert freq[4] == 0  # -inf is never drawn


def test_sampling_only_draws_kept_tokens_and_is_reproducible() -> None:
    x = fixed_logits(b=64, v=50)
    cfg = SamplingConfig(temperature=1.5, top_k=5)
    allowed = kept(top_k_filter(x, 5))
    a = sample_next(x, cfg, generator=torch.Generator().manual_seed(7))
    b = sample_next(x, cfg, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert allowed.gather(1, a[:, None]).all()


def test_top_k_sampling_draws_what_the_full_vocabulary_sampler_draws() -> None:
    """sample_next's top-k-only shortcut (k survivors instead of the whole vocabulary) draws exactly the
    token that filtering the vocabulary and inverting its CDF draws, from the same generator state."""
    x = fixed_logits(b=2000, v=300, seed=3)
    x[:, ::7] = float("-inf")  # masked ids (e.g. past the tokenizer's vocab) may fall inside the top k
    counts = torch.randint(0, 3, x.shape, generator=torch.Generator().manual_seed(4)).float()
    for cfg in (SamplingConfig(temperature=0.7, top_k=20),
                SamplingConfig(temperature=1.0, top_k=1),
                SamplingConfig(temperature=1.3, top_k=299, frequency_penalty=0.5, presence_penalty=0.3)):
        want = sample_from_logits(process_logits(x, cfg, generated_counts=counts), torch.Generator().manual_seed(5))
        got = sample_next(x, cfg, torch.Generator().manual_seed(5), generated_counts=counts)
        assert torch.equal(got, want), cfg


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"num_beams": 0}, "num_beams"),
        ({"temperature": float("nan")}, "temperature"),
    ],
)
def test_nonsense_settings_raise_one_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


# --------------------------------------------------------------------------------------- beam search

V, EOS = 4, 0


def table_model(seed: int = 0):
    """A fixed 'model': next-token logits depend on the last two tokens (a 2nd-order transition table)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(V + 1, V + 1, V, generator=g) * 1.5  # index V = "no token yet"

    def logits_of(seq: list[int]) -> torch.Tensor:
        a = seq[-2] if len(seq) >= 2 else V
        b = seq[-1] if len(seq) >= 1 else V
        return table[a, b]

    return logits_of


def exhaustive(logits_of, max_new: int, alpha: float, eos: int | None) -> list[tuple[float, list[int]]]:
    """Every finished sequence: ends with eos (length <= max_new) or has length max_new; score sum log p / L^alpha."""
    out = []
    for length in range(1, max_new + 1):
        for seq in itertools.product(range(V), repeat=length):
            seq = list(seq)
            if eos is not None and eos in seq[:-1]:
                continue
            if length < max_new and (eos is None or seq[-1] != eos):
                continue
            lp = 0.0
            for t, tok in enumerate(seq):
                lp += probs_ref_log(logits_of(seq[:t]).double().tolist())[tok]
            out.append((lp / length**alpha, seq))
    return sorted(out, key=lambda s: -s[0])


def probs_ref_log(row: list[float]) -> list[float]:
    return [math.log(q) for q in probs_ref(row)]


def beam_step_for(logits_of):
    """Wrap the table as a BeamStep that tracks the beams only through (tokens, parents), as a KV cache would."""
    state: list[list[int]] = []

    def step(tokens, parents):
        nonlocal state
        if tokens is None:
            state = [[]]
        else:
            state = [state[p] + [t] for p, t in zip(parents.tolist(), tokens.tolist())]
        return torch.stack([logits_of(s) for s in state])

    return step


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0, -0.5])
@pytest.mark.parametrize("eos", [EOS, None])
def test_beam_search_equals_exhaustive_search(ref_snapshot, alpha: float, eos: int | None) -> None:
    max_new = 4
    logits_of = table_model(seed=3)
    ref = exhaustive(logits_of, max_new, alpha, eos)
    stored = ref_snapshot({"scores": torch.tensor([s for s, _ in ref[:3]], dtype=torch.float64),
                           "best": torch.tensor(ref[0][1])}, rtol=1e-9, atol=1e-9)
    width = (V - (eos is not None)) ** (max_new - 1)  # wide enough that nothing is pruned
    hyps = beam_search(beam_step_for(logits_of), num_beams=width, max_new_tokens=max_new, eos_id=eos,
                       length_penalty=alpha, num_return=3)
    assert hyps[0].tokens == stored["best"].tolist()
    torch.testing.assert_close(torch.tensor([h.score for h in hyps], dtype=torch.float64), stored["scores"],
                               rtol=1e-9, atol=1e-9)
    assert [h.tokens for h in hyps] == [s for _, s in ref[:3]]


def test_beam_search_width_one_is_greedy() -> None:
    logits_of = table_model(seed=5)
    seq: list[int] = []
    for _ in range(6):
        seq.append(int(logits_of(seq).argmax()))
    hyps = beam_search(beam_step_for(logits_of), num_beams=1, max_new_tokens=6, eos_id=None)
    assert hyps[0].tokens == seq


def test_beam_search_narrow_beam_matches_a_plain_reference() -> None:
    """num_beams=2 (pruning happens): compare with a straightforward list-based beam search."""
    logits_of = table_model(seed=11)
    k, max_new, alpha = 2, 5, 1.0
    beams, finished = [(0.0, [])], []
    for t in range(max_new):
        cands = []
        for lp, seq in beams:
            logp = probs_ref_log(logits_of(seq).double().tolist())
            for tok in range(V):
                if tok == EOS:
                    finished.append(((lp + logp[tok]) / (t + 1) ** alpha, seq + [tok]))
                else:
                    cands.append((lp + logp[tok], seq + [tok]))
        beams = sorted(cands, key=lambda c: -c[0])[:k]
    finished += [(lp / max_new**alpha, seq) for lp, seq in beams]
    best = max(finished, key=lambda f: f[0])
    hyps = beam_search(beam_step_for(logits_of), num_beams=k, max_new_tokens=max_new, eos_id=EOS, length_penalty=alpha)
    assert hyps[0].tokens == best[1]
    assert math.isclose(hyps[0].score, best[0], rel_tol=1e-9)

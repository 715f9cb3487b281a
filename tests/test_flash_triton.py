"""The Triton FlashAttention-2 kernels, run on CPU by the Triton interpreter (tiny shapes), or on CUDA."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
import torch.nn.functional as F

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5 if DEVICE == "cpu" else 2e-2  # fp32 tiles use TF32 tl.dot on GPUs


@pytest.fixture(scope="module")
def fa():
    """Import the kernels with TRITON_INTERPRET=1 on CPU. Triton decides interpreted vs compiled when
    `@triton.jit` runs (at import) and checks again when it first launches, so the variable is set for
    the whole module and restored afterwards."""
    if DEVICE == "cuda":
        yield importlib.import_module("llm.fast.flash_attention_triton")
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        mod = sys.modules.get("llm.fast.flash_attention_triton")
        mod = importlib.reload(mod) if mod is not None else importlib.import_module("llm.fast.flash_attention_triton")
        assert mod.INTERPRETED
        yield mod
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def _inputs(b, h, hk, sq, sk, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(b, h, sq, d, generator=gen), torch.randn(b, hk, sk, d, generator=gen), torch.randn(b, hk, sk, d, generator=gen)
    do = torch.randn(b, h, sq, d, generator=gen)
    return q, k, v, do


def _reference(q, k, v, do, is_causal):
    """float64 F.scaled_dot_product_attention, kv heads repeated, bottom-right causal mask."""
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    g = q.shape[1] // k.shape[1]
    mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2]) if is_causal else None
    o = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask)
    return dict(zip(["o", "dq", "dk", "dv"], (o.detach(), *torch.autograd.grad(o, (q, k, v), do.double()))))


def _ours(fa, q, k, v, do, is_causal, **kw):
    q, k, v = (t.to(DEVICE).requires_grad_() for t in (q, k, v))
    o = fa.flash_attention_triton(q, k, v, is_causal, **kw)
    grads = torch.autograd.grad(o, (q, k, v), do.to(DEVICE))
    return {name: t.detach().double().cpu() for name, t in zip(["o", "dq", "dk", "dv"], (o, *grads))}


# (b, h, hk, sq, sk, d, causal): lengths off the 16-blocks, sq < sk, GQA, d below the 16-wide tile
CASES = [
    (1, 2, 2, 37, 37, 16, True),
    (1, 2, 2, 37, 37, 16, False),
    (2, 4, 2, 13, 50, 8, True),
    (1, 2, 1, 50, 50, 32, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:6])) + ("-causal" if c[6] else "-full"))
def test_matches_sdpa_values_and_grads(fa, case) -> None:
    *shape, is_causal = case
    q, k, v, do = _inputs(*shape)
    ref = _reference(q, k, v, do, is_causal)
    ours = _ours(fa, q, k, v, do, is_causal, block_q=16, block_k=16)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=TOL, atol=TOL, msg=name)


def test_launch_options_reach_every_kernel(fa) -> None:
    """num_warps / num_stages go to all four launches (the tuner sets them): on a GPU they change the
    compiled kernels, never the results (the interpreter ignores them; this checks the plumbing)."""
    q, k, v, do = _inputs(1, 2, 1, 40, 40, 16, seed=3)
    ref = _reference(q, k, v, do, True)
    ours = _ours(fa, q, k, v, do, True, block_q=16, block_k=32, num_warps=2, num_stages=2)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=TOL, atol=TOL, msg=name)


def test_snapshot_against_float64_reference(fa, ref_snapshot) -> None:
    q, k, v, do = _inputs(1, 2, 1, 24, 24, 16, seed=1)
    stored = ref_snapshot(_reference(q, k, v, do, True), rtol=1e-10, atol=1e-12)
    ours = _ours(fa, q, k, v, do, True, block_q=16, block_k=16)
    for name, want in stored.items():
        torch.testing.assert_close(ours[name], want, rtol=TOL, atol=TOL, msg=name)


def test_agrees_with_the_pytorch_flash_attention(fa) -> None:
    """Same algorithm, two implementations, different tile shapes: bit-level agreement is not expected,
    fp32 agreement is (TF32 agreement on a GPU)."""
    from llm.fast.flash_attention import flash_attention

    q, k, v, do = _inputs(1, 2, 2, 40, 40, 16, seed=2)
    q_, k_, v_ = (t.clone().requires_grad_() for t in (q, k, v))
    o = flash_attention(q_, k_, v_, True, block_q=8, block_k=24)
    want = dict(zip(["o", "dq", "dk", "dv"], (o.detach(), *torch.autograd.grad(o, (q_, k_, v_), do))))
    ours = _ours(fa, q, k, v, do, True, block_q=32, block_k=16)
    for name in want:
        torch.testing.assert_close(ours[name].float(), want[name], rtol=TOL, atol=TOL, msg=name)


def test_model_trains_through_the_kernels(fa) -> None:
    """`attn_impl="triton"` (what a GPU trains with) gives the loss and gradients of the CPU path."""
    from llm.transformer import Transformer

    torch.manual_seed(0)
    ref = Transformer(64, 16, 32, 2, 2, d_ff=48, rope_theta=10000.0, attn_impl="ours")
    tri = Transformer(64, 16, 32, 2, 2, d_ff=48, rope_theta=10000.0, attn_impl="triton")
    tri.load_state_dict(ref.state_dict())
    ref.to(DEVICE), tri.to(DEVICE)
    x = torch.randint(0, 64, (2, 16), device=DEVICE)
    y = torch.randint(0, 64, (2, 16), device=DEVICE)
    losses = []
    for model in (ref, tri):
        loss = model.loss(x, y)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=TOL, atol=TOL)
    for (name, p), q in zip(ref.named_parameters(), tri.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=TOL, atol=TOL, msg=name)


@pytest.mark.parametrize(
    "shapes,kw,match",
    [
        (((1, 3, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {}, "multiple of key/value heads"),
        (((1, 2, 9, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {}, "sk >= sq"),
        (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"block_q": 24}, "power of two"),
        (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 8)), {}, r"\(b, h_kv, sk, d\)"),
        (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"num_warps": 3}, "num_warps must be a power of two"),
        (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"num_stages": 0}, "num_stages must be a positive integer"),
    ],
)
def test_bad_input_is_a_clear_error(fa, shapes, kw, match) -> None:
    q, k, v = (torch.randn(s, device=DEVICE) for s in shapes)
    with pytest.raises(ValueError, match=match):
        fa.flash_attention_triton(q, k, v, True, **kw)

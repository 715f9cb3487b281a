"""FlashAttention-2 (plain PyTorch) against F.scaled_dot_product_attention and the reference op
(llm.ops.attention): values, gradients, snapshots."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm.fast.flash_attention import flash_attention
from llm.ops.attention import scaled_dot_product_attention


def _inputs(b, h, hk, sq, sk, d, dv=None, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, sq, d, generator=gen, dtype=dtype)
    k = torch.randn(b, hk, sk, d, generator=gen, dtype=dtype)
    v = torch.randn(b, hk, sk, dv or d, generator=gen, dtype=dtype)
    do = torch.randn(b, h, sq, dv or d, generator=gen, dtype=dtype)
    return q, k, v, do


def _reference(q, k, v, do, is_causal):
    """F.scaled_dot_product_attention with kv heads repeated and an explicit bottom-right causal mask."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    g = q.shape[1] // k.shape[1]
    sq, sk = q.shape[2], k.shape[2]
    mask = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq) if is_causal else None
    o = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    return {"o": o.detach(), "dq": dq, "dk": dk, "dv": dv}


def _ours(q, k, v, do, is_causal, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = flash_attention(q, k, v, is_causal, **kw)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    return {"o": o.detach(), "dq": dq, "dk": dk, "dv": dv}


# (b, h, hk, sq, sk, d, dv): lengths that are not multiples of the blocks, sq < sk, GQA, d != dv
SHAPES = [
    (2, 4, 4, 37, 37, 16, None),
    (1, 6, 2, 70, 70, 8, None),
    (2, 2, 1, 13, 50, 16, 8),
    (1, 2, 2, 1, 9, 4, None),
]


@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])))
def test_matches_sdpa_values_and_grads_float64(shape, is_causal) -> None:
    b, h, hk, sq, sk, d, dv = shape
    q, k, v, do = _inputs(b, h, hk, sq, sk, d, dv)
    ref = _reference(q, k, v, do, is_causal)
    ours = _ours(q, k, v, do, is_causal, block_q=8, block_k=16)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s[:6])))
def test_matches_the_reference_op(shape) -> None:
    """Against llm.ops' masked attention with K/V heads repeated and the bottom-right causal mask."""
    b, h, hk, sq, sk, d, dv = shape
    q, k, v, do = _inputs(b, h, hk, sq, sk, d, dv)
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    g = h // hk
    mask = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
    o = scaled_dot_product_attention(qr, kr.repeat_interleave(g, 1), vr.repeat_interleave(g, 1), mask)
    ref = dict(zip(("o", "dq", "dk", "dv"), (o.detach(), *torch.autograd.grad(o, (qr, kr, vr), do))))
    ours = _ours(q, k, v, do, True, block_q=8, block_k=16)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("block_q,block_k", [(16, 16), (32, 8), (128, 128)])
def test_block_sizes_float32_sdpa_is_causal(block_q, block_k) -> None:
    """sq == sk: our mask is exactly F.sdpa's is_causal=True."""
    q, k, v, do = _inputs(2, 4, 4, 45, 45, 32, dtype=torch.float32)
    q_, k_, v_ = (t.clone().requires_grad_() for t in (q, k, v))
    r = F.scaled_dot_product_attention(q_, k_, v_, is_causal=True)
    ref = dict(zip(["dq", "dk", "dv"], torch.autograd.grad(r, (q_, k_, v_), do)), o=r.detach())
    ours = _ours(q, k, v, do, True, block_q=block_q, block_k=block_k)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_snapshot_against_float64_reference(ref_snapshot) -> None:
    q, k, v, do = _inputs(1, 4, 2, 29, 29, 8, seed=1)
    stored = ref_snapshot(_reference(q, k, v, do, True), rtol=1e-10, atol=1e-12)
    ours = _ours(q, k, v, do, True, block_q=8, block_k=8)
    for name, want in stored.items():
        torch.testing.assert_close(ours[name], want, rtol=1e-10, atol=1e-12, msg=name)
    stored = ref_snapshot(_reference(q, k, v, do, False), rtol=1e-10, atol=1e-12)
    ours = _ours(q, k, v, do, False, block_q=8, block_k=8)
    for name, want in stored.items():
        torch.testing.assert_close(ours[name], want, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "full"])
def test_gradcheck_float64(is_causal) -> None:
    q, k, v, _ = _inputs(1, 4, 2, 7, 7, 4)
    if not is_causal:
        k, v = k[:, :, :5], v[:, :, :5]
    args = tuple(t.requires_grad_() for t in (q, k, v))
    fn = lambda q, k, v: flash_attention(q, k, v, is_causal, block_q=3, block_k=2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8)


def test_fully_masked_key_blocks_are_skipped() -> None:
    """NaNs in keys/values that the first query block can never see must not reach it. A masked (not
    skipped) tile would leak them: exp(-inf) = 0 but 0 * NaN = NaN in P V and in dS K."""
    q, k, v, do = _inputs(1, 2, 2, 48, 48, 8)
    k[:, :, 32:] = float("nan")
    v[:, :, 32:] = float("nan")
    ours = _ours(q, k, v, do, True, block_q=16, block_k=16)
    ref = _reference(q[:, :, :32], k[:, :, :32], v[:, :, :32], do[:, :, :32], True)
    torch.testing.assert_close(ours["o"][:, :, :32], ref["o"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours["dq"][:, :, :32], ref["dq"], rtol=1e-10, atol=1e-10)
    assert ours["o"][:, :, 32:].isnan().any()  # the later queries do see them: the trick can fail


def test_bfloat16_close_to_float32() -> None:
    q, k, v, do = _inputs(1, 2, 2, 40, 40, 16, dtype=torch.float32)
    want = _reference(q, k, v, do, True)
    got = _ours(*(t.bfloat16() for t in (q, k, v, do)), True, block_q=16, block_k=16)
    for name in want:
        assert got[name].dtype == torch.bfloat16
        torch.testing.assert_close(got[name].float(), want[name], rtol=0.05, atol=0.05, msg=name)


@pytest.mark.parametrize(
    "shapes,kw,match",
    [
        (((1, 4, 8, 4), (1, 3, 8, 4), (1, 3, 8, 4)), {}, "multiple of key/value heads"),
        (((1, 2, 8, 4), (1, 2, 8, 5), (1, 2, 8, 4)), {}, "head dims differ"),
        (((2, 8, 4), (2, 8, 4), (2, 8, 4)), {}, r"\(b h s d\)"),
        (((1, 2, 9, 4), (1, 2, 8, 4), (1, 2, 8, 4)), {}, "sk >= sq"),
        (((1, 2, 8, 4), (1, 2, 8, 4), (1, 2, 7, 4)), {}, "share"),
        (((1, 2, 8, 4), (1, 2, 8, 4), (1, 2, 8, 4)), {"block_q": 0}, "positive"),
    ],
)
def test_bad_input_is_a_clear_error(shapes, kw, match) -> None:
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, True, **kw)


def test_dtype_mismatch_is_a_clear_error() -> None:
    q = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="dtype"):
        flash_attention(q, q.double(), q, True)

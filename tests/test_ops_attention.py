"""Attention: gradcheck of the general (masked) reference and the fast chunked causal Function (P kept from
the forward and P recomputed), of the custom ops that torch.compile calls, forward/grads against
F.scaled_dot_product_attention through torch autograd, and the fast causal path against the reference op."""

import pytest
import torch
import torch.nn.functional as F

import llm.fast.attention as attention_mod
from llm.fast.attention import causal_attention
from llm.ops.attention import scaled_dot_product_attention
from llm.transformer import MultiHeadAttention, ScaledDotProductAttention


pytestmark = pytest.mark.usefixtures("one_thread")


def test_gradcheck_general_with_mask() -> None:
    q = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 5) > 0.4
    mask[:, 0] = True  # no fully masked row
    assert torch.autograd.gradcheck(lambda q, k, v: scaled_dot_product_attention(q, k, v, mask), (q, k, v))


@pytest.mark.parametrize("save_p", [0, 1 << 20], ids=["recompute_p", "keep_p"])
def test_gradcheck_causal_chunked(monkeypatch, save_p) -> None:
    monkeypatch.setattr(attention_mod, "CHUNK_ELEMS", 2 * 2 * 5)  # several (b·h) chunks, ragged last one
    monkeypatch.setattr(attention_mod, "QUERY_BLOCK", 2)  # query blocks (0,2), (2,4), (4,5)
    monkeypatch.setattr(attention_mod, "SAVE_P_BYTES", save_p)
    q, k, v = (torch.randn(1, 5, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert attention_mod._keeps_p(q[0]) == bool(save_p)
    assert torch.autograd.gradcheck(causal_attention, (q, k, v))
    with torch.no_grad():  # inference keeps no P (there is no backward), same output
        torch.testing.assert_close(causal_attention(q, k, v), causal_attention(q.detach(), k.detach(), v.detach()))


@pytest.mark.parametrize("save_p", [0, 1 << 20], ids=["recompute_p", "keep_p"])
def test_compiled_path_custom_ops(monkeypatch, save_p) -> None:
    """Under torch.compile causal_attention calls the llm::causal_attention custom ops (same forward and
    backward code, registered autograd): checked here in eager by pretending to compile, plus opcheck
    (schema, fake tensors, autograd registration, AOT dispatch) without running Inductor (slow)."""
    monkeypatch.setattr(attention_mod, "CHUNK_ELEMS", 2 * 3 * 7)
    monkeypatch.setattr(attention_mod, "QUERY_BLOCK", 3)  # 7 queries: blocks of 3, 3, 1
    monkeypatch.setattr(attention_mod, "SAVE_P_BYTES", save_p)
    q, k, v = (torch.randn(2, 2, 7, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    do = torch.randn(2, 2, 7, 4, dtype=torch.float64)
    eager = _grads(causal_attention, q, k, v, do)
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        assert torch.autograd.gradcheck(causal_attention, (q, k, v))
        compiled = _grads(causal_attention, q, k, v, do)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same code: bit-identical
    q3, k3, v3 = (t.detach().reshape(4, 7, 4).float().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(attention_mod._causal_op, (q3, k3, v3, bool(save_p)))


@pytest.mark.parametrize("save_p", [0, 1 << 20], ids=["recompute_p", "keep_p"])
def test_causal_matches_the_reference_op(monkeypatch, save_p) -> None:
    monkeypatch.setattr(attention_mod, "CHUNK_ELEMS", 3 * 4 * 11)
    monkeypatch.setattr(attention_mod, "QUERY_BLOCK", 4)  # 11 queries: blocks of 4, 4, 3
    monkeypatch.setattr(attention_mod, "SAVE_P_BYTES", save_p)
    q, k, v = (torch.randn(2, 3, 11, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    do = torch.randn(2, 3, 11, 8, dtype=torch.float64)
    mask = torch.ones(11, 11, dtype=torch.bool).tril()
    ref = _grads(lambda q, k, v: scaled_dot_product_attention(q, k, v, mask), q, k, v, do)
    for a, b in zip(_grads(causal_attention, q, k, v, do), ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _grads(fn, q, k, v, do):
    o = fn(q, k, v)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def test_matches_f_sdpa(ref_snapshot, monkeypatch) -> None:
    q = torch.randn(2, 3, 6, 8, requires_grad=True)
    k = torch.randn(2, 3, 7, 8, requires_grad=True)
    v = torch.randn(2, 3, 7, 5, requires_grad=True)
    mask = torch.rand(6, 7) > 0.3
    mask[:, 0] = True
    do = torch.randn(2, 3, 6, 5)
    qc, kc, vc = (torch.randn(2, 3, 9, 8, requires_grad=True) for _ in range(3))
    doc = torch.randn(2, 3, 9, 8)
    ref = _grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), q, k, v, do)
    ref_c = _grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), qc, kc, vc, doc)
    names = ["o", "dq", "dk", "dv"]
    stored = ref_snapshot(
        {**dict(zip(names, ref)), **{f"causal_{n}": t for n, t in zip(names, ref_c)}}, rtol=1e-5, atol=1e-5
    )
    ours = _grads(lambda q, k, v: ScaledDotProductAttention()(q, k, v, mask), q, k, v, do)
    monkeypatch.setattr(attention_mod, "CHUNK_ELEMS", 4 * 4 * 9)  # 6 heads·batch in chunks of 4
    monkeypatch.setattr(attention_mod, "QUERY_BLOCK", 4)  # 9 queries in blocks of 4, 4, 1
    ours_c = _grads(causal_attention, qc, kc, vc, doc)
    for n, a, b in zip(names, ours, ours_c):
        torch.testing.assert_close(a, stored[n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b, stored[f"causal_{n}"], rtol=1e-5, atol=1e-5)


def test_mha_matches_reference(ref_snapshot) -> None:
    """Causal MHA with RoPE and GQA vs F.linear + F.sdpa (RoPE tables applied as float64 math)."""
    d, h, hkv, s = 16, 4, 2, 6
    mha = MultiHeadAttention(d, h, max_seq_len=8, theta=10000.0, num_kv_heads=hkv)
    x = torch.randn(2, s, d)
    dh = d // h
    ang = torch.arange(s, dtype=torch.float64)[:, None] / 10000.0 ** (torch.arange(0, dh, 2) / dh)

    def rot(t: torch.Tensor) -> torch.Tensor:
        te, to = t[..., 0::2].double(), t[..., 1::2].double()
        return torch.stack([te * ang.cos() - to * ang.sin(), te * ang.sin() + to * ang.cos()], -1).flatten(-2).float()

    q = rot(F.linear(x, mha.q_proj.weight).view(2, s, h, dh).transpose(1, 2))
    k = rot(F.linear(x, mha.k_proj.weight).view(2, s, hkv, dh).transpose(1, 2))
    v = F.linear(x, mha.v_proj.weight).view(2, s, hkv, dh).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    y_ref = F.linear(o.transpose(1, 2).reshape(2, s, d), mha.output_proj.weight)
    stored = ref_snapshot({"y": y_ref}, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mha(x), stored["y"], rtol=1e-5, atol=1e-5)
    # no theta: no RoPE
    plain = MultiHeadAttention(d, h)
    o = F.scaled_dot_product_attention(
        *(F.linear(x, p.weight).view(2, s, h, dh).transpose(1, 2) for p in (plain.q_proj, plain.k_proj, plain.v_proj)),
        is_causal=True,
    )
    y_plain = F.linear(o.transpose(1, 2).reshape(2, s, d), plain.output_proj.weight)
    torch.testing.assert_close(plain(x), y_plain, rtol=1e-5, atol=1e-5)


def test_errors() -> None:
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match="divisible by num_kv_heads"):
        MultiHeadAttention(16, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="bool"):
        scaled_dot_product_attention(torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4), torch.ones(2, 2))


def test_low_precision_inputs_use_fp32_softmax() -> None:
    """bf16 queries against an fp32 KV cache (decoding under autocast): computed in fp32, returned in bf16."""
    q, k, v = torch.randn(2, 3, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    out = scaled_dot_product_attention(q.bfloat16(), k, v)
    assert out.dtype == torch.bfloat16
    ref = F.scaled_dot_product_attention(q.bfloat16().float(), k, v)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    oc = causal_attention(*(t.bfloat16() for t in (q, q, q)))
    assert oc.dtype == torch.bfloat16

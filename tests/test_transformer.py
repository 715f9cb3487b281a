"""The full Transformer against a reference written here with torch built-ins (F.embedding, F.rms_norm,
F.linear, F.silu, F.scaled_dot_product_attention, F.cross_entropy) loading the same state dict."""

import pytest
import torch
import torch.nn.functional as F

from llm.config import ModelConfig
from llm.ops.cross_entropy import cross_entropy
from llm.transformer import Transformer, TransformerBlock


pytestmark = pytest.mark.usefixtures("one_thread")

CFG = dict(vocab_size=64, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=48, rope_theta=10000.0)


def random_state_dict(cfg: ModelConfig, seed: int = 1) -> dict[str, torch.Tensor]:
    """Independent random weights (not our init), with the CS336 key layout."""
    g = torch.Generator().manual_seed(seed)
    d, f, dh = cfg.d_model, cfg.d_ff, cfg.head_dim
    kv = dh * (cfg.num_kv_heads or cfg.num_heads)

    def r(*shape: int, scale: float | None = None) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * (scale if scale is not None else shape[-1] ** -0.5)

    sd = {"token_embeddings.weight": r(cfg.vocab_size, d, scale=1.0)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        sd |= {
            p + "attn.q_proj.weight": r(d, d), p + "attn.k_proj.weight": r(kv, d),
            p + "attn.v_proj.weight": r(kv, d), p + "attn.output_proj.weight": r(d, d),
            p + "ln1.weight": 1 + 0.1 * r(d, scale=1.0), p + "ln2.weight": 1 + 0.1 * r(d, scale=1.0),
            p + "ffn.w1.weight": r(f, d), p + "ffn.w2.weight": r(d, f), p + "ffn.w3.weight": r(f, d),
        }
    sd["ln_final.weight"] = 1 + 0.1 * r(d, scale=1.0)
    sd["lm_head.weight"] = sd["token_embeddings.weight"] if cfg.tie_embeddings else r(cfg.vocab_size, d)
    return sd


def reference_forward(sd: dict[str, torch.Tensor], cfg: ModelConfig, ids: torch.Tensor) -> torch.Tensor:
    b, s = ids.shape
    h, dh = cfg.num_heads, cfg.head_dim
    hkv = cfg.num_kv_heads or h
    ang = torch.arange(s, dtype=torch.float64)[:, None] / cfg.rope_theta ** (torch.arange(0, dh, 2) / dh)
    cos, sin = ang.cos().float(), ang.sin().float()

    def rope(t: torch.Tensor) -> torch.Tensor:
        te, to = t[..., 0::2], t[..., 1::2]
        return torch.stack([te * cos - to * sin, te * sin + to * cos], -1).flatten(-2)

    x = F.embedding(ids, sd["token_embeddings.weight"])
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        a = F.rms_norm(x, (cfg.d_model,), sd[p + "ln1.weight"], 1e-5)
        q = rope(F.linear(a, sd[p + "attn.q_proj.weight"]).view(b, s, h, dh).transpose(1, 2))
        k = rope(F.linear(a, sd[p + "attn.k_proj.weight"]).view(b, s, hkv, dh).transpose(1, 2))
        v = F.linear(a, sd[p + "attn.v_proj.weight"]).view(b, s, hkv, dh).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hkv != h)
        x = x + F.linear(o.transpose(1, 2).reshape(b, s, -1), sd[p + "attn.output_proj.weight"])
        a = F.rms_norm(x, (cfg.d_model,), sd[p + "ln2.weight"], 1e-5)
        gate = F.silu(F.linear(a, sd[p + "ffn.w1.weight"])) * F.linear(a, sd[p + "ffn.w3.weight"])
        x = x + F.linear(gate, sd[p + "ffn.w2.weight"])
    x = F.rms_norm(x, (cfg.d_model,), sd["ln_final.weight"], 1e-5)
    return F.linear(x, sd["lm_head.weight"])


def expected_keys(cfg: ModelConfig) -> set[str]:
    keys = {"token_embeddings.weight", "ln_final.weight", "lm_head.weight"}
    for i in range(cfg.num_layers):
        keys |= {f"layers.{i}.attn.{n}_proj.weight" for n in ("q", "k", "v", "output")}
        keys |= {f"layers.{i}.{n}.weight" for n in ("ln1", "ln2", "ffn.w1", "ffn.w2", "ffn.w3")}
    return keys


@pytest.mark.parametrize("extra", [{}, {"num_kv_heads": 2, "tie_embeddings": True}], ids=["mha", "gqa_tied"])
def test_forward_matches_reference(ref_snapshot, extra) -> None:
    cfg = ModelConfig(**CFG, **extra)
    sd = random_state_dict(cfg)
    full = torch.randint(0, cfg.vocab_size, (2, cfg.context_length))
    short = full[:, :5]  # shorter than the context
    stored = ref_snapshot(
        {"full": reference_forward(sd, cfg, full), "short": reference_forward(sd, cfg, short)}, rtol=1e-5, atol=1e-5
    )
    model = Transformer.from_config(cfg)
    model.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(model(full), stored["full"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(short), stored["short"], rtol=1e-4, atol=1e-4)


def test_fused_loss_and_gradients_match_reference(ref_snapshot) -> None:
    cfg = ModelConfig(**CFG)
    sd = random_state_dict(cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 12))
    targets = torch.randint(0, cfg.vocab_size, (3, 12))
    ref_params = {k: v.clone().requires_grad_() for k, v in sd.items()}
    loss_ref = F.cross_entropy(reference_forward(ref_params, cfg, ids).flatten(0, 1), targets.flatten())
    loss_ref.backward()
    stored = ref_snapshot({"loss": loss_ref, **{k: p.grad for k, p in ref_params.items()}}, rtol=1e-4, atol=1e-5)
    model = Transformer.from_config(cfg)
    model.load_state_dict(sd)
    loss = model.loss(ids, targets)
    torch.testing.assert_close(loss, stored["loss"], rtol=1e-5, atol=1e-5)
    loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, stored[name], rtol=1e-4, atol=1e-5, msg=name)
    # the fused loss equals cross_entropy over the full logits, and so do its gradients
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (2.0 * cross_entropy(model(ids), targets)).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2.0 * fused_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_state_dict_roundtrip_and_exact_keys(tmp_path) -> None:
    for extra in ({}, {"num_kv_heads": 2, "tie_embeddings": True}):
        cfg = ModelConfig(**CFG, **extra)
        model = Transformer.from_config(cfg)
        assert set(model.state_dict()) == expected_keys(cfg)
        assert model.config == cfg
        torch.save(model.state_dict(), tmp_path / "m.pt")
        other = Transformer.from_config(cfg)
        other.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
        ids = torch.randint(0, cfg.vocab_size, (1, 9))
        with torch.no_grad():
            assert torch.equal(model(ids), other(ids))
        if cfg.tie_embeddings:
            assert other.lm_head.weight is other.token_embeddings.weight


def test_block_signature_and_default_d_ff() -> None:
    block = TransformerBlock(32, 4, 48, 16, 10000.0)
    assert block(torch.randn(2, 7, 32)).shape == (2, 7, 32)
    assert Transformer(64, 16, 96, 1, 4).config.d_ff == 256


def test_errors() -> None:
    with pytest.raises(ValueError, match="divisible by num_heads"):
        Transformer(64, 16, 30, 1, 4)
    with pytest.raises(ValueError, match="divisible by num_kv_heads"):
        Transformer(64, 16, 32, 1, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="attn_impl"):
        Transformer(64, 16, 32, 1, 4, attn_impl="fast")
    model = Transformer(**CFG)
    with pytest.raises(ValueError, match="exceeds context_length"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 64\)"):
        model(torch.tensor([[1, 64]]))
    with pytest.raises(ValueError, match=r"token ids must be in"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        model.loss(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="targets"):
        model.loss(torch.zeros(1, 4, dtype=torch.long), torch.full((1, 4), 64))


def test_course_names_importable_from_transformer() -> None:
    """The course's adapters import everything from one module; the optimizer pieces are re-exported."""
    import llm.optim
    import llm.transformer as t

    for name in ("AdamW", "SGDDecay", "cos_lr_scheduler", "gradient_clip"):
        assert getattr(t, name) is getattr(llm.optim, name)
        assert name in t.__all__

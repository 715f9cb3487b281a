"""LoRA (llm.ops.lora, llm.lora): the Function against gradcheck and torch.nn.functional, the model at init
equal to its base, frozen base weights through AdamW, merge/unmerge against float64 math, the impls,
activation checkpointing and KV-cache decoding, adapter files and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llm.decoding import iter_tokens
from llm.fast import decode_step
from llm.fast.cross_entropy import linear_cross_entropy
from llm.fileio import sha256_of
from llm.lora import (
    LoraConfig, LoRALinear, adapter_paths, apply_lora, attach_adapter, load_adapter, load_lora_state_dict,
    lora_modules, lora_state_dict, merge_and_unload, merge_lora, resolve_targets, save_adapter, unmerge_lora,
)
from llm.ops.lora import LoRALinearFn, lora_linear
from llm.optim import AdamW
from llm.parallel import apply_activation_checkpointing
from llm.sampling import SamplingConfig
from llm.transformer import Linear, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = dict(vocab_size=64, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=48, num_kv_heads=2)


def _mask(shape: tuple[int, ...], p: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.bernoulli(torch.full(shape, 1 - p, dtype=dtype)) / (1 - p)


def _randomize_b(model: torch.nn.Module) -> None:
    """B starts at zero, which would hide a wrong merge or a missing LoRA term."""
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0.0, 0.5)


def _pair(impl: str = "fast", config: LoraConfig | None = None) -> tuple[Transformer, Transformer]:
    """(base, the same weights with LoRA applied)."""
    base = Transformer(**CFG, impl=impl)
    lora = Transformer(**CFG, impl=impl)
    lora.load_state_dict(base.state_dict())
    apply_lora(lora, config or LoraConfig(rank=4))
    return base, lora


# ------------------------------------------------------------------------------------------ the Function


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("train_w", [False, True], ids=["frozen-W", "trained-W"])
def test_gradcheck(dropout: float, train_w: bool) -> None:
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64, requires_grad=train_w)
    a = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    mask = _mask((2, 3, 6), dropout, torch.float64) if dropout else None
    assert torch.autograd.gradcheck(lambda x, w, a, b: LoRALinearFn.apply(x, w, a, b, 0.7, mask), (x, w, a, b))


@pytest.mark.parametrize("dropout", [0.0, 0.5], ids=["no-dropout", "dropout"])
def test_matches_autograd_through_f_linear(dropout: float) -> None:
    x = torch.randn(3, 7, 16, requires_grad=True)
    w = torch.randn(12, 16, requires_grad=True)
    a = torch.randn(4, 16, requires_grad=True)
    b = torch.randn(12, 4, requires_grad=True)
    mask = _mask((3, 7, 16), dropout, torch.float32) if dropout else None
    dy = torch.randn(3, 7, 12)
    xd = x if mask is None else x * mask
    ref = F.linear(x, w) + 2.0 * F.linear(F.linear(xd, a), b)
    ours = lora_linear(x, w, a, b, 2.0, mask)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(torch.autograd.grad(ours, (x, w, a, b), dy), torch.autograd.grad(ref, (x, w, a, b), dy)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the inference shortcut computes the same
        torch.testing.assert_close(lora_linear(x, w, a, b, 2.0, mask), ref, rtol=1e-5, atol=1e-5)


def test_frozen_weight_gets_no_gradient_computed() -> None:
    """needs_input_grad: with W frozen backward returns no dW at all (the GEMM LoRA saves)."""
    seen = {}

    class Spy(LoRALinearFn):
        @staticmethod
        def backward(ctx, dy):
            grads = LoRALinearFn.backward(ctx, dy)
            seen["dw"] = grads[1]
            return grads

    x = torch.randn(4, 8, requires_grad=True)
    w, a, b = torch.randn(6, 8), torch.randn(2, 8, requires_grad=True), torch.randn(6, 2, requires_grad=True)
    Spy.apply(x, w, a, b, 1.0, None).sum().backward()
    assert seen["dw"] is None and a.grad is not None and b.grad is not None and x.grad is not None


def test_fused_loss_with_a_frozen_lm_head_skips_dw_and_keeps_dh() -> None:
    """LoRA freezes lm_head: the fused loss then returns no dW, and dh still matches F.cross_entropy."""
    h = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(11, 8)
    t = torch.randint(0, 11, (2, 5))
    ref = F.cross_entropy(F.linear(h, w).reshape(-1, 11), t.reshape(-1))
    loss = linear_cross_entropy(h, w, t)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    (dh,) = torch.autograd.grad(loss, (h,))
    torch.testing.assert_close(dh, torch.autograd.grad(ref, (h,))[0], rtol=1e-5, atol=1e-6)
    node = linear_cross_entropy(h, w, t).grad_fn
    assert node.saved_tensors[1] is None  # nothing (vocab d) computed or kept for the frozen weight


# ------------------------------------------------------------------------------------------- the model


def test_config_targets_and_errors() -> None:
    assert LoraConfig().targets == ("q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3")
    assert LoraConfig(targets="q,v").targets == ("q_proj", "v_proj")
    assert resolve_targets(["ffn", "o"]) == ("output_proj", "w1", "w2", "w3")
    assert LoraConfig.from_dict(LoraConfig(rank=2, targets=("q",)).to_dict()) == LoraConfig(rank=2, targets=("q_proj",))
    for bad in (dict(rank=-1), dict(rank=1.5), dict(alpha=0), dict(dropout=1.0), dict(targets="q,bogus"), dict(targets="")):
        with pytest.raises(ValueError, match="LoRA"):
            LoraConfig(**bad)


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_identity_at_init_and_only_a_b_trainable(impl: str) -> None:
    base, lora = _pair(impl, LoraConfig(rank=4, dropout=0.1))
    trainable = {id(p) for p in apply_lora(Transformer(**CFG), LoraConfig(rank=4))}
    assert len(trainable) == 2 * 7 * CFG["num_layers"]
    names = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert names and all(n.endswith((".lora_A", ".lora_B")) for n in names)
    assert len(names) == 2 * 7 * CFG["num_layers"]
    ids = torch.randint(0, 64, (2, 16))
    base.eval(), lora.eval()
    with torch.no_grad():
        torch.testing.assert_close(lora(ids), base(ids), rtol=0, atol=0)
    assert base.state_dict().keys() <= lora.state_dict().keys()  # base keys unchanged, lora_A/B added


def test_q_v_targets_wrap_only_those() -> None:
    _, lora = _pair(config=LoraConfig(rank=2, targets="q,v"))
    assert sorted(lora_modules(lora)) == [f"layers.{i}.attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert isinstance(lora.layers[0].attn.k_proj, Linear) and isinstance(lora.layers[0].ffn.w1, Linear)


def test_rank_zero_is_full_fine_tuning() -> None:
    model = Transformer(**CFG)
    for p in model.parameters():
        p.requires_grad_(False)
    params = apply_lora(model, LoraConfig(rank=0))
    assert len(params) == len(list(model.parameters())) and all(p.requires_grad for p in params)
    assert not lora_modules(model)


def test_apply_twice_is_refused() -> None:
    _, lora = _pair()
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(lora, LoraConfig())


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_base_weights_bit_identical_after_adamw(impl: str) -> None:
    _, lora = _pair(impl, LoraConfig(rank=4, dropout=0.1))
    frozen = {n: p.detach().clone() for n, p in lora.named_parameters() if not p.requires_grad}
    before = {n: t.clone() for n, t in lora_state_dict(lora).items()}
    opt = AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    losses = []
    for _ in range(5):
        opt.zero_grad(set_to_none=True)
        loss = lora.loss(x, y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    for n, p in lora.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
            assert p.grad is None, n
    assert all(not torch.equal(lora_state_dict(lora)[k], before[k]) for k in before)


def test_fast_and_reference_agree_with_lora() -> None:
    """The same LoRA weights in both impls: same loss and the same A, B gradients."""
    _, fast = _pair("fast")
    _, ref = _pair("reference")
    _randomize_b(fast)
    ref.load_state_dict(fast.state_dict())
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    lf, lr = fast.loss(x, y), ref.loss(x, y)
    torch.testing.assert_close(lf, lr, rtol=1e-5, atol=1e-5)
    lf.backward(), lr.backward()
    for (n, pf), pr in zip(fast.named_parameters(), ref.parameters()):
        if pf.requires_grad:
            torch.testing.assert_close(pf.grad, pr.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_activation_checkpointing_gives_the_same_gradients_with_dropout() -> None:
    _, plain = _pair(config=LoraConfig(rank=4, dropout=0.2))
    _randomize_b(plain)
    _, ckpt = _pair(config=LoraConfig(rank=4, dropout=0.2))
    ckpt.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(ckpt, "full")
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(7)  # the same dropout masks; the recompute restores the RNG state it started from
        model.loss(x, y).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-6, atol=1e-6, msg=n)


# ---------------------------------------------------------------------------------------- merge, decode


def test_merge_against_float64_and_unmerge_round_trip() -> None:
    _, lora = _pair()
    _randomize_b(lora)
    m = lora.layers[1].ffn.w2
    w0 = m.weight.detach().clone()
    want = w0.double() + m.scale * m.lora_B.detach().double() @ m.lora_A.detach().double()
    merge_lora(lora)
    assert m.merged
    torch.testing.assert_close(m.weight.detach().double(), want, rtol=0, atol=1e-6)
    unmerge_lora(lora)
    assert not m.merged
    torch.testing.assert_close(m.weight.detach(), w0, rtol=0, atol=1e-6)


def test_merge_runs_in_fp32_under_bf16_autocast() -> None:
    _, a = _pair()
    _randomize_b(a)
    _, b = _pair()
    b.load_state_dict(a.state_dict())
    merge_lora(a)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        merge_lora(b)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_merged_logits_equal_unmerged(impl: str) -> None:
    _, lora = _pair(impl)
    _randomize_b(lora)
    lora.eval()
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        unmerged = lora(ids)
        merge_lora(lora)
        merged = lora(ids)
        merge_and_unload(lora)
        unloaded = lora(ids)
    assert not lora_modules(lora) and isinstance(lora.layers[0].attn.q_proj, Linear)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unloaded, merged, rtol=0, atol=0)
    assert set(lora.state_dict()) == set(Transformer(**CFG).state_dict())


def _greedy(model: Transformer, prompt: list[int], use_cache: bool) -> list[int]:
    toks = iter_tokens(model, [prompt], SamplingConfig(temperature=0.0), max_new_tokens=20, use_cache=use_cache)
    return [int(t) for t in toks]


def test_kv_cache_decoding_sees_the_adapter_merged_or_not() -> None:
    """An unmerged adapter takes the general path (the lean step would miss B A); merged, the lean step."""
    base, lora = _pair()
    _randomize_b(lora)
    cache = lora.new_kv_cache(1)
    assert decode_step.weights(lora, cache) is None
    prompt = [1, 2, 3]
    want = _greedy(lora, prompt, use_cache=False)  # a full forward per token (and the window slides)
    assert _greedy(lora, prompt, use_cache=True) == want
    assert want != _greedy(base, prompt, use_cache=False)
    merge_lora(lora)
    assert decode_step.weights(lora, lora.new_kv_cache(1)) is not None
    assert _greedy(lora, prompt, use_cache=True) == want


# ------------------------------------------------------------------------------------------ adapter files


def _saved(tmp_path: Path) -> tuple[Transformer, Path, str, LoraConfig]:
    base = Transformer(**CFG)
    base_file = tmp_path / "base.pt"
    torch.save(base.state_dict(), base_file)
    cfg = LoraConfig(rank=4, alpha=8.0, dropout=0.05, targets="attn")
    model = Transformer(**CFG)
    model.load_state_dict(base.state_dict())
    apply_lora(model, cfg)
    _randomize_b(model)
    path = tmp_path / "out" / "adapter.safetensors"
    save_adapter(path, model, cfg, str(base_file), sha256_of(base_file))
    return model, path, sha256_of(base_file), cfg


def test_adapter_round_trip_is_bit_exact(tmp_path: Path) -> None:
    model, path, digest, cfg = _saved(tmp_path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["adapter.json", "adapter.safetensors"]  # no temp files
    config, tensors, meta = load_adapter(path)
    assert config == cfg and meta["base_sha256"] == digest and meta["base_checkpoint"].endswith("base.pt")
    want = lora_state_dict(model)
    assert tensors.keys() == want.keys() and all(torch.equal(tensors[k], want[k]) for k in want)
    fresh = Transformer(**CFG)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k})
    assert attach_adapter(fresh, path.with_suffix(".json"), base_sha256=digest)[0] == cfg  # either file names it
    assert all(torch.equal(lora_state_dict(fresh)[k], want[k]) for k in want)
    ids = torch.randint(0, 64, (1, 16))
    fresh.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)
    other = Transformer(**CFG)  # load_lora_state_dict into an already adapted model, merged
    apply_lora(other, cfg)
    merge_lora(other)
    load_lora_state_dict(other, tensors)
    assert all(torch.equal(lora_state_dict(other)[k], want[k]) for k in want)


def test_adapter_paths() -> None:
    assert adapter_paths("a/x.safetensors") == adapter_paths("a/x.json") == adapter_paths("a/x")
    assert adapter_paths("a/x") == (Path("a/x.safetensors"), Path("a/x.json"))


def test_wrong_base_hash_is_refused_and_the_model_left_as_it_was(tmp_path: Path) -> None:
    _, path, digest, _ = _saved(tmp_path)
    model = Transformer(**CFG)
    before = model.state_dict()
    with pytest.raises(ValueError, match=r"trained on .*base\.pt .* not on this base"):
        attach_adapter(model, path, base_sha256="0" * 64)
    assert not lora_modules(model) and model.state_dict().keys() == before.keys()


def test_wrong_base_shape_is_refused(tmp_path: Path) -> None:
    _, path, _, _ = _saved(tmp_path)
    with pytest.raises(ValueError, match="d_model=32, this one has d_model=64"):
        attach_adapter(Transformer(**(CFG | dict(d_model=64))), path)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["model_config"] = None  # an adapter without a model record: the tensor shapes still catch it
    path.with_suffix(".json").write_text(json.dumps(meta))
    other = Transformer(**(CFG | dict(d_model=64)))
    with pytest.raises(ValueError, match=r"lora_A has shape \(4, 32\), the model needs \(4, 64\)"):
        attach_adapter(other, path)
    assert not lora_modules(other)


def test_damaged_or_mismatched_adapter_files(tmp_path: Path) -> None:
    _, path, _, _ = _saved(tmp_path)
    with pytest.raises(ValueError, match="no LoRA adapter at"):
        load_adapter(tmp_path / "missing.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match="is not the file .*adapter.json was saved with"):
        load_adapter(path)
    path.write_bytes(data)
    path.with_suffix(".json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read adapter config"):
        load_adapter(path)
    path.with_suffix(".json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a LoRA adapter config"):
        load_adapter(path)


def test_saving_without_adapters_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_adapter(tmp_path / "a.safetensors", Transformer(**CFG), LoraConfig(rank=0), "base.pt", "0" * 64)
    assert not list(tmp_path.iterdir())


def test_lora_linear_module_dropout_only_in_training() -> None:
    base = Linear(8, 6)
    m = LoRALinear(base, rank=2, alpha=4.0, dropout=0.5)
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(3, 8)
    m.eval()
    torch.testing.assert_close(m(x), F.linear(x, base.weight) + 2.0 * F.linear(F.linear(x, m.lora_A), m.lora_B))
    m.train()
    assert not torch.allclose(m(x), m(x))  # fresh masks each call


def test_benchmark_runs_end_to_end(tmp_path: Path, capsys) -> None:
    """kernel/benchmarking_lora.py on the smallest settings (so it cannot rot); bad flags: one line, code 2."""
    from kernel import benchmarking_lora

    out = tmp_path / "lora.md"
    argv = ["--batch-size", "1", "--seq-len", "8", "--warmup", "0", "--steps", "1", "--new-tokens", "2",
            "--repeats", "1", "--targets", "q,v", "--out", str(out)]
    assert benchmarking_lora.main(argv) == 0
    text = out.read_text()
    # 4 layers x (q + v) x rank 8 x (256 in + 256 out) = 32,768 beside the 4,262,144 of the demo model
    assert "| demo | 32,768 | 4,294,912 | 0.76% |" in text
    assert "LoRA step / full fine-tuning step" in text and "| merged |" in text
    assert benchmarking_lora.main(["--targets", "bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: unknown LoRA target")


def test_shared_input_lora_equals_one_op_per_branch() -> None:
    """llm.fast.lora_linears (q/k/v, w1/w3 of the fast model) against llm.ops.lora per branch, float64,
    frozen and trainable W; and gradcheck."""
    from llm.fast.lora_linears import SharedInputLoRAFn, lora_linears, shared_lora

    mods = [LoRALinear(Linear(6, n, dtype=torch.float64), rank=r, alpha=2.0 * r) for n, r in ((5, 2), (3, 3), (3, 2))]
    for m in mods:
        with torch.no_grad():
            m.lora_B.normal_()
        m.weight.requires_grad_(False)
    mods[1].weight.requires_grad_(True)  # one trainable W among frozen ones
    assert shared_lora(*mods)
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    dys = [torch.randn(2, 4, m.out_features, dtype=torch.float64) for m in mods]
    params = [x, mods[1].weight, *(p for m in mods for p in (m.lora_A, m.lora_B))]
    ref_y = [lora_linear(x, m.weight, m.lora_A, m.lora_B, m.scale) for m in mods]
    ys = lora_linears(x, *mods)
    for a, b in zip(ys, ref_y):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(ys, params, dys), torch.autograd.grad(ref_y, params, dys)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    tensors = [m.weight for m in mods] + [m.lora_A for m in mods] + [m.lora_B for m in mods]
    assert torch.autograd.gradcheck(lambda x, *t: SharedInputLoRAFn.apply(x, 2.0, 3, *t), (x, *tensors))
    mods[2].dropout = 0.1  # each branch would draw its own mask: the per-branch path
    assert not shared_lora(*mods)
    merge_lora(mods[0])
    assert not shared_lora(mods[0], mods[1])

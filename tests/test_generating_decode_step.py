"""The lean one-token decode step (llm.fast.decode_step): the same logits as the model's forward and as the
torch.nn reference, inference weights that follow every kind of parameter change, and the general path
for everything the step does not cover."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from kernel.torch_reference import TorchTransformer
from llm.fast import decode_step
from llm.config import ModelConfig
from llm.decoding import iter_tokens
from llm.optim import AdamW
from llm.sampling import SamplingConfig
from llm.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = dict(vocab_size=64, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=48)


def random_gains(model: torch.nn.Module) -> torch.nn.Module:
    """RMSNorm gains start at ones, which would hide a gain folded into the wrong matrix."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln" in name or name.startswith("ln"):
                p.uniform_(0.5, 1.5)
    return model


def decode(model: Transformer, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits (b, s - prefill, v) of positions prefill.. by the fast step, after a general-path prefill."""
    cache = model.new_kv_cache(ids.shape[0])
    w = decode_step.weights(model, cache)
    assert w is not None
    with torch.no_grad():
        model.hidden(ids[:, :prefill], kv_cache=cache)
        out = [decode_step.decode_step(w, ids[:, t], cache) for t in range(prefill, ids.shape[1])]
    assert cache.length == ids.shape[1]
    return torch.stack(out, 1)


@pytest.mark.parametrize("kv_heads,tie", [(None, False), (2, True), (1, False)], ids=["mha", "gqa-tied", "mqa"])
def test_decode_step_equals_the_torch_reference(ref_snapshot, kv_heads, tie) -> None:
    """float64: RMSNorm gains and the attention scale folded into merged weights change only rounding."""
    cfg = ModelConfig(**CFG, num_kv_heads=kv_heads, tie_embeddings=tie)
    ours = random_gains(Transformer.from_config(cfg).double().eval())
    ref = TorchTransformer.from_config(cfg).double()
    ref.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 64, (2, 16))  # up to the full context: every RoPE position is used
    with torch.no_grad():
        stored = ref_snapshot({"logits": ref(ids)[:, 3:]}, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(decode(ours, ids, 3), torch.as_tensor(stored["logits"]), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_decode_step_equals_the_training_path_in_float32(kv_heads) -> None:
    model = random_gains(Transformer(**CFG, num_kv_heads=kv_heads))
    ids = torch.randint(0, 64, (3, 12))
    want = model(ids)[:, 5:].detach()  # grad enabled: the autograd Functions of training
    torch.testing.assert_close(decode(model, ids, 5), want, rtol=1e-5, atol=1e-5)


def test_inference_weights_follow_parameter_changes() -> None:
    model = Transformer(**CFG, num_kv_heads=2)
    ids = torch.randint(0, 64, (1, 10))

    def check() -> None:
        with torch.no_grad():
            want = model(ids)[:, 4:]
        torch.testing.assert_close(decode(model, ids, 4), want, rtol=1e-5, atol=1e-5)

    check()
    cache = model.new_kv_cache(1)
    first = decode_step.weights(model, cache)
    assert decode_step.weights(model, cache) is first  # built once per cache
    opt = AdamW(model.parameters(), lr=1e-2)  # training continues: in-place updates of every parameter
    for _ in range(2):
        opt.zero_grad()
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
        opt.step()
    decode_step.invalidate(cache)  # a caller that keeps a cache across a weight change says so
    assert decode_step.weights(model, cache) is not first
    check()
    model.load_state_dict(Transformer(**CFG, num_kv_heads=2).state_dict())  # copy_ into the parameters
    check()
    with torch.no_grad():
        model.layers[1].ffn.w2.weight.mul_(3.0)  # one in-place edit of one matrix
    check()
    model.layers[0].attn.q_proj.weight = torch.nn.Parameter(torch.randn(32, 32) * 0.3)  # a new Parameter object
    check()
    q = model.layers[0].attn.q_proj
    q.weight = torch.nn.Parameter(q.weight.detach().t())  # same storage, same version, other matrix
    check()
    model.double()  # new storage, new dtype
    check()


def test_generation_takes_the_fast_step_only_where_it_applies(monkeypatch) -> None:
    calls = []
    real = decode_step.decode_step
    monkeypatch.setattr(decode_step, "decode_step", lambda *a: calls.append(1) or real(*a))
    greedy = SamplingConfig(temperature=0)
    model = Transformer(**CFG).eval()
    list(iter_tokens(model, [[1, 2, 3]], greedy, max_new_tokens=6))
    assert len(calls) == 5  # every step after the prefill
    calls.clear()
    list(iter_tokens(model, [[1, 2, 3], [4]], greedy, max_new_tokens=6))  # left padding: general path
    assert not calls
    list(iter_tokens(model.to(torch.bfloat16), [[1, 2, 3]], greedy, max_new_tokens=3))
    assert not calls and decode_step.weights(model, model.new_kv_cache(1)) is None

    class Wrapped(Transformer):  # a subclass may compute something else: never assume the layout
        pass

    wrapped = Wrapped(**CFG)
    assert decode_step.weights(wrapped, wrapped.new_kv_cache(1)) is None


def test_inference_copies_live_only_as_long_as_their_cache(monkeypatch) -> None:
    """A model sampled from during training must not keep a second copy of its weights in between."""
    built = []
    build = decode_step._build

    def tracked(model: Transformer):
        w = build(model)
        built.append(weakref.ref(w))
        return w

    monkeypatch.setattr(decode_step, "_build", tracked)
    model = Transformer(**CFG).eval()
    list(iter_tokens(model, [[1, 2, 3]], SamplingConfig(temperature=0), max_new_tokens=6))
    gc.collect()
    assert len(built) == 1 and built[0]() is None  # built once for the generation, gone with its cache
    cache = model.new_kv_cache(1)
    w = decode_step.weights(model, cache)
    other = Transformer(**CFG).eval()  # the same cache used with another model gets that model's copies
    assert decode_step.weights(other, cache) is not w and decode_step.weights(other, cache).model is other
    del cache, w
    gc.collect()
    assert all(ref() is None for ref in built)


def test_decode_step_errors() -> None:
    model = Transformer(**CFG).eval()
    cache = model.new_kv_cache(1, max_len=4)
    w = decode_step.weights(model, cache)
    with torch.no_grad():
        model.hidden(torch.zeros(1, 4, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="KV cache full"):
            decode_step.decode_step(w, torch.zeros(1, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="batch size"):
            decode_step.decode_step(w, torch.zeros(2, dtype=torch.long), model.new_kv_cache(1))

"""Weight-only quantization (llm.quant, llm.quantize): per-row error within scale/2, the quantized matmul
against a float64 reference, int4 packing, greedy agreement and perplexity of a small trained model, the
checkpoint round trip and its errors."""

from __future__ import annotations

import copy
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llm.checkpoint import load_model, save_checkpoint
from llm.evaluate import evaluate_tokens
from llm.fast import decode_step as ds
from llm.quant import (
    HAS_INT8PACK, QuantLinear, dequantize_rows, pack_int4, quant_matmul, quantize, quantize_model, unpack_int4,
)
from llm.quantize import main as quantize_main
from llm.transformer import Linear
from tests.test_generating import byte_tokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
KERNELS = ["chunked", "aten"] if HAS_INT8PACK else ["chunked"]  # "compiled": in a subprocess (conftest)
TEXT = "the hello shell held the help desk. " * 8


@pytest.mark.parametrize("bits, group_size", [(8, 0), (4, 32), (4, 64), (4, 128)])
def test_dequantize_error_is_at_most_half_a_scale(bits: int, group_size: int) -> None:
    w = torch.randn(48, 256) * torch.rand(48, 1) * 3
    w[3] = 0.0  # an all-zero row: scale 1, exact
    qw = quantize(w, bits, group_size or 64)
    err = (dequantize_rows(qw) - w).abs()
    bound = qw.scale[:, None] if bits == 8 else qw.scale.repeat_interleave(group_size, dim=1)
    assert (err <= bound / 2 + 1e-6).all()
    assert err[3].max() == 0


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bits", [8, 4])
def test_quant_matmul_matches_float64_reference(bits: int, kernel: str) -> None:
    x, w = torch.randn(3, 5, 128), torch.randn(300, 128)
    qw = quantize(w, bits, 32)
    y = quant_matmul(x, qw, kernel)
    ref = x.double() @ dequantize_rows(qw, dtype=torch.float64).t()
    assert y.shape == (3, 5, 300)
    # fp32 accumulation of 128 products: |Σ| rounding ≤ n·eps·Σ|x||Ŵ| (a loose, sure bound)
    bound = 128 * 2**-23 * (x.double().abs() @ dequantize_rows(qw, dtype=torch.float64).abs().t())
    assert ((y.double() - ref).abs() <= bound + 1e-6).all()
    # and the quantization error itself: |x (Ŵ - W)ᵀ| ≤ Σ|x| s/2 per row (int8)
    if bits == 8:
        q_err = (ref - x.double() @ w.double().t()).abs()
        assert (q_err <= x.double().abs().sum(-1, keepdim=True) * qw.scale.double() / 2 + 1e-6).all()


COMPILED_CHECK = """
import torch
from llm import quant
from llm.quant import dequantize_rows, quant_matmul, quantize
torch.manual_seed(0)
for rows in (1, 5, 16):  # decode-sized inputs (the kernel serves at most COMPILED_MAX_ROWS rows), odd widths
    x, w = torch.randn(rows, 200), torch.randn(77, 200) * torch.rand(77, 1)
    qw = quantize(w, 8)
    y = quant_matmul(x, qw, "compiled")
    w_hat = dequantize_rows(qw, dtype=torch.float64)
    ref = x.double() @ w_hat.t()
    bound = 200 * 2**-23 * (x.double().abs() @ w_hat.abs().t())  # fp32 accumulation of 200 products
    assert ((y.double() - ref).abs() <= bound + 1e-6).all(), rows
    assert quant._use_compiled(x, qw), rows
print("compiled" if not quant._Compiled.failed else "fallback")
"""


def test_compiled_int8_kernel_matches_float64_reference() -> None:
    """The fused kernel against float64 within the fp32 rounding bound, built in a fresh process."""
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", COMPILED_CHECK], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    if shutil.which(os.environ.get("CXX", "g++")) or shutil.which("clang++"):  # Inductor can build it here
        assert out.stdout.split()[-1] == "compiled", out.stderr[-2000:]


def test_int4_pack_unpack_round_trip() -> None:
    q = torch.randint(-8, 8, (7, 64), dtype=torch.int8)
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (7, 32)
    assert torch.equal(unpack_int4(p), q)
    assert int(p[0, 0]) == (int(q[0, 0]) + 8) | ((int(q[0, 1]) + 8) << 4)


def test_quant_linear_is_inference_only_and_checks_its_format() -> None:
    lin = Linear(64, 32)
    m = QuantLinear.from_linear(lin, 8)
    with pytest.raises(RuntimeError, match="inference-only"):
        m(torch.randn(2, 64, requires_grad=True))
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantLinear(64, 32, bits=3)
    with pytest.raises(ValueError, match="group size 128 does not divide"):
        QuantLinear(64, 32, bits=4, group_size=128)


def trained_model(steps: int = 150) -> torch.nn.Module:
    """tiny_model fitted to TEXT: a model whose greedy choices mean something."""
    tok = byte_tokenizer()
    ids = torch.tensor(tok.encode(TEXT))
    model = tiny_model(ctx=16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 17, (16,))
        batch = torch.stack([ids[s : s + 17] for s in starts.tolist()])
        loss = model.loss(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens through the KV-cache decode step (llm.fast.decode_step)."""
    cache = model.new_kv_cache(1)
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), kv_cache=cache)[:, -1]
        w = ds.weights(model, cache)
        assert w is not None
        out = []
        for _ in range(n):
            out.append(int(logits.argmax(-1)))
            logits = ds.decode_step(w, torch.tensor(out[-1:]), cache)
    return out


def test_int8_greedy_tokens_and_perplexity_of_a_trained_model() -> None:
    model = trained_model()
    q8, q4 = quantize_model(copy.deepcopy(model), 8), quantize_model(copy.deepcopy(model), 4, 32)
    prompt = byte_tokenizer().encode("the hel")
    n = 16 - len(prompt)  # up to the context window
    assert greedy(q8, prompt, n) == greedy(model, prompt, n)
    tokens = np.asarray(byte_tokenizer().encode(TEXT))
    ppl = {k: evaluate_tokens(m, tokens, stride=8)["perplexity"] for k, m in (("fp32", model), ("int8", q8), ("int4", q4))}
    assert ppl["int8"] <= 1.01 * ppl["fp32"] and ppl["int4"] <= 1.05 * ppl["fp32"], ppl


def _checkpoint(tmp_path: Path) -> Path:
    tok = byte_tokenizer()
    tok.save(tmp_path / "tokenizer")
    model = tiny_model(ctx=16)
    ckpt = tmp_path / "step_0000001.pt"
    save_checkpoint(model, None, 1, ckpt, extra={"model_config": model.config.to_dict(),
                                                 "tokenizer_dir": str(tmp_path / "tokenizer")})
    return ckpt


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_checkpoint_round_trip(tmp_path: Path, capsys, bits: int) -> None:
    ckpt = _checkpoint(tmp_path)
    out = tmp_path / f"q{bits}.pt"
    assert quantize_main(["--checkpoint", str(ckpt), "--bits", str(bits), "--group-size", "32", "--out", str(out)]) == 0
    assert "bytes" in capsys.readouterr().out
    loaded, _, _ = load_model(out)
    on_load, _, _ = load_model(ckpt, quantize=f"int{bits}") if bits == 8 else (None, None, None)
    expected = quantize_model(tiny_model(ctx=16), bits, 32)
    x = torch.randint(0, 259, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(x), expected(x))
        if on_load is not None:
            assert torch.equal(on_load(x), expected(x))
    assert isinstance(loaded.layers[0].attn.q_proj, QuantLinear) and loaded.layers[0].attn.q_proj.bits == bits


def test_bad_inputs_give_one_clear_error(tmp_path: Path, capsys) -> None:
    ckpt = _checkpoint(tmp_path)
    q4 = tmp_path / "q4.pt"
    assert quantize_main(["--checkpoint", str(ckpt), "--bits", "4", "--group-size", "32", "--out", str(q4)]) == 0
    with pytest.raises(ValueError, match="quantized to int4; it cannot be loaded as int8"):
        load_model(q4, quantize="int8")
    # a quantized state dict into a model of another width / bit width: one line naming the tensor
    state = torch.load(q4, weights_only=True)
    state["model_config"]["d_ff"] = 96
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(ValueError, match="wrong model shape or bit width"):
        load_model(bad)
    state = torch.load(q4, weights_only=True)
    state["quantization"]["bits"] = 8
    torch.save(state, bad)
    with pytest.raises(ValueError, match="wrong model shape or bit width"):
        load_model(bad)
    assert quantize_main(["--checkpoint", str(q4), "--out", str(tmp_path / "x.pt")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert quantize_main(["--checkpoint", str(ckpt), "--bits", "4", "--group-size", "64"]) == 2  # 64 ∤ d_model 32
    assert "does not divide" in capsys.readouterr().err

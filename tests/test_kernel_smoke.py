"""The benchmark scripts run end to end on tiny shapes (so they cannot rot), and the torch.nn reference
they compare against is the same model as ours (same weights -> same logits and gradients)."""

from __future__ import annotations

import json

import pytest
import torch

from kernel import benchmarking_attention, benchmarking_model, tune_flash_triton
from kernel.torch_reference import TorchTransformer
from llm.config import ModelConfig

TINY = ["--vocab-size", "64", "--context-length", "16", "--d-model", "32", "--num-layers", "1", "--num-heads", "2",
        "--batch-size", "2", "--warmup", "0", "--steps", "1", "--peak-flops", "1e11", "--device", "cpu"]


def test_benchmarking_model_compare_memory_profile(tmp_path, capsys) -> None:
    out = tmp_path / "r.json"
    argv = TINY + ["--compare", "torch", "--memory", "--profile", "--profile-steps", "1", "--profile-rows", "3", "--json", str(out)]
    assert benchmarking_model.main(argv) == 0
    res = json.loads(out.read_text())
    assert [p["phase"] for p in res["phases"]] == ["forward", "fwd+bwd", "step"]
    for p in res["phases"]:
        assert set(p["impls"]) == {"ours", "torch"} and p["speed_ours_over_torch"] > 0
        assert p["impls"]["ours"]["tokens_per_s"] > 0 and p["impls"]["ours"]["mfu"] > 0
    assert abs(res["loss_check"]["ours"] - res["loss_check"]["torch"]) < 1e-4
    assert set(res["memory"]) == {f"{i}/{p}" for i in ("ours", "torch") for p in ("forward", "fwd+bwd", "step")}
    printed = capsys.readouterr().out
    assert "speed ours/torch" in printed and "where the time goes" in printed and "Ceiling ours/torch" in printed


def test_benchmarking_model_reports_the_reference_model_too(tmp_path, capsys) -> None:
    out = tmp_path / "r.json"
    assert benchmarking_model.main(TINY + ["--impl", "both", "--compare", "torch", "--phases", "fwd+bwd", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    (phase,) = res["phases"]
    assert set(phase["impls"]) == {"ours", "reference", "torch"}
    assert all(phase[f"speed_{k}"] > 0 for k in ("ours_over_torch", "reference_over_torch", "ours_over_reference"))
    assert abs(res["loss_check"]["reference"] - res["loss_check"]["ours"]) < 1e-5
    assert "speed ours/reference" in capsys.readouterr().out
    assert benchmarking_model.main(TINY + ["--impl", "reference", "--phases", "forward"]) == 0
    assert benchmarking_model.main(TINY + ["--impl", "reference", "--sweep"]) == 2  # the sweep measures the fast model


def test_benchmarking_model_runs_a_checkpointed_twin(tmp_path, capsys) -> None:
    out = tmp_path / "r.json"
    argv = TINY + ["--num-layers", "2", "--activation-checkpointing", "full", "--phases", "step", "--memory", "--json", str(out)]
    assert benchmarking_model.main(argv) == 0
    res = json.loads(out.read_text())
    assert set(res["phases"][0]["impls"]) == {"ours", "ours+ac"} and res["phases"][0]["speed_ours+ac_over_ours"] > 0
    assert res["loss_check"]["ours+ac"] == res["loss_check"]["ours"]
    assert set(res["memory"]) == {"ours/step", "ours+ac/step"}
    assert "speed ours+ac/ours" in capsys.readouterr().out
    assert benchmarking_model.main(TINY + ["--activation-checkpointing", "every-0"]) == 2  # one error line


def test_gemm_ceiling_is_torch_total_over_our_gemm_time() -> None:
    gemm = benchmarking_model.GEMM
    ours = {gemm: 800.0, "batched matmul": 50.0, "_total_ms": 900.0}
    ref = {gemm: 790.0, "attention kernel": 100.0, "_total_ms": 960.0}
    line = benchmarking_model.gemm_ceiling(ours, ref)
    assert "ours 100.0 ms, torch 170.0 ms" in line  # everything but the GEMMs
    assert "1.20x" in line  # 960 / 800
    assert "in 72.7 ms" in line  # 960 / 1.1 - 800
    assert "out of reach" in benchmarking_model.gemm_ceiling({gemm: 950.0, "_total_ms": 990.0}, ref)  # 960 / 1.1 < 950


def test_benchmarking_model_sweep_writes_results(tmp_path) -> None:
    argv = ["--sweep", "--sweep-sizes", "demo", "--sweep-contexts", "8,16", "--batch-size", "1", "--warmup", "0",
            "--vocab-size", "64", "--d-model", "32", "--num-layers", "1", "--num-heads", "2",
            "--steps", "1", "--phases", "step", "--compare", "torch", "--peak-flops", "1e11", "--device", "cpu",
            "--results-dir", str(tmp_path), "--img-dir", str(tmp_path / "img"), "--max-seconds", "60"]
    assert benchmarking_model.main(argv) == 0
    data = json.loads((tmp_path / "sweep_cpu.json").read_text())
    assert [(p["size"], p["context"]) for p in data["points"]] == [("demo", 8), ("demo", 16)]
    assert "| demo | 16 | step |" in (tmp_path / "sweep_cpu.md").read_text()


def test_benchmarking_model_sweep_skips_what_does_not_fit(tmp_path, capsys) -> None:
    argv = ["--sweep", "--sweep-sizes", "small", "--sweep-contexts", "1024", "--peak-flops", "1e11", "--device", "cpu",
            "--results-dir", str(tmp_path), "--img-dir", str(tmp_path), "--max-seconds", "1"]
    assert benchmarking_model.main(argv) == 0
    data = json.loads((tmp_path / "sweep_cpu.json").read_text())
    assert data["points"] == [] and "estimated" in data["skipped"][0]["reason"]
    assert "skipping small @ 1024" in capsys.readouterr().err


def test_benchmarking_attention_tiny(tmp_path) -> None:
    argv = ["--head-dims", "16", "--seq-lens", "32,48", "--batch-size", "1", "--warmup", "0", "--steps", "1",
            "--memory", "--device", "cpu", "--out", "--results-dir", str(tmp_path)]
    assert benchmarking_attention.main(argv) == 0
    data = json.loads((tmp_path / "attention_cpu.json").read_text())
    for p in data["points"]:
        assert set(p["results"]) == {"ours", "ours_causal", "flash", "naive", "sdpa"}
        for r in p["results"].values():
            assert r["fwd"]["median_s"] > 0 and r["fwd+bwd"]["median_s"] > 0 and "peak_above_start_bytes" in r
    assert "## fwd+bwd" in (tmp_path / "attention_cpu.md").read_text()


@pytest.mark.parametrize(
    "main,argv",
    [
        (benchmarking_model.main, ["--phases", "sideways"]),
        (benchmarking_model.main, TINY + ["--num-heads", "3"]),
        (benchmarking_attention.main, ["--impls", "magic"]),
        (benchmarking_attention.main, ["--seq-lens", "0"]),
    ],
)
def test_bad_flags_are_one_line_errors(main, argv, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


@pytest.mark.parametrize("attn_impl", ["ours", "flash"])
@pytest.mark.parametrize("kv_heads,tie", [(None, False), (2, True)], ids=["mha", "gqa-tied"])
def test_torch_reference_is_the_same_model(attn_impl, kv_heads, tie) -> None:
    """Our Transformer's weights load into the torch.nn twin; logits, loss and gradients agree (also
    through the flash attention path)."""
    from llm.transformer import Transformer

    cfg = ModelConfig(vocab_size=50, context_length=24, d_model=32, num_layers=2, num_heads=4, num_kv_heads=kv_heads, tie_embeddings=tie)
    ours = Transformer.from_config(cfg, attn_impl=attn_impl).double()
    ref = TorchTransformer.from_config(cfg).double()
    assert ref.state_dict().keys() == ours.state_dict().keys()
    ref.load_state_dict(ours.state_dict())
    x = torch.randint(0, 50, (2, 19))
    y = torch.randint(0, 50, (2, 19))
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-10, atol=1e-10)
    ours.loss(x, y).backward()
    ref.loss(x, y).backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-8, atol=1e-10, msg=name)


def test_tune_flash_triton_parses_configs_and_needs_cuda(capsys) -> None:
    assert tune_flash_triton.parse_configs("64x64x4x3, 128x32x8x2") == [(64, 64, 4, 3), (128, 32, 8, 2)]
    with pytest.raises(ValueError, match="like 128x64x8x3"):
        tune_flash_triton.parse_configs("64x64x4")
    if not torch.cuda.is_available():
        assert tune_flash_triton.main(["--device", "cpu"]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err
    assert tune_flash_triton.main(["--configs", "64x64"]) == 2

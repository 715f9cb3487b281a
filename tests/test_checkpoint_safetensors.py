"""Checkpoints in the safetensors format (--checkpoint-format safetensors): tensors in X.safetensors, the rest
in X.json, no pickle. Resume stays bit-exact; loading never calls torch.load; damage to either file, or a
pair that does not belong together, is refused with one line. Reference: the same dict through torch.save /
torch.load(weights_only=True)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open

from llm.checkpoint import (
    CheckpointError, load_checkpoint, prune_checkpoints, read_checkpoint, resolve_checkpoint, save_checkpoint,
)
from llm.config import ModelConfig
from llm.export import export_checkpoint
from llm.optim import AdamW
from llm.training import main, train
from llm.transformer import Transformer
from tests.test_training import _cfg, data_dir  # noqa: F401  (data_dir: the same token files, a fixture)

CFG = ModelConfig(vocab_size=64, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=64,
                  tie_embeddings=True)


def _trained() -> tuple[Transformer, AdamW]:
    torch.manual_seed(0)
    model = Transformer.from_config(CFG)
    opt = AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    for _ in range(2):
        model(torch.randint(0, 64, (2, 8))).sum().backward()
        opt.step()
    return model, opt


def _same(a, b, where="") -> None:
    """Equal values, types and dict key types (tuples stay tuples, int keys stay ints), tensors bit for bit.
    A state dict's OrderedDict reads back as a dict (same keys, same order)."""
    assert type(a) is type(b) or (isinstance(a, dict) and type(b) is dict), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def test_same_dict_as_torch_save_without_torch_load(tmp_path, monkeypatch):
    model, opt = _trained()
    extra = {"model_config": CFG.to_dict(), "best_val": math.inf, "nan": math.nan, "pair": (1, 2.5),
             "by_int": {3: "x", 4: [None, True]}, "tiny": 1e-300, "third": 1 / 3, "big": 2**62}
    save_checkpoint(model, opt, 7, tmp_path / "a.pt", extra=extra)
    save_checkpoint(model, opt, 7, tmp_path / "a.safetensors", extra=extra)
    want = torch.load(tmp_path / "a.pt", weights_only=True)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load read a safetensors checkpoint"))
    got = read_checkpoint(tmp_path / "a.safetensors")
    _same(want, got)
    assert sorted(p.name for p in tmp_path.iterdir() if "a.s" in p.name or p.name == "a.json") == [
        "a.json", "a.safetensors", "a.safetensors.sha256"]
    with safe_open(tmp_path / "a.safetensors", "pt") as f:  # a plain safetensors file; tied weights stored once
        names = set(f.keys())
    assert "model/token_embeddings.weight" in names and "model/lm_head.weight" not in names
    assert "optimizer/state/0/exp_avg" in names
    fresh = Transformer.from_config(CFG)
    fresh_opt = AdamW(fresh.parameters(), lr=1e-3)
    assert load_checkpoint(tmp_path / "a.safetensors", fresh, fresh_opt) == 7
    assert fresh.lm_head.weight is fresh.token_embeddings.weight
    _same(opt.state_dict(), fresh_opt.state_dict())


def test_damage_is_one_line(tmp_path):
    model, opt = _trained()
    save_checkpoint(model, opt, 1, tmp_path / "x.safetensors")
    with torch.no_grad():
        model.ln_final.weight.add_(1.0)
    save_checkpoint(model, opt, 2, tmp_path / "y.safetensors")
    path = tmp_path / "x.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # inside the last tensor: the file still parses
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"x\.safetensors is corrupt: checksum mismatch"):
        read_checkpoint(path)
    (tmp_path / "x.safetensors.sha256").unlink()  # no checksum file: the JSON's digest still catches it
    with pytest.raises(CheckpointError, match=r"x\.json was written with other tensors"):
        read_checkpoint(path)
    shutil.copy(tmp_path / "x.json", tmp_path / "y.json")  # a pair that does not belong together
    with pytest.raises(CheckpointError, match=r"y\.json was written with other tensors"):
        read_checkpoint(tmp_path / "y.safetensors")
    (tmp_path / "y.json").unlink()
    with pytest.raises(CheckpointError, match=r"y\.safetensors is incomplete: its state file y\.json is missing"):
        read_checkpoint(tmp_path / "y.safetensors")


def test_resume_is_bit_exact_in_the_safetensors_format(data_dir, tmp_path):
    full = train(_cfg(data_dir, tmp_path / "full"), quiet=True)
    cfg = _cfg(data_dir, tmp_path / "split", checkpoint_format="safetensors")
    first = train(cfg, stop_at=10, quiet=True)
    assert first.checkpoint.name == "step_0000010.safetensors"
    second = train(cfg, resume="auto", quiet=True)
    assert {**first.losses, **second.losses} == full.losses  # every step's loss identical, bit for bit
    a, b = read_checkpoint(full.checkpoint)["model"], read_checkpoint(second.checkpoint)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    names = ["best.safetensors", "step_0000015.safetensors", "step_0000020.safetensors"]  # keep_last=2 plus best
    files = sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir())
    assert files == sorted(names + [n + ".sha256" for n in names] + [n.replace(".safetensors", ".json") for n in names])
    state = json.loads((tmp_path / "split" / "checkpoints" / "step_0000020.json").read_text())["checkpoint"]
    assert state["iteration"] == 20 and state["train_config"]["checkpoint_format"] == "safetensors"
    assert resolve_checkpoint(tmp_path / "split").name == "best.safetensors"
    out = export_checkpoint(second.checkpoint, tmp_path / "hf")  # export reads this format too
    assert (out / "model.safetensors").is_file()


def test_switching_format_on_resume_leaves_one_best(data_dir, tmp_path, capsys):
    cfg = _cfg(data_dir, tmp_path / "run", max_steps=10)
    train(cfg, stop_at=5, quiet=True)
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "best.pt").is_file()
    assert main(["--resume", "auto", "--out-dir", str(tmp_path / "run"), "--checkpoint-format", "safetensors",
                 "--no-sample", "--no-plot"]) == 0
    assert not (ckpts / "best.pt").exists() and (ckpts / "best.safetensors").is_file()
    assert (ckpts / "step_0000010.safetensors").is_file() and (ckpts / "step_0000005.pt").is_file()
    assert main(["--checkpoint-format", "pickle"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "pickle" in err[-1]


def test_prune_takes_the_json_along(tmp_path):
    model, _ = _trained()
    for step in (1, 2, 3):
        save_checkpoint(model, None, step, tmp_path / f"step_{step:07d}.safetensors")
    (tmp_path / "step_0000009.json").write_text("{}")  # an orphan: its tensors are gone
    removed = {p.name for p in prune_checkpoints(tmp_path, 1)}
    assert removed == {"step_0000001.safetensors", "step_0000001.safetensors.sha256", "step_0000001.json",
                       "step_0000002.safetensors", "step_0000002.safetensors.sha256", "step_0000002.json",
                       "step_0000009.json"}
    assert read_checkpoint(tmp_path / "step_0000003.safetensors")["iteration"] == 3

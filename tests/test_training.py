"""Training loop: bit-exact resume, world-size invariance (2 gloo processes), signals, non-finite loss,
config validation and the plot command. Tiny model (d_model 32, 2 layers, context 16) on tiny token
arrays written to tmp_path, so the whole file runs in seconds on 2 cores."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from llm import training
from llm.checkpoint import save_checkpoint
from llm.generating import load_model
from llm.train_config import TrainConfig, load_toml, merge, train_preset
from llm.training import TrainingError, batch_rng, global_micro_index, main, train, unigram_entropy
from tests.corrupt import scribble_tensor_bytes, truncate

VOCAB = 64


def _tokens(n: int, seed: int) -> np.ndarray:
    """A learnable stream: each token is 3 * previous + noise (mod VOCAB)."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 3, size=n)
    a = np.zeros(n, dtype=np.uint16)
    for i in range(1, n):
        a[i] = (int(a[i - 1]) * 3 + int(noise[i])) % VOCAB
    return a


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tokens")
    np.save(d / "train.npy", _tokens(6000, 0))
    np.save(d / "val.npy", _tokens(1000, 1))
    return d


def _cfg(data_dir: Path, out_dir: Path, **kw) -> TrainConfig:
    over = dict(
        train_data=str(data_dir / "train.npy"), val_data=str(data_dir / "val.npy"), out_dir=str(out_dir),
        prepare_demo_data=False, max_steps=20, batch_size=4, grad_accum=1, lr=3e-3, min_lr=3e-4, warmup_steps=3,
        eval_interval=5, eval_batches=2, log_interval=5, checkpoint_interval=5, keep_last=2, threads=1,
        model=dict(vocab_size=VOCAB, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=64),
    )
    over.update(kw)
    return merge(train_preset("demo"), over)


def _params(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_resume_is_bit_exact(data_dir: Path, tmp_path: Path) -> None:
    full = train(_cfg(data_dir, tmp_path / "full"), quiet=True)
    cfg = _cfg(data_dir, tmp_path / "split")
    first = train(cfg, stop_at=10, quiet=True)
    assert first.step == 10 and first.checkpoint is not None and first.checkpoint.name == "step_0000010.pt"
    second = train(cfg, resume="auto", quiet=True)
    assert sorted(first.losses) == list(range(1, 11)) and sorted(second.losses) == list(range(11, 21))
    resumed = {**first.losses, **second.losses}
    assert resumed == full.losses  # every step's loss identical, bit for bit
    a, b = _params(full.checkpoint), _params(second.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # metrics.jsonl of the resumed run continues the first part: one train record per log step, no duplicates
    steps = [r["step"] for r in map(json.loads, (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]
    assert steps == [5, 10, 15, 20]
    ckpts = sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir())
    names = ["best.pt", "step_0000015.pt", "step_0000020.pt"]  # keep_last=2 plus best
    assert ckpts == sorted(names + [n + ".sha256" for n in names])  # each with its checksum
    saved = torch.load(second.checkpoint, map_location="cpu", weights_only=True)
    for key in ("model", "optimizer", "iteration", "model_config", "train_config", "rng", "sampler", "best_val"):
        assert key in saved
    assert saved["iteration"] == 20 and saved["model_config"]["d_model"] == 32
    # a fresh start must not mix its checkpoints with an earlier run's
    with pytest.raises(ValueError, match="already holds a run .*--resume auto.*--overwrite"):
        train(cfg, quiet=True)


def test_sigint_finishes_the_step_saves_and_resumes_exactly(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    full = train(_cfg(data_dir, tmp_path / "full", max_steps=8, checkpoint_interval=0), quiet=True)
    calls = {"n": 0}
    orig = training.LossModule.forward

    def forward(self, x, y):
        calls["n"] += 1
        if calls["n"] == 3:  # Ctrl-C in the middle of step 3
            os.kill(os.getpid(), signal.SIGINT)
        return orig(self, x, y)

    monkeypatch.setattr(training.LossModule, "forward", forward)
    cfg = _cfg(data_dir, tmp_path / "run", max_steps=8, checkpoint_interval=0)
    part = train(cfg, quiet=True)
    assert part.interrupted and part.step == 3 and part.checkpoint.name == "step_0000003.pt"
    monkeypatch.setattr(training.LossModule, "forward", orig)
    rest = train(cfg, resume=str(tmp_path / "run"), quiet=True)
    assert {**part.losses, **rest.losses} == full.losses
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_non_finite_loss_names_the_step_and_keeps_the_checkpoint(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    calls = {"n": 0}
    orig = training.LossModule.forward

    def forward(self, x, y):
        calls["n"] += 1
        loss = orig(self, x, y)
        return loss * float("nan") if calls["n"] == 7 else loss

    monkeypatch.setattr(training.LossModule, "forward", forward)
    cfg = _cfg(data_dir, tmp_path / "run", max_steps=10, checkpoint_interval=5)
    with pytest.raises(TrainingError, match=r"non-finite training loss \(nan\) at step 7.*step_0000005\.pt"):
        train(cfg, quiet=True)
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert "step_0000005.pt" in ckpts and not any("7" in c for c in ckpts)
    good = torch.load(tmp_path / "run" / "checkpoints" / "step_0000005.pt", weights_only=True)
    assert good["iteration"] == 5 and all(torch.isfinite(v).all() for v in good["model"].values())


# -------------------------------------------------------------------------------- world-size invariance
def _ddp_worker(rank: int, world: int, port: int, cfg_dict: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    train(TrainConfig.from_dict(cfg_dict), quiet=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_world_2_accum_1_equals_world_1_accum_2(data_dir: Path, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    kw = dict(max_steps=4, eval_interval=2, checkpoint_interval=4, log_interval=1)
    single = train(_cfg(data_dir, tmp_path / "w1", grad_accum=2, **kw), quiet=True)
    cfg2 = _cfg(data_dir, tmp_path / "w2", grad_accum=1, **kw)
    # fork: the children inherit the imported torch instead of paying for a fresh import each; DDP's
    # constructor imports torch._dynamo (seconds), so import it once here rather than once per child
    import torch._dynamo  # noqa: F401

    mp.start_processes(_ddp_worker, args=(2, _free_port(), cfg2.to_dict()), nprocs=2, join=True, start_method="fork")
    a, b = _params(single.checkpoint), _params(tmp_path / "w2" / "checkpoints" / "step_0000004.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)  # equal up to float reduction order
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "w2" / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]
    assert losses == pytest.approx([single.losses[s] for s in range(1, 5)], rel=1e-6)


def test_micro_batches_are_a_pure_function_of_seed_step_and_global_index() -> None:
    # world 1 x accum 2 and world 2 x accum 1 visit the same global micro indices
    assert [global_micro_index(m, 0, 2) for m in range(2)] == [global_micro_index(0, r, 1) for r in range(2)]
    assert batch_rng(3, 7, 1).integers(0, 1 << 30, 4).tolist() == batch_rng(3, 7, 1).integers(0, 1 << 30, 4).tolist()
    assert batch_rng(3, 7, 1).integers(0, 1 << 30, 4).tolist() != batch_rng(3, 8, 1).integers(0, 1 << 30, 4).tolist()


# ---------------------------------------------------------------------------------------- config / CLI
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "-1"], "lr must be positive"),
        (["--max-steps", "0"], "max_steps must be a positive integer"),
        (["--warmup-steps", "500", "--max-steps", "100"], "warmup_steps (500) must not exceed max_steps (100)"),
        (["--d-model", "100", "--num-heads", "8"], "d_model (100) must be divisible by num_heads (8)"),
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--dtype", "fp8"], "invalid choice: 'fp8'"),
        (["--batch-size", "two"], "invalid int value: 'two'"),
        (["--device", "tpu"], "device must be auto, cpu, cuda"),
        (["--min-lr", "1", "--lr", "0.1"], "min_lr must be in [0, lr=0.1]"),
        (["--config", "/nonexistent.toml"], "does not exist"),
    ],
)
def test_invalid_values_give_one_error_line_before_any_work(argv, message, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(argv + ["--out-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not out.exists()  # nothing started


def _parsed(*argv: str) -> TrainConfig:
    return training.config_from_args(training.build_parser().parse_args(list(argv)))


def test_a_shorter_max_steps_scales_the_presets_warmup_to_a_tenth(tmp_path: Path) -> None:
    """Rule: a preset's warmup_steps, when max_steps is given and warmup_steps is not, becomes
    min(preset warmup, max_steps // 10); an explicit warmup_steps is kept (and must not exceed max_steps)."""
    assert _parsed().warmup_steps == 20  # the demo preset as it is: 200 steps, 20 of warmup
    assert _parsed("--max-steps", "20").warmup_steps == 2
    assert _parsed("--max-steps", "5").warmup_steps == 0
    assert _parsed("--max-steps", "1000").warmup_steps == 20  # never longer than the preset's
    assert _parsed("--preset", "tinystories", "--max-steps", "2000").warmup_steps == 200
    assert _parsed("--max-steps", "20", "--warmup-steps", "7").warmup_steps == 7
    toml = tmp_path / "short.toml"
    toml.write_text("max_steps = 30\n")
    assert _parsed("--config", str(toml)).warmup_steps == 3
    toml.write_text("max_steps = 30\nwarmup_steps = 25\n")
    assert _parsed("--config", str(toml)).warmup_steps == 25
    with pytest.raises(ValueError, match=r"warmup_steps \(30\) must not exceed max_steps \(20\)"):
        _parsed("--max-steps", "20", "--warmup-steps", "30")


def test_a_resumed_run_keeps_the_warmup_of_its_checkpoint(tmp_path: Path) -> None:
    """On --resume the checkpoint's config is the base: its schedule goes on unchanged when max_steps moves."""
    saved = merge(train_preset("demo"), {"max_steps": 400, "warmup_steps": 40})
    ckpt = tmp_path / "step_0000010.pt"
    save_checkpoint(torch.nn.Linear(1, 1), None, 10, ckpt, extra={"train_config": saved.to_dict()})
    cfg = _parsed("--resume", str(ckpt), "--max-steps", "300")
    assert (cfg.max_steps, cfg.warmup_steps) == (300, 40)


def test_missing_data_is_one_clear_error(tmp_path: Path, capsys) -> None:
    rc = main(["--preset", "tinystories", "--train-data", str(tmp_path / "nope.npy"), "--out-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: train_data") and "llm.data prepare" in err[-1]


def test_toml_keys_and_types_are_checked(tmp_path: Path) -> None:
    bad_key = tmp_path / "a.toml"
    bad_key.write_text("max_step = 10\n")
    with pytest.raises(ValueError, match=r"unknown training \(a.toml\) config key\(s\): max_step"):
        load_toml(bad_key)
    bad_type = tmp_path / "b.toml"
    bad_type.write_text('[model]\nd_model = "big"\n')
    with pytest.raises(ValueError, match="d_model must be int"):
        merge(train_preset("demo"), load_toml(bad_type))


def test_cli_end_to_end_with_toml_and_flags(data_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the optional extra is missing: say so, carry on
    toml = tmp_path / "c.toml"
    toml.write_text(
        f'train_data = "{data_dir / "train.npy"}"\nval_data = "{data_dir / "val.npy"}"\nprepare_demo_data = false\n'
        "max_steps = 6\nbatch_size = 4\nwarmup_steps = 2\neval_interval = 3\nlog_interval = 2\neval_batches = 2\n"
        f"[model]\nvocab_size = {VOCAB}\ncontext_length = 16\nd_model = 32\nnum_layers = 2\nnum_heads = 4\n"
    )
    out = tmp_path / "run"
    rc = main(["--config", str(toml), "--lr", "0.002", "--out-dir", str(out), "--threads", "1", "--img-dir", str(tmp_path / "img")])
    cap = capsys.readouterr()
    assert rc == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["lr"] == 0.002 and saved["max_steps"] == 6 and saved["model"]["d_model"] == 32  # flag > TOML > preset
    assert saved["model"]["d_ff"] == 128  # re-derived from the new d_model
    assert "uv sync --extra plot" in cap.err
    assert "unigram entropy" in cap.out and "final val loss" in cap.out
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["type"] == "train"]
    assert [r["step"] for r in train_recs] == [2, 4, 6]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "time"):
        assert all(math.isfinite(r[key]) for r in train_recs), key
    assert [r["step"] for r in recs if r["type"] == "eval"] == [3, 6]
    # the plot subcommand: same hint, exit 0; a directory without metrics is a one-line error
    assert main(["plot", str(out)]) == 0
    assert "uv sync --extra plot" in capsys.readouterr().err
    assert main(["plot", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_unigram_entropy_matches_a_float64_count(ref_snapshot) -> None:
    tokens = _tokens(5000, 2)
    counts = Counter(tokens.tolist())
    n = sum(counts.values())
    reference = -sum(c / n * math.log(c / n) for c in counts.values())
    stored = ref_snapshot({"entropy": np.float64(reference)}, rtol=1e-12, atol=0)
    assert unigram_entropy(tokens, VOCAB) == pytest.approx(float(stored["entropy"]), rel=1e-12)


# -------------------------------------------------------------------------------- nothing lost (issue #12)
ONE_LAYER = dict(vocab_size=VOCAB, context_length=16, d_model=32, num_layers=1, num_heads=4, d_ff=64)


def _records(run: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def test_rewind_retires_the_abandoned_branch(data_dir: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    cfg = _cfg(data_dir, run, max_steps=12, checkpoint_interval=1, keep_last=5, eval_interval=2, log_interval=1,
               model=ONE_LAYER)
    train(cfg, stop_at=9, quiet=True)
    ckpts = run / "checkpoints"
    assert torch.load(ckpts / "best.pt", weights_only=True)["iteration"] > 6
    # go back to step 6 with another learning rate: steps 7-9 and best.pt belong to the abandoned branch
    branch = merge(cfg, {"lr": 1e-3})
    train(branch, resume=str(ckpts / "step_0000006.pt"), stop_at=7)
    err = capsys.readouterr().err
    retired = [d for d in (ckpts / "retired").iterdir()]
    assert len(retired) == 1
    line = next(ln for ln in err.splitlines() if "retired" in ln)
    assert "step 6" in line and "step_0000009.pt" in line and "best.pt" in line and str(retired[0]) in line
    assert sorted(p.name for p in retired[0].iterdir() if p.suffix == ".pt") == [
        "best.pt", "step_0000007.pt", "step_0000008.pt", "step_0000009.pt"]
    assert [r["step"] for r in map(json.loads, (retired[0] / "metrics.jsonl").read_text().splitlines())] == [
        7, 8, 8, 9]  # train 7, train 8, eval 8, train 9 of the old branch
    assert sorted(p.name for p in ckpts.glob("*.pt")) == [f"step_{s:07d}.pt" for s in (5, 6, 7)]
    rest = train(branch, resume="auto", quiet=True)  # continues the new branch, not the old step 9
    assert sorted(rest.losses) == list(range(8, 13))
    recs = _records(run)
    assert [r["step"] for r in recs] == list(range(1, 13))  # one history: every step once, in order
    assert [r["lr"] for r in recs[6:]] == [training.lr_at(s, branch) for s in range(6, 12)]
    assert all(r["lr"] == training.lr_at(s, cfg) for s, r in enumerate(recs[:6]))


@pytest.mark.parametrize("keep_last", [5, 2])
def test_divergence_stops_before_the_ruined_weights_are_checkpointed(data_dir: Path, tmp_path: Path,
                                                                    keep_last: int) -> None:
    run = tmp_path / "run"
    cfg = _cfg(data_dir, run, lr=1e6, min_lr=0.0, checkpoint_interval=1, keep_last=keep_last, model=ONE_LAYER)
    with pytest.raises(TrainingError, match=r"diverged at step 2 \(max \|weight\| .*last healthy checkpoint: "
                                            r".*step_0000001\.pt") as e:
        train(cfg, quiet=True)
    assert "\n" not in str(e.value)
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.pt")) == ["step_0000001.pt"]
    healthy = torch.load(ckpts / "step_0000001.pt", weights_only=True)["model"]
    assert max(v.abs().max().item() for v in healthy.values()) < 10


def test_loss_stuck_at_uniform_output_moves_the_ruined_checkpoint_aside(data_dir: Path, tmp_path: Path,
                                                                      monkeypatch) -> None:
    calls = {"n": 0}
    orig = training.LossModule.forward

    def forward(self, x, y):  # from step 7 on: uniform output, no gradient (the weights of step 6 are dead)
        calls["n"] += 1
        loss = orig(self, x, y)
        return loss * 0.0 + math.log(VOCAB) if calls["n"] >= 7 else loss

    monkeypatch.setattr(training.LossModule, "forward", forward)
    run = tmp_path / "run"
    cfg = _cfg(data_dir, run, max_steps=10, checkpoint_interval=3, keep_last=1, eval_interval=100,
               model=ONE_LAYER)
    with pytest.raises(TrainingError, match=r"diverged at step 7 \(loss 4\.1589 = ln\(vocab 64\).*moved "
                                            r"step_0000006\.pt.*last healthy checkpoint: .*step_0000003\.pt"):
        train(cfg, quiet=True)
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.pt")) == ["step_0000003.pt"]  # kept although keep_last=1
    assert [p.name for p in (ckpts / "retired").glob("*/*.pt")] == ["step_0000006.pt"]


def test_resume_auto_falls_back_to_the_newest_intact_checkpoint(data_dir: Path, tmp_path: Path, capsys) -> None:
    full = train(_cfg(data_dir, tmp_path / "full", max_steps=12, model=ONE_LAYER), quiet=True)
    run = tmp_path / "run"
    cfg = _cfg(data_dir, run, max_steps=12, model=ONE_LAYER)
    train(cfg, stop_at=10, quiet=True)
    ckpts = run / "checkpoints"
    scribble_tensor_bytes(ckpts / "step_0000010.pt")  # loads without complaint, NaNs and all, unless checked
    assert main(["--resume", str(ckpts / "step_0000010.pt"), "--out-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step_0000010.pt is corrupt: checksum mismatch" in err[0]
    with pytest.raises(ValueError, match=r"step_0000010\.pt is corrupt: checksum mismatch"):
        load_model(ckpts / "step_0000010.pt")  # generation and evaluation load through the same check
    truncate(ckpts / "step_0000010.pt")
    rest = train(cfg, resume="auto")
    err = capsys.readouterr().err
    used = [ln for ln in err.splitlines() if "corrupt" in ln]
    assert len(used) == 1 and "step_0000010.pt" in used[0] and "resuming from" in used[0]
    assert used[0].endswith("step_0000005.pt")
    assert {s: full.losses[s] for s in range(6, 13)} == rest.losses  # the same run, from step 5 on

"""FSDP2 (--parallel fsdp) on the CPU with gloo, 2 processes: the same gradients and loss trajectory as DDP
and as one process, gradient accumulation without a sync per micro-batch, per-rank memory, and sharded
(DCP) checkpoints: atomic, resumable on another world size, exportable to one file."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llm.checkpoint import latest_intact_checkpoint, read_checkpoint
from llm.fsdp import apply_fsdp
from llm.parallel import rank_state_bytes
from llm.train_config import TrainConfig
from llm.training import main, train
from llm.transformer import Transformer
from tests.test_training import _cfg, _free_port, data_dir  # noqa: F401  (data_dir: the shared token-array fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = dict(vocab_size=47, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=39)  # odd: uneven shards
TOL = dict(rel=1e-5, abs=1e-6)


def _env(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))


def _spawn(fn, *args) -> None:
    import torch._dynamo  # noqa: F401  (DDP's constructor imports it: once here, not once per forked child)

    # The autograd engine starts its threads at the first backward of a process; when that first backward
    # runs in a forked child, the threads' set_num_threads now and then meets the OpenMP state the fork
    # copied ("Invalid thread pool!", SIGABRT). One backward here first, and the children inherit a started engine.
    torch.ones(1, requires_grad=True).sum().backward()

    mp.start_processes(fn, args=(2, _free_port(), *args), nprocs=2, join=True, start_method="fork")


def _train_worker(rank: int, world: int, port: int, cfg_dict: dict, kw: dict) -> None:
    _env(rank, world, port)
    train(TrainConfig.from_dict(cfg_dict), quiet=True, **kw)


def _records(run_dir: Path) -> dict[int, tuple[float, float]]:
    """step -> (loss, pre-clip gradient norm) from metrics.jsonl (log_interval 1)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in map(json.loads, lines) if r["type"] == "train"}


# ------------------------------------------------------------------------------------ gradients
def _grad_worker(rank: int, world: int, port: int, out: str) -> None:
    """One backward of the sharded model on this rank's half of a batch; rank 0 saves the full gradients,
    and those of the same model made to sum (divide factor 1: the gloo bug, as a control)."""
    _env(rank, world, port)
    dist.init_process_group("gloo")
    grads = {}
    for kind in ("mean", "sum"):
        torch.manual_seed(0)
        model = apply_fsdp(Transformer(**MODEL), torch.device("cpu"), torch.float32)
        if kind == "sum":
            for unit in [*model.layers, model]:
                unit.set_gradient_divide_factor(1.0)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randint(47, (4, 16), generator=g), torch.randint(47, (4, 16), generator=g)
        model.loss(x[2 * rank: 2 * rank + 2], y[2 * rank: 2 * rank + 2]).backward()
        grads[kind] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save(grads, out)
    dist.destroy_process_group()


def test_sharded_gradients_are_the_mean_over_ranks_not_the_sum(tmp_path: Path) -> None:
    """The gloo pitfall: FSDP gradients summed over the ranks instead of averaged are W times too large.
    AdamW hides a constant factor in the loss curve, so the gradients themselves are compared with those
    of the whole batch on one plain process."""
    _spawn(_grad_worker, str(tmp_path / "grads.pt"))
    torch.manual_seed(0)
    plain = Transformer(**MODEL)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(47, (4, 16), generator=g), torch.randint(47, (4, 16), generator=g)
    plain.loss(x, y).backward()
    got = torch.load(tmp_path / "grads.pt", weights_only=True)
    for name, p in plain.named_parameters():
        torch.testing.assert_close(got["mean"][name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
        # the control: summed gradients are W = 2 times these, which the comparison above would reject
        torch.testing.assert_close(got["sum"][name], 2 * p.grad, rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------------ trajectories
def test_fsdp_loss_trajectory_equals_ddp_and_one_process(data_dir: Path, tmp_path: Path) -> None:
    """20 steps, 2 ranks x 2 micro-batches (no sync on the first) against 1 process x 4 micro-batches:
    the same 4 batches per step, so the same losses and gradient norms within 1e-5; fsdp also with every
    block activation-checkpointed (recomputed inside FSDP's gathered units)."""
    kw = dict(max_steps=20, log_interval=1, eval_interval=20, checkpoint_interval=0)
    single = train(_cfg(data_dir, tmp_path / "one", grad_accum=4, **kw), quiet=True)
    runs = {"ddp": {}, "fsdp": {}, "fsdp-ac": {"activation_checkpointing": "full"}}
    for name, extra in runs.items():
        cfg = _cfg(data_dir, tmp_path / name, grad_accum=2, parallel=name[:4], **extra, **kw)
        _spawn(_train_worker, cfg.to_dict(), {})
    want = _records(tmp_path / "one")
    assert sorted(want) == list(range(1, 21)) and [want[s][0] for s in want] == list(single.losses.values())
    for name in runs:
        got = _records(tmp_path / name)
        assert sorted(got) == sorted(want)
        for step in want:
            assert got[step] == pytest.approx(want[step], **TOL), (name, step)
    assert want[20][0] < want[1][0] - 0.5  # it learned something: the comparison is not of two flat lines


# ------------------------------------------------------------------------------------ memory
def _memory_worker(rank: int, world: int, port: int, out: str, parallel: str) -> None:
    _env(rank, world, port)
    from llm import train_loop

    seen = {}
    orig = train_loop.check_step

    def check_step(run, state, step_loss, grad_norm):  # after backward, before the update: grads exist
        if state.step == 1:
            seen.update(rank_state_bytes(run.params, run.optimizer))
        orig(run, state, step_loss, grad_norm)

    train_loop.check_step = check_step
    cfg = TrainConfig.from_dict(json.loads(Path(out).with_suffix(".json").read_text()))
    cfg.parallel = parallel
    train(cfg, quiet=True)
    if rank == 0:
        Path(out).write_text(json.dumps(seen))


def test_fsdp_holds_about_half_the_bytes_of_ddp_per_rank(data_dir: Path, tmp_path: Path) -> None:
    """Parameters + gradients + AdamW state measured on rank 0 at step 2 (all three exist): with 2 ranks,
    fsdp at most 0.55x of ddp."""
    totals = {}
    for parallel in ("ddp", "fsdp"):
        out = tmp_path / f"{parallel}.out"
        cfg = _cfg(data_dir, tmp_path / parallel, max_steps=2, warmup_steps=1, checkpoint_interval=0, eval_interval=2)
        out.with_suffix(".json").write_text(cfg.to_json())
        _spawn(_memory_worker, str(out), parallel)
        seen = json.loads(out.read_text())
        assert seen["grads"] == seen["params"] and seen["optimizer"] >= 2 * seen["params"]
        totals[parallel] = seen["params"] + seen["grads"] + seen["optimizer"]
    assert totals["fsdp"] <= 0.55 * totals["ddp"], totals


# ------------------------------------------------------------------------------------ sharded checkpoints
def _losses(run_dir: Path) -> dict[int, float]:
    return {step: loss for step, (loss, _) in _records(run_dir).items()}


def test_dcp_resume_across_world_sizes_continues_the_uninterrupted_curve(data_dir: Path, tmp_path: Path) -> None:
    """Paused at step 10 with 2 ranks and resumed with 1 (and the reverse): steps 11-20 equal the
    uninterrupted run's within 1e-5. World 2 x accum 1 draws the batches of world 1 x accum 2."""
    kw = dict(max_steps=20, log_interval=1, eval_interval=10, checkpoint_interval=10, parallel="fsdp")
    full = train(_cfg(data_dir, tmp_path / "full", grad_accum=2, **kw), quiet=True)
    assert (tmp_path / "full" / "checkpoints" / "step_0000020.dcp" / "SHA256SUMS").is_file()
    # 2 -> 1
    two = _cfg(data_dir, tmp_path / "2to1", grad_accum=1, **kw)
    _spawn(_train_worker, two.to_dict(), {"stop_at": 10})
    assert sorted(p.name for p in (tmp_path / "2to1" / "checkpoints").iterdir()) == ["best.dcp", "step_0000010.dcp"]
    rest = train(_cfg(data_dir, tmp_path / "2to1", grad_accum=2, **kw), resume="auto", quiet=True)
    assert sorted(rest.losses) == list(range(11, 21))
    for step, loss in rest.losses.items():
        assert loss == pytest.approx(full.losses[step], **TOL), step
    # 1 -> 2
    one = _cfg(data_dir, tmp_path / "1to2", grad_accum=2, **kw)
    train(one, stop_at=10, quiet=True)
    _spawn(_train_worker, _cfg(data_dir, tmp_path / "1to2", grad_accum=1, **kw).to_dict(), {"resume": "auto"})
    got = _losses(tmp_path / "1to2")
    assert sorted(got) == list(range(1, 21))
    for step in range(1, 21):
        assert got[step] == pytest.approx(full.losses[step], **TOL), step
    # the exported single file holds the same weights as the sharded checkpoint it came from ...
    exported = tmp_path / "model.pt"
    assert main(["export", str(tmp_path / "1to2" / "checkpoints" / "step_0000020.dcp"), "--out", str(exported)]) == 0
    want = read_checkpoint(tmp_path / "full" / "checkpoints" / "step_0000020.dcp")
    got_ckpt = read_checkpoint(exported)
    assert got_ckpt["iteration"] == 20 and got_ckpt["model_config"] == want["model_config"]
    for name, t in want["model"].items():
        torch.testing.assert_close(got_ckpt["model"][name], t, rtol=1e-4, atol=1e-5, msg=name)
    # ... and resumes as a single file (DDP's format): step 10 of the 2-rank run, continued by one process
    step10 = tmp_path / "step10.pt"
    assert main(["export", str(tmp_path / "2to1" / "checkpoints" / "step_0000010.dcp"), "--out", str(step10)]) == 0
    assert read_checkpoint(step10)["optimizer"]["state"]  # AdamW state, index-keyed
    cont = train(_cfg(data_dir, tmp_path / "from_pt", grad_accum=2, **{**kw, "parallel": "ddp"}), resume=str(step10),
                 quiet=True)
    assert sorted(cont.losses) == list(range(11, 21))
    for step, loss in cont.losses.items():
        assert loss == pytest.approx(full.losses[step], **TOL), step


def _killed_save_worker(cfg_dict: dict) -> None:
    """Trains to step 5 (saved), then dies by SIGKILL in the middle of saving step 10: the shards are
    written, the checksums and the rename are not."""
    from llm import fsdp

    orig = fsdp.write_manifest

    def die_at_10(directory: Path) -> None:
        if "0000010" in directory.name:
            os.kill(os.getpid(), signal.SIGKILL)
        orig(directory)

    fsdp.write_manifest = die_at_10
    train(TrainConfig.from_dict(cfg_dict), quiet=True)


def test_a_killed_save_leaves_no_complete_looking_checkpoint(data_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(data_dir, tmp_path / "run", max_steps=15, checkpoint_interval=5, parallel="fsdp")
    proc = mp.get_context("fork").Process(target=_killed_save_worker, args=(cfg.to_dict(),))
    proc.start()
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    ckpt_dir = tmp_path / "run" / "checkpoints"
    names = sorted(p.name for p in ckpt_dir.iterdir())
    assert "step_0000005.dcp" in names and "step_0000010.dcp" not in names
    assert any(n.startswith(".tmp-step_0000010.dcp-") for n in names)  # the shards of the killed save, set apart
    result = train(cfg, resume="auto", quiet=True)
    assert min(result.losses) == 6  # resumed from step 5
    names = sorted(p.name for p in ckpt_dir.iterdir())
    assert not any(n.startswith(".tmp-") for n in names), names  # the next save's pruning removed them
    assert "step_0000010.dcp" in names and "step_0000015.dcp" in names
    # a complete-looking checkpoint damaged later fails its checksums: --resume auto takes the one before
    shard = ckpt_dir / "step_0000015.dcp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    found, skipped = latest_intact_checkpoint(ckpt_dir)
    assert found.name == "step_0000010.dcp" and "checksum mismatch in __0_0.distcp" in skipped[0]


def test_a_bad_parallel_mode_is_one_error_line(capsys) -> None:
    assert main(["--parallel", "zero3", "--no-sample"]) == 2
    assert "error: argument --parallel: invalid choice: 'zero3'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="parallel must be one of ddp, fsdp, got 'zero3'"):
        TrainConfig(parallel="zero3").validate()

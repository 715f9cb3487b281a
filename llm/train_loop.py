"""The training loop: `train(cfg)` sets a run up (llm.train_setup), then `train_loop` steps it.

Why the loop looks the way it does:
- Batches are a pure function of (seed, step, global micro-batch index): no sampler state to lose, so a
  resumed run sees exactly the batches the uninterrupted run would have, and world size W with accumulation
  A draws the same W*A micro-batches as world 1 with accumulation W*A (world-size invariance).
- The learning rate is a pure function of the step (cosine schedule), so resuming needs only the model,
  optimizer and step.
- Only rank 0 writes (logs, metrics, checkpoints); checkpoints are atomic, so a kill -9 never leaves a
  half-written "latest".
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llm.data import get_batch
from llm.distributed import DistInfo, all_reduce_sum, barrier, setup_distributed, teardown_distributed
from llm.metrics import Throughput, fmt_time, log, quiet_log
from llm.optim import gradient_clip
from llm.parallel import is_fsdp, no_gradient_sync
from llm.run_dir import divergence_message, run_dir_lock, save_run_checkpoint
from llm.train_config import TrainConfig
from llm.train_setup import Run, lr_at, resolve_device, setup_run

EVAL_STREAM = 0x5EED_E7A1  # separates the validation batches' random stream from the training one


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, divergence); the message is one line for the user."""


def batch_rng(seed: int, step: int, micro: int) -> np.random.Generator:
    """The random stream of one micro-batch: a pure function of (seed, step, global micro index)."""
    return np.random.default_rng([seed, step, micro])


def global_micro_index(micro: int, rank: int, grad_accum: int) -> int:
    """Rank r's micro-step m is micro-batch r*A + m of the step: world W x accum A draws the same W*A batches
    whatever W and A are, so world 2 x accum 1 == world 1 x accum 2."""
    return rank * grad_accum + micro


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # optimizer steps completed
    losses: dict[int, float] = field(default_factory=dict)  # step (1-based) -> train loss, this process' run
    val_losses: dict[int, float] = field(default_factory=dict)
    best_val: float = math.inf
    checkpoint: Path | None = None
    interrupted: bool = False
    tokens_per_s: float = math.nan
    mfu: float = math.nan
    step_seconds: float = 0.0  # time of the optimizer steps (data + fwd/bwd + clip + step + logging)
    step_times: list[tuple[float, float]] = field(default_factory=list)  # (whole step, fwd/bwd/optimizer part)
    eval_seconds: float = 0.0
    eval_count: int = 0
    ckpt_seconds: float = 0.0
    ckpt_count: int = 0
    loop_seconds: float = 0.0  # the whole loop: steps + evals + checkpoints


@dataclass
class LoopState:
    """What changes as the loop runs, besides the weights and the optimizer state."""

    step: int  # optimizer steps done
    best_val: float  # lowest validation loss so far (best.pt holds its weights)
    last_ckpt: Path | None  # the newest checkpoint a later step has shown healthy: never pruned
    elapsed_before: float  # training seconds of earlier processes of this run (from the checkpoint)
    t_start: float = field(default_factory=time.perf_counter)
    window: Throughput = field(default_factory=Throughput)  # for tokens/s on the next progress line

    def elapsed(self, now: float | None = None) -> float:
        return self.elapsed_before + (time.perf_counter() if now is None else now) - self.t_start


class StopFlag:
    """SIGINT/SIGTERM ask the loop to stop after the current step (then save and say how to resume).
    A second Ctrl-C while saving is ignored for the checkpoint's sake; SIGKILL is safe thanks to atomic writes."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            log(f"\n{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint ...")
        self.signum = signum

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


# ------------------------------------------------------------------------------------------------ train
def train(cfg: TrainConfig, *, resume: str | None = None, stop_at: int | None = None, overwrite: bool = False,
          quiet: bool = False, profile: bool = False) -> TrainResult:
    """Run (or continue) training as `cfg` says. `resume`: "auto", a run directory or a checkpoint file.
    `stop_at`: pause after this step (checkpoint + return), keeping the schedule of max_steps.
    `overwrite`: a fresh start may replace the checkpoints of an earlier run in `cfg.out_dir`.
    `profile`: synchronise CUDA around the timed sections so `step_times` are exact (costs speed on GPUs).
    Call once per process (torchrun starts one per rank)."""
    cfg.validate()
    info = setup_distributed(resolve_device(cfg).type)  # the device before joining the group: nccl vs gloo
    threads = torch.get_num_threads()
    try:
        with run_dir_lock(cfg.out_dir, info):
            run, start = setup_run(cfg, info, resume=resume, overwrite=overwrite, profile=profile,
                                   log=log if info.is_main and not quiet else quiet_log)
            state = LoopState(start.step, start.best_val, run.ckpt_path, start.elapsed)
            result = TrainResult(run_dir=Path(cfg.out_dir), step=start.step, best_val=start.best_val)
            end_step = min(cfg.max_steps, stop_at) if stop_at is not None else cfg.max_steps
            train_loop(run, state, result, end_step)
            run.metrics.close()
            say_how_to_go_on(run, state.step, result)
            return result
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it
        teardown_distributed(info)


def train_loop(run: Run, state: LoopState, result: TrainResult, end_step: int) -> None:
    """Optimizer steps from state.step to end_step, or to a signal; eval, log and checkpoint on the way.
    B = batch_size, T = context_length, A = grad_accum, W = world size."""
    cfg, info, loop_t0 = run.cfg, run.info, time.perf_counter()
    run.model.train()
    state.t_start = state.window.t0 = time.perf_counter()
    with StopFlag() as stop:
        while state.step < end_step:
            t_step, compute = run.clock(), 0.0
            lr = lr_at(state.step, cfg)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)  # () sum of the A micro-batch losses
            for micro in range(cfg.grad_accum):
                g = global_micro_index(micro, info.rank, cfg.grad_accum)
                # x, y: (B, T) token ids, y = x shifted left by one: the next token at every position
                x, y = get_batch(run.train_tokens, cfg.batch_size, cfg.model.context_length, run.device,
                                 rng=batch_rng(cfg.seed, state.step, g))
                # DDP / FSDP: reduce gradients only on the last micro-batch of the step.
                sync = micro == cfg.grad_accum - 1 or not info.enabled
                t_c = run.clock()
                no_sync = contextlib.nullcontext() if sync else no_gradient_sync(run.step_module, run.model)
                with no_sync, run.autocast():
                    loss = run.step_module(x, y)  # (): mean cross-entropy over the B*T positions
                run.scaler.scale(loss / cfg.grad_accum).backward()  # grads accumulate: mean over A micro-batches
                compute += run.clock() - t_c
                loss_sum += loss.detach().double()
            run.scaler.unscale_(run.optimizer)
            grad_norm = gradient_clip(run.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            # One all-reduce carries the loss and "someone got a signal", so every rank stops at the same step.
            signalled = torch.tensor(float(stop.signum is not None), dtype=torch.float64, device=run.device)
            packed = all_reduce_sum(torch.stack([loss_sum, signalled]), info)  # (2,): summed over the W ranks
            loss_total, signals = packed.tolist()  # one device-to-host read for both
            step_loss = loss_total / (cfg.grad_accum * info.world_size)
            check_step(run, state, step_loss, grad_norm)  # on the weights of state.step, before the update
            t_c = run.clock()
            run.scaler.step(run.optimizer)  # fp16: skips the update if the gradients overflowed
            run.scaler.update()
            run.optimizer.zero_grad(set_to_none=True)
            compute += run.clock() - t_c
            state.step += 1
            result.step, result.losses[state.step] = state.step, step_loss
            state.window.steps += 1
            if state.step % cfg.log_interval == 0 or state.step == end_step:
                log_progress(run, state, result, step_loss, lr, grad_norm)
            # Per-step wall time (logging included, eval/checkpoints apart) and the fwd/bwd/optimizer part of it.
            result.step_times.append((run.clock() - t_step, compute))
            result.step_seconds += result.step_times[-1][0]
            t_aside = time.perf_counter()
            if state.step % cfg.eval_interval == 0 or state.step == cfg.max_steps:
                run_eval(run, state, result)
            stopping = signals > 0 or state.step == end_step
            if (cfg.checkpoint_interval and state.step % cfg.checkpoint_interval == 0) or stopping:
                state.last_ckpt = save(run, state, result) or state.last_ckpt
                barrier(info)  # nobody races ahead (or exits) while rank 0 writes
            state.window.leave_out(time.perf_counter() - t_aside)  # tokens/s counts training steps only
            if signals > 0:
                result.interrupted = True
                break
    result.loop_seconds = time.perf_counter() - loop_t0
    result.checkpoint = state.last_ckpt


# ------------------------------------------------------------------------------------ parts of a step
def check_step(run: Run, state: LoopState, step_loss: float, grad_norm: float) -> None:
    """Stop (TrainingError, nothing saved) on a non-finite loss or a step the divergence check rejects."""
    if not math.isfinite(step_loss):
        raise TrainingError(
            f"non-finite training loss ({step_loss}) at step {state.step + 1}; stopped without saving, "
            f"last good checkpoint: {state.last_ckpt or 'none'} (try a lower --lr or --grad-clip)"
        )
    problem = run.health.step_problem(step_loss, grad_norm, overflow_ok=run.scaler.is_enabled())
    if problem is not None:
        raise TrainingError(divergence_message(run.cfg.out_dir, run.info, state.step + 1, problem, state.last_ckpt,
                                               ruined_from=state.step))


def log_progress(run: Run, state: LoopState, result: TrainResult, step_loss: float, lr: float,
                 grad_norm: float) -> None:
    """The progress line (stderr) and train record (metrics.jsonl) for the steps since the last one."""
    cfg, info, step = run.cfg, run.info, state.step
    now = time.perf_counter()
    tokens_per_step = cfg.tokens_per_step * info.world_size
    tps = state.window.tokens_per_s(tokens_per_step, now)
    flops_per_token = cfg.model.flops_per_token(training=True)
    mfu = tps * flops_per_token / (run.peak_flops * info.world_size) if info.is_main else math.nan
    eta = (now - state.t_start) / len(result.losses) * (cfg.max_steps - step)  # one loss per step of this process
    result.tokens_per_s, result.mfu = tps, mfu
    run.log(
        f"step {step}/{cfg.max_steps} | loss {step_loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
        f"{tps:,.0f} tok/s | MFU {100 * mfu:.1f}% | elapsed {fmt_time(state.elapsed(now))} | ETA {fmt_time(eta)}"
    )
    run.metrics.write({"type": "train", "step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                       "tokens_per_s": tps, "mfu": mfu, "tokens": step * tokens_per_step, "time": state.elapsed(now)})
    state.window.restart()


@torch.no_grad()
def evaluate(model: nn.Module, val: np.ndarray, cfg: TrainConfig, info: DistInfo, device: torch.device,
             autocast: Callable[[], contextlib.AbstractContextManager]) -> float:
    """Mean loss over the fixed held-out batches (batch i is drawn from stream (seed, EVAL_STREAM, i),
    batches split round-robin across ranks) — the same number whatever the world size. A sharded model
    all-gathers its weights in every forward, a collective: there every rank runs ceil(batches / W) forwards,
    and a rank past the last batch recomputes one without counting it."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    end = cfg.eval_batches
    if is_fsdp(model):
        end = math.ceil(cfg.eval_batches / info.world_size) * info.world_size
    for i in range(info.rank, end, info.world_size):
        x, y = get_batch(val, cfg.batch_size, cfg.model.context_length, device,
                         rng=np.random.default_rng([cfg.seed, EVAL_STREAM, i % cfg.eval_batches]))
        with autocast():
            loss = model.loss(x, y).double()
        if i < cfg.eval_batches:
            total += loss
    if is_fsdp(model):
        model.reshard()  # the root keeps its gathered weights after a forward (backward would need them)
    model.train(was_training)
    return float(all_reduce_sum(total, info)) / cfg.eval_batches


def run_eval(run: Run, state: LoopState, result: TrainResult) -> float:
    """Validation loss at state.step: logged, recorded, and saved as best.pt when it is the lowest yet."""
    t0 = time.perf_counter()
    val = evaluate(run.model, run.val_tokens, run.cfg, run.info, run.device, run.autocast)
    result.eval_seconds += time.perf_counter() - t0
    result.eval_count += 1
    result.val_losses[state.step] = val
    improved = val < state.best_val
    state.best_val = result.best_val = min(state.best_val, val)
    ppl = math.exp(val) if val < 50 else math.inf
    run.log(f"eval step {state.step}/{run.cfg.max_steps}: val loss {val:.4f} | ppl {ppl:.2f}{' (best)' if improved else ''}")
    run.metrics.write({"type": "eval", "step": state.step, "val_loss": val, "ppl": ppl, "time": state.elapsed()})
    if improved and state.step > 0:
        save(run, state, result, best=True)
    return val


def save(run: Run, state: LoopState, result: TrainResult, *, best: bool = False) -> Path | None:
    """Checkpoint state.step (rank 0 writes; under fsdp every rank writes its shard; llm.run_dir.save_run_checkpoint).
    Every rank first checks the weights (the same answer on all), so a diverged run stops together and saves nothing."""
    problem = run.health.weights_problem(run.params)
    if problem is not None:
        raise TrainingError(divergence_message(run.cfg.out_dir, run.info, state.step, problem, state.last_ckpt))
    if not run.info.is_main and run.cfg.parallel != "fsdp":
        return None
    t0 = time.perf_counter()
    path = save_run_checkpoint(run.cfg, run.model, run.optimizer, run.scaler, state.step, best=best,
                               best_val=state.best_val, elapsed=state.elapsed(), tokenizer_dir=run.tokenizer_dir,
                               last_ckpt=state.last_ckpt, info=run.info)
    result.ckpt_seconds += time.perf_counter() - t0
    result.ckpt_count += 1
    return path


def say_how_to_go_on(run: Run, step: int, result: TrainResult) -> None:
    """After a signal or --stop-at: where the checkpoint is and the command that continues the run."""
    cfg = run.cfg
    if result.interrupted:
        run.log(f"stopped at step {step}/{cfg.max_steps}; checkpoint {result.checkpoint}\n"
                f"resume with: uv run -m llm.training --resume auto --out-dir {cfg.out_dir}")
    elif step < cfg.max_steps:
        run.log(f"paused at step {step}/{cfg.max_steps} (--stop-at); resume with: "
                f"uv run -m llm.training --resume auto --out-dir {cfg.out_dir}")

"""Train the language model: `uv run -m llm.training` (the `demo` preset, end to end on a laptop CPU).

    uv run -m llm.training                                  # demo: data -> train -> eval -> checkpoint -> sample
    uv run -m llm.training --preset tinystories --max-steps 2000
    uv run -m llm.training --config my.toml --lr 3e-4       # TOML file, then flags on top
    uv run -m llm.training --resume auto --out-dir runs/demo  # continue bit-exactly after Ctrl-C
    torchrun --nproc_per_node=2 -m llm.training ...         # DDP: gloo on CPU, nccl on CUDA
    uv run -m llm.training plot runs/demo                   # loss.png / lr.png from metrics.jsonl
    uv run -m llm.training overhead                         # loop overhead vs a bare fwd/bwd/step loop

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

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from llm.checkpoint import Divergence, DivergenceCheck, latest_intact_checkpoint, retire_checkpoints
from llm.config import ModelConfig
from llm.data import DirLockBusy, _dir_lock
from llm.train_config import DTYPES, TrainConfig, _train_fields, load_toml, merge, train_preset

EVAL_STREAM = 0x5EED_E7A1  # separates the validation batches' random stream from the training one


# ----------------------------------------------------------------------------------------------- errors
class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, bad data); the message is one line for the user."""


# ------------------------------------------------------------------------------------------ distributed
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    initialized_here: bool = False  # we called init_process_group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, ...), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(
        rank=int(os.environ["RANK"]), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
    )
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
        info.initialized_here = True
    return info


def _all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


# ------------------------------------------------------------------------------------------- hardware
def resolve_device(cfg: TrainConfig, info: DistInfo | None = None) -> torch.device:
    name = cfg.device
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda" and info is not None and info.enabled:
        name = f"cuda:{info.local_rank}"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but torch sees no CUDA GPU (use --device cpu)")
    return dev


def resolve_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, cfg.dtype)


def autocast_context(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision: weights and optimizer stay fp32, matmuls run in `dtype`."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------------------ data
def batch_rng(seed: int, step: int, micro: int) -> np.random.Generator:
    """The random stream of one micro-batch: a pure function of (seed, step, global micro index)."""
    return np.random.default_rng([seed, step, micro])


def global_micro_index(micro: int, rank: int, grad_accum: int) -> int:
    """Rank r's micro-step m is micro-batch r*A + m of the step: world W x accum A draws the same W*A batches
    whatever W and A are, so world 2 x accum 1 == world 1 x accum 2."""
    return rank * grad_accum + micro


def _get_batch(tokens: np.ndarray, batch_size: int, context_length: int, device: torch.device,
               rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    from llm.data import get_batch

    return get_batch(tokens, batch_size, context_length, device, rng=rng)


def _open_tokens(path: str, vocab_size: int) -> np.ndarray:
    from llm.data import open_tokens

    return open_tokens(path, vocab_size=vocab_size)


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats/token) of the corpus' unigram distribution: the loss of a model that ignores context,
    the bar a trained model must get well below. One chunked pass over the memmap (bounded memory)."""
    from llm.data import token_counts
    from llm.data import unigram_entropy as entropy_of_counts

    return entropy_of_counts(token_counts(tokens, minlength=vocab_size))


def corpus_entropy(cfg: TrainConfig, max_tokens: int = 200_000_000) -> float:
    """Unigram entropy of the training tokens: from the data dir's meta.json when `llm.data prepare` recorded
    it for this very array, else counted (over the first `max_tokens` on huge corpora)."""
    meta = Path(cfg.train_data).parent / "meta.json"
    try:
        m = json.loads(meta.read_text())
        if m.get("train") == Path(cfg.train_data).name and m.get("train_tokens") == len(np.load(cfg.train_data, mmap_mode="r")):
            return float(m["unigram_entropy"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    tokens = _open_tokens(cfg.train_data, cfg.model.vocab_size)
    return unigram_entropy(tokens[:max_tokens], cfg.model.vocab_size)


# ----------------------------------------------------------------------------------------------- model
class LossModule(nn.Module):
    """`forward(x, y) -> loss`, so that DDP (which hooks forward) and torch.compile wrap the fused loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model.loss(x, y)


def build_model(mcfg: ModelConfig, device: torch.device, impl: str = "fast") -> nn.Module:
    from llm.transformer import Transformer

    return Transformer.from_config(mcfg, device=device, impl=impl)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    from llm.optim import AdamW

    # No weight decay on gains (1-D): decaying them towards 0 only fights RMSNorm.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)


def lr_at(step: int, cfg: TrainConfig) -> float:
    from llm.optim import cos_lr_scheduler

    return cos_lr_scheduler(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)


# ----------------------------------------------------------------------------------------- checkpoints
def checkpoint_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.out_dir) / "checkpoints"


def step_checkpoint_path(cfg: TrainConfig, step: int) -> Path:
    return checkpoint_dir(cfg) / f"step_{step:07d}.pt"


def find_latest_checkpoint(out_dir: str | Path) -> Path | None:
    """Newest step checkpoint of a run directory (not best.pt: resuming continues the latest state)."""
    from llm.checkpoint import latest_checkpoint

    d = Path(out_dir) / "checkpoints"
    return latest_checkpoint(d) if d.is_dir() else None


def resolve_resume(resume: str, out_dir: str, say: Callable[[str], None] | None = None) -> Path | None:
    """--resume auto -> newest intact checkpoint in out_dir (None: start fresh); a run dir -> its newest intact
    one; a file -> it. `say` gets one line when damaged newer checkpoints were passed over."""
    if resume == "auto":
        return _newest_intact(Path(out_dir), resume, say)
    p = Path(resume)
    if p.is_dir():
        found = _newest_intact(p, resume, say)
        if found is None:
            raise ValueError(f"--resume {resume}: no checkpoints/step_*.pt in that directory")
        return found
    if not p.is_file():
        raise ValueError(f"--resume {resume}: no such checkpoint file or run directory")
    return p


def _newest_intact(run_dir: Path, resume: str, say: Callable[[str], None] | None) -> Path | None:
    """The newest step checkpoint of run_dir that is intact (checksum, or loads); a damaged newer one is
    passed over with one line saying which was used; ValueError when none is intact."""
    d = run_dir / "checkpoints"
    found, skipped = latest_intact_checkpoint(d) if d.is_dir() else (None, [])
    if found is None and skipped:
        raise ValueError(f"--resume {resume}: no intact checkpoint in {d}: {'; '.join(skipped)}")
    if skipped and say is not None:
        say(f"--resume {resume}: {'; '.join(skipped)}; resuming from {found}")
    return found


def _retire_abandoned_branch(cfg: TrainConfig, step: int, log: Callable[..., None]) -> None:
    """Resuming at `step` continues one history: later checkpoints (and a best.pt from after `step`) would be
    picked by the next --resume auto and pruned against the new ones, and later metrics records would
    interleave with the redone steps. Move them to checkpoints/retired/<timestamp>/, saying so in one line."""
    dest, moved = retire_checkpoints(checkpoint_dir(cfg), step, metrics=Path(cfg.out_dir) / "metrics.jsonl")
    if dest is not None:
        log(f"resuming at step {step}: moved what came after it ({', '.join(moved)}) to {dest} (retired, not deleted)")


def _divergence_error(cfg: TrainConfig, info: DistInfo, step: int, problem: Divergence, last_ckpt: Path | None, *,
                      ruined_from: int | None = None) -> TrainingError:
    """The one-line error for a run that diverged at `step`. When the weights are ruined from step
    `ruined_from` (default: `step`) on, rank 0 first moves checkpoints saved from them to
    checkpoints/retired/, so neither this message nor the next --resume auto offers one as healthy."""
    moved = ""
    if problem.weights_ruined and info.is_main:
        dest, names = retire_checkpoints(checkpoint_dir(cfg), (step if ruined_from is None else ruined_from) - 1)
        if dest is not None:
            moved = f"; moved {', '.join(names)} (saved from those weights) to {dest}"
        if last_ckpt is not None and not last_ckpt.exists():
            last_ckpt = find_latest_checkpoint(cfg.out_dir)
    return TrainingError(f"training diverged at step {step} ({problem.reason}); stopped without saving{moved}; "
                         f"last healthy checkpoint: {last_ckpt or 'none'} (try a lower --lr or --grad-clip)")


def _read_checkpoint(path: Path) -> dict:
    from llm.checkpoint import read_checkpoint

    return read_checkpoint(path)  # CheckpointError (a ValueError) with one line for missing/corrupt files


# -------------------------------------------------------------------------------------------- metrics
class MetricsLog:
    """RUN_DIR/metrics.jsonl, one JSON object per line, flushed so `plot` can follow a live run."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            # Drop records beyond the checkpoint (the run died after logging them): they are about to be redone.
            keep = []
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("step", 0) <= resume_step:
                    keep.append(line)
            _atomic_write_text(path, "".join(k + "\n" for k in keep))
        self._f = path.open("a")

    def write(self, record: dict) -> None:
        if self.enabled:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self.enabled:
            self._f.close()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- signals
class StopFlag:
    """SIGINT/SIGTERM ask the loop to stop after the current step (then save and say how to resume).
    A second Ctrl-C while saving is ignored for the checkpoint's sake; SIGKILL is safe thanks to atomic writes."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            _log(f"\n{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint ...")
        self.signum = signum

    def __enter__(self) -> "StopFlag":
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------------------------- result
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


# ------------------------------------------------------------------------------------------------ train
@torch.no_grad()
def evaluate(model: nn.Module, val: np.ndarray, cfg: TrainConfig, info: DistInfo, device: torch.device,
             ctx: contextlib.AbstractContextManager | Callable) -> float:
    """Mean loss over the fixed held-out batches (batch i is drawn from stream (seed, EVAL_STREAM, i),
    batches split round-robin across ranks) — the same number whatever the world size."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(info.rank, cfg.eval_batches, info.world_size):
        x, y = _get_batch(val, cfg.batch_size, cfg.model.context_length, device, np.random.default_rng([cfg.seed, EVAL_STREAM, i]))
        with ctx():
            total += model.loss(x, y).double()
    model.train(was_training)
    return float(_all_reduce_sum(total, info)) / cfg.eval_batches


def uses_demo_data_paths(cfg: TrainConfig) -> bool:
    """Whether the run reads the demo preset's own token arrays (data/demo/...): the only place the demo
    corpus is ever built, so a run on other data never generates or re-prepares anything."""
    demo = train_preset("demo")
    return all(os.path.abspath(getattr(cfg, k)) == os.path.abspath(getattr(demo, k))
               for k in ("train_data", "val_data"))


def prepare_data(cfg: TrainConfig, info: DistInfo) -> None:
    """Build the built-in demo corpus at its own paths (rank 0; others wait), or check that the token arrays exist."""
    if cfg.prepare_demo_data and uses_demo_data_paths(cfg):
        if info.is_main:
            from llm.data import ensure_demo_data

            ensure_demo_data(out_dir=str(Path(cfg.train_data).parent), vocab_size=cfg.model.vocab_size)
        _barrier(info)
    for name in ("train_data", "val_data"):
        p = Path(getattr(cfg, name))
        if not p.is_file():
            raise ValueError(
                f"{name} {str(p)!r} does not exist: prepare it with `uv run -m llm.data prepare --input TEXT "
                f"--vocab-size {cfg.model.vocab_size} --out {p.parent}` (or `llm.data download`)"
            )


def tokenizer_dir_for(cfg: TrainConfig) -> str | None:
    if cfg.tokenizer_dir:
        return cfg.tokenizer_dir
    guess = Path(cfg.train_data).parent / "tokenizer"
    return str(guess) if guess.is_dir() else None


@contextlib.contextmanager
def run_dir_lock(cfg: TrainConfig, info: DistInfo) -> Iterator[None]:
    """Rank 0 holds RUN_DIR/.lock for the whole run, so a second run in the same out_dir stops with one line
    instead of interleaving checkpoints and metrics; the other ranks learn the outcome from rank 0."""
    with contextlib.ExitStack() as stack:
        error = None
        if info.is_main:
            try:
                stack.enter_context(_dir_lock(Path(cfg.out_dir), wait=False))
            except DirLockBusy as e:
                error = f"{e}: wait for it to finish or choose another --out-dir"
        if info.enabled:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise ValueError(error)
        yield


def train(cfg: TrainConfig, *, resume: str | None = None, stop_at: int | None = None, overwrite: bool = False,
          quiet: bool = False, profile: bool = False) -> TrainResult:
    """Run (or continue) training as `cfg` says. `resume`: "auto", a run directory or a checkpoint file.
    `stop_at`: pause after this step (checkpoint + return), keeping the schedule of max_steps.
    `overwrite`: a fresh start may replace the checkpoints of an earlier run in `cfg.out_dir`.
    `profile`: synchronise CUDA around the timed sections so `step_times` are exact (costs speed on GPUs).
    Call once per process (torchrun starts one per rank)."""
    cfg.validate()
    log = (lambda *a: None) if quiet else _log
    device_probe = resolve_device(cfg)  # before joining the group: nccl vs gloo
    info = setup_distributed(device_probe.type)
    threads = torch.get_num_threads()
    try:
        with run_dir_lock(cfg, info):
            return _train(cfg, info, resume=resume, stop_at=stop_at, overwrite=overwrite, profile=profile,
                          log=log if info.is_main else (lambda *a: None))
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it
        if info.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, info: DistInfo, *, resume: str | None, stop_at: int | None, overwrite: bool,
           profile: bool, log: Callable[..., None]) -> TrainResult:
    device = resolve_device(cfg, info)
    dtype = resolve_dtype(cfg, device)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads or max(1, _cpu_cores() // info.local_world_size))
        if dtype != torch.float32:
            log(f"warning: {cfg.dtype} on CPU runs through autocast and is usually SLOWER than float32 here")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores: ~8x, loss unaffected
        torch.backends.cudnn.allow_tf32 = True
        # exact resume needs the same numbers twice: index_add_ (embedding and lm_head backward) sums with
        # atomics on CUDA unless deterministic algorithms are asked for, and cuBLAS needs a fixed workspace
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    run_dir = Path(cfg.out_dir)
    result = TrainResult(run_dir=run_dir, step=0)

    # ---- resume: find the checkpoint, check it fits --------------------------------------------------
    ckpt_path = resolve_resume(resume, cfg.out_dir, say=log) if resume else None
    ckpt: dict | None = None
    if resume == "auto" and ckpt_path is None:
        log(f"--resume auto: no checkpoint in {cfg.out_dir}/checkpoints yet, starting fresh")
    old = find_latest_checkpoint(cfg.out_dir)
    if ckpt_path is None and old is not None:
        # A fresh run would interleave its step files with the old run's (and prune the wrong ones).
        if not overwrite:
            raise ValueError(
                f"{cfg.out_dir} already holds a run (checkpoint {old.name}): continue it with --resume auto, "
                f"start over with --overwrite, or choose another --out-dir"
            )
    if ckpt_path is not None:
        ckpt = _read_checkpoint(ckpt_path)
        saved_model = ckpt.get("model_config")
        if saved_model is not None and ModelConfig.from_dict(saved_model) != cfg.model:
            raise ValueError(f"checkpoint {ckpt_path} holds model {saved_model}, but the config asks for {cfg.model.to_dict()}")

    # ---- data (validated before any model work) ------------------------------------------------------
    prepare_data(cfg, info)
    train_tokens = _open_tokens(cfg.train_data, cfg.model.vocab_size)
    val_tokens = _open_tokens(cfg.val_data, cfg.model.vocab_size)
    for name, arr in (("train_data", train_tokens), ("val_data", val_tokens)):
        if len(arr) <= cfg.model.context_length + 1:
            raise ValueError(f"{name} has {len(arr)} tokens: fewer than context_length + 2 = {cfg.model.context_length + 2}")
    log(f"effective config ({cfg.preset} preset):\n{cfg.to_json()}")  # after the checks: a bad input is one line

    if ckpt_path is None and old is not None:  # --overwrite, and the data is fine: now clear the old run
        if info.is_main:
            log(f"--overwrite: removing the earlier run's checkpoints in {checkpoint_dir(cfg)}")
            for p in checkpoint_dir(cfg).glob("*.pt"):
                p.unlink()
        _barrier(info)

    # ---- model, optimizer, precision -----------------------------------------------------------------
    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's weights)
    model = build_model(cfg.model, device, cfg.impl)
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    start_step, best_val, elapsed_before = 0, math.inf, 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        start_step = int(ckpt["iteration"])
        best_val = float(ckpt.get("best_val", math.inf))
        elapsed_before = float(ckpt.get("elapsed", 0.0))
        if ckpt.get("rng"):
            from llm.checkpoint import restore_rng_state

            restore_rng_state(ckpt["rng"])
        log(f"resumed from {ckpt_path} at step {start_step}/{cfg.max_steps}")
    result.step, result.best_val = start_step, best_val
    step_module: nn.Module = LossModule(model)
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        step_module = DDP(step_module, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        step_module = torch.compile(step_module)
    ctx = lambda: autocast_context(device, dtype)  # noqa: E731
    from llm.optim import gradient_clip

    def clock() -> float:
        """Wall time; on CUDA under `profile`, after the queued kernels finish (else it would time launches)."""
        if profile and device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    params = [p for p in model.parameters() if p.requires_grad]

    # ---- bookkeeping ---------------------------------------------------------------------------------
    world_tokens_per_step = cfg.tokens_per_step * info.world_size
    flops_per_token = cfg.model.flops_per_token(training=True)
    peak = math.nan
    peak_src = ""
    if info.is_main:
        from llm.hardware import peak_flops

        peak, peak_src = peak_flops(device, dtype, cfg.peak_flops)
        run_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(run_dir / "config.json", cfg.to_json() + "\n")
        checkpoint_dir(cfg).mkdir(parents=True, exist_ok=True)
        if ckpt is not None:
            _retire_abandoned_branch(cfg, start_step, log)
    metrics = MetricsLog(run_dir / "metrics.jsonl", info.is_main, start_step if ckpt is not None else None)
    tok_dir = tokenizer_dir_for(cfg)
    n_params = sum(p.numel() for p in params)
    log(
        f"model: {n_params / 1e6:.2f}M params ({cfg.model.num_params(embedding=False) / 1e6:.2f}M non-embedding), "
        f"{flops_per_token / 1e6:.1f} MFLOP/token | device {device} {str(dtype).replace('torch.', '')}"
        f"{' compiled' if cfg.compile else ''} | world {info.world_size} x accum {cfg.grad_accum} x batch "
        f"{cfg.batch_size} x ctx {cfg.model.context_length} = {world_tokens_per_step:,} tokens/step | "
        f"{len(train_tokens):,} train / {len(val_tokens):,} val tokens"
        + (f" | peak {peak / 1e12:.3g} TFLOP/s ({peak_src})" if info.is_main else "")
    )

    health = DivergenceCheck.start(params, cfg.model.vocab_size)

    def save(step: int, *, best: bool = False) -> Path | None:
        """Rank 0 writes step_N.pt (or best.pt) atomically; older step files beyond keep_last are pruned, but
        never the previous save, the newest one a later step's loss has shown healthy. Every rank first
        checks the weights (identical on all), so a diverged run stops together and saves nothing."""
        problem = health.weights_problem(params)
        if problem is not None:
            raise _divergence_error(cfg, info, step, problem, last_ckpt)
        if not info.is_main:
            return None
        from llm.checkpoint import capture_rng_state, prune_checkpoints, save_checkpoint

        t0 = time.perf_counter()
        extra = {
            "model_config": cfg.model.to_dict(), "train_config": cfg.to_dict(), "tokenizer_dir": tok_dir,
            "rng": capture_rng_state(), "sampler": {"kind": "stateless", "seed": cfg.seed, "next_step": step},
            "best_val": best_val, "elapsed": elapsed_before + (time.perf_counter() - t_start),
        }
        if scaler.is_enabled():
            extra["scaler"] = scaler.state_dict()
        path = checkpoint_dir(cfg) / "best.pt" if best else step_checkpoint_path(cfg, step)
        save_checkpoint(model, optimizer, step, path, extra=extra)
        if not best:
            prune_checkpoints(checkpoint_dir(cfg), max(1, cfg.keep_last), keep=[last_ckpt] if last_ckpt else [])
        result.ckpt_seconds += time.perf_counter() - t0
        result.ckpt_count += 1
        return path

    def run_eval(step: int) -> float:
        nonlocal best_val
        t0 = time.perf_counter()
        val = evaluate(model, val_tokens, cfg, info, device, ctx)
        result.eval_seconds += time.perf_counter() - t0
        result.eval_count += 1
        result.val_losses[step] = val
        improved = val < best_val
        best_val = min(best_val, val)
        result.best_val = best_val
        ppl = math.exp(val) if val < 50 else math.inf
        log(f"eval step {step}/{cfg.max_steps}: val loss {val:.4f} | ppl {ppl:.2f}{' (best)' if improved else ''}")
        metrics.write({"type": "eval", "step": step, "val_loss": val, "ppl": ppl,
                       "time": elapsed_before + time.perf_counter() - t_start})
        if improved and step > 0:
            save(step, best=True)
        return val

    # ---- the loop ------------------------------------------------------------------------------------
    t_start = time.perf_counter()
    last_ckpt: Path | None = ckpt_path
    end_step = min(cfg.max_steps, stop_at) if stop_at is not None else cfg.max_steps
    window_t, window_steps = time.perf_counter(), 0
    loop_t0 = time.perf_counter()
    model.train()
    with StopFlag() as stop:
        step = start_step
        window_t = time.perf_counter()
        while step < end_step:
            t_step, compute = clock(), 0.0
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for micro in range(cfg.grad_accum):
                g = global_micro_index(micro, info.rank, cfg.grad_accum)
                x, y = _get_batch(train_tokens, cfg.batch_size, cfg.model.context_length, device,
                                  batch_rng(cfg.seed, step, g))
                # DDP: all-reduce gradients only on the last micro-batch of the step.
                sync = micro == cfg.grad_accum - 1 or not info.enabled
                t_c = clock()
                with (contextlib.nullcontext() if sync else step_module.no_sync()), ctx():
                    loss = step_module(x, y)
                scaler.scale(loss / cfg.grad_accum).backward()
                compute += clock() - t_c
                loss_sum += loss.detach().double()
            scaler.unscale_(optimizer)
            grad_norm = gradient_clip(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            # One all-reduce carries the loss and "someone got a signal", so every rank stops at the same step.
            packed = torch.stack([loss_sum, torch.tensor(float(stop.signum is not None), dtype=torch.float64, device=device)])
            packed = _all_reduce_sum(packed, info)
            step_loss = float(packed[0]) / (cfg.grad_accum * info.world_size)
            if not math.isfinite(step_loss):
                raise TrainingError(
                    f"non-finite training loss ({step_loss}) at step {step + 1}; stopped without saving, "
                    f"last good checkpoint: {last_ckpt or 'none'} (try a lower --lr or --grad-clip)"
                )
            problem = health.step_problem(step_loss, grad_norm, overflow_ok=scaler.is_enabled())
            if problem is not None:  # measured on the weights of `step`, before this update
                raise _divergence_error(cfg, info, step + 1, problem, last_ckpt, ruined_from=step)
            t_c = clock()
            scaler.step(optimizer)  # fp16: skips the update if the gradients overflowed
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            compute += clock() - t_c
            step += 1
            result.step = step
            result.losses[step] = step_loss
            window_steps += 1

            if step % cfg.log_interval == 0 or step == end_step:
                now = time.perf_counter()
                dt = max(now - window_t, 1e-9)
                tps = window_steps * world_tokens_per_step / dt
                mfu = tps * flops_per_token / (peak * info.world_size) if info.is_main else math.nan
                steps_done = step - start_step
                eta = (now - t_start) / steps_done * (cfg.max_steps - step)
                result.tokens_per_s, result.mfu = tps, mfu
                log(
                    f"step {step}/{cfg.max_steps} | loss {step_loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
                    f"{tps:,.0f} tok/s | MFU {100 * mfu:.1f}% | elapsed {_fmt_time(elapsed_before + now - t_start)} "
                    f"| ETA {_fmt_time(eta)}"
                )
                metrics.write({"type": "train", "step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                               "tokens_per_s": tps, "mfu": mfu, "tokens": step * world_tokens_per_step,
                               "time": elapsed_before + now - t_start})
                window_t, window_steps = time.perf_counter(), 0

            # Per-step wall time (logging included, eval/checkpoints apart) and the fwd/bwd/optimizer part of it.
            result.step_times.append((clock() - t_step, compute))
            result.step_seconds += result.step_times[-1][0]
            t_aside = time.perf_counter()
            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                run_eval(step)
            stopping = packed[1].item() > 0 or step == end_step
            if (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0) or stopping:
                last_ckpt = save(step) or last_ckpt
                _barrier(info)  # nobody races ahead (or exits) while rank 0 writes
            window_t += time.perf_counter() - t_aside  # tokens/s counts training steps only
            if packed[1].item() > 0:
                result.interrupted = True
                break
    result.loop_seconds = time.perf_counter() - loop_t0
    result.checkpoint = last_ckpt
    metrics.close()
    if result.interrupted:
        log(f"stopped at step {step}/{cfg.max_steps}; checkpoint {last_ckpt}\n"
            f"resume with: uv run -m llm.training --resume auto --out-dir {cfg.out_dir}")
    elif step < cfg.max_steps:
        log(f"paused at step {step}/{cfg.max_steps} (--stop-at); resume with: "
            f"uv run -m llm.training --resume auto --out-dir {cfg.out_dir}")
    return result


# --------------------------------------------------------------------------------------------- sampling
def sample_text(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int, *, temperature: float = 0.8,
                top_k: int = 20, seed: int = 0) -> str:
    """`prompt` and its sampled continuation (top-k, KV-cached: llm.generating), stopping at end-of-text."""
    from llm.generating import generate

    model.eval()
    return prompt + generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=top_k, seed=seed)


def _load_tokenizer(tok_dir: str | None) -> Any:
    if tok_dir is None or not Path(tok_dir).is_dir():
        return None
    from llm.bpe_tokenizer import BpeTokenizer

    return BpeTokenizer.load(tok_dir)


# -------------------------------------------------------------------------------------------------- CLI
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_comments(cls: type) -> dict[str, str]:
    """The `# comment` after each field in the dataclass source: the flags' help text, kept in one place."""
    import inspect
    import re

    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    pattern = r"^\s+(\w+): [^=\n]+=[^#\n]*#(.*)$"
    return {m[1]: m[2].strip() for m in re.finditer(pattern, src, re.M)}


def _add_field_flags(p: argparse.ArgumentParser, cls: type, dest_prefix: str, skip: set[str],
                     example: Any, title: str) -> None:
    """One flag per dataclass field, typed from its annotation; default SUPPRESS so only given flags override."""
    group = p.add_argument_group(title)
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        ann = str(f.type)
        kw: dict[str, Any] = {"dest": dest_prefix + f.name, "default": argparse.SUPPRESS}
        if ann == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        else:
            base = ann.split("|")[0].strip()
            kw["type"] = {"int": int, "float": float, "str": str}[base]
            kw["metavar"] = base.upper()
            if "None" in ann:
                kw["type"] = _optional(kw["type"])
        if f.name == "dtype":
            kw["choices"] = DTYPES
            kw.pop("metavar")
        help_text = comments.get(f.name, "")
        kw["help"] = f"{help_text} (demo: {getattr(example, f.name)!r})".strip().replace("%", "%%")
        group.add_argument(_flag(f.name), **kw)


def _optional(t: type) -> Callable[[str], Any]:
    def parse(s: str) -> Any:
        return None if s.lower() in ("none", "null", "") else t(s)

    parse.__name__ = t.__name__
    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2 (argparse's default prints usage too)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m llm.training",
        description="Train the decoder-only LM. Subcommands: `plot RUN_DIR`, `overhead`. "
        "Config precedence: preset < --config TOML < flags.",
    )
    p.add_argument("--preset", default=None, help="training preset: demo (default), tinystories, tiny, small, medium, large, xl, 2.7B")
    p.add_argument("--config", default=None, help="TOML file with training keys and a [model] table")
    p.add_argument("--resume", default=None, metavar="PATH|auto", help="checkpoint file, run dir, or auto (newest in --out-dir)")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --out-dir that holds an earlier run's checkpoints")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP", help="pause after STEP (checkpoint), keeping max_steps' schedule")
    p.add_argument("--no-sample", action="store_true", help="skip the sample continuation at the end")
    p.add_argument("--no-plot", action="store_true", help="skip writing loss.png / lr.png at the end")
    p.add_argument("--img-dir", default=None, help="also copy the plots here (the demo preset defaults to img/)")
    demo = train_preset("demo")
    _add_field_flags(p, TrainConfig, "", {"model", "preset"}, demo, "training (defaults come from the preset)")
    _add_field_flags(p, ModelConfig, "model.", set(), demo.model, "model (defaults come from the preset)")
    return p


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    """preset (or the checkpoint's config on --resume) < TOML < flags; validated."""
    given = vars(ns)
    overrides: dict[str, Any] = {"model": {}}
    base: TrainConfig | None = None
    toml: dict[str, Any] = {}
    if ns.config:
        toml = load_toml(ns.config)
    preset = ns.preset or toml.pop("preset", None)
    toml.pop("preset", None)
    if ns.resume and preset is None:
        out_dir = given.get("out_dir") or toml.get("out_dir") or train_preset("demo").out_dir
        path = resolve_resume(ns.resume, out_dir)
        if path is not None:
            saved = _read_checkpoint(path).get("train_config")
            if saved:
                base = TrainConfig.from_dict(saved)
    if base is None:
        base = train_preset(preset or "demo")
    if preset:
        overrides["preset"] = preset
    for k, v in toml.items():
        if k == "model":
            overrides["model"].update(v)
        else:
            overrides[k] = v
    for k, v in given.items():
        if k.startswith("model."):
            overrides["model"][k[len("model."):]] = v
        elif k in _train_fields() and k != "preset":
            overrides[k] = v
    if {"train_data", "val_data"} & set(overrides) and "prepare_demo_data" not in overrides:
        overrides["prepare_demo_data"] = False  # the user named data: never build the demo corpus in its place
    cfg = merge(base, overrides)
    if overrides.get("prepare_demo_data") and not uses_demo_data_paths(cfg):
        raise ValueError(
            f"prepare_demo_data builds data/demo only, not train_data {cfg.train_data!r} / val_data {cfg.val_data!r}: "
            "drop --prepare-demo-data, or prepare that data with `uv run -m llm.data prepare`"
        )
    return cfg


def _finish_demo_report(cfg: TrainConfig, result: TrainResult, model_loader: Callable[[], nn.Module | None],
                        no_sample: bool) -> None:
    """Rank 0, after training: val loss vs unigram entropy, and a sample continuation."""
    h = corpus_entropy(cfg)
    final_val = result.val_losses[max(result.val_losses)] if result.val_losses else math.nan
    print(f"final val loss {final_val:.4f} nats/token (ppl {math.exp(final_val):.2f}) vs unigram entropy of the "
          f"training corpus {h:.4f} nats/token (ppl {math.exp(h):.1f}); best val {result.best_val:.4f}", flush=True)
    print(f"tokens/s {result.tokens_per_s:,.0f} | MFU {100 * result.mfu:.1f}% | checkpoint {result.checkpoint}", flush=True)
    if no_sample or cfg.sample_tokens == 0:
        return
    tok = _load_tokenizer(tokenizer_dir_for(cfg))
    if tok is None:
        print("(no tokenizer found next to the training data: pass --tokenizer-dir to print a sample)", flush=True)
        return
    text = sample_text(model_loader(), tok, cfg.sample_prompt, cfg.sample_tokens, seed=cfg.seed)
    print(f"\nsample:\n{text}\n", flush=True)


def _main_train(argv: list[str]) -> int:
    ns = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(ns)
        if ns.stop_at is not None and ns.stop_at <= 0:
            raise ValueError(f"--stop-at must be positive, got {ns.stop_at}")
        resolve_device(cfg)  # an unusable device is a config error: say so before any work
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        result = train(cfg, resume=ns.resume, stop_at=ns.stop_at, overwrite=ns.overwrite)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not is_main:
        return 0
    if result.interrupted:
        return 130
    if not ns.no_plot:
        from llm.plotting import plot_run

        img = ns.img_dir if ns.img_dir is not None else ("img" if cfg.preset == "demo" else None)
        written = plot_run(cfg.out_dir, img, unigram_entropy=_entropy_or_none(cfg))
        if written:
            _log("plots: " + ", ".join(str(p) for p in written))

    def load_model() -> nn.Module:
        device = resolve_device(cfg)
        model = build_model(cfg.model, device)
        model.load_state_dict(_read_checkpoint(result.checkpoint)["model"])
        return model

    if result.step >= cfg.max_steps:
        _finish_demo_report(cfg, result, load_model, ns.no_sample)
    return 0


def _entropy_or_none(cfg: TrainConfig) -> float | None:
    try:
        return corpus_entropy(cfg)
    except (OSError, ValueError):  # data moved or gone: the plot goes on without the line
        return None


def _main_plot(argv: list[str]) -> int:
    p = _Parser(prog="python -m llm.training plot", description="Write loss.png and lr.png from RUN_DIR/metrics.jsonl.")
    p.add_argument("run_dir")
    p.add_argument("--img-dir", default=None, help="also write the plots here (e.g. img)")
    ns = p.parse_args(argv)
    from llm.plotting import plot_run

    h = None
    config = Path(ns.run_dir) / "config.json"
    if config.is_file():
        try:
            h = _entropy_or_none(TrainConfig.from_dict(json.loads(config.read_text())))
        except (ValueError, TypeError):
            h = None
    try:
        written = plot_run(ns.run_dir, ns.img_dir, unigram_entropy=h)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for w in written:
        print(w)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "plot":
            return _main_plot(argv[1:])
        if argv and argv[0] == "overhead":
            return _main_overhead(argv[1:])
        return _main_train(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error already printed as one line (2)
        return e.code if isinstance(e.code, int) else 2


# ------------------------------------------------------------------------------------- loop overhead
def _main_overhead(argv: list[str]) -> int:
    """Loop overhead of a preset's run: everything but forward/backward/optimizer-step (data, lr, clipping,
    loss all-reduce, logging), plus eval and checkpoints amortised over the preset's intervals.
    Measured two ways in one process: (1) inside the loop, per step, the fwd/bwd/step part against the whole
    step (robust on a busy machine: both halves see the same load); (2) per-step medians of the training
    loop against a bare fwd/bwd/step loop on the same model, interleaved repeats (noisy when others load the CPU)."""
    p = _Parser(prog="python -m llm.training overhead", description=_main_overhead.__doc__)
    p.add_argument("--preset", default="demo")
    p.add_argument("--steps", type=int, default=8, help="timed steps per repeat (+2 warm-up)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out-dir", default="runs/overhead")
    ns = p.parse_args(argv)
    try:
        cfg = train_preset(ns.preset)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = resolve_device(cfg)
    prepare_data(cfg, DistInfo())
    train_tokens = _open_tokens(cfg.train_data, cfg.model.vocab_size)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads or _cpu_cores())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    med = lambda v: float(np.median(v))  # noqa: E731
    bare, loop, inner, evals, ckpts = [], [], [], [], []
    n = ns.steps + 2
    for r in range(ns.repeats):
        # bare: one fixed batch already on the device; forward + backward + optimizer step, nothing else
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, device, cfg.impl)
        opt = build_optimizer(model, cfg)
        x, y = _get_batch(train_tokens, cfg.batch_size, cfg.model.context_length, device, batch_rng(0, 0, 0))
        times = []
        for _ in range(n):
            sync()
            t0 = time.perf_counter()
            for _ in range(cfg.grad_accum):
                with autocast_context(device, resolve_dtype(cfg, device)):
                    loss = model.loss(x, y)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            times.append(time.perf_counter() - t0)
        bare.append(med(times[2:]))  # two warm-up steps left out
        del model, opt
        run_cfg = merge(cfg, {"out_dir": f"{ns.out_dir}/r{r}", "max_steps": n, "warmup_steps": min(cfg.warmup_steps, n),
                              "eval_interval": n, "checkpoint_interval": 0, "prepare_demo_data": False})
        res = train(run_cfg, quiet=True, overwrite=True, profile=True)
        steps = res.step_times[2:]
        loop.append(med([w for w, _ in steps]))
        inner.append(med([(w - c) / c for w, c in steps]))
        evals.append(res.eval_seconds / max(1, res.eval_count))
        ckpts.append(res.ckpt_seconds / max(1, res.ckpt_count))
        print(f"repeat {r}: bare {bare[-1] * 1e3:.0f} ms/step | loop {loop[-1] * 1e3:.0f} ms/step | in-loop overhead "
              f"{100 * inner[-1]:.2f}% | eval {evals[-1] * 1e3:.0f} ms | checkpoint {ckpts[-1] * 1e3:.0f} ms",
              file=sys.stderr, flush=True)
    b, lp, ov, e, c = med(bare), med(loop), med(inner), med(evals), med(ckpts)
    compute = lp / (1 + ov)  # the fwd/bwd/step part of a loop step
    n_evals = -(-cfg.max_steps // cfg.eval_interval)  # every eval_interval, and at the end
    n_ckpts = (cfg.max_steps // cfg.checkpoint_interval if cfg.checkpoint_interval else 1) + n_evals  # + best.pt
    amort = (e * n_evals + c * n_ckpts) / (compute * cfg.max_steps)
    print(f"{cfg.preset} ({ns.repeats} repeats x {ns.steps} steps, medians):")
    print(f"  (1) in-loop: per-step overhead {100 * ov:.2f}% + eval {100 * e * n_evals / (compute * cfg.max_steps):.2f}% "
          f"({n_evals} x {e * 1e3:.0f} ms) + checkpoints {100 * c * n_ckpts / (compute * cfg.max_steps):.2f}% "
          f"(<= {n_ckpts} x {c * 1e3:.0f} ms) = {100 * (ov + amort):.2f}% of fwd/bwd/step time over {cfg.max_steps} steps")
    print(f"  (2) vs a bare loop: bare {b * 1e3:.0f} ms/step, training loop {lp * 1e3:.0f} ms/step -> "
          f"{100 * (lp / b - 1):+.2f}% per step, {100 * (lp / b - 1 + amort * compute / b):+.2f}% with eval/checkpoints")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

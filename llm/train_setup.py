"""Everything a training run fixes before its first step: device and precision, the checkpoint to resume,
the token arrays, the model, optimizer and gradient scaler (restored on a resume), the run directory.
`setup_run` returns them as one `Run`, which the loop (llm.train_loop) only reads."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llm.checkpoint import DivergenceCheck, read_checkpoint, restore_rng_state
from llm.config import ModelConfig
from llm.data import ensure_demo_data, open_tokens
from llm.distributed import DistInfo, barrier, wrap_data_parallel
from llm.hardware import autocast_context, device_from_name, peak_flops
from llm.machine import usable_cores
from llm.metrics import MetricsLog
from llm.optim import AdamW, cos_lr_scheduler
from llm.parallel import apply_activation_checkpointing, rank_state_bytes
from llm.run_dir import clear_earlier_run, earlier_run, open_run_dir, resolve_resume
from llm.sharded_checkpoint import fsdp_module, is_sharded_checkpoint, read_sharded_meta
from llm.train_config import TrainConfig, train_preset
from llm.transformer import Transformer


# ---------------------------------------------------------------------------------------- device, precision
def resolve_device(cfg: TrainConfig, info: DistInfo | None = None) -> torch.device:
    """cfg.device via llm.hardware.device_from_name; under torchrun a bare "cuda" is this rank's local GPU."""
    dev = device_from_name(cfg.device)
    if dev.type == "cuda" and dev.index is None and info is not None and info.enabled:
        dev = torch.device("cuda", info.local_rank)
    return dev


def resolve_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, cfg.dtype)


def configure_device(cfg: TrainConfig, info: DistInfo, log: Callable[[str], None]) -> tuple[torch.device, torch.dtype]:
    """This rank's device and compute dtype, with the process settings they want: CPU threads shared among
    the node's ranks; on CUDA TF32 matmuls and the deterministic algorithms a bit-exact resume needs."""
    device = resolve_device(cfg, info)
    dtype = resolve_dtype(cfg, device)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads or max(1, usable_cores() // info.local_world_size))
        if dtype != torch.float32:
            log(f"warning: {cfg.dtype} on CPU runs through autocast and is usually SLOWER than float32 here")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores: ~8x, loss unaffected
        torch.backends.cudnn.allow_tf32 = True
        # exact resume needs the same numbers twice: index_add_ (embedding and lm_head backward) sums with
        # atomics on CUDA unless deterministic algorithms are asked for, and cuBLAS needs a fixed workspace
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    return device, dtype


# ---------------------------------------------------------------------------------------------------- data
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
            ensure_demo_data(out_dir=str(Path(cfg.train_data).parent), vocab_size=cfg.model.vocab_size)
        barrier(info)
    for name in ("train_data", "val_data"):
        p = Path(getattr(cfg, name))
        if not p.is_file():
            raise ValueError(
                f"{name} {str(p)!r} does not exist: prepare it with `uv run -m llm.data prepare --input TEXT "
                f"--vocab-size {cfg.model.vocab_size} --out {p.parent}` (or `llm.data download`)"
            )


def open_data(cfg: TrainConfig, info: DistInfo) -> tuple[np.ndarray, np.ndarray]:
    """The train and validation token arrays (memmapped, ids checked), each long enough for one window."""
    prepare_data(cfg, info)
    arrays = open_tokens(cfg.train_data, cfg.model.vocab_size), open_tokens(cfg.val_data, cfg.model.vocab_size)
    for name, arr in zip(("train_data", "val_data"), arrays):
        if len(arr) <= cfg.model.context_length + 1:
            raise ValueError(f"{name} has {len(arr)} tokens: fewer than context_length + 2 = {cfg.model.context_length + 2}")
    return arrays


def tokenizer_dir_for(cfg: TrainConfig) -> str | None:
    if cfg.tokenizer_dir:
        return cfg.tokenizer_dir
    guess = Path(cfg.train_data).parent / "tokenizer"
    return str(guess) if guess.is_dir() else None


# -------------------------------------------------------------------------------------------------- model
class LossModule(nn.Module):
    """`forward(x, y) -> loss`, so that DDP (which hooks forward) and torch.compile wrap the fused loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model.loss(x, y)


def build_model(mcfg: ModelConfig, device: torch.device, impl: str = "fast") -> nn.Module:
    return Transformer.from_config(mcfg, device=device, impl=impl)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on gains (1-D): decaying them towards 0 only fights RMSNorm.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)


def lr_at(step: int, cfg: TrainConfig) -> float:
    return cos_lr_scheduler(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class Run:
    """What the loop reads and never reassigns: one training process' configuration, data and modules."""

    cfg: TrainConfig
    info: DistInfo
    device: torch.device
    dtype: torch.dtype
    model: nn.Module  # the Transformer itself (checkpoints, evaluation)
    step_module: nn.Module  # LossModule(model), under DDP and torch.compile when asked: what a step calls
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # enabled for float16 only
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    metrics: MetricsLog
    health: DivergenceCheck
    log: Callable[[str], None]
    profile: bool  # synchronise CUDA around timed sections
    ckpt_path: Path | None  # the checkpoint this process resumed from
    tokenizer_dir: str | None
    peak_flops: float  # device peak FLOP/s for MFU (rank 0; NaN elsewhere)

    @functools.cached_property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.device, self.dtype)

    def clock(self) -> float:
        """Wall time; on CUDA under `profile`, after the queued kernels finish (else it would time launches)."""
        if self.profile and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


@dataclass
class Start:
    """Where the loop starts: step 0, or the step, best validation loss and training time of a checkpoint."""

    step: int = 0
    best_val: float = math.inf
    elapsed: float = 0.0


def load_resume(cfg: TrainConfig, resume: str | None, log: Callable[[str], None]) -> tuple[Path | None, dict | None]:
    """The checkpoint `resume` names (None: a fresh start) and its contents, checked against cfg.model. A
    sharded (DCP) checkpoint gives its meta.pt only: the tensors are loaded into the built model later."""
    ckpt_path = resolve_resume(resume, cfg.out_dir, say=log) if resume else None
    if resume == "auto" and ckpt_path is None:
        log(f"--resume auto: no checkpoint in {cfg.out_dir}/checkpoints yet, starting fresh")
    if ckpt_path is None:
        return None, None
    if is_sharded_checkpoint(ckpt_path):
        ckpt = read_sharded_meta(ckpt_path)  # ShardedCheckpointError (a ValueError): one line
    else:
        ckpt = read_checkpoint(ckpt_path)  # CheckpointError (a ValueError) with one line for missing/corrupt files
    saved_model = ckpt.get("model_config")
    if saved_model is not None and ModelConfig.from_dict(saved_model) != cfg.model:
        raise ValueError(f"checkpoint {ckpt_path} holds model {saved_model}, but the config asks for {cfg.model.to_dict()}")
    return ckpt_path, ckpt


def single_file_from_sharded(path: Path) -> dict:
    """A sharded checkpoint as one ordinary checkpoint dict, optimizer included, so the file resumes like any
    step_N.pt: the AdamW state, saved by parameter name, goes into the optimizer the checkpoint's own config
    builds, whose state_dict() is the index-keyed form a single-file resume loads."""
    ckpt = fsdp_module().read_sharded_full(path, with_optimizer=True)
    by_name = ckpt.pop("optimizer_by_name")
    cfg = TrainConfig.from_dict(ckpt["train_config"])
    model = build_model(cfg.model, torch.device("cpu"), cfg.impl)
    optimizer = build_optimizer(model, cfg)
    for name, p in model.named_parameters():
        if name in by_name:
            optimizer.state[p] = dict(by_name[name])
    ckpt["optimizer"] = optimizer.state_dict()
    return ckpt


def shards(cfg: TrainConfig, info: DistInfo) -> bool:
    """Whether this run shards the model with FSDP (--parallel fsdp under torchrun with 2+ ranks); a single
    process of an fsdp run trains the whole model but still writes sharded (DCP) checkpoints."""
    return cfg.parallel == "fsdp" and info.enabled


def build_training_state(cfg: TrainConfig, info: DistInfo, device: torch.device, dtype: torch.dtype,
                         ckpt_path: Path | None, ckpt: dict | None
                         ) -> tuple[nn.Module, torch.optim.Optimizer, torch.amp.GradScaler, Start]:
    """Model (checkpointed, sharded as cfg says), optimizer and gradient scaler, initialised from cfg.seed or
    restored (with every RNG) from `ckpt`: a single-file one before sharding, a DCP one into the shards."""
    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's weights)
    model = build_model(cfg.model, device, cfg.impl)
    apply_activation_checkpointing(model, cfg.activation_checkpointing)  # before DDP / FSDP wrap it
    sharded_ckpt = ckpt_path is not None and is_sharded_checkpoint(ckpt_path)
    if ckpt is not None and not sharded_ckpt:
        if shards(cfg, info):
            raise ValueError(f"--parallel fsdp resumes from sharded checkpoints (step_N.dcp); {ckpt_path} is a single "
                             "file: resume it with --parallel ddp")
        if ckpt.get("optimizer") is None:
            raise ValueError(f"{ckpt_path} holds weights only (an export?): it cannot resume training; resume "
                             "from the checkpoint it was made from")
        model.load_state_dict(ckpt["model"])
    if shards(cfg, info):
        fsdp_module().apply_fsdp(model, device, dtype)  # before the optimizer: it must see the shards
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    if ckpt is None:
        return model, optimizer, scaler, Start()
    if sharded_ckpt:
        fsdp_module().load_sharded(ckpt_path, model, optimizer)
    else:
        optimizer.load_state_dict(ckpt["optimizer"])
    if "scaler" in ckpt and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    start = Start(int(ckpt["iteration"]), float(ckpt.get("best_val", math.inf)), float(ckpt.get("elapsed", 0.0)))
    if ckpt.get("rng"):
        restore_rng_state(ckpt["rng"])
    return model, optimizer, scaler, start


def setup_run(cfg: TrainConfig, info: DistInfo, *, resume: str | None, overwrite: bool, profile: bool,
              log: Callable[[str], None]) -> tuple[Run, Start]:
    """Check every input before any model work (each failure is one ValueError line), then build the run."""
    device, dtype = configure_device(cfg, info, log)
    ckpt_path, ckpt = load_resume(cfg, resume, log)
    old = earlier_run(cfg.out_dir, ckpt_path, overwrite)
    train_tokens, val_tokens = open_data(cfg, info)
    log(f"effective config ({cfg.preset} preset):\n{cfg.to_json()}")  # after the checks: a bad input is one line
    if old is not None:  # --overwrite, and the data is fine: now clear the old run
        clear_earlier_run(cfg.out_dir, info, log)
    model, optimizer, scaler, start = build_training_state(cfg, info, device, dtype, ckpt_path, ckpt)
    if ckpt is not None:
        log(f"resumed from {ckpt_path} at step {start.step}/{cfg.max_steps}")
    step_module = LossModule(model) if shards(cfg, info) else wrap_data_parallel(LossModule(model), device, info)
    if cfg.compile:
        step_module = torch.compile(step_module)
    peak, peak_src = math.nan, ""
    if info.is_main:
        peak, peak_src = peak_flops(device, dtype, cfg.peak_flops)
        open_run_dir(cfg, start.step if ckpt is not None else None, log)
    metrics = MetricsLog(Path(cfg.out_dir) / "metrics.jsonl", info.is_main, start.step if ckpt is not None else None)
    run = Run(cfg, info, device, dtype, model, step_module, optimizer, scaler, train_tokens, val_tokens, metrics,
              DivergenceCheck.start([p for p in model.parameters() if p.requires_grad], cfg.model.vocab_size),
              log, profile, ckpt_path, tokenizer_dir_for(cfg), peak)
    log(describe_run(run) + (f" | peak {peak / 1e12:.3g} TFLOP/s ({peak_src})" if info.is_main else ""))
    return run, start


def describe_run(run: Run) -> str:
    """The one line about the model, device and batch that a run prints before its first step."""
    cfg, mcfg = run.cfg, run.cfg.model
    n_params = sum(p.numel() for p in run.params)
    mem = rank_state_bytes(run.params, run.optimizer)
    return (
        f"model: {n_params / 1e6:.2f}M params ({mcfg.num_params(embedding=False) / 1e6:.2f}M non-embedding), "
        f"{mcfg.flops_per_token(training=True) / 1e6:.1f} MFLOP/token | device {run.device} "
        f"{str(run.dtype).replace('torch.', '')}{' compiled' if cfg.compile else ''} | world {run.info.world_size} "
        f"x accum {cfg.grad_accum} x batch {cfg.batch_size} x ctx {mcfg.context_length} = "
        f"{cfg.tokens_per_step * run.info.world_size:,} tokens/step | "
        f"{len(run.train_tokens):,} train / {len(run.val_tokens):,} val tokens | "
        f"{run.cfg.parallel if run.info.enabled else 'one process'}: "
        f"{fmt_bytes(mem['expected'])} per rank for params {fmt_bytes(mem['params'])} + grads + AdamW state"
    )


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"

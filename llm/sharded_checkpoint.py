"""Sharded checkpoints of FSDP runs: torch.distributed.checkpoint (DCP) directories.

    RUN_DIR/checkpoints/step_NNNNNNN.dcp/
        __0_0.distcp, __1_0.distcp, ...   each rank's shard of the weights and of the AdamW state (DCP)
        .metadata                          DCP's index: which bytes of which file hold which slice of which tensor
        meta.pt                            iteration, configs, RNG, best_val, ... (torch.save, weights_only-loadable)
        SHA256SUMS                         sha256 of every other file (`sha256sum -c` format)

Atomic as a whole: every rank writes its shard into .tmp-step_NNNNNNN.dcp-<random>/; when all are done,
rank 0 writes meta.pt and SHA256SUMS there and renames the directory to its name. A kill at any moment leaves
at most a .tmp- directory, which no resume picks (its name is not step_N.dcp) and the next save removes.

DCP maps slices, not files, so a checkpoint saved by W ranks loads on any other world size, sharded (FSDP)
or whole (one process, DDP). Only tensors go through DCP (it reads any other value back with a full
unpickler); everything else is in meta.pt, which loads with weights_only=True.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from llm.distributed import DistInfo, barrier, broadcast_from_main
from llm.fileio import sha256_of, write_text

DCP_SUFFIX = ".dcp"
META = "meta.pt"
MANIFEST = "SHA256SUMS"
TMP_PREFIX = ".tmp-"  # as llm.checkpoint's temp files: never a step_N name


class ShardedCheckpointError(ValueError):
    """A sharded checkpoint that cannot be used (incomplete, damaged); the message is one line."""


def is_sharded_checkpoint(path: str | os.PathLike[str]) -> bool:
    return Path(path).name.endswith(DCP_SUFFIX) and Path(path).is_dir()


def train_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The tensors of a training state by parameter name: {"model": state dict, "optimizer": {name: that
    parameter's optimizer state}}. Under FSDP the tensors are this rank's DTensor shards, so DCP saves and
    loads them in place, shard by shard. The optimizer state must exist (`init_optimizer_state`)."""
    names = {p: n for n, p in model.named_parameters()}
    optim = {names[p]: optimizer.state[p] for group in optimizer.param_groups for p in group["params"]}
    return {"model": model.state_dict(), "optimizer": optim}


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create every parameter's (zero) optimizer state, the tensors a load then fills in place."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer._state(p)  # llm.optim.AdamW: step, exp_avg, exp_avg_sq shaped (and sharded) like p


@contextlib.contextmanager
def _single_process_is_meant() -> Iterator[None]:
    """DCP warns on every save/load without a process group, even when asked for exactly that (no_dist)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, iteration: int,
                 extra: dict[str, Any], info: DistInfo) -> Path:
    """Every rank calls this: each writes its shard, rank 0 the metadata, then the directory appears whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{broadcast_from_main(os.urandom(4).hex(), info)}")
    with _single_process_is_meant():
        dcp.save(train_state(model, optimizer), checkpoint_id=tmp, no_dist=not info.enabled)  # collective; fsynced
    if info.is_main:
        with open(tmp / META, "xb") as f:
            torch.save({"iteration": int(iteration), **extra}, f)
            f.flush()
            os.fsync(f.fileno())
        _write_manifest(tmp)
        _publish(tmp, path)
    barrier(info)  # no rank goes on (or exits) before the checkpoint is complete
    return path


def _write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    write_text(directory / MANIFEST, "".join(f"{sha256_of(p)}  {p.name}\n" for p in files))


def _publish(tmp: Path, path: Path) -> None:
    """Rename the finished temp directory to `path`. An existing `path` (best.dcp) is first renamed aside and
    removed after, so at every moment the name holds a whole checkpoint or nothing."""
    old = path.with_name(f"{TMP_PREFIX}{path.name}-old-{os.urandom(4).hex()}") if path.exists() else None
    if old is not None:
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_sharded(path: Path) -> None:
    """Every file SHA256SUMS lists is there with its digest, and DCP's index and meta.pt are among them."""
    try:
        lines = (path / MANIFEST).read_text().splitlines()
    except OSError:
        raise ShardedCheckpointError(f"checkpoint {path} is incomplete: no {MANIFEST}") from None
    listed = {}
    for line in lines:
        m = re.fullmatch(r"([0-9a-f]{64})  (\S+)", line)
        if m is None:
            raise ShardedCheckpointError(f"checkpoint {path} is corrupt: bad line in {MANIFEST}: {line[:60]!r}")
        listed[m.group(2)] = m.group(1)
    for name in (".metadata", META):
        if name not in listed:
            raise ShardedCheckpointError(f"checkpoint {path} is incomplete: {MANIFEST} lists no {name}")
    for name, digest in listed.items():
        if not (path / name).is_file():
            raise ShardedCheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if sha256_of(path / name) != digest:
            raise ShardedCheckpointError(f"checkpoint {path} is corrupt: checksum mismatch in {name}")


def read_sharded_meta(path: Path) -> dict[str, Any]:
    """meta.pt of a verified checkpoint: iteration, model_config, train_config, rng, best_val, ..."""
    verify_sharded(path)
    return torch.load(path / META, map_location="cpu", weights_only=True)


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Fill model and optimizer (sharded or whole, any world size) in place from a DCP checkpoint; collective
    under a process group."""
    init_optimizer_state(optimizer)
    state = train_state(model, optimizer)
    with _single_process_is_meant():
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    model.load_state_dict(state["model"])


def read_sharded_full(path: Path) -> dict[str, Any]:
    """The whole checkpoint in one process (no process group), as an ordinary checkpoint dict: meta.pt's
    entries plus "model" (full tensors on the CPU) and "optimizer" None (a parameter-name-keyed AdamW state
    does not fit the single-file format's index-keyed one)."""
    meta = read_sharded_meta(path)
    state: dict[str, Any] = {}
    # dcp.load fills only the keys it is given; with none, the planner that builds them from the checkpoint's
    # index needs the loader underneath (what torch's own dcp_to_torch_save calls)
    with _single_process_is_meant():
        _load_state_dict(state, storage_reader=dcp.FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
    return {**meta, "model": state["model"], "optimizer": None}

"""FSDP2 and its sharded checkpoints: the code that needs torch.distributed.fsdp and torch.distributed.checkpoint.

Imported on first use (llm.sharded_checkpoint.fsdp_module; the trainer when --parallel fsdp shards, a DCP
checkpoint being saved or read): those packages import DTensor and torch.fx's symbolic shapes, seconds of
start-up that every other process is spared.

FSDP2 (`fully_shard`, ZeRO-3 style): each transformer block and then the root model become one FSDP unit;
between uses each rank holds 1/W of every parameter (a DTensor shard), a unit's full parameters are
all-gathered just before its forward (and again for its backward) and freed after, and its gradients are
reduce-scattered, so every rank ends the backward with the mean gradient of its own shard. The optimizer is
built afterwards, on the shards, so its state is sharded too. `Transformer.loss` is registered as a forward
method, so the fused loss (not `forward`) triggers the root's all-gather.

The checkpoint format (directory layout, checksums, atomic publishing) is llm.sharded_checkpoint's.
"""

from __future__ import annotations

import contextlib
import os
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
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from llm.distributed import DistInfo, barrier, broadcast_from_main
from llm.sharded_checkpoint import TMP_PREFIX, publish, read_sharded_meta, write_manifest, write_meta
from llm.transformer import Transformer


def apply_fsdp(model: Transformer, device: torch.device, dtype: torch.dtype) -> Transformer:
    """Shard `model` in place across the default process group: `fully_shard` per block, then the root
    (embedding, final norm, lm_head). Call after activation checkpointing and before building the optimizer.
    On CUDA with bf16, parameters are all-gathered in bf16 and gradients reduced in fp32; on the CPU
    everything stays fp32. On gloo the gradient mean is a SUM followed by an explicit division by the world
    size: some torch versions' gloo path takes an AVG reduce-scatter for a SUM, which would give W times the
    gradient of the same batch on one process."""
    mp = MixedPrecisionPolicy()
    if device.type == "cuda" and dtype == torch.bfloat16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    units = [*model.layers, model]  # the root last: it takes the parameters no block owns
    for unit in units:
        fully_shard(unit, mp_policy=mp, reshard_after_forward=unit is not model)
    if dist.get_backend() == "gloo":
        for unit in units:
            unit.set_force_sum_reduction_for_comms(True)
    register_fsdp_forward_method(model, "loss")
    return model


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
        write_meta(tmp, {"iteration": int(iteration), **extra})
        write_manifest(tmp)
        publish(tmp, path)
    barrier(info)  # no rank goes on (or exits) before the checkpoint is complete
    return path


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Fill model and optimizer (sharded or whole, any world size) in place from a DCP checkpoint; collective
    under a process group."""
    init_optimizer_state(optimizer)
    state = train_state(model, optimizer)
    with _single_process_is_meant():
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    model.load_state_dict(state["model"])


def read_sharded_full(path: Path, *, with_optimizer: bool = False) -> dict[str, Any]:
    """The whole checkpoint in one process (no process group), as an ordinary checkpoint dict: meta.pt's
    entries plus "model" (full tensors on the CPU) and "optimizer" None. `with_optimizer` also reads the
    AdamW state, as saved: {parameter name: {step, exp_avg, exp_avg_sq}} under "optimizer_by_name"
    (llm.train_setup.single_file_from_sharded turns it into the single file's index-keyed form)."""
    meta = read_sharded_meta(path)
    keys = {"model", "optimizer"} if with_optimizer else {"model"}
    state: dict[str, Any] = {}
    # dcp.load fills only the keys it is given; with none, the planner that builds them from the checkpoint's
    # index needs the loader underneath (what torch's own dcp_to_torch_save calls)
    with _single_process_is_meant():
        _load_state_dict(state, storage_reader=dcp.FileSystemReader(path),
                         planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True)
    extra = {"optimizer_by_name": state["optimizer"]} if with_optimizer else {}
    return {**meta, "model": state["model"], "optimizer": None, **extra}

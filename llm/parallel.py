"""Training-time wrappers applied to a built model from outside, torchtitan-style: the model's own code
stays as it is, the choice is a TrainConfig field (see docs/training.md).

Activation checkpointing: a checkpointed TransformerBlock keeps only its inputs through the forward
pass and runs its forward again during backward to rebuild what its backward needs. It uses the
non-reentrant form (`use_reentrant=False`): it works with DDP and FSDP, where the reentrant form fails,
and it frees whatever our autograd Functions keep through `ctx.save_for_backward` (all of them do; a
tensor kept as a plain ctx attribute would stay alive).

FSDP2 (`fully_shard`, ZeRO-3 style): each transformer block and then the root model become one FSDP unit;
between uses each rank holds 1/W of every parameter (a DTensor shard), a unit's full parameters are
all-gathered just before its forward (and again for its backward) and freed after, and its gradients are
reduce-scattered, so every rank ends the backward with the mean gradient of its own shard. The optimizer is
built afterwards, on the shards, so its state is sharded too. `Transformer.loss` is registered as a forward
method, so the fused loss (not `forward`) triggers the root's all-gather."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.utils.checkpoint import checkpoint

from llm.kv_cache import KVCache
from llm.optim import local
from llm.train_config import checkpoint_every
from llm.transformer import Transformer


def _checkpointed(forward: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
    """forward(*args, **kwargs) under non-reentrant checkpointing when autograd records it. Without grad
    there is nothing to save; with a KV cache the recompute would write the cache again after it has
    advanced, so those calls (generation, evaluation) run the plain forward."""
    if not torch.is_grad_enabled() or any(isinstance(a, KVCache) for a in (*args, *kwargs.values())):
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: Transformer, mode: str) -> int:
    """Checkpoint the blocks `mode` picks (block i when i % K == 0) by replacing their `forward` on the
    instance: parameters and state-dict keys stay the same, so checkpoints are interchangeable with a
    plain model's. Returns the number of blocks checkpointed."""
    every = checkpoint_every(mode)
    if not every:
        return 0
    chosen = [block for i, block in enumerate(model.layers) if i % every == 0]
    for block in chosen:
        block.forward = functools.partial(_checkpointed, block.forward)
    return len(chosen)


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


@contextlib.contextmanager
def no_gradient_sync(module: nn.Module, model: nn.Module) -> Iterator[None]:
    """Gradient accumulation without communication: a micro-batch's gradients are only added locally.
    DDP: its `no_sync()`; FSDP: `set_requires_gradient_sync(False)` on the sharded model (the unsharded
    gradients then accumulate until the last micro-batch reduce-scatters their sum); otherwise nothing."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(module, "no_sync"):  # DDP, also under torch.compile (its wrapper forwards attributes)
        with module.no_sync():
            yield
    else:
        yield


def rank_state_bytes(params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds for parameters, gradients and optimizer state, measured on the tensors
    themselves (a DTensor counts its local shard only). Before the first step, gradients and AdamW state do
    not exist yet: "expected" gives what they will be (gradients like the parameters, AdamW's m and v twice
    them, plus its step counters)."""
    def nbytes(ts: list[torch.Tensor]) -> int:
        return sum(local(t).numel() * t.element_size() for t in ts)

    state = [t for p in params for t in optimizer.state.get(p, {}).values() if isinstance(t, torch.Tensor)]
    out = {"params": nbytes(params), "grads": nbytes([p.grad for p in params if p.grad is not None]),
           "optimizer": nbytes(state)}
    out["expected"] = 4 * out["params"] + 4 * len(params)  # params + grads + m + v (+ a float32 step each)
    return out

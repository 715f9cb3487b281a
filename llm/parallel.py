"""Training-time wrappers applied to a built model from outside, torchtitan-style: the model's own code
stays as it is, the choice is a TrainConfig field (see docs/training.md).

Activation checkpointing: a checkpointed TransformerBlock keeps only its inputs through the forward
pass and runs its forward again during backward to rebuild what its backward needs. It uses the
non-reentrant form (`use_reentrant=False`): it works with DDP and FSDP, where the reentrant form fails,
and it frees whatever our autograd Functions keep through `ctx.save_for_backward` (all of them do; a
tensor kept as a plain ctx attribute would stay alive).

FSDP2 sharding itself is llm.fsdp (`apply_fsdp`), imported only by runs that shard; here are the parts
every run calls: accumulation without a gradient sync, and the bytes a rank holds."""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator

import torch
from torch import nn
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


def is_fsdp(module: nn.Module) -> bool:
    """Whether `module` was sharded by fully_shard (checked without importing torch.distributed.fsdp)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


@contextlib.contextmanager
def no_gradient_sync(module: nn.Module, model: nn.Module) -> Iterator[None]:
    """Gradient accumulation without communication: a micro-batch's gradients are only added locally.
    DDP: its `no_sync()`; FSDP: `set_requires_gradient_sync(False)` on the sharded model (the unsharded
    gradients then accumulate until the last micro-batch reduce-scatters their sum); otherwise nothing."""
    if is_fsdp(model):
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

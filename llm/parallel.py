"""Training-time wrappers applied to a built model from outside, torchtitan-style: the model's own code
stays as it is, the choice is a TrainConfig field (see docs/training.md).

Activation checkpointing: a checkpointed TransformerBlock keeps only its inputs through the forward
pass and runs its forward again during backward to rebuild what its backward needs. It uses the
non-reentrant form (`use_reentrant=False`): it works with DDP and FSDP, where the reentrant form fails,
and it frees whatever our autograd Functions keep through `ctx.save_for_backward` (all of them do; a
tensor kept as a plain ctx attribute would stay alive)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from llm.kv_cache import KVCache
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

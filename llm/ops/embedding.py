"""Embedding lookup: y = W[ids].

    forward:  y[... d] = W[ids[...], d]
    backward: dW[v d]  = Σ_{... : ids[...] = v} dy[... d]      (scatter-add with index_add_)
    ids are integers: no gradient.
"""

from __future__ import annotations

import torch
from torch.autograd import Function


def _embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    flat = weight.index_select(0, ids.reshape(-1))  # one gather over all tokens
    return flat.view(*ids.shape, weight.shape[1])


class EmbeddingFn(Function):
    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.num_embeddings = weight.shape[0]
        return _embedding(ids, weight)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (ids,) = ctx.saved_tensors
        d = dy.shape[-1]
        dw = dy.new_zeros(ctx.num_embeddings, d)
        # repeated ids must accumulate, so a plain scatter would be wrong: index_add_ sums.
        dw.index_add_(0, ids.reshape(-1), dy.reshape(-1, d))
        return None, dw


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Rows of `weight (vocab d)` selected by integer `ids (...)` -> `(... d)`."""
    if not torch.is_grad_enabled():  # inference: no autograd.Function overhead
        return _embedding(ids, weight)
    return EmbeddingFn.apply(ids, weight)

"""Cross-entropy of unnormalised logits against integer targets, mean over the counted positions.

    forward:  L[n]   = logsumexp_v z[n v] = m[n] + log Σ_v exp(z[n v] − m[n]),   m = max_v z
              loss   = Σ_n w[n] (L[n] − z[n, t_n]) / Σ_n w[n]
    backward: dz[n v] = w[n] (softmax(z)[n v] − 1[v = t_n]) · dloss / Σ_n w[n]
w is an optional per-position weight (a 0/1 loss mask: instruction tuning counts only the answer's tokens);
without it w = 1 and the loss is the plain mean over all N positions. A mask that counts no position gives
loss 0 and zero gradients. Masking is by position, never by token id: any target id is allowed under w = 0.
The softmax is never stored: backward recomputes exp(z − L) from the saved logits and L. Shapes
(einops): logits `... v`, targets and weight `...`, all positions folded into n. This is the reference;
`llm.fast.cross_entropy.linear_cross_entropy` fuses it with the lm_head projection.
"""

from __future__ import annotations

import torch
from torch.autograd import Function


def check_targets(logits_shape: torch.Size, targets: torch.Tensor, weight: torch.Tensor | None = None) -> None:
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if tuple(targets.shape) != tuple(logits_shape[:-1]):
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal logits shape without the vocab dim {tuple(logits_shape[:-1])}")
    if weight is not None and tuple(weight.shape) != tuple(targets.shape):
        raise ValueError(f"loss weight shape {tuple(weight.shape)} must equal targets shape {tuple(targets.shape)}")


def normalised_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w / Σw as a flat `dtype` tensor (a bool mask counts as 0/1); all zeros when Σw = 0."""
    w = weight.reshape(-1).to(dtype)
    total = w.sum()
    return w / torch.where(total > 0, total, torch.ones_like(total))


class CrossEntropyFn(Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        vocab = logits.shape[-1]
        z = logits.reshape(-1, vocab)
        t = targets.reshape(-1, 1).long()
        m = z.amax(-1, keepdim=True)
        lse = (z - m).exp_().sum(-1, keepdim=True).log_().add_(m)
        per_position = lse - z.gather(-1, t)  # (n 1)
        if weight is None:
            ctx.save_for_backward(logits, t, lse, None)
            return per_position.mean()
        wn = normalised_weight(weight, lse.dtype)[:, None]  # (n 1): each position's share of the mean
        ctx.save_for_backward(logits, t, lse, wn)
        return (per_position * wn).sum()

    @staticmethod
    def backward(ctx, dloss: torch.Tensor):
        logits, t, lse, wn = ctx.saved_tensors
        vocab = logits.shape[-1]
        g = logits.reshape(-1, vocab) - lse
        g.exp_()  # softmax, recomputed
        g.scatter_add_(-1, t, torch.full_like(t, -1, dtype=g.dtype))  # − onehot
        g.mul_(dloss / t.shape[0] if wn is None else wn * dloss)
        return g.view(logits.shape), None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of logits (... vocab) against integer targets (...): the mean over all positions, or,
    with `weight` (...; a bool/0-1 loss mask or any non-negative weights), Σ w·loss / Σ w."""
    check_targets(logits.shape, targets, weight)
    return CrossEntropyFn.apply(logits, targets, weight)

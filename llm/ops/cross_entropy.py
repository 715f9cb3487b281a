"""Cross-entropy of unnormalised logits against integer targets, mean over all positions.

    forward:  L[n]   = logsumexp_v z[n v] = m[n] + log Σ_v exp(z[n v] − m[n]),   m = max_v z
              loss   = (1/N) Σ_n (L[n] − z[n, t_n])
    backward: dz[n v] = (softmax(z)[n v] − 1[v = t_n]) · dloss / N
The softmax is never stored: backward recomputes exp(z − L) from the saved logits and L. Shapes
(einops): logits `... v`, targets `...` (integers), all positions folded into n. This is the reference;
`llm.fast.cross_entropy.linear_cross_entropy` fuses it with the lm_head projection.
"""

from __future__ import annotations

import torch
from torch.autograd import Function


def check_targets(logits_shape: torch.Size, targets: torch.Tensor) -> None:
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if tuple(targets.shape) != tuple(logits_shape[:-1]):
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal logits shape without the vocab dim {tuple(logits_shape[:-1])}")


class CrossEntropyFn(Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        vocab = logits.shape[-1]
        z = logits.reshape(-1, vocab)
        t = targets.reshape(-1, 1).long()
        m = z.amax(-1, keepdim=True)
        lse = (z - m).exp_().sum(-1, keepdim=True).log_().add_(m)
        ctx.save_for_backward(logits, t, lse)
        return (lse - z.gather(-1, t)).mean()

    @staticmethod
    def backward(ctx, dloss: torch.Tensor):
        logits, t, lse = ctx.saved_tensors
        vocab = logits.shape[-1]
        g = logits.reshape(-1, vocab) - lse
        g.exp_()  # softmax, recomputed
        g.scatter_add_(-1, t, torch.full_like(t, -1, dtype=g.dtype))  # − onehot
        g.mul_(dloss / t.shape[0])
        return g.view(logits.shape), None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (... vocab) against integer targets (...)."""
    check_targets(logits.shape, targets)
    return CrossEntropyFn.apply(logits, targets)

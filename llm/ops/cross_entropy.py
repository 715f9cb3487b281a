"""Cross-entropy of unnormalised logits against integer targets, mean over all positions.

    forward:  L[n]   = logsumexp_v z[n v] = m[n] + log Σ_v exp(z[n v] − m[n]),   m = max_v z
              loss   = (1/N) Σ_n (L[n] − z[n, t_n])
    backward: dz[n v] = (softmax(z)[n v] − 1[v = t_n]) · dloss / N
The softmax is never stored: backward recomputes exp(z − L) from the saved logits and L.

`linear_cross_entropy(h, W, t)` fuses the output projection z = h Wᵀ with the loss for training:
walking over token chunks it computes the chunk's logits in one reused buffer, the loss, and at once
the gradients dh = G W and dW += Gᵀ h with G = (softmax − onehot)/N (llm.c style). The (N vocab)
logits never exist in full; backward only scales the saved dh, dW by dloss.
"""

from __future__ import annotations

import torch
from torch.autograd import Function


def _check_targets(logits_shape: torch.Size, targets: torch.Tensor) -> None:
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
    _check_targets(logits.shape, targets)
    return CrossEntropyFn.apply(logits, targets)


# Tokens per chunk of the fused loss: (chunk vocab) logits buffer, reused.
FUSED_CHUNK = 512


class LinearCrossEntropyFn(Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, need_grad: bool) -> torch.Tensor:
        d = h.shape[-1]
        hf = h.reshape(-1, d)
        ct = torch.promote_types(torch.float32, torch.promote_types(h.dtype, weight.dtype))
        hf, w = hf.to(ct), weight.to(ct)
        t = targets.reshape(-1).long()
        n, vocab = hf.shape[0], w.shape[0]
        chunk = min(n, FUSED_CHUNK)
        buf = torch.empty(chunk, vocab, device=h.device, dtype=ct)
        loss = torch.zeros((), device=h.device, dtype=ct)
        if need_grad:
            dh = torch.empty_like(hf)
            dw = torch.zeros_like(w)
            minus_one = torch.full((chunk, 1), -1.0 / n, device=h.device, dtype=ct)
        for i in range(0, n, chunk):
            j = min(n, i + chunk)
            z = buf[: j - i]
            torch.mm(hf[i:j], w.t(), out=z)
            ti = t[i:j, None]
            m = z.amax(-1, keepdim=True)
            loss -= z.gather(-1, ti).sum()
            z.sub_(m).exp_()
            s = z.sum(-1, keepdim=True)
            loss += (s.log() + m).sum()
            if need_grad:
                z.mul_(s.reciprocal_().mul_(1.0 / n))  # softmax / N
                z.scatter_add_(-1, ti, minus_one[: j - i])  # − onehot / N
                torch.mm(z, w, out=dh[i:j])
                dw.addmm_(z.t(), hf[i:j])
        if need_grad:
            ctx.save_for_backward(dh.view(h.shape).to(h.dtype), dw.to(weight.dtype))
        return (loss / n).to(h.dtype)

    @staticmethod
    def backward(ctx, dloss: torch.Tensor):
        dh, dw = ctx.saved_tensors
        # the usual loss.backward() on CPU: hand back the saved grads without a copy (on CUDA the
        # check would force a device sync, so just scale)
        if dloss.device.type == "cpu" and float(dloss) == 1.0:
            return dh, dw, None, None
        return dh * dloss, dw * dloss, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """cross_entropy(h Wᵀ, targets) for h (... d), W (vocab d), without materialising all logits."""
    _check_targets(torch.Size((*h.shape[:-1], weight.shape[0])), targets)
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    with torch.autocast(h.device.type, enabled=False):  # out= buffers; loss statistics in fp32
        return LinearCrossEntropyFn.apply(h, weight, targets, need_grad)

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
# Logits per chunk of the mixed-precision loop (GPU, autocast): fewer, larger GEMMs (256 MiB of fp32).
LOWP_CHUNK_ELEMS = 1 << 26


def _linear_cross_entropy(
    h2: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dh, dw) for h (n d), W (vocab d), targets (n): the chunked loop, shared by the Function and
    the custom op. dh, dw are the gradients for dloss = 1 (empty when not need_grad)."""
    ct = torch.promote_types(torch.float32, torch.promote_types(h2.dtype, weight.dtype))
    hf, w = h2.to(ct), weight.to(ct)
    t = t.long()
    n, vocab = hf.shape[0], w.shape[0]
    chunk = max(1, min(n, FUSED_CHUNK))
    buf = torch.empty(chunk, vocab, device=h2.device, dtype=ct)
    loss = torch.zeros((), device=h2.device, dtype=ct)
    if need_grad:
        dh = torch.empty_like(hf)
        dw = torch.empty_like(w)
    for i in range(0, n, chunk):
        j = min(n, i + chunk)
        z = buf[: j - i]
        torch.mm(hf[i:j], w.t(), out=z)
        ti = t[i:j]
        m = z.amax(-1, keepdim=True)
        loss -= z.gather(-1, ti[:, None]).sum()
        z.sub_(m).exp_()  # E = exp(z − m)
        s = z.sum(-1, keepdim=True)
        loss += (s.log() + m).sum()
        if need_grad:
            # G = r ⊙ E − onehot/N with r = 1/(N·s) per row. The row scale and the one-hot go on the
            # small (rows d) operands and results, not on the (rows vocab) E: one pass over it fewer.
            #   dh = G W    = r ⊙ (E W) − W[t]/N
            #   dW = Gᵀ h   = Eᵀ (r ⊙ h) − scatter_t(h)/N
            r = s.reciprocal_().mul_(1.0 / n)
            torch.mm(z, w, out=dh[i:j]).mul_(r).sub_(w.index_select(0, ti), alpha=1.0 / n)
            hr = hf[i:j] * r
            if i == 0:
                torch.mm(z.t(), hr, out=dw)  # first chunk: no zero fill
            else:
                dw.addmm_(z.t(), hr)
            dw.index_add_(0, ti, hf[i:j], alpha=-1.0 / n)
    if not need_grad:
        dh, dw = h2.new_empty(0), weight.new_empty(0)
    return (loss / n).to(h2.dtype), dh.to(h2.dtype), dw.to(weight.dtype)


def _linear_cross_entropy_lowp(
    h2: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, need_grad: bool, gemm_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same loss and gradients with the chunk GEMMs in `gemm_dtype` (bf16/fp16 under autocast, as
    autocast runs the lm_head matmul) and the softmax statistics, dh and dW accumulated in fp32."""
    n, vocab = h2.shape[0], weight.shape[0]
    hg, wg = h2.to(gemm_dtype), weight.to(gemm_dtype)
    t = t.long()
    chunk = max(1, min(n, LOWP_CHUNK_ELEMS // vocab))
    loss = torch.zeros((), device=h2.device, dtype=torch.float32)
    if need_grad:
        dh = torch.empty(h2.shape, device=h2.device, dtype=torch.float32)
        dw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
        w_scaled = wg.float().mul_(1.0 / n)  # W/N, for the one-hot term of dh
    for i in range(0, n, chunk):
        j = min(n, i + chunk)
        z = torch.mm(hg[i:j], wg.t()).float()  # (rows vocab) logits
        ti = t[i:j]
        m = z.amax(-1, keepdim=True)
        loss -= z.gather(-1, ti[:, None]).sum()
        z.sub_(m).exp_()  # E = exp(z − m)
        s = z.sum(-1, keepdim=True)
        loss += (s.log() + m).sum()
        if need_grad:  # as in the fp32 loop: dh = r ⊙ (E W) − W[t]/N, dW = Eᵀ (r ⊙ h) − scatter_t(h)/N
            r = s.reciprocal_().mul_(1.0 / n)
            e = z.to(gemm_dtype)
            torch.mul(torch.mm(e, wg), r, out=dh[i:j]).sub_(w_scaled.index_select(0, ti))
            dw += torch.mm(e.t(), (hg[i:j] * r).to(gemm_dtype))
            dw.index_add_(0, ti, hg[i:j].float(), alpha=-1.0 / n)
    if not need_grad:
        return (loss / n).to(h2.dtype), h2.new_empty(0), weight.new_empty(0)
    return (loss / n).to(h2.dtype), dh.to(h2.dtype), dw.to(weight.dtype)


class LinearCrossEntropyFn(Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, need_grad: bool,
                gemm_dtype: torch.dtype | None) -> torch.Tensor:
        args = (h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), need_grad)
        if gemm_dtype is None:
            loss, dh, dw = _linear_cross_entropy(*args)
        else:
            loss, dh, dw = _linear_cross_entropy_lowp(*args, gemm_dtype)
        if need_grad:
            ctx.save_for_backward(dh.view(h.shape), dw)
        return loss

    @staticmethod
    def backward(ctx, dloss: torch.Tensor):
        dh, dw = ctx.saved_tensors
        # the usual loss.backward() on CPU: hand back the saved grads without a copy (on CUDA the
        # check would force a device sync, so just scale)
        if dloss.device.type == "cpu" and float(dloss) == 1.0:
            return dh, dw, None, None, None
        return dh * dloss, dw * dloss, None, None, None


# The same loop as an opaque custom op for torch.compile: Dynamo would unroll the chunk loop and Inductor
# allocate a fresh logits buffer per chunk; as an op the compiled graph keeps our loop and fuses the
# rest. Backward is dloss · (dh, dw), which Inductor compiles. Eager keeps LinearCrossEntropyFn.
@torch.library.custom_op("llm::linear_cross_entropy", mutates_args=())
def _lce_op(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _linear_cross_entropy(h, weight, targets, need_grad)


@_lce_op.register_fake
def _(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, need_grad: bool):
    if not need_grad:
        return h.new_empty(()), h.new_empty(0), weight.new_empty(0)
    return h.new_empty(()), h.new_empty(h.shape), weight.new_empty(weight.shape)


def _lce_setup_context(ctx, inputs, output) -> None:
    ctx.need_grad = inputs[3]
    ctx.save_for_backward(output[1], output[2])


def _lce_op_backward(ctx, dloss: torch.Tensor, ddh, ddw):
    if not ctx.need_grad:  # called with need_grad=False (no grad mode): nothing was computed
        return None, None, None, None
    dh, dw = ctx.saved_tensors
    return dh * dloss, dw * dloss, None, None


_lce_op.register_autograd(_lce_op_backward, setup_context=_lce_setup_context)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """cross_entropy(h Wᵀ, targets) for h (... d), W (vocab d), without materialising all logits."""
    _check_targets(torch.Size((*h.shape[:-1], weight.shape[0])), targets)
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    # Under autocast on a GPU the GEMMs run in the autocast dtype (fp32 GEMMs there cost more than the
    # rest of the loss); on a CPU, and when compiling, the fp32 loop with its reused buffers.
    device = h.device.type
    lowp = device != "cpu" and torch.is_autocast_enabled(device)
    gemm_dtype = torch.get_autocast_dtype(device) if lowp else None
    with torch.autocast(device, enabled=False):  # out= buffers; loss statistics in fp32
        if torch.compiler.is_compiling():
            return _lce_op(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), need_grad)[0]
        return LinearCrossEntropyFn.apply(h, weight, targets, need_grad, gemm_dtype)

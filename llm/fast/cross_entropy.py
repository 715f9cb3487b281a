"""The lm_head projection fused with the cross-entropy, for training: loss = cross_entropy(h Wᵀ, t)
(`llm.ops.cross_entropy`, the reference it is tested against) without the (n vocab) logits in memory.

Walking over token chunks it computes the chunk's logits z = h Wᵀ in one reused buffer, the loss, and at
once the gradients for dloss = 1 (llm.c style), with G = (softmax(z) − onehot(t)) / n:
    dh = G W,    dW = Σ_chunks Gᵀ h
With a per-position weight (a loss mask) the 1/n of row i becomes wn[i] = w[i] / Σw (the reference's
weighted mean), so G = wn ⊙ (softmax(z) − onehot(t)); rows with w = 0 add nothing.
Backward only scales the saved dh, dW by dloss. Two loops: fp32 (CPU, and every compiled graph), and the
mixed-precision one (GPU under autocast: chunk GEMMs in bf16/fp16, statistics and sums in fp32).
Under torch.compile the fp32 loop runs as the opaque custom op `llm::linear_cross_entropy`.
"""

from __future__ import annotations

import torch
from torch.autograd import Function

from llm.fast.softmax import exp_rows_
from llm.ops.cross_entropy import check_targets, normalised_weight


# Tokens per chunk of the fused loss: (chunk vocab) logits buffer, reused.
FUSED_CHUNK = 512
# Logits per chunk of the mixed-precision loop (GPU, autocast): fewer, larger GEMMs (256 MiB of fp32).
LOWP_CHUNK_ELEMS = 1 << 26


def _chunk_loss_(z: torch.Tensor, t: torch.Tensor, n: int, wn: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """For a chunk of logits z (rows vocab) and its targets t (rows): Σ_rows (logsumexp(z) − z[t]), and
    r = 1/(n·l) (rows 1); z becomes E = exp(z − m) in place, so softmax(z)/n = r ⊙ E. With row weights
    wn (rows 1, the 1/n of each row): Σ_rows wn (logsumexp(z) − z[t]) and r = wn / l."""
    picked = z.gather(-1, t[:, None])
    m, l = exp_rows_(z)
    if wn is None:
        return (l.log() + m).sum() - picked.sum(), l.reciprocal_().mul_(1.0 / n)
    return ((l.log() + m - picked) * wn).sum(), wn / l


def _linear_cross_entropy(
    h2: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, need_grad: bool, loss_weight: torch.Tensor | None = None,
    need_dw: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dh, dw) for h (n d), W (vocab d), targets (n), optional per-position loss weights (n): the
    chunked loop, shared by the Function and the custom op. dh, dw are the gradients for dloss = 1 (empty
    when not need_grad; dw empty when not need_dw: a frozen lm_head, as in LoRA fine-tuning, skips its
    (vocab d) GEMM)."""
    ct = torch.promote_types(torch.float32, torch.promote_types(h2.dtype, weight.dtype))
    hf, w = h2.to(ct), weight.to(ct)
    t = t.long()
    n, vocab = hf.shape[0], w.shape[0]
    wn = None if loss_weight is None else normalised_weight(loss_weight, ct)[:, None]  # (n 1)
    chunk = max(1, min(n, FUSED_CHUNK))
    buf = torch.empty(chunk, vocab, device=h2.device, dtype=ct)
    loss = torch.zeros((), device=h2.device, dtype=ct)
    if need_grad:
        dh = torch.empty_like(hf)
        dw = torch.empty_like(w) if need_dw else w.new_empty(0)
    for i in range(0, n, chunk):
        j = min(n, i + chunk)
        z = buf[: j - i]
        torch.mm(hf[i:j], w.t(), out=z)
        ti = t[i:j]
        wi = None if wn is None else wn[i:j]
        part, r = _chunk_loss_(z, ti, n, wi)
        loss += part
        if need_grad:
            # G = r ⊙ E − onehot/N. The row scale r and the one-hot go on the small (rows d) operands and
            # results, not on the (rows vocab) E: one pass over it fewer.
            #   dh = G W    = r ⊙ (E W) − W[t]/N
            #   dW = Gᵀ h   = Eᵀ (r ⊙ h) − scatter_t(h)/N         (wn ⊙ in place of /N when weighted)
            torch.mm(z, w, out=dh[i:j]).mul_(r)
            if wi is None:
                dh[i:j].sub_(w.index_select(0, ti), alpha=1.0 / n)
            else:
                dh[i:j].sub_(w.index_select(0, ti) * wi)
            if not need_dw:
                continue
            hr = hf[i:j] * r
            if i == 0:
                torch.mm(z.t(), hr, out=dw)  # first chunk: no zero fill
            else:
                dw.addmm_(z.t(), hr)
            if wi is None:
                dw.index_add_(0, ti, hf[i:j], alpha=-1.0 / n)
            else:
                dw.index_add_(0, ti, hf[i:j] * wi, alpha=-1.0)
    if not need_grad:
        dh, dw = h2.new_empty(0), weight.new_empty(0)
    if wn is None:
        loss = loss / n
    return loss.to(h2.dtype), dh.to(h2.dtype), dw.to(weight.dtype)


def _linear_cross_entropy_lowp(
    h2: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, need_grad: bool, gemm_dtype: torch.dtype,
    loss_weight: torch.Tensor | None = None, need_dw: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same loss and gradients with the chunk GEMMs in `gemm_dtype` (bf16/fp16 under autocast, as
    autocast runs the lm_head matmul) and the softmax statistics, dh and dW accumulated in fp32."""
    n, vocab = h2.shape[0], weight.shape[0]
    hg, wg = h2.to(gemm_dtype), weight.to(gemm_dtype)
    t = t.long()
    wn = None if loss_weight is None else normalised_weight(loss_weight, torch.float32)[:, None]  # (n 1)
    chunk = max(1, min(n, LOWP_CHUNK_ELEMS // vocab))
    loss = torch.zeros((), device=h2.device, dtype=torch.float32)
    if need_grad:
        dh = torch.empty(h2.shape, device=h2.device, dtype=torch.float32)
        dw = torch.zeros(weight.shape if need_dw else (0,), device=weight.device, dtype=torch.float32)
        w_scaled = wg.float().mul_(1.0 / n) if wn is None else wg.float()  # W/N, for the one-hot term of dh
    for i in range(0, n, chunk):
        j = min(n, i + chunk)
        z = torch.mm(hg[i:j], wg.t()).float()  # (rows vocab) logits
        ti = t[i:j]
        wi = None if wn is None else wn[i:j]
        part, r = _chunk_loss_(z, ti, n, wi)
        loss += part
        if need_grad:  # as in the fp32 loop: dh = r ⊙ (E W) − W[t]/N, dW = Eᵀ (r ⊙ h) − scatter_t(h)/N
            e = z.to(gemm_dtype)
            w_t = w_scaled.index_select(0, ti)
            torch.mul(torch.mm(e, wg), r, out=dh[i:j]).sub_(w_t if wi is None else w_t * wi)
            if not need_dw:
                continue
            dw += torch.mm(e.t(), (hg[i:j] * r).to(gemm_dtype))
            if wi is None:
                dw.index_add_(0, ti, hg[i:j].float(), alpha=-1.0 / n)
            else:
                dw.index_add_(0, ti, hg[i:j].float() * wi, alpha=-1.0)
    if wn is None:
        loss = loss / n
    if not need_grad:
        return loss.to(h2.dtype), h2.new_empty(0), weight.new_empty(0)
    return loss.to(h2.dtype), dh.to(h2.dtype), dw.to(weight.dtype)


class LinearCrossEntropyFn(Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, need_grad: bool,
                gemm_dtype: torch.dtype | None, loss_weight: torch.Tensor | None = None) -> torch.Tensor:
        args = (h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), need_grad)
        lw = None if loss_weight is None else loss_weight.reshape(-1)
        need_dw = ctx.needs_input_grad[1]  # False for a frozen lm_head (LoRA): no dW GEMM
        if gemm_dtype is None:
            loss, dh, dw = _linear_cross_entropy(*args, lw, need_dw)
        else:
            loss, dh, dw = _linear_cross_entropy_lowp(*args, gemm_dtype, lw, need_dw)
        if need_grad:
            ctx.save_for_backward(dh.view(h.shape), dw if need_dw else None)
        return loss

    @staticmethod
    def backward(ctx, dloss: torch.Tensor):
        dh, dw = ctx.saved_tensors
        # the usual loss.backward() on CPU: hand back the saved grads without a copy (on CUDA the
        # check would force a device sync, so just scale)
        if dloss.device.type == "cpu" and float(dloss) == 1.0:
            return dh, dw, None, None, None, None
        return dh * dloss, None if dw is None else dw * dloss, None, None, None, None


# The same loop as an opaque custom op for torch.compile: Dynamo would unroll the chunk loop and Inductor
# allocate a fresh logits buffer per chunk; as an op the compiled graph keeps our loop and fuses the
# rest. Backward is dloss · (dh, dw), which Inductor compiles. Eager keeps LinearCrossEntropyFn.
@torch.library.custom_op("llm::linear_cross_entropy", mutates_args=())
def _lce_op(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, need_grad: bool,
            loss_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _linear_cross_entropy(h, weight, targets, need_grad, loss_weight)


@_lce_op.register_fake
def _(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, need_grad: bool,
      loss_weight: torch.Tensor | None = None):
    if not need_grad:
        return h.new_empty(()), h.new_empty(0), weight.new_empty(0)
    return h.new_empty(()), h.new_empty(h.shape), weight.new_empty(weight.shape)


def _lce_setup_context(ctx, inputs, output) -> None:
    ctx.need_grad = inputs[3]
    ctx.save_for_backward(output[1], output[2])


def _lce_op_backward(ctx, dloss: torch.Tensor, ddh, ddw):
    if not ctx.need_grad:  # called with need_grad=False (no grad mode): nothing was computed
        return None, None, None, None, None
    dh, dw = ctx.saved_tensors
    return dh * dloss, dw * dloss, None, None, None


_lce_op.register_autograd(_lce_op_backward, setup_context=_lce_setup_context)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         loss_weight: torch.Tensor | None = None) -> torch.Tensor:
    """cross_entropy(h Wᵀ, targets, loss_weight) for h (... d), W (vocab d), without materialising all logits.
    `loss_weight` (...): per-position weights or a bool loss mask; the loss is then Σ w·loss / Σ w."""
    check_targets(torch.Size((*h.shape[:-1], weight.shape[0])), targets, loss_weight)
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    # Under autocast on a GPU the GEMMs run in the autocast dtype (fp32 GEMMs there cost more than the
    # rest of the loss); on a CPU, and when compiling, the fp32 loop with its reused buffers.
    device = h.device.type
    lowp = device != "cpu" and torch.is_autocast_enabled(device)
    gemm_dtype = torch.get_autocast_dtype(device) if lowp else None
    with torch.autocast(device, enabled=False):  # out= buffers; loss statistics in fp32
        if torch.compiler.is_compiling():
            lw = None if loss_weight is None else loss_weight.reshape(-1)
            return _lce_op(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), need_grad, lw)[0]
        return LinearCrossEntropyFn.apply(h, weight, targets, need_grad, gemm_dtype, loss_weight)

"""Several LoRA linears of one input (q/k/v, or w1/w3) as one Function: y_i = x W_iᵀ + s · (x A_iᵀ) B_iᵀ.

    forward:  U = x [A_1; A_2; ...]ᵀ                    one (n, Σr) GEMM instead of one skinny GEMM per branch
              y_i = x W_iᵀ + s · U_i B_iᵀ               (U_i: branch i's r columns of U)
    backward: dU_i = s · dy_i B_i
              dx = Σ_i dy_i W_i + dU [A_1; A_2; ...]    accumulated in one buffer (addmm_), one GEMM for LoRA
              [dA_1; dA_2; ...] = dUᵀ x                  one GEMM
              dB_i = s · dy_iᵀ U_i;   dW_i only for a trainable W_i
Equal to one `llm.ops.lora` per branch (tested against it); no dropout (with dropout each branch draws its
own mask, so those take the per-branch path). `shared_lora` says whether a set of modules qualifies.
"""

from __future__ import annotations

import torch
from torch.autograd import Function


class SharedInputLoRAFn(Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: torch.Tensor, scale: float, count: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        weights, lora_a, lora_b = tensors[:count], tensors[count: 2 * count], tensors[2 * count:]
        x2 = x.reshape(-1, x.shape[-1])
        a_cat = torch.cat(lora_a)  # (Σr in)
        u = x2.mm(a_cat.t())  # (n Σr)
        ys, col = [], 0
        for w, b in zip(weights, lora_b):
            y = x2.mm(w.t())
            y.addmm_(u[:, col: col + b.shape[1]], b.t().to(y.dtype), alpha=scale)
            col += b.shape[1]
            ys.append(y.view(*x.shape[:-1], y.shape[-1]))
        ctx.scale, ctx.count, ctx.x_shape = scale, count, x.shape
        ctx.save_for_backward(x2, a_cat, u, *weights, *lora_b)
        return tuple(ys)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, *dys: torch.Tensor):
        x2, a_cat, u, *rest = ctx.saved_tensors
        k, s = ctx.count, ctx.scale
        weights, lora_b = rest[:k], rest[k:]
        need = ctx.needs_input_grad
        dy2 = [dy.reshape(-1, dy.shape[-1]) for dy in dys]
        du = torch.cat([dy.mm(b.to(dy.dtype)) for dy, b in zip(dy2, lora_b)], dim=1).mul_(s)  # (n Σr)
        dx = None
        if need[0]:
            dx = dy2[0].mm(weights[0].to(du.dtype))
            for dy, w in zip(dy2[1:], weights[1:]):
                dx.addmm_(dy, w.to(dy.dtype))
            dx = dx.addmm_(du, a_cat.to(du.dtype)).view(ctx.x_shape)
        xt = x2.to(du.dtype)
        dws = [dy.t().mm(xt) if need[3 + i] else None for i, dy in enumerate(dy2)]
        da_cat = du.t().mm(xt)
        das, col = [], 0
        for b in lora_b:
            das.append(da_cat[col: col + b.shape[1]])
            col += b.shape[1]
        dbs, col = [], 0
        for dy, b in zip(dy2, lora_b):
            dbs.append(dy.t().mm(u[:, col: col + b.shape[1]].to(dy.dtype)).mul_(s))
            col += b.shape[1]
        return (dx, None, None, *dws, *das, *dbs)


def shared_lora(*modules) -> bool:
    """Whether `modules` are unmerged LoRA linears (llm.lora.LoRALinear) that one SharedInputLoRAFn can run:
    the same scale, and no dropout in effect."""
    first = modules[0]
    return all(
        hasattr(m, "lora_A") and not m.merged and m.scale == first.scale and not (m.training and m.dropout > 0)
        for m in modules
    )


def lora_linears(x: torch.Tensor, *modules) -> tuple[torch.Tensor, ...]:
    """(y_1, y_2, ...) of LoRA linears sharing the input x (... in); check shared_lora(*modules) first."""
    tensors = [m.weight for m in modules] + [m.lora_A for m in modules] + [m.lora_B for m in modules]
    if not torch.is_grad_enabled():  # inference: the plain products
        return tuple(m(x) for m in modules)
    return SharedInputLoRAFn.apply(x, modules[0].scale, len(modules), *tensors)

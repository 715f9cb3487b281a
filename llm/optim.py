"""Optimisers, learning-rate schedule and gradient clipping, written on tensor ops.

Four small pieces the training loop uses every step:

- `AdamW`: Adam with decoupled weight decay (Loshchilov & Hutter, 2019), numerically the same as
  `torch.optim.AdamW` (same op order, so the same rounding), with a multi-tensor (`torch._foreach_*`) path.
- `SGDDecay`: SGD whose step size decays as lr / sqrt(t + 1) (the CS336 warm-up exercise).
- `cos_lr_scheduler`: linear warm-up, cosine decay to `min_lr`, then constant `min_lr`.
- `gradient_clip`: rescale all gradients together when their global L2 norm exceeds a maximum.

Sharded (FSDP2) parameters are DTensors, each rank holding one shard. The AdamW update is elementwise, so it
runs on each rank's local shard as it is; the global gradient norm sums the shards' squared norms across
the ranks (one all-reduce) before the square root.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from llm.fast.optimizer import Optimizer  # torch.optim.Optimizer without its 4 s first-call torch._dynamo import

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]
CPU_CHUNK = 1 << 20  # elements per chunk of the CPU update: 4 MiB per fp32 tensor, ~20 MiB in flight (L3-sized)


def _check_range(name: str, value: float, low: float, high: float = math.inf, *, high_open: bool = False) -> None:
    ok = low <= value < high if high_open else low <= value <= high
    if not (isinstance(value, (int, float)) and ok):
        bound = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise ValueError(f"{name} must be in {bound}, got {value!r}")


def is_dtensor(t: object) -> bool:
    """Whether `t` is a DTensor (a sharded parameter), without importing torch.distributed.tensor: that
    import costs seconds (it pulls in torch.fx's symbolic shapes), and before it no DTensor can exist."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (a view: in-place ops update the DTensor); any other tensor as it is."""
    return t.to_local() if is_dtensor(t) else t


def _evaluate_closure(closure: Callable[[], float] | None) -> float | None:
    """The Optimizer.step contract: re-evaluate the loss (with grad enabled) when a closure is given."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class AdamW(Optimizer):
    """Adam with decoupled weight decay.

    For each parameter θ with gradient g at step t = 1, 2, ... (per group: lr α, betas β1 β2, eps ε, decay λ):

        θ ← θ · (1 − α λ)                     decay is applied to θ, not added to g ("decoupled")
        m ← β1 m + (1 − β1) g                 (computed as m.lerp_(g, 1 − β1), as torch does)
        v ← β2 v + (1 − β2) g²
        θ ← θ − α / (1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε)

    State per parameter: "step" (float32 scalar tensor on the CPU), "exp_avg" m, "exp_avg_sq" v, the same
    keys and types as torch.optim.AdamW, so state dicts load in either direction. `group["lr"]` may be
    changed between steps (the scheduler does). `foreach=None` picks the multi-tensor path on CUDA and the
    per-tensor path on the CPU (there `_foreach_*` is just a Python-free loop of the same kernels, and the
    per-tensor path reuses one scratch buffer instead of allocating √v for every tensor every step).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        foreach: bool | None = None,
    ) -> None:
        _check_range("lr", lr, 0.0)
        _check_range("betas[0]", betas[0], 0.0, 1.0, high_open=True)
        _check_range("betas[1]", betas[1], 0.0, 1.0, high_open=True)
        _check_range("eps", eps, 0.0)
        _check_range("weight_decay", weight_decay, 0.0)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults)
        # Scratch for √v, per (device, dtype): not optimizer state, never saved.
        self._scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._scratch = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = _evaluate_closure(closure)
        for group in self.param_groups:
            # Bucket by (device, dtype): _foreach_* ops need homogeneous lists.
            buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("AdamW does not support sparse gradients")
                buckets.setdefault((p.device, p.dtype), []).append(p)
            for (device, _), params in buckets.items():
                foreach = group.get("foreach")
                if foreach is None:
                    foreach = device.type == "cuda"
                (self._step_foreach if foreach else self._step_single)(group, params)
        return loss

    def _state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _step_single(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        device, dtype = params[0].device, params[0].dtype
        # On the CPU, run all the update's ops on one cache-sized chunk before moving to the next: the same
        # arithmetic element by element (so the same bits), but p, g, m, v stream from DRAM once instead
        # of once per op. On accelerators a whole tensor per op is better (fewer kernel launches).
        chunk = CPU_CHUNK if device.type == "cpu" else max(max(local(p).numel() for p in params), 1)
        scratch = self._scratch.get((device, dtype))
        if scratch is None or scratch.numel() < chunk:
            scratch = self._scratch[(device, dtype)] = torch.empty(chunk, device=device, dtype=dtype)
        for p in params:
            state = self._state(p)
            state["step"] += 1
            t = state["step"].item()
            decay, step_size, bc2_sqrt = 1 - lr * wd, lr / (1 - beta1**t), (1 - beta2**t) ** 0.5
            tensors = tuple(local(x) for x in (p, p.grad, state["exp_avg"], state["exp_avg_sq"]))
            if all(x.is_contiguous() for x in tensors):
                n = p.numel()
                flat = [x.view(-1) for x in tensors]
                pieces = [[x[i : i + chunk] for x in flat] for i in range(0, n, chunk)]
            else:  # rare (e.g. an expanded gradient): whole tensors, √v allocated
                pieces = [list(tensors)]
            for param, grad, m, v in pieces:
                if wd != 0:
                    param.mul_(decay)
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                if v.numel() <= scratch.numel() and v.is_contiguous():
                    denom = torch.sqrt(v, out=scratch[: v.numel()].view_as(v))  # no allocation per step
                else:
                    denom = v.sqrt()
                denom.div_(bc2_sqrt).add_(eps)
                param.addcdiv_(m, denom, value=-step_size)

    def _step_foreach(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        states = [self._state(p) for p in params]
        grads = [local(p.grad) for p in params]
        ms = [local(s["exp_avg"]) for s in states]
        vs = [local(s["exp_avg_sq"]) for s in states]
        params = [local(p) for p in params]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        if wd != 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_lerp_(ms, grads, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, 1 - beta2)
        ts = [s.item() for s in steps]  # CPU scalars: no device sync
        step_sizes = [-lr / (1 - beta1**t) for t in ts]
        denoms = torch._foreach_sqrt(vs)
        torch._foreach_div_(denoms, [(1 - beta2**t) ** 0.5 for t in ts])
        torch._foreach_add_(denoms, eps)
        torch._foreach_addcdiv_(params, ms, denoms, step_sizes)


class SGDDecay(Optimizer):
    """SGD with a 1/√(t+1) step-size decay: θ ← θ − lr / √(t + 1) · g, with t = 0, 1, 2, ... per parameter.

    State per parameter: "t" (int), the number of steps taken so far.
    """

    def __init__(self, params: ParamsT, lr: float = 1e-3) -> None:
        _check_range("lr", lr, 0.0)
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = _evaluate_closure(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                t = state.get("t", 0)
                p.add_(p.grad, alpha=-group["lr"] / math.sqrt(t + 1))
                state["t"] = t + 1
        return loss


def cos_lr_scheduler(it: int, max_lr: float, min_lr: float, warmup_iters: int, cosine_cycle_iters: int) -> float:
    """Learning rate at iteration `it` (CS336 semantics):

        it < warmup:                  it / warmup · max_lr                       (linear warm-up from 0)
        warmup ≤ it ≤ cycle:          min + ½ (1 + cos(π (it − warmup) / (cycle − warmup))) (max − min)
        it > cycle:                   min_lr
    """
    if it < 0:
        raise ValueError(f"iteration must be >= 0, got {it}")
    if warmup_iters < 0:
        raise ValueError(f"warmup_iters must be >= 0, got {warmup_iters}")
    if cosine_cycle_iters < warmup_iters:
        raise ValueError(f"cosine_cycle_iters ({cosine_cycle_iters}) must be >= warmup_iters ({warmup_iters})")
    if not 0 <= min_lr <= max_lr:
        raise ValueError(f"need 0 <= min_lr <= max_lr, got min_lr={min_lr}, max_lr={max_lr}")
    if it < warmup_iters:
        return it / warmup_iters * max_lr
    if it > cosine_cycle_iters:
        return min_lr
    if cosine_cycle_iters == warmup_iters:  # zero-length cosine: the warm-up peak, then min_lr
        return max_lr
    progress = (it - warmup_iters) / (cosine_cycle_iters - warmup_iters)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)


@torch.no_grad()
def gradient_clip(params: Iterable[torch.Tensor], max_l2_norm: float, eps: float = 1e-6) -> float:
    """Clip gradients by their global L2 norm ‖g‖ = √(Σ_p Σ_i g_pi²) over every parameter with a gradient.

    When ‖g‖ > max_l2_norm every gradient is scaled in place by max_l2_norm / (‖g‖ + eps).
    Returns ‖g‖ before clipping (0.0 when no parameter has a gradient). A non-finite norm leaves the
    gradients untouched and is returned as is, so the caller can stop with a clear message.
    """
    if not max_l2_norm > 0:
        raise ValueError(f"max_l2_norm must be > 0, got {max_l2_norm}")
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    groups = set()  # the process groups of sharded gradients: their squared norms are summed across ranks
    for p in params:
        if p.grad is not None:
            if is_dtensor(p.grad):
                groups.add(_shard_group(p.grad))
            by_device.setdefault(p.grad.device, []).append(local(p.grad))
    if not by_device:
        return 0.0
    # One norm per tensor (float32 accumulation even for bf16 grads), then the norm of those norms.
    norms = []
    for grads in by_device.values():
        norms.extend(torch._foreach_norm(grads, 2.0, dtype=torch.float32))
    first = next(iter(by_device))
    stacked = torch.stack([n.to(first) for n in norms]) if norms else torch.zeros(1, device=first)
    if groups:  # each rank holds a shard: sum the shards' squared norms over the ranks
        squared = stacked.square().sum()
        for group in groups:
            dist.all_reduce(squared, group=group)
        total = squared.sqrt().item()
    else:
        total = torch.linalg.vector_norm(stacked).item()
    if math.isfinite(total) and total > max_l2_norm:
        scale = max_l2_norm / (total + eps)
        for grads in by_device.values():
            torch._foreach_mul_(grads, scale)
    return total


def _shard_group(t: torch.Tensor) -> dist.ProcessGroup:
    """The process group a DTensor is sharded over (FSDP: one mesh dimension, Shard placements only)."""
    if t.device_mesh.ndim != 1 or not all(pl.is_shard() for pl in t.placements):
        raise ValueError(f"gradient_clip supports 1-D sharded DTensors (FSDP), got placements {t.placements}")
    return t.device_mesh.get_group()

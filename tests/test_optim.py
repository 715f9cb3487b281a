"""AdamW, SGDDecay, cos_lr_scheduler and gradient_clip against independent references.

References: torch.optim.AdamW trajectories, torch.nn.utils.clip_grad_norm_, and float64 math written
here in numpy. Snapshots store only those references; our outputs are compared against the stored copy.
"""

from __future__ import annotations

import copy
import functools
import math
import sys

import numpy as np
import pytest
import torch

import llm.optim
from llm.optim import AdamW, SGDDecay, cos_lr_scheduler, gradient_clip

SHAPES = [(16, 8), (8,), (4, 3, 5)]
STEPS = 1000
RECORD = (1, 10, 100, 1000)


def _init_params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(1234)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _adamw_trajectory(make_opt, steps: int = STEPS) -> dict[str, torch.Tensor]:
    """Run `steps` steps of an optimizer on a loss whose gradient depends on the parameters (so errors
    compound), with two param groups (the second without weight decay) and lr changed every step."""
    params = _init_params()
    opt = make_opt([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}])
    g = torch.Generator().manual_seed(99)
    targets = [torch.randn(p.shape, generator=g) for p in params]
    out = {}
    for step in range(1, steps + 1):
        # ∇ of Σ (p − t)² (1 + n) + mean(p³), written out (autograd would dominate the test's time).
        for p, t in zip(params, targets):
            n = 0.1 * torch.randn(p.shape, generator=g)
            p.grad = 2 * (p.detach() - t) * (1 + n) + 3 * p.detach() ** 2 / p.numel()
        params[0].grad = params[0].grad.t().contiguous().t()  # same values, non-contiguous layout
        for group in opt.param_groups:  # what the scheduler does between steps
            group["lr"] = 1e-2 * (0.5 + 0.5 * math.cos(step / 50))
        opt.step()
        if step in RECORD:
            out.update({f"p{i}_step{step}": p.detach().clone() for i, p in enumerate(params)})
    return out


@functools.cache
def _torch_adamw_reference() -> dict[str, torch.Tensor]:
    """The live reference, computed once per session and shared by the parametrized tests."""
    return _adamw_trajectory(lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1, foreach=False))


@pytest.mark.parametrize("path", ["foreach", "per_tensor", "per_tensor_small_chunks"])
def test_adamw_matches_torch_trajectory(ref_snapshot, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    stored = ref_snapshot(_torch_adamw_reference(), rtol=1e-6, atol=1e-7)
    if path == "per_tensor_small_chunks":  # chunk boundaries inside every tensor, and a ragged last chunk
        monkeypatch.setattr(llm.optim, "CPU_CHUNK", 7)
    foreach = path == "foreach"
    ours = _adamw_trajectory(lambda groups: AdamW(groups, lr=1e-2, weight_decay=0.1, foreach=foreach))
    for k, v in stored.items():
        torch.testing.assert_close(ours[k], v, rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
    # Not a trivial pass: the parameters moved far from where they started.
    assert not torch.allclose(stored["p0_step1000"], _init_params()[0].detach(), atol=0.1)


def test_optimizer_base_methods_work_without_dynamo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our optimizers bypass the base class's lazy `import torch._dynamo` when dynamo is not loaded."""
    monkeypatch.delitem(sys.modules, "torch._dynamo", raising=False)
    params = _init_params()
    opt = AdamW([{"params": params[:1]}], lr=1e-2)
    opt.add_param_group({"params": params[1:], "lr": 1e-3})
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    sd = copy.deepcopy(opt.state_dict())
    fresh = AdamW([{"params": params[:1]}, {"params": params[1:]}])
    fresh.load_state_dict(sd)
    assert fresh.param_groups[1]["lr"] == 1e-3 and fresh.state[params[2]]["step"].item() == 1
    assert "torch._dynamo" not in sys.modules


def _one_step_state(opt_cls, **kw) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    params = _init_params()
    opt = opt_cls(params, lr=1e-2, weight_decay=0.1, **kw)
    for _ in range(3):
        for p in params:
            p.grad = torch.sin(p.detach() * 3)
        opt.step()
    return params, opt


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_adamw_state_dict_interchanges_with_torch(direction: str) -> None:
    src_cls, dst_cls = (torch.optim.AdamW, AdamW) if direction == "torch_to_ours" else (AdamW, torch.optim.AdamW)
    params, src = _one_step_state(src_cls)
    sd = copy.deepcopy(src.state_dict())  # load_state_dict would otherwise share src's tensors
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    p2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    dst = dst_cls(p2, lr=1e-2, weight_decay=0.1)
    dst.load_state_dict(sd)
    for a, b in zip(params, p2):
        a.grad = torch.cos(a.detach())
        b.grad = torch.cos(b.detach())
    src.step()
    dst.step()
    for a, b in zip(params, p2):
        assert torch.equal(a, b)


def test_adamw_skips_params_without_grad_and_validates() -> None:
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = AdamW([a, b], lr=0.1)
    a.grad = torch.ones(3)
    opt.step()
    assert torch.equal(b, torch.ones(3)) and b not in opt.state
    assert not torch.equal(a, torch.ones(3))
    for kw, word in [({"lr": -1.0}, "lr"), ({"betas": (1.0, 0.9)}, "betas"), ({"eps": -1.0}, "eps"),
                     ({"weight_decay": -0.1}, "weight_decay")]:
        with pytest.raises(ValueError, match=word):
            AdamW([a], **kw)


def test_sgd_decay_matches_float64_hand_computation(ref_snapshot) -> None:
    lr, steps = 0.02, 25
    init = [p.detach().numpy().astype(np.float64) for p in _init_params()]
    # Reference: float64 numpy, loss = Σ p⁴/4 + p so ∇ = p³ + 1 (gradient depends on the parameters).
    ref = [x.copy() for x in init]
    for t in range(steps):
        ref = [x - lr / math.sqrt(t + 1) * (x**3 + 1) for x in ref]
    stored = ref_snapshot({f"p{i}": x for i, x in enumerate(ref)}, rtol=1e-12, atol=1e-12)
    params = [torch.nn.Parameter(p.detach().double()) for p in _init_params()]
    opt = SGDDecay(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        sum((p**4 / 4 + p).sum() for p in params).backward()
        opt.step()
    for i, p in enumerate(params):
        torch.testing.assert_close(p.detach(), stored[f"p{i}"], rtol=1e-12, atol=1e-12)
    assert opt.state[params[0]]["t"] == steps
    with pytest.raises(ValueError, match="lr"):
        SGDDecay(params, lr=-1)


def _cosine_reference(it: np.ndarray, max_lr: float, min_lr: float, warmup: int, cycle: int) -> np.ndarray:
    """Independent float64 formula, vectorised with np.select."""
    it = it.astype(np.float64)
    frac = np.clip((it - warmup) / (cycle - warmup), 0.0, 1.0)
    cosine = min_lr + (max_lr - min_lr) * (np.cos(np.pi * frac) + 1) / 2
    return np.select([it < warmup, it <= cycle], [max_lr * it / warmup, cosine], default=min_lr)


def test_cos_lr_scheduler_warmup_cosine_after(ref_snapshot) -> None:
    its = np.arange(0, 40)
    ref = _cosine_reference(its, 1.0, 0.1, 7, 21)
    stored = ref_snapshot({"lr": ref}, rtol=1e-12, atol=1e-12)["lr"]
    ours = torch.tensor([cos_lr_scheduler(int(i), 1.0, 0.1, 7, 21) for i in its], dtype=torch.float64)
    torch.testing.assert_close(ours, stored, rtol=1e-12, atol=1e-12)
    # The three regimes the reference covers: 0 at start, peak at the end of warm-up, min after the cycle.
    assert ours[0] == 0 and ours[7] == 1.0 and bool((ours[22:] == 0.1).all())
    assert bool((ours[:8].diff() > 0).all()) and bool((ours[7:22].diff() < 0).all())


def test_cos_lr_scheduler_edges_and_errors() -> None:
    assert cos_lr_scheduler(0, 1.0, 0.1, 0, 10) == 1.0  # no warm-up: starts at the peak
    assert cos_lr_scheduler(5, 1.0, 0.1, 5, 5) == 1.0 and cos_lr_scheduler(6, 1.0, 0.1, 5, 5) == 0.1
    for args, word in [((-1, 1.0, 0.1, 5, 10), "iteration"), ((0, 1.0, 0.1, -1, 10), "warmup_iters"),
                       ((0, 1.0, 0.1, 10, 5), "cosine_cycle_iters"), ((0, 0.1, 1.0, 1, 5), "min_lr")]:
        with pytest.raises(ValueError, match=word):
            cos_lr_scheduler(*args)


def _grads_case(scale: float) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(7)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(20, 10), (10,), (3, 4), (5,)]]
    for p in params[:3]:  # the last parameter has no gradient and must be skipped
        p.grad = scale * torch.randn(p.shape, generator=g)
    return params


@pytest.mark.parametrize("scale", [10.0, 0.01], ids=["clipped", "unclipped"])
def test_gradient_clip_matches_clip_grad_norm(ref_snapshot, scale: float) -> None:
    max_norm = 1.0
    ref_params = _grads_case(scale)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref_params, max_norm)
    ref = {f"g{i}": p.grad for i, p in enumerate(ref_params[:3])} | {"norm": ref_norm}
    stored = ref_snapshot(ref, rtol=1e-6, atol=1e-8)
    params = _grads_case(scale)
    before = [p.grad.clone() for p in params[:3]]
    norm = gradient_clip(params, max_norm)
    assert math.isclose(norm, stored["norm"].item(), rel_tol=1e-6)
    for i, p in enumerate(params[:3]):
        torch.testing.assert_close(p.grad, stored[f"g{i}"], rtol=1e-6, atol=1e-8)
    assert params[3].grad is None
    if scale < 1:  # below the max: untouched bit for bit
        assert all(torch.equal(b, p.grad) for b, p in zip(before, params))
    else:
        total = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params[:3]])).item()
        assert total == pytest.approx(max_norm, rel=1e-5)


def test_gradient_clip_edges() -> None:
    assert gradient_clip([torch.nn.Parameter(torch.ones(2))], 1.0) == 0.0  # no gradients at all
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([float("inf"), 1.0])
    assert math.isinf(gradient_clip([p], 1.0)) and p.grad[1] == 1.0  # left for the caller to report
    with pytest.raises(ValueError, match="max_l2_norm"):
        gradient_clip([p], 0.0)
    q = torch.nn.Parameter(torch.ones(2))
    q.grad = torch.tensor([3.0, 4.0])
    assert gradient_clip(iter([q]), 1.0) == 5.0  # a generator (model.parameters()) works
    torch.testing.assert_close(q.grad, torch.tensor([0.6, 0.8]) * 5 / (5 + 1e-6))

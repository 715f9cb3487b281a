"""Peak FLOP/s of the device, so that MFU (model FLOPs utilisation) is honest.

GPUs: dense (no sparsity) figures from the vendors' data sheets. CPUs have no data sheet we can trust
here, so we measure a large fp32 matmul once per process and use that as the peak.
"""

from __future__ import annotations

import contextlib
import functools
import time

import torch

from llm.machine import DEVICE_HELP

# name fragment (lower case) -> {dtype: peak FLOP/s}; fp32 is the TF32 tensor-core rate where it exists.
GPU_PEAK_FLOPS: dict[str, dict[torch.dtype, float]] = {
    "h200": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 494e12},
    "h100": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 494e12},
    "a100": {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 156e12},
    "l40s": {torch.bfloat16: 362e12, torch.float16: 362e12, torch.float32: 183e12},
    "a10g": {torch.bfloat16: 70e12, torch.float16: 70e12, torch.float32: 35e12},
    "l4": {torch.bfloat16: 121e12, torch.float16: 121e12, torch.float32: 60e12},
    "4090": {torch.bfloat16: 165e12, torch.float16: 165e12, torch.float32: 82.6e12},
    "3090": {torch.bfloat16: 71e12, torch.float16: 71e12, torch.float32: 35.6e12},
    "v100": {torch.float16: 125e12, torch.float32: 15.7e12},
    "t4": {torch.float16: 65e12, torch.float32: 8.1e12},
}


@functools.cache
def measure_cpu_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """Best-of-`repeats` fp32 matmul throughput with the current torch thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(device: torch.device | str, dtype: torch.dtype = torch.float32, override: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s, where the number came from)."""
    if override:
        return override, "given"
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key, table in GPU_PEAK_FLOPS.items():
            if key in name and dtype in table:
                return table[dtype], f"data sheet ({key})"
        return float("nan"), f"unknown GPU {name!r}: pass --peak-flops"
    return measure_cpu_matmul_flops(), "measured fp32 matmul"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def device_from_name(name: str | None) -> torch.device:
    """A --device value as a torch.device this machine has; None or "auto": cuda, else mps, else cpu.
    ValueError with one line for an unknown name or a device torch cannot see (torch itself would fail
    later, deep in the first CUDA call, with a multi-line traceback)."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {name!r}; use {DEVICE_HELP}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name} requested but torch sees no CUDA GPU (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {name} requested but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    if dev.type == "mps" and not _mps_available():
        raise ValueError(f"device {name} requested but this machine has no MPS backend (use --device cpu)")
    return dev


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's weights live on (inputs must go there)."""
    return next(model.parameters()).device


def autocast_context(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision: weights (and optimizer state) stay fp32, matmuls run in `dtype`; fp32: plain."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def inference_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The precision of inference (generation, evaluation): bf16 autocast on CUDA, as training runs there;
    plain fp32 elsewhere, where bf16 is slower."""
    return autocast_context(device, torch.bfloat16 if device.type == "cuda" else torch.float32)


THREADS_HELP = "CPU threads for torch (default: torch's); 1 is faster when the machine is busy"


def set_threads(n: int | None) -> None:
    """Apply a --threads option: two threads fighting over one free core run several times slower than one."""
    if n is None:
        return
    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)

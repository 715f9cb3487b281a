"""Shared helpers for the benchmark scripts: device/dtype parsing, synchronised timing, statistics,
peak memory (CUDA allocator; on CPU the process's peak RSS from /proc, resettable), atomic writes,
progress lines with an ETA."""

from __future__ import annotations

import contextlib
import gc
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from llm.fileio import write_json, write_text
from llm.hardware import device_from_name

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """--device of the benchmarks: cpu or cuda (auto: cuda when present); names checked by llm's device_from_name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = device_from_name(name)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"the benchmarks run on cpu or cuda, not {name!r}")
    return dev


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """bf16 autocast (weights stay fp32, matmuls run in bf16); a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call, with the device synchronised before and after and Python's cyclic garbage
    collector paused (as timeit does): a collection that happens to start inside one model's call
    would charge it a pause that has nothing to do with its code (tensors are freed by refcount anyway)."""
    sync(device)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0
    finally:
        if was_enabled:
            gc.enable()


def interleaved_times(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, steps: int) -> dict[str, list[float]]:
    """Seconds per call of each fn over `steps` timed iterations after `warmup` untimed ones; every
    iteration runs each fn once, alternating which goes first, so machine load hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for it in range(warmup + steps):
        for name in names if it % 2 == 0 else names[::-1]:
            t = timed(fns[name], device)
            if it >= warmup:
                times[name].append(t)
    return times


def summarize(times: list[float]) -> dict[str, float]:
    return {
        "mean_s": statistics.fmean(times),
        "std_s": statistics.stdev(times) if len(times) > 1 else 0.0,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "n": len(times),
    }


def paired_speed_ratio(ours: list[float], ref: list[float]) -> float:
    """Median over interleaved iterations of t_ref / t_ours (> 1: ours faster). Pairing cancels the slow
    drifts of a shared machine that would bias two separately measured medians."""
    return statistics.median(r / o for o, r in zip(ours, ref))


# ---------------------------------------------------------------- memory
def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def exact_cpu_rss() -> bool:
    """Make peak RSS track tensor memory on glibc: with a fixed (not adaptive) mmap threshold, every
    allocation above 64 KiB gets its own pages and returns them when freed, so VmHWM measures what a
    phase needs instead of what the heap happened to have cached. Slower (fresh pages every time), so
    call it only after the timings. Returns False where it is not available."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 1 << 16))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Give cached free heap pages back first (malloc_trim madvises them away), so that reusing them counts.
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    # Writing 5 to clear_refs resets the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0).
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def current_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    kb = _proc_status_kb("VmRSS")
    return None if kb is None else kb * 1024


def peak_memory_bytes(device: torch.device) -> int | None:
    """CUDA: the allocator's peak since reset. CPU: the process's peak RSS since reset (VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    kb = _proc_status_kb("VmHWM")
    return None if kb is None else kb * 1024


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


class TensorMemoryTracker:
    """Exact peak of the CPU tensor memory allocated while active (a TorchDispatchMode sees every op's
    outputs; weak references to their storages tell when they are freed). Inputs that existed before are
    not counted. RSS cannot give this: the allocator keeps freed pages and the kernel counts RSS lazily."""

    def __new__(cls):  # build the mode class lazily: torch.utils._python_dispatch is a private module
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        class _Tracker(TorchDispatchMode):
            def __init__(self) -> None:
                super().__init__()
                self.live: dict[int, tuple[StorageWeakRef, int]] = {}
                self.current = 0
                self.peak = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                        st = t.untyped_storage()
                        key = st.data_ptr()
                        if key and key in self.live and self.live[key][0].expired():  # freed, address reused
                            self.current -= self.live.pop(key)[1]
                        if key and key not in self.live:
                            self.live[key] = (StorageWeakRef(st), st.nbytes())
                            self.current += st.nbytes()
                self.peak = max(self.peak, self.current)
                for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
                    self.current -= self.live.pop(key)[1]
                return out

        return _Tracker()


def measure_peak(fn: Callable[[], object], device: torch.device) -> dict[str, int | None]:
    """Peak memory of one call. CUDA: allocator peak above the start. CPU: exact tensor peak (see
    TensorMemoryTracker) and the process's peak RSS above the start (coarse)."""
    gc.collect()
    sync(device)
    base = current_memory_bytes(device)
    reset_peak_memory(device)
    if device.type == "cuda":
        fn()
        sync(device)
        peak = peak_memory_bytes(device)
        return {"peak_bytes": None if peak is None or base is None else max(peak - base, 0)}
    with TensorMemoryTracker() as tracker:
        fn()
    rss = peak_memory_bytes(device)
    return {"peak_bytes": tracker.peak, "peak_rss_bytes": None if rss is None or base is None else max(rss - base, 0)}


def fmt_bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# ---------------------------------------------------------------- output
def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Eta:
    """`eta.tick()` after each of `total` units of work; returns a 'done/total, ETA' string."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.t0 = max(total, 1), 0, time.perf_counter()

    def tick(self, n: int = 1) -> str:
        self.done += n
        elapsed = time.perf_counter() - self.t0
        left = elapsed / self.done * (self.total - self.done)
        return f"{self.done}/{self.total}, elapsed {elapsed:.0f}s, ETA {left:.0f}s"


def atomic_write_text(path: Path, text: str) -> None:
    """llm.fileio.write_text (temp + rename, no temp left on failure) into a directory made if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text)


def atomic_write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, obj, default=str)


def machine_info(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        info["cores"] = os.cpu_count()
    return info


@contextlib.contextmanager
def cuda_memory_history(device: torch.device, path: Path | None) -> Iterator[None]:
    """Record allocator history (CUDA only) and dump a snapshot for https://pytorch.org/memory_viz."""
    if device.type != "cuda" or path is None:
        yield
        return
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    try:
        yield
    finally:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
        torch.cuda.memory._record_memory_history(enabled=None)

"""Timing and peak memory of one callable: median and interquartile range over repeats.

CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` (all of torch's threads), peak resident
memory from ``/proc/self/status`` (VmHWM, reset through ``/proc/self/clear_refs``) above the
resident size before the call. CUDA: ``triton.testing.do_bench`` quantiles and
``torch.cuda.max_memory_allocated`` above the allocation before the call.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import statistics
from typing import Callable

import torch
import torch.utils.benchmark as tb


def _fix_malloc_threshold() -> None:
    """Pin glibc's mmap threshold at 128 KiB so large tensors are mapped and unmapped on free.

    By default the threshold grows after each free of a large block, and freed memory then stays
    resident for reuse: the resident peak would miss allocations that reuse it. Pinned, every
    tensor of 128 KiB or more shows up in (and leaves) the resident size.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_MMAP_THRESHOLD = -3
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    except OSError:
        pass


_fix_malloc_threshold()


@dataclasses.dataclass
class Timing:
    median_ms: float
    iqr_ms: float
    runs: int


def _proc_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory one call of ``fn`` adds above what was in use before it (MB)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if not _reset_peak_rss():
        return None
    base = _proc_kb("VmRSS")
    out = fn()
    peak = _proc_kb("VmHWM")
    del out
    if base is None or peak is None:
        return None
    return max(peak - base, 0) / 1024


def time_fn(fn: Callable[[], object], device: torch.device, min_run_time: float) -> Timing:
    """Median and IQR of ``fn``'s run time after warm-up."""
    if device.type == "cuda":
        import triton.testing

        q25, q50, q75 = triton.testing.do_bench(fn, quantiles=[0.25, 0.5, 0.75], rep=int(min_run_time * 1000))
        return Timing(q50, q75 - q25, 0)
    fn()  # warm-up (allocator, lazy inits)
    timer = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times = [t * 1e3 for t in m.times]
    if len(times) >= 4:
        q = statistics.quantiles(times, n=4)
        iqr = q[2] - q[0]
    else:
        iqr = max(times) - min(times)
    return Timing(statistics.median(times), iqr, len(times))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"

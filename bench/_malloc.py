"""glibc malloc set up for CPU timings (no torch import: set before torch's threads start).

Each first touch of a fresh page is a page fault, and on this kind of VM a fault costs about
10 us: a training step whose tensors come from freshly mapped memory spends up to half its time
in the kernel, and how much varies from step to step with glibc's dynamic mmap threshold.
``init()`` turns that off: no mmap, no trimming, one arena. Freed memory stays in the heap and is
reused, as a GPU caching allocator (or jemalloc/tcmalloc) reuses it, and after warm-up a step
faults no pages. Every implementation is timed under the same setting. (Peak memory is counted
from the profiler's allocation events, which this does not change.)

A no-op where glibc is absent, and with ``BENCH_MALLOC=default``: then glibc's defaults stay, as
users run (the effect of the allocator on a step is measured that way: docs/layers.md, "Speed on
the CPU").
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8

MODE = os.environ.get("BENCH_MALLOC", "steady")
if MODE not in ("steady", "default"):
    raise ValueError(f"BENCH_MALLOC must be 'steady' or 'default', got {MODE!r}")

try:
    _libc = ctypes.CDLL("libc.so.6")
    _libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
except (OSError, AttributeError):
    _libc = None


def steady() -> None:
    if _libc is not None and MODE == "steady":
        _libc.mallopt(M_MMAP_MAX, 0)
        _libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


def init() -> None:
    """One arena (the autograd thread shares the main heap), then ``steady()``."""
    if _libc is not None and MODE == "steady":
        _libc.mallopt(M_ARENA_MAX, 1)
    steady()

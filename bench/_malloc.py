"""glibc malloc settings for CPU measurements (no torch import: set before torch's threads start).

Each first touch of a fresh page is a page fault, and on this kind of VM a fault costs about
10 us: a training step whose tensors come from freshly mapped memory spends up to half its time
in the kernel, and how much varies from step to step with glibc's dynamic mmap threshold. Two
settings separate what the benchmark measures from that noise:

- ``steady()`` (timings): no mmap, no trimming, one arena. Freed memory stays in the heap and is
  reused, as a GPU caching allocator (or jemalloc/tcmalloc) reuses it; after warm-up a step
  faults no pages. Every implementation is timed under the same setting.
- ``exact()`` (peak memory): every block of 128 KiB or more is mapped on allocation and unmapped
  on free, and the free heap is returned first, so the resident high-water mark sees every
  tensor.

Both are no-ops where glibc is absent.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -3, -4, -8

try:
    _libc = ctypes.CDLL("libc.so.6")
    _libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _libc.malloc_trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):
    _libc = None


def available() -> bool:
    return _libc is not None


def steady() -> None:
    if _libc is None:
        return
    _libc.mallopt(M_MMAP_MAX, 0)
    _libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


def exact() -> None:
    if _libc is None:
        return
    _libc.mallopt(M_MMAP_MAX, 65536)
    _libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    _libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
    _libc.malloc_trim(0)


def init() -> None:
    """One arena (the autograd thread shares the main heap), then ``steady()``."""
    if _libc is None:
        return
    _libc.mallopt(M_ARENA_MAX, 1)
    steady()

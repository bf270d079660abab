"""The C++ CPU kernels' cache of large output blocks (csrc/cpu/buffer_cache.cpp).

A training step frees and re-allocates the same large tensors every step: the experts' weight
gradients (E times a dense MLP's), the [R, H] activations, the dispatch and combine buffers.
From glibc's default allocator each of them is freshly mapped memory that page-faults on first
touch (at V-MoE-B/16, ~190,000 faults a step). The CPU kernels take these outputs (1 MiB and
larger) from a cache of freed blocks instead, as a GPU caching allocator does: up to
``MOE_KERNELS_CPU_CACHE_MB`` MiB of free blocks are kept (default 2048; 0 turns it off).
``torch.profiler``'s memory events count the blocks in use, not the free ones.
"""

from __future__ import annotations

import torch

from moe_kernels import _ext
from moe_kernels.validation import is_int

__all__ = ["cpu_cache_info", "empty_cpu_cache", "set_cpu_cache_limit"]


def cpu_cache_info() -> dict[str, int]:
    """``{"in_use_bytes", "cached_bytes", "cached_blocks", "limit_bytes"}``: the blocks live tensors
    hold, the free blocks kept for reuse and how many, and the limit on the free ones (all 0
    when ``moe_kernels._C`` is not loaded: no cache is used then)."""
    keys = ("in_use_bytes", "cached_bytes", "cached_blocks", "limit_bytes")
    if not _ext.LOADED:
        return dict.fromkeys(keys, 0)
    return dict(zip(keys, torch.ops.moe_kernels_C.cpu_cache_info(), strict=True))


def empty_cpu_cache() -> None:
    """Returns the free blocks to the system (blocks of live tensors stay; a no-op without ``_C``)."""
    if _ext.LOADED:
        torch.ops.moe_kernels_C.cpu_cache_clear()


def set_cpu_cache_limit(mb: int) -> None:
    """At most ``mb`` MiB of free blocks are kept from now on (0: none, and the cache is emptied);
    the environment variable ``MOE_KERNELS_CPU_CACHE_MB`` sets the initial limit."""
    if not is_int(mb) or mb < 0:
        raise ValueError(f"set_cpu_cache_limit: mb must be an int >= 0, got {mb!r}")
    if _ext.LOADED:
        torch.ops.moe_kernels_C.cpu_cache_set_limit(mb)

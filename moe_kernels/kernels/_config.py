"""Launch-configuration helpers shared by the kernel modules (no torch)."""

from __future__ import annotations

import os

import triton


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (read when the kernels are imported,
    which is also when Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_configs(gpu: list[triton.Config], interpret: triton.Config) -> list[triton.Config]:
    """The GPU candidates, or the single ``interpret`` config under the interpreter, which
    fails when ``@triton.autotune`` has more than one config to choose from."""
    return [interpret] if interpreting() else gpu

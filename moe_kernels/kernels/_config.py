"""Launch-configuration helpers shared by the kernel modules (no torch).

Autotuning (the grouped GEMMs): ``@triton.autotune`` times its candidate configs on the first
call for a key and keeps the winner for the rest of the process. The key holds
``M_BUCKET = m_bucket(M)``, the next power of two of the row count, never M itself: under
expert parallelism M is the number of rows received, which changes every step, and a key on
it would re-run the timing every step.

``MOE_KERNELS_TRITON_CONFIG`` pins one config per kernel instead (read at each launch):
  unset, "" or "autotune"  time the candidates once per key and process (the fastest, but two
                           processes can pick different configs: different summation order,
                           different bits)
  "first"                  each kernel's first candidate that fits the device's shared memory
                           (no timing: run-to-run and process-to-process identical bits)
  "grouped_mm=128x128x64:8:3,grouped_mm_weight_grad=64x128x64:4:3"
                           explicit BLOCK_MxBLOCK_NxBLOCK_K:warps:stages per kernel (GROUP_M 8);
                           a kernel not named gets its first fitting candidate
Every kernel is deterministic for a given config (no atomics, a fixed reduction order), so a
pinned config gives bitwise identical results from run to run; tests, expert parallelism
(every rank must pick the same config) and ``make gpu-check`` pin.
"""

from __future__ import annotations

import os
import re

import triton

PIN_ENV = "MOE_KERNELS_TRITON_CONFIG"


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (read when the kernels are imported,
    which is also when Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_configs(gpu: list[triton.Config], interpret: triton.Config) -> list[triton.Config]:
    """The GPU candidates, or the single ``interpret`` config under the interpreter, which
    fails when ``@triton.autotune`` has more than one config to choose from."""
    return [interpret] if interpreting() else gpu


def m_bucket(m: int) -> int:
    """The autotune key's bucket of a row count: the next power of two (at least 16)."""
    return max(16, triton.next_power_of_2(max(int(m), 1)))


_SPEC = re.compile(r"^(\d+)x(\d+)x(\d+):(\d+):(\d+)$")


def parse_config(text: str, group_m: int = 8) -> triton.Config:
    """``"BMxBNxBK:warps:stages"`` -> a ``triton.Config`` (GROUP_M ``group_m``)."""
    m = _SPEC.match(text.strip())
    if not m:
        raise ValueError(
            f"{PIN_ENV}: a config must look like BLOCK_MxBLOCK_NxBLOCK_K:warps:stages (e.g. 128x128x64:8:3), "
            f"got {text!r}"
        )
    bm, bn, bk, warps, stages = (int(g) for g in m.groups())
    for name, v in (("BLOCK_M", bm), ("BLOCK_N", bn), ("BLOCK_K", bk)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{PIN_ENV}: {name} must be a power of two >= 16, got {v} in {text!r}")
    if warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"{PIN_ENV}: warps must be one of 1, 2, 4, 8, 16, got {warps} in {text!r}")
    if not 1 <= stages <= 8:
        raise ValueError(f"{PIN_ENV}: stages must be in [1, 8], got {stages} in {text!r}")
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m}, num_warps=warps, num_stages=stages
    )


def pin_mode(kernel: str) -> str | triton.Config:
    """What ``MOE_KERNELS_TRITON_CONFIG`` asks for ``kernel``: ``"autotune"``, ``"first"`` or
    an explicit config."""
    raw = os.environ.get(PIN_ENV, "").strip()
    if raw in ("", "autotune"):
        return "autotune"
    if raw == "first":
        return "first"
    explicit = {}
    for part in raw.split(","):
        name, sep, spec = part.partition("=")
        if not sep:
            raise ValueError(
                f"{PIN_ENV} must be 'autotune', 'first' or 'kernel=BMxBNxBK:warps:stages,...', got {raw!r}"
            )
        explicit[name.strip()] = spec
    return parse_config(explicit[kernel]) if kernel in explicit else "first"


def pinned_config(kernel: str, candidates: list[triton.Config], fits) -> triton.Config | None:
    """The config to launch ``kernel`` with when pinned, or ``None`` to autotune.

    Args:
        kernel: the kernel's name in ``MOE_KERNELS_TRITON_CONFIG``.
        candidates: its autotune candidates, in order of preference.
        fits: ``fits(configs) -> configs`` keeps those the device can run (shared memory).
    """
    mode = pin_mode(kernel)
    if isinstance(mode, triton.Config):
        return mode
    if mode == "autotune" and not interpreting():
        return None
    # "first", and the interpreter (one candidate, nothing to time).
    return candidates[0] if interpreting() else fits(candidates)[0]

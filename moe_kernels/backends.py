"""One place that decides which implementation runs each op, and says why the others cannot.

Backends, in the order ``auto`` tries them:
  cuda    C++/CUDA kernels of ``moe_kernels._C`` (CUDA tensors)
  triton  Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1`` and only
          when asked for by name, since the interpreter is slow)
  cpu     C++ CPU kernels of ``moe_kernels._C`` (CPU tensors)
  torch   the pure-PyTorch reference (``moe_kernels.reference``): always available

``MOE_KERNELS_BACKEND=auto|cuda|triton|cpu|torch`` (or a layer's ``backend=`` argument, which
wins over the variable) picks one. ``auto`` falls back quietly; a named backend that cannot run
a call raises a ``RuntimeError`` listing why.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from types import ModuleType

import torch

from moe_kernels import _ext

ENV_VAR = "MOE_KERNELS_BACKEND"
BACKENDS = ("cuda", "triton", "cpu", "torch")
CHOICES = ("auto",) + BACKENDS

# Every backend module implements these names with the signatures of moe_kernels.reference.
OPS = (
    "topk_softmax",
    "topk_softmax_backward",
    "make_routing",
    "dispatch",
    "combine",
    "combine_weights_grad",
    "grouped_mm",
    "grouped_mm_weight_grad",
)

_MODULES = {
    "torch": "moe_kernels.reference",
    "cpu": "moe_kernels.ops._cpp",
    "cuda": "moe_kernels.ops._cpp",
    "triton": "moe_kernels.ops._triton",
}


def requested_backend(backend: str | None = None) -> str:
    """The backend a call asks for: the argument if given and not ``auto``, else the env var."""
    name = backend if backend not in (None, "auto") else os.environ.get(ENV_VAR, "auto")
    name = name.strip().lower()
    if name not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {name!r} (argument or {ENV_VAR})")
    return name


@functools.cache
def _module(backend: str) -> ModuleType | str:
    """The backend's implementation module, or the reason it cannot be imported."""
    try:
        return importlib.import_module(_MODULES[backend])
    except Exception as exc:  # e.g. triton missing
        return f"{type(exc).__name__}: {exc}"


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def not_supported_reasons(backend: str, op: str, device: torch.device) -> list[str]:
    """Why ``backend`` cannot run ``op`` on tensors of ``device`` (empty when it can)."""
    reasons: list[str] = []
    if backend == "torch":
        return reasons
    if backend in ("cpu", "cuda") and not _ext.LOADED:
        reasons.append(f"moe_kernels._C did not load ({_ext.LOAD_ERROR})")
    if backend == "cpu" and device.type != "cpu":
        reasons.append(f"the cpu backend needs CPU tensors, got {device.type}")
    if backend == "cuda":
        if device.type != "cuda":
            reasons.append(f"the cuda backend needs CUDA tensors, got {device.type}")
        if _ext.LOADED and not _ext.cuda_kernels_built():
            reasons.append("moe_kernels._C was built without CUDA kernels (MOE_KERNELS_BUILD_CUDA=0 or no nvcc)")
    if backend == "triton":
        if device.type == "cpu" and not _triton_interpret():
            reasons.append("triton needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)")
        elif device.type not in ("cpu", "cuda"):
            reasons.append(f"triton does not run on {device.type} tensors")
    if not reasons:
        mod = _module(backend)
        if isinstance(mod, str):
            reasons.append(f"cannot import {_MODULES[backend]} ({mod})")
        else:
            supported = mod.supported_ops(device) if hasattr(mod, "supported_ops") else OPS
            if op not in supported:
                reasons.append(f"{backend} has no {op} kernel for {device.type} tensors")
    return reasons


def _auto_order(op: str, device: torch.device) -> tuple[str, ...]:
    if device.type == "cuda":
        # Grouped GEMM: Triton's tiles beat a loop of cuBLAS calls; the rest: CUDA first.
        return ("triton", "cuda", "torch") if op.startswith("grouped_mm") else ("cuda", "triton", "torch")
    # The interpreter is a correctness tool, never an automatic choice on the CPU.
    return ("cpu", "torch")


@functools.cache
def _choose(op: str, backend: str, device: torch.device) -> tuple[str, Callable]:
    if backend == "auto":
        for name in _auto_order(op, device):
            if not not_supported_reasons(name, op, device):
                return name, getattr(_module(name), op)
        raise AssertionError("unreachable: the torch backend supports every op")
    reasons = not_supported_reasons(backend, op, device)
    if reasons:
        raise RuntimeError(
            f"moe_kernels: backend {backend!r} cannot run {op} on {device.type} tensors: " + "; ".join(reasons)
        )
    return backend, getattr(_module(backend), op)


def choose(op: str, backend: str, device: torch.device) -> tuple[str, Callable]:
    """``(name, implementation)`` of the backend that runs ``op`` for tensors on ``device``.

    Args:
        op: one of ``OPS``.
        backend: ``auto`` or a name of ``BACKENDS`` (already resolved by ``requested_backend``).
        device: the device of the call's tensors.
    """
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if os.environ.get("TRITON_INTERPRET") is not None:
        # Tests flip the interpreter on and off within one process.
        _choose.cache_clear()
    return _choose(op, backend, device)


def available(device: torch.device | str = "cpu") -> dict[str, list[str]]:
    """For each backend, the reasons it cannot run on ``device`` for any op (empty = available)."""
    device = torch.device(device)
    out = {}
    for name in BACKENDS:
        per_op = {op: not_supported_reasons(name, op, device) for op in OPS}
        if any(not r for r in per_op.values()):
            out[name] = []
        else:
            out[name] = sorted({r for rs in per_op.values() for r in rs})
    return out

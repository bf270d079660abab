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

Each backend module declares what it supports (``SUPPORTS[name]``, a ``Support``: devices,
ops, dtypes, the fp64 rule, fused bias and epilogues, preconditions); this module reads the
declarations and decides, and no op or kernel module makes a backend decision of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from collections.abc import Callable
from types import ModuleType

import torch

ENV_VAR = "MOE_KERNELS_BACKEND"
BACKENDS = ("cuda", "triton", "cpu", "torch")
CHOICES = ("auto",) + BACKENDS

# The one list of ops: every backend module implements these names with the signatures of
# moe_kernels.reference (csrc/registration.cpp registers the same names; a test checks).
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

# Fused grouped GEMMs, beyond OPS, that a backend may declare (``Support.fused_epilogues``);
# ops/grouped_mm.py composes the unfused ops where it does not (moe_kernels/ops/_triton.py):
#   grouped_mm_act(x, w, offsets, bias, approximate, keep_pre) -> (gelu(p), p or [0, N])
#   grouped_mm_act_grad(grad, w, offsets, pre, approximate) -> grouped_mm(grad, w) * gelu'(pre)
#   grouped_mm_weight_grad_fused(x, grad, offsets, approximate | None, need_dw, need_db)
#       -> (grad.T @ gelu(x) per expert, or @ x when None; grad's row sums per expert)
FUSED_OPS = ("grouped_mm_act", "grouped_mm_act_grad", "grouped_mm_weight_grad_fused")

# Where each backend's implementations live; each module declares ``SUPPORTS[name]``.
_MODULES = {
    "torch": "moe_kernels.reference",
    "cpu": "moe_kernels.ops._cpp",
    "cuda": "moe_kernels.ops._cpp",
    "triton": "moe_kernels.ops._triton",
}


_DEVICE_NAMES = {"cuda": "CUDA", "cpu": "CPU"}


@dataclasses.dataclass(frozen=True)
class Support:
    """What one backend declares it can run; ``not_supported_reasons`` reads nothing else.

    Attributes:
        devices: device types of the tensors it runs on (empty: any device).
        ops: the ops it has kernels for (a callable: a compiled library knows at run time).
        dtypes: float dtypes its kernels compute in.
        fp64: ``"native"``, or ``"reference"``: fp64 calls (gradcheck) run the reference.
        fused_bias: its ``grouped_mm`` adds the per-expert bias itself.
        fused_epilogues: it implements ``FUSED_OPS`` too (GELU in the GEMM epilogue or on the
            operand load, GELU's derivative in dX's epilogue, bias gradients as row sums in
            the weight-gradient pass).
        fused_mlp: with fused epilogues, the expert MLP runs as one autograd op
            (``ops.gelu_mlp``: GELU in fc1's epilogue, so gelu(h) is written once and never
            re-read); without it the pair ``grouped_mm`` -> ``gelu_grouped_mm`` runs (two
            autograd nodes, whose backward frees h before fc1's weight gradient is allocated)
            with the fused backward pieces. Triton declares it; the CPU kernels do not (GELU
            on a tile is no cheaper there than a pass over [M, H], and the one node kept h
            alive through fc1's backward: +36 MB peak at V-MoE-B/16, measured).
        requirements: ``requirements(device) -> reasons`` for preconditions beyond the device
            type (a library that did not load, an interpreter that is off).
    """

    devices: tuple[str, ...]
    ops: Callable[[], tuple[str, ...]] = lambda: OPS
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    fp64: str = "native"
    fused_bias: bool = True
    fused_epilogues: bool = False
    fused_mlp: bool = False
    requirements: Callable[[torch.device], list[str]] = lambda device: []


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
    except Exception as exc:  # e.g. triton missing, moe_kernels._C not loaded
        return f"{type(exc).__name__}: {exc}"


def support(backend: str) -> Support | str:
    """``backend``'s declaration, or the reason its module cannot be imported."""
    mod = _module(backend)
    return mod if isinstance(mod, str) else mod.SUPPORTS[backend]


def not_supported_reasons(backend: str, op: str, device: torch.device, dtype: torch.dtype | None = None) -> list[str]:
    """Why ``backend`` cannot run ``op`` on tensors of ``device`` (and ``dtype``, the dtype of
    the op's float data, when given); empty when it can."""
    sup = support(backend)
    if isinstance(sup, str):
        return [f"cannot import {_MODULES[backend]} ({sup})"]
    if sup.devices and device.type not in sup.devices:
        needs = " or ".join(_DEVICE_NAMES.get(d, d) for d in sup.devices)
        return [f"the {backend} backend needs {needs} tensors, got {device.type}"]
    reasons = list(sup.requirements(device))
    if not reasons and op not in sup.ops():
        reasons.append(f"{backend} has no {op} kernel for {device.type} tensors")
    if not reasons and dtype is not None and dtype not in sup.dtypes and not _fp64_to_reference(sup, dtype):
        reasons.append(f"{backend} does not compute in {str(dtype).replace('torch.', '')}")
    return reasons


def _fp64_to_reference(sup: Support, dtype: torch.dtype | None) -> bool:
    # The declared fp64 rule: kernels that accumulate in fp32 hand fp64 calls (gradcheck) to
    # the reference rather than silently computing them in fp32.
    return dtype == torch.float64 and sup.fp64 == "reference"


def _auto_order(op: str, device: torch.device) -> tuple[str, ...]:
    if device.type == "cuda":
        # Grouped GEMM: Triton's tiles beat a loop of cuBLAS calls; the rest: CUDA first.
        return ("triton", "cuda", "torch") if op.startswith("grouped_mm") else ("cuda", "triton", "torch")
    # The interpreter is a correctness tool, never an automatic choice on the CPU.
    return ("cpu", "torch")


@functools.cache
def _choose(op: str, backend: str, device: torch.device, dtype: torch.dtype | None) -> tuple[str, Callable]:
    if backend == "auto":
        for name in _auto_order(op, device):
            if not not_supported_reasons(name, op, device, dtype):
                return _resolve(name, op, dtype)
        raise AssertionError("unreachable: the torch backend supports every op")
    reasons = not_supported_reasons(backend, op, device, dtype)
    if reasons:
        raise RuntimeError(
            f"moe_kernels: backend {backend!r} cannot run {op} on {device.type} tensors: " + "; ".join(reasons)
        )
    return _resolve(backend, op, dtype)


def _resolve(backend: str, op: str, dtype: torch.dtype | None) -> tuple[str, Callable]:
    if _fp64_to_reference(support(backend), dtype):
        return "torch", getattr(_module("torch"), op)
    return backend, getattr(_module(backend), op)


def choose(op: str, backend: str, device: torch.device, dtype: torch.dtype | None = None) -> tuple[str, Callable]:
    """``(name, implementation)`` of the backend that runs ``op`` for tensors on ``device``.

    Args:
        op: one of ``OPS``.
        backend: ``auto`` or a name of ``BACKENDS`` (already resolved by ``requested_backend``).
        device: the device of the call's tensors.
        dtype: the dtype of the call's float data (``None`` for integer-only ops): fp64 runs the
            reference on backends that declare so (``name`` is then ``"torch"``).
    """
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if os.environ.get("TRITON_INTERPRET") is not None:
        # Tests flip the interpreter on and off within one process.
        _choose.cache_clear()
    return _choose(op, backend, device, dtype)


def fuses_bias(backend: str) -> bool:
    """Whether ``backend``'s grouped GEMM adds the per-expert bias itself (its declaration)."""
    sup = support(backend)
    return not isinstance(sup, str) and sup.fused_bias


def fused(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> Callable | None:
    """The implementation of ``op`` (one of ``FUSED_OPS``) by the backend that runs
    ``grouped_mm`` for tensors of ``device`` and ``dtype``, or ``None`` when that backend
    declares no fused epilogues (fp64 on a backend that hands it to the reference included):
    the caller then composes the unfused ops, exactly as before they existed."""
    name, _ = choose("grouped_mm", backend, device, dtype)
    sup = support(name)
    if isinstance(sup, str) or not sup.fused_epilogues:
        return None
    return getattr(_module(name), op)


def fuses_mlp(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the backend that runs ``grouped_mm`` for ``device`` and ``dtype`` runs the expert
    MLP as one fused op (``Support.fused_mlp``, with fused epilogues)."""
    sup = support(choose("grouped_mm", backend, device, dtype)[0])
    return not isinstance(sup, str) and sup.fused_epilogues and sup.fused_mlp


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

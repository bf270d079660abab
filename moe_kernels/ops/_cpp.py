"""The ``cpu`` and ``cuda`` backends: thin calls into the C++ ops of ``moe_kernels._C``.

Same names and signatures as ``moe_kernels.reference``; the C++ side checks its inputs with
``TORCH_CHECK`` and dispatches on the tensors' device (CPU kernels always, CUDA kernels when
the extension was built with them).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_kernels import _ext
from moe_kernels.backends import FUSED_OPS, OPS, Support

if not _ext.LOADED:
    raise ImportError(f"moe_kernels._C is not loaded: {_ext.LOAD_ERROR}")

_ops = torch.ops.moe_kernels_C


def _registered(key: str):
    """The ops with a kernel of ``moe_kernels._C`` registered for dispatch key ``key``."""

    def ops() -> tuple[str, ...]:
        return tuple(n for n in OPS if torch._C._dispatch_has_kernel_for_dispatch_key(f"moe_kernels_C::{n}", key))

    return ops


def _cuda_requirements(device: torch.device) -> list[str]:
    if not _ext.cuda_kernels_built():
        return ["moe_kernels._C was built without CUDA kernels (MOE_KERNELS_BUILD_CUDA=0 or no nvcc)"]
    return []


def _has_cpu_kernels(ops: tuple[str, ...]) -> bool:
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"moe_kernels_C::{n}", "CPU") for n in ops)


SUPPORTS = {
    # fp64 runs natively (fp64 accumulation), so gradcheck tests the kernels themselves. The CPU
    # kernels fuse the expert MLP's GELU, GELU' and bias gradients into the GEMM tiles
    # (backends.FUSED_OPS; csrc/cpu/grouped_mm.cpp); the CUDA ones do not.
    "cpu": Support(devices=("cpu",), ops=_registered("CPU"), fused_epilogues=_has_cpu_kernels(FUSED_OPS)),
    "cuda": Support(devices=("cuda",), ops=_registered("CUDA"), requirements=_cuda_requirements),
}


def topk_softmax(logits: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    return _ops.topk_softmax(logits, k, renormalize)


def topk_softmax_backward(grad_weights: Tensor, logits: Tensor, indices: Tensor, renormalize: bool) -> Tensor:
    return _ops.topk_softmax_backward(grad_weights, logits, indices, renormalize)


def make_routing(indices: Tensor, num_experts: int, capacity: int | None, group_size: int, priority: Tensor | None):
    return _ops.make_routing(indices, num_experts, capacity, group_size, priority)


def dispatch(x: Tensor, rows: Tensor, row_src: Tensor, weights: Tensor | None) -> Tensor:
    return _ops.dispatch(x, rows, row_src, weights)


def combine(y: Tensor, rows: Tensor, row_src: Tensor, weights: Tensor | None) -> Tensor:
    return _ops.combine(y, rows, row_src, weights)


def combine_weights_grad(a: Tensor, b: Tensor, rows: Tensor) -> Tensor:
    return _ops.combine_weights_grad(a, b, rows)


def grouped_mm(x: Tensor, w: Tensor, offsets: Tensor, bias: Tensor | None = None) -> Tensor:
    return _ops.grouped_mm(x, w, offsets, bias)


def grouped_mm_weight_grad(x: Tensor, grad_out: Tensor, offsets: Tensor) -> Tensor:
    return _ops.grouped_mm_weight_grad(x, grad_out, offsets)


def grouped_mm_act(
    x: Tensor, w: Tensor, offsets: Tensor, bias: Tensor | None, approximate: str, keep_pre: bool
) -> tuple[Tensor, Tensor]:
    return _ops.grouped_mm_act(x, w, offsets, bias, approximate, keep_pre)


def grouped_mm_act_grad(grad: Tensor, w: Tensor, offsets: Tensor, pre: Tensor, approximate: str) -> Tensor:
    return _ops.grouped_mm_act_grad(grad, w, offsets, pre, approximate)


def grouped_mm_weight_grad_fused(
    x: Tensor, grad_out: Tensor, offsets: Tensor, approximate: str | None, need_dw: bool, need_db: bool
) -> tuple[Tensor, Tensor]:
    return _ops.grouped_mm_weight_grad_fused(x, grad_out, offsets, approximate, need_dw, need_db)

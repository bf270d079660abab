"""``grouped_mm``: one matmul per expert over consecutive row ranges given by ``offsets``.

Shape letters: M rows, E experts, Din input width, N output width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_kernels import backends
from moe_kernels.ops._common import FLOAT_DTYPES, check_same_device, check_tensor


def _add_bias(out: Tensor, bias: Tensor, offsets: Tensor) -> Tensor:
    """out[m] += bias[e] for the rows of expert e; padding rows past offsets[E] stay 0."""
    M = out.shape[0]
    expert = torch.bucketize(torch.arange(M, device=out.device), offsets[1:], right=True)  # [M], E for padding
    return out + F.pad(bias, (0, 0, 0, 1))[expert].to(out.dtype)  # [M, N]


@torch.library.custom_op("moe_kernels::grouped_mm", mutates_args=())
def _grouped_mm(x: Tensor, w: Tensor, offsets: Tensor, bias: Tensor | None, backend: str) -> Tensor:
    name, impl = backends.choose("grouped_mm", backend, x.device, x.dtype)
    if bias is None:
        return impl(x, w, offsets)
    if backends.fuses_bias(name):
        return impl(x, w, offsets, bias)
    return _add_bias(impl(x, w, offsets), bias, offsets)


@_grouped_mm.register_fake
def _(x, w, offsets, bias, backend):
    return x.new_empty(x.shape[0], w.shape[1])


@torch.library.custom_op("moe_kernels::grouped_mm_weight_grad", mutates_args=())
def _grouped_mm_weight_grad(x: Tensor, grad_out: Tensor, offsets: Tensor, backend: str) -> Tensor:
    _, impl = backends.choose("grouped_mm_weight_grad", backend, x.device, x.dtype)
    return impl(x, grad_out, offsets)


@_grouped_mm_weight_grad.register_fake
def _(x, grad_out, offsets, backend):
    return x.new_empty(offsets.shape[0] - 1, grad_out.shape[1], x.shape[1])


def _setup(ctx, inputs, output):
    x, w, offsets, bias, backend = inputs
    ctx.save_for_backward(x, w, offsets)
    ctx.backend = backend


def _backward(ctx, grad):
    x, w, offsets = ctx.saved_tensors
    grad = grad.contiguous()
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        # dX = dY @ W_e, i.e. the same grouped matmul with each expert's matrix transposed
        # (a strided view: the kernels take strides, so nothing is copied).
        gx = _grouped_mm(grad, w.transpose(1, 2), offsets, None, ctx.backend)
    if ctx.needs_input_grad[1]:
        gw = _grouped_mm_weight_grad(x, grad, offsets, ctx.backend)
    if ctx.needs_input_grad[3]:
        gb = _bias_grad(grad, offsets, ctx.backend)
    return gx, gw, None, gb, None


def _bias_grad(grad: Tensor, offsets: Tensor, backend: str) -> Tensor:
    """Row sums of ``grad`` per expert, ``[E, N]``, as the weight gradient of a ones column: the
    same kernel on every backend, thread-count invariant (segment_reduce's parallel sum is not),
    and padding rows past offsets[E] fall outside every expert."""
    return _grouped_mm_weight_grad(grad.new_ones(grad.shape[0], 1), grad, offsets, backend).squeeze(2)


_grouped_mm.register_autograd(_backward, setup_context=_setup)


# ---------------------------------------------------------------- gelu, then grouped_mm
# The second expert matmul with the GELU before it, saving GELU's input instead of its output:
# fc2's weight gradient needs gelu(h), GELU's gradient needs h, and the unfused pair keeps both
# ([R, H] each) from forward to backward. Here gelu(h) is recomputed in the backward (one
# elementwise pass, about 1-3% of a training step) and freed before dX is formed.
@torch.library.custom_op("moe_kernels::gelu_grouped_mm", mutates_args=())
def _gelu_grouped_mm(
    h: Tensor, w: Tensor, offsets: Tensor, bias: Tensor | None, approximate: str, backend: str
) -> Tensor:
    return _grouped_mm(F.gelu(h, approximate=approximate), w, offsets, bias, backend)


@_gelu_grouped_mm.register_fake
def _(h, w, offsets, bias, approximate, backend):
    return h.new_empty(h.shape[0], w.shape[1])


def _gelu_setup(ctx, inputs, output):
    h, w, offsets, bias, approximate, backend = inputs
    ctx.save_for_backward(h, w, offsets)
    ctx.approximate, ctx.backend = approximate, backend


def _gelu_backward(ctx, grad):
    h, w, offsets = ctx.saved_tensors
    grad = grad.contiguous()
    gh = gw = gb = None
    if ctx.needs_input_grad[1]:
        gw = _grouped_mm_weight_grad(F.gelu(h, approximate=ctx.approximate), grad, offsets, ctx.backend)
    if ctx.needs_input_grad[3]:
        gb = _bias_grad(grad, offsets, ctx.backend)
    if ctx.needs_input_grad[0]:
        ga = _grouped_mm(grad, w.transpose(1, 2), offsets, None, ctx.backend)
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            gh = torch.ops.aten.gelu_backward(ga, h, approximate=ctx.approximate)  # differentiable
        else:
            # ga is this function's own buffer: GELU's derivative is applied to it in place
            # (an elementwise out= that aliases its input exactly), one [R, H] less at the peak.
            gh = torch.ops.aten.gelu_backward.grad_input(ga, h, approximate=ctx.approximate, grad_input=ga)
    return gh, gw, None, gb, None, None


_gelu_grouped_mm.register_autograd(_gelu_backward, setup_context=_gelu_setup)


def gelu_grouped_mm(
    h: Tensor,
    w: Tensor,
    offsets: Tensor,
    *,
    bias: Tensor | None = None,
    approximate: str = "none",
    backend: str = "auto",
) -> Tensor:
    """``grouped_mm(F.gelu(h, approximate=approximate), w, offsets, bias=bias)``, keeping ``h``
    rather than ``gelu(h)`` for the backward (the recomputation costs one GELU pass). Same
    arguments, checks and result as the unfused pair; ``approximate`` is ``"none"`` or ``"tanh"``."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu_grouped_mm: approximate must be 'none' or 'tanh', got {approximate!r}")
    h, w, offsets, b = _checked_args("gelu_grouped_mm", h, w, offsets, bias, x_name="h")
    return _gelu_grouped_mm(h, w, offsets, b, approximate, backends.requested_backend(backend))


def grouped_mm(
    x: Tensor, w: Tensor, offsets: Tensor, *, bias: Tensor | None = None, backend: str = "auto"
) -> Tensor:
    """``out[m] = x[m] @ w[e].T (+ bias[e])`` for ``offsets[e] <= m < offsets[e+1]``.

    Args:
        x: ``[M, Din]`` rows grouped by expert (fp32/fp16/bf16, fp64 for gradcheck).
        w: ``[E, N, Din]`` one matrix per expert (``nn.Linear`` layout), dtype of ``x``.
        offsets: ``[E+1]`` int64, non-decreasing from 0 to at most M; rows past ``offsets[E]``
            (padding) come out as zeros.
        bias: optional ``[E, N]`` per-expert bias, dtype of ``x`` (fused into the GEMM on CPU).
        backend: ``auto`` or a name of ``moe_kernels.backends.BACKENDS``.

    Returns:
        ``[M, N]``, dtype of ``x``.
    """
    x, w, offsets, b = _checked_args("grouped_mm", x, w, offsets, bias)
    return _grouped_mm(x, w, offsets, b, backends.requested_backend(backend))


def _checked_args(op: str, x: Tensor, w: Tensor, offsets: Tensor, bias: Tensor | None, x_name: str = "x"):
    """The checks of ``grouped_mm``'s arguments; returns them contiguous, offsets as int64."""
    check_tensor(x_name, x, ndim=2, dtypes=FLOAT_DTYPES, op=op)
    check_tensor("w", w, ndim=3, dtypes=FLOAT_DTYPES, op=op)
    check_tensor("offsets", offsets, ndim=1, dtypes=(torch.int64, torch.int32), op=op)
    E = w.shape[0]
    if w.dtype != x.dtype:
        raise TypeError(f"{op}: w must have the dtype of {x_name} ({x.dtype}), got {w.dtype}")
    if w.shape[2] != x.shape[1]:
        raise ValueError(f"{op}: w must have shape [E, N, Din={x.shape[1]}], got {tuple(w.shape)}")
    if offsets.shape[0] != E + 1:
        raise ValueError(f"{op}: offsets must have shape [E+1]=[{E + 1}], got {tuple(offsets.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=2, dtypes=(x.dtype,), op=op)
        if tuple(bias.shape) != (E, w.shape[1]):
            raise ValueError(f"{op}: bias must have shape [E, N]=[{E}, {w.shape[1]}], got {tuple(bias.shape)}")
    check_same_device(op, **{x_name: x}, w=w, offsets=offsets, bias=bias)
    offsets = offsets.to(torch.int64).contiguous()
    if offsets.device.type == "cpu" and not torch.compiler.is_compiling():
        # Free on the CPU; on a GPU it would be a host sync, so the kernels bound-check there.
        _check_offsets(op, offsets, x.shape[0])
    b = None if bias is None else bias.contiguous()
    return x.contiguous(), w.contiguous(), offsets, b


def _check_offsets(op: str, offsets: Tensor, M: int) -> None:
    if offsets[0].item() != 0 or bool((offsets[1:] < offsets[:-1]).any()) or offsets[-1].item() > M:
        raise ValueError(
            f"{op}: offsets must be non-decreasing from 0 to at most M={M}, got {offsets.tolist()[:16]}"
            + ("..." if offsets.shape[0] > 16 else "")
        )

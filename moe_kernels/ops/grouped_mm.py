"""``grouped_mm``: one matmul per expert over consecutive row ranges given by ``offsets``;
``gelu_grouped_mm`` (GELU, then the matmul) and ``gelu_mlp`` (the expert MLP with a plain
GELU between its two matmuls).

Backends that declare fused epilogues (``Support.fused_epilogues``: Triton) run GELU, GELU's
derivative and the bias gradients inside the GEMMs (``backends.FUSED_OPS``); for every other
backend these functions call exactly the unfused ops they called before (docs/triton.md).

Shape letters: M rows, E experts, Din input width, N output width, H hidden width.
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


def _run_grouped_mm(x: Tensor, w: Tensor, offsets: Tensor, bias: Tensor | None, backend: str) -> Tensor:
    name, impl = backends.choose("grouped_mm", backend, x.device, x.dtype)
    if bias is None:
        return impl(x, w, offsets)
    if backends.fuses_bias(name):
        return impl(x, w, offsets, bias)
    return _add_bias(impl(x, w, offsets), bias, offsets)


def _fused(op: str, backend: str, t: Tensor):
    """The fused implementation of ``op`` for tensors like ``t`` (None: compose unfused ops)."""
    return backends.fused(op, backend, t.device, t.dtype)


@torch.library.custom_op("moe_kernels::grouped_mm", mutates_args=())
def _grouped_mm(x: Tensor, w: Tensor, offsets: Tensor, bias: Tensor | None, backend: str) -> Tensor:
    return _run_grouped_mm(x, w, offsets, bias, backend)


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
    if ctx.needs_input_grad[3] and _fused("grouped_mm_weight_grad_fused", ctx.backend, grad) is not None:
        # The bias gradient from programs of the weight-gradient launch, not a GEMM against ones.
        gw, gb = _weight_grad_fused(x, grad, offsets, None, ctx.needs_input_grad[1], True, ctx.backend)
        return gx, gw if ctx.needs_input_grad[1] else None, None, gb, None
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


# ---------------------------------------------------------------- fused backward pieces
# Backward-only ops (no autograd of their own), so that torch.compile traces the backward
# formulas through their fake implementations. On a backend without fused epilogues they
# compose the unfused kernels (reached only when called directly, e.g. by tests).
@torch.library.custom_op("moe_kernels::grouped_mm_act_grad", mutates_args=())
def _grouped_mm_act_grad(
    grad: Tensor, w: Tensor, offsets: Tensor, pre: Tensor, approximate: str, backend: str
) -> Tensor:
    fused = _fused("grouped_mm_act_grad", backend, grad)
    if fused is not None:
        return fused(grad, w, offsets, pre, approximate)
    ga = _run_grouped_mm(grad, w, offsets, None, backend)  # [M, H]
    return torch.ops.aten.gelu_backward(ga, pre, approximate=approximate)


@_grouped_mm_act_grad.register_fake
def _(grad, w, offsets, pre, approximate, backend):
    return grad.new_empty(grad.shape[0], w.shape[1])


@torch.library.custom_op("moe_kernels::grouped_mm_weight_grad_fused", mutates_args=())
def _weight_grad_fused(
    x: Tensor, grad_out: Tensor, offsets: Tensor, approximate: str | None, need_dw: bool, need_db: bool, backend: str
) -> tuple[Tensor, Tensor]:
    """``(dw [E, N, Din], db [E, N])``: ``grad_out.T @ gelu(x)`` (``x`` when ``approximate`` is
    None) and ``grad_out``'s row sums, per expert; an unneeded one is an empty [0]."""
    fused = _fused("grouped_mm_weight_grad_fused", backend, x)
    if fused is not None:
        return fused(x, grad_out, offsets, approximate, need_dw, need_db)
    _, impl = backends.choose("grouped_mm_weight_grad", backend, x.device, x.dtype)
    a = x if approximate is None else F.gelu(x, approximate=approximate)
    dw = impl(a, grad_out, offsets) if need_dw else x.new_empty(0)
    db = impl(grad_out.new_ones(grad_out.shape[0], 1), grad_out, offsets).squeeze(2) if need_db else x.new_empty(0)
    return dw, db


@_weight_grad_fused.register_fake
def _(x, grad_out, offsets, approximate, need_dw, need_db, backend):
    E, N = offsets.shape[0] - 1, grad_out.shape[1]
    dw = x.new_empty(E, N, x.shape[1]) if need_dw else x.new_empty(0)
    return dw, (x.new_empty(E, N) if need_db else x.new_empty(0))


def _differentiable() -> bool:
    """Whether a backward formula runs under ``create_graph=True`` (the fused backward pieces
    have no autograd of their own); tracing under torch.compile is not."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


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
    if _fused("grouped_mm_act_grad", ctx.backend, grad) is not None and not _differentiable():
        # gelu(h) applied as fc2's weight gradient loads h (never materialised), the bias
        # gradient in the same launch, GELU' in the epilogue of dX.
        need_w, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        if need_w or need_b:
            gw, gb = _weight_grad_fused(h, grad, offsets, ctx.approximate, need_w, need_b, ctx.backend)
        if ctx.needs_input_grad[0]:
            gh = _grouped_mm_act_grad(grad, w.transpose(1, 2), offsets, h, ctx.approximate, ctx.backend)
        return gh, gw if need_w else None, None, gb if need_b else None, None, None
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


# ---------------------------------------------------------------- the expert MLP, fused
# On a backend with fused epilogues: fc1 with GELU in its epilogue (writing gelu(h) for fc2 and,
# only when autograd needs it, h), fc2 on gelu(h); the backward from h alone (gelu(h) applied as
# fc2's weight gradient loads h, GELU' in the epilogue of fc2's dX, bias gradients summed in the
# weight-gradient passes). Saved for the backward: x, h and the weights, as the unfused pair
# (grouped_mm, then gelu_grouped_mm) saves. docs/triton.md says why GELU goes into fc1's
# epilogue rather than onto fc2's operand loads.
@torch.library.custom_op("moe_kernels::gelu_mlp", mutates_args=())
def _gelu_mlp(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    offsets: Tensor,
    approximate: str,
    keep_h: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """``(y [M, Dout], h [M, H])``, h fc1's output (GELU's input) for the backward, an empty
    [0, H] without ``keep_h``."""
    act = _fused("grouped_mm_act", backend, x)
    if act is not None:
        a, h = act(x, w1, offsets, b1, approximate, keep_h)  # [M, H] each
    else:  # reached only when called directly: the unfused kernels
        h = _run_grouped_mm(x, w1, offsets, b1, backend)  # [M, H]
        a = F.gelu(h, approximate=approximate)  # [M, H]
        h = h if keep_h else h.new_empty(0, h.shape[1])
    return _run_grouped_mm(a, w2, offsets, b2, backend), h


@_gelu_mlp.register_fake
def _(x, w1, b1, w2, b2, offsets, approximate, keep_h, backend):
    return x.new_empty(x.shape[0], w2.shape[1]), x.new_empty(x.shape[0] if keep_h else 0, w1.shape[1])


def _mlp_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, offsets, approximate, keep_h, backend = inputs
    ctx.save_for_backward(x, w1, b1, w2, offsets, output[1])
    ctx.mark_non_differentiable(output[1])  # returned for the backward only
    # Without this the engine hands the backward a zero-filled [M, H] gradient for h every step
    # (a 36 MB fill at V-MoE-B/16, ~9,000 page faults from a default CPU allocator).
    ctx.set_materialize_grads(False)
    ctx.approximate, ctx.backend = approximate, backend


def _mlp_backward(ctx, grad, _):
    if grad is None:  # y took no part in the loss
        return (None,) * 9
    x, w1, b1, w2, offsets, h = ctx.saved_tensors
    grad = grad.contiguous()
    need = ctx.needs_input_grad  # x, w1, b1, w2, b2, ...
    gx = gw1 = gb1 = gw2 = gb2 = None
    if _differentiable():
        # create_graph=True: the unfused ops, whose backward is differentiable where the pair's
        # was; h is recomputed with autograd (the saved one is not differentiable).
        h = _grouped_mm(x, w1, offsets, b1, ctx.backend)  # [M, H]
        if need[3]:
            gw2 = _grouped_mm_weight_grad(F.gelu(h, approximate=ctx.approximate), grad, offsets, ctx.backend)
        if need[4]:
            gb2 = _bias_grad(grad, offsets, ctx.backend)
        if need[0] or need[1] or need[2]:
            ga = _grouped_mm(grad, w2.transpose(1, 2), offsets, None, ctx.backend)  # [M, H]
            gh = torch.ops.aten.gelu_backward(ga, h, approximate=ctx.approximate)  # [M, H]
            gw1 = _grouped_mm_weight_grad(x, gh, offsets, ctx.backend) if need[1] else None
            gb1 = _bias_grad(gh, offsets, ctx.backend) if need[2] else None
    else:
        if need[3] or need[4]:
            gw2, gb2 = _weight_grad_fused(h, grad, offsets, ctx.approximate, need[3], need[4], ctx.backend)
        if need[0] or need[1] or need[2]:
            gh = _grouped_mm_act_grad(grad, w2.transpose(1, 2), offsets, h, ctx.approximate, ctx.backend)  # [M, H]
            if need[1] or need[2]:
                gw1, gb1 = _weight_grad_fused(x, gh, offsets, None, need[1], need[2], ctx.backend)
    if need[0]:
        gx = _grouped_mm(gh, w1.transpose(1, 2), offsets, None, ctx.backend)  # [M, D]
    grads = (gx, gw1, gb1, gw2, gb2)
    return (*(g if n else None for g, n in zip(grads, need, strict=False)), None, None, None, None)


_gelu_mlp.register_autograd(_mlp_backward, setup_context=_mlp_setup)


@torch.compiler.assume_constant_result
def _fuses_mlp(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    # A constant for torch.compile: the backend decision imports modules and reads caches,
    # which Dynamo does not trace; tensors of a device and dtype always get the same answer.
    return backends.fuses_mlp(backend, device, dtype)


def gelu_mlp(
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    offsets: Tensor,
    *,
    bias1: Tensor | None = None,
    bias2: Tensor | None = None,
    approximate: str = "none",
    backend: str = "auto",
) -> Tensor:
    """The expert MLP with a plain GELU between its matmuls:
    ``gelu_grouped_mm(grouped_mm(x, w1, offsets, bias=bias1), w2, offsets, bias=bias2,
    approximate=approximate)``, which is what runs unless the backend declares a fused MLP
    (``Support.fused_mlp``: Triton; then one op, above; the same result up to rounding: one
    rounding less in GELU's input gradient, and Triton's erf/tanh against torch's). The pair's
    backward uses the backend's fused backward pieces where it declares fused epilogues (the
    CPU kernels).

    Args:
        x: ``[M, D]`` rows grouped by expert (fp32/fp16/bf16, fp64 for gradcheck).
        w1: ``[E, H, D]`` fc1's matrices; ``w2``: ``[E, Dout, H]`` fc2's; dtype of ``x``.
        offsets: ``[E+1]`` int64, as for ``grouped_mm``; padding rows come out as zeros.
        bias1: optional ``[E, H]``; bias2: optional ``[E, Dout]``; dtype of ``x``.
        approximate: GELU's ``"none"`` (erf) or ``"tanh"``.
        backend: ``auto`` or a name of ``moe_kernels.backends.BACKENDS``.

    Returns:
        ``[M, Dout]``, dtype of ``x``.
    """
    op = "gelu_mlp"
    if approximate not in ("none", "tanh"):
        raise ValueError(f"{op}: approximate must be 'none' or 'tanh', got {approximate!r}")
    name = backends.requested_backend(backend)
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, op=op)
    if not _fuses_mlp(name, x.device, x.dtype):
        h = grouped_mm(x, w1, offsets, bias=bias1, backend=backend)  # [M, H]
        return gelu_grouped_mm(h, w2, offsets, bias=bias2, approximate=approximate, backend=backend)
    x, w1, offsets, b1 = _checked_args(op, x, w1, offsets, bias1)
    E, H = w1.shape[0], w1.shape[1]
    check_tensor("w2", w2, ndim=3, dtypes=(x.dtype,), op=op)
    if (w2.shape[0], w2.shape[2]) != (E, H):
        raise ValueError(f"{op}: w2 must have shape [E={E}, Dout, H={H}], got {tuple(w2.shape)}")
    if bias2 is not None:
        check_tensor("bias2", bias2, ndim=2, dtypes=(x.dtype,), op=op)
        if tuple(bias2.shape) != (E, w2.shape[1]):
            raise ValueError(f"{op}: bias2 must have shape [E, Dout]=[{E}, {w2.shape[1]}], got {tuple(bias2.shape)}")
    check_same_device(op, x=x, w2=w2, bias2=bias2)
    b2 = None if bias2 is None else bias2.contiguous()
    keep_h = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w1, b1, w2, b2))
    return _gelu_mlp(x, w1, b1, w2.contiguous(), b2, offsets, approximate, keep_h, name)[0]


def grouped_mm(x: Tensor, w: Tensor, offsets: Tensor, *, bias: Tensor | None = None, backend: str = "auto") -> Tensor:
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

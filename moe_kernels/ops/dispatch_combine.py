"""``dispatch`` (tokens -> expert buffer) and ``combine`` (expert buffer -> tokens).

The two are each other's adjoints, and ``combine_weights_grad`` closes the set: every gradient
(of x, of the expert outputs, of the combine weights, and their second derivatives) is again one
of these three ops.

Shape letters: T tokens, D width, K choices per token, R buffer rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_kernels import backends
from moe_kernels.ops._common import FLOAT_DTYPES, check_same_device, check_tensor
from moe_kernels.ops.make_routing import Routing


def _run(op: str, backend: str, data: Tensor, *args):
    """``op`` on the backend chosen for ``data``'s device and the call's dtype (fp64 if any float
    argument is: a backend's fp64 rule applies to the whole call)."""
    fp64 = any(isinstance(t, Tensor) and t.dtype == torch.float64 for t in args)
    _, impl = backends.choose(op, backend, data.device, torch.float64 if fp64 else data.dtype)
    return impl(*args)


@torch.library.custom_op("moe_kernels::dispatch", mutates_args=())
def _dispatch(x: Tensor, rows: Tensor, row_src: Tensor, weights: Tensor | None, backend: str) -> Tensor:
    return _run("dispatch", backend, x, x, rows, row_src, weights)


@_dispatch.register_fake
def _(x, rows, row_src, weights, backend):
    return x.new_empty(row_src.shape[0], x.shape[1])


@torch.library.custom_op("moe_kernels::combine", mutates_args=())
def _combine(y: Tensor, rows: Tensor, row_src: Tensor, weights: Tensor | None, backend: str) -> Tensor:
    return _run("combine", backend, y, y, rows, row_src, weights)


@_combine.register_fake
def _(y, rows, row_src, weights, backend):
    return y.new_empty(rows.shape[0], y.shape[1])


@torch.library.custom_op("moe_kernels::combine_weights_grad", mutates_args=())
def _combine_weights_grad(a: Tensor, b: Tensor, rows: Tensor, row_src: Tensor, backend: str) -> Tensor:
    return _run("combine_weights_grad", backend, a, a, b, rows)


@_combine_weights_grad.register_fake
def _(a, b, rows, row_src, backend):
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    return a.new_empty(rows.shape, dtype=acc)


def _weights_like(g: Tensor, weights: Tensor) -> Tensor:
    return g.to(weights.dtype)


def _setup_pair(ctx, inputs, output):
    data, rows, row_src, weights, backend = inputs
    ctx.save_for_backward(data, rows, row_src, weights)
    ctx.backend = backend


def _dispatch_backward(ctx, grad):
    x, rows, row_src, weights = ctx.saved_tensors
    grad = grad.contiguous()
    gx = gw = None
    if ctx.needs_input_grad[0]:
        gx = _combine(grad, rows, row_src, weights, ctx.backend)
    if weights is not None and ctx.needs_input_grad[3]:
        gw = _weights_like(_combine_weights_grad(x, grad, rows, row_src, ctx.backend), weights)
    return gx, None, None, gw, None


def _combine_backward(ctx, grad):
    y, rows, row_src, weights = ctx.saved_tensors
    grad = grad.contiguous()
    gy = gw = None
    if ctx.needs_input_grad[0]:
        gy = _dispatch(grad, rows, row_src, weights, ctx.backend)
    if weights is not None and ctx.needs_input_grad[3]:
        gw = _weights_like(_combine_weights_grad(grad, y, rows, row_src, ctx.backend), weights)
    return gy, None, None, gw, None


def _setup_wgrad(ctx, inputs, output):
    a, b, rows, row_src, backend = inputs
    ctx.save_for_backward(a, b, rows, row_src)
    ctx.backend = backend


def _combine_weights_grad_backward(ctx, grad):
    # g[t, k] = <a[t], b[rows[t, k]]>  =>  da = combine(b, g), db = dispatch(a, g).
    a, b, rows, row_src = ctx.saved_tensors
    grad = grad.contiguous()
    ga = gb = None
    if ctx.needs_input_grad[0]:
        ga = _combine(b, rows, row_src, grad, ctx.backend).to(a.dtype)
    if ctx.needs_input_grad[1]:
        gb = _dispatch(a, rows, row_src, grad, ctx.backend).to(b.dtype)
    return ga, gb, None, None, None


_dispatch.register_autograd(_dispatch_backward, setup_context=_setup_pair)
_combine.register_autograd(_combine_backward, setup_context=_setup_pair)
_combine_weights_grad.register_autograd(_combine_weights_grad_backward, setup_context=_setup_wgrad)


def _check_routing(op: str, routing: object) -> Routing:
    if not isinstance(routing, Routing):
        raise TypeError(
            f"{op}: routing must be a moe_kernels.Routing (from make_routing), got {type(routing).__name__}"
        )
    return routing


def dispatch(x: Tensor, routing: Routing, *, backend: str = "auto") -> Tensor:
    """Copy each token's row to the buffer rows of its kept assignments; empty rows are zero.

    Args:
        x: ``[T, D]`` activations (fp32/fp16/bf16, fp64 for gradcheck).
        routing: the plan from ``make_routing`` for the same T tokens.
        backend: ``auto`` or a name of ``moe_kernels.backends.BACKENDS``.

    Returns:
        ``[E, G*C, D]`` (``[T*K, D]`` when dropless), dtype of ``x``.
    """
    op = "dispatch"
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, op=op)
    routing = _check_routing(op, routing)
    if x.shape[0] != routing.num_tokens:
        raise ValueError(
            f"{op}: x must have routing.num_tokens={routing.num_tokens} rows, got x of shape {tuple(x.shape)}"
        )
    check_same_device(op, x=x, routing=routing.rows)
    out = _dispatch(x.contiguous(), routing.rows, routing.row_src, None, backends.requested_backend(backend))
    return out.view(routing.buffer_shape(x.shape[1]))


def combine(y: Tensor, routing: Routing, weights: Tensor | None = None, *, backend: str = "auto") -> Tensor:
    """``out[t] = sum_k weights[t, k] * y[e[t, k], slot[t, k]]`` over kept assignments.

    Args:
        y: expert outputs, ``[E, G*C, D]`` (``[T*K, D]`` when dropless) or flat ``[R, D]``.
        routing: the plan from ``make_routing``.
        weights: ``[T, K]`` combine weights (e.g. from ``topk_softmax``); ``None`` sums unweighted.
        backend: ``auto`` or a name of ``moe_kernels.backends.BACKENDS``.

    Returns:
        ``[T, D]``, dtype of ``y`` (accumulated in fp32).
    """
    op = "combine"
    check_tensor("y", y, dtypes=FLOAT_DTYPES, op=op)
    routing = _check_routing(op, routing)
    R = routing.num_rows
    expected = routing.buffer_shape(y.shape[-1]) if y.dim() > 0 else ()
    if tuple(y.shape) not in (expected, (R, y.shape[-1] if y.dim() > 0 else 0)):
        raise ValueError(f"{op}: y must have shape {expected[:-1]} + (D,) or (R={R}, D), got {tuple(y.shape)}")
    if weights is not None:
        check_tensor("weights", weights, ndim=2, dtypes=FLOAT_DTYPES, op=op)
        if tuple(weights.shape) != tuple(routing.rows.shape):
            raise ValueError(
                f"{op}: weights must have shape [T, K]={tuple(routing.rows.shape)}, got {tuple(weights.shape)}"
            )
    check_same_device(op, y=y, routing=routing.rows, weights=weights)
    flat = y.reshape(R, y.shape[-1]).contiguous()
    w = None if weights is None else weights.contiguous()
    return _combine(flat, routing.rows, routing.row_src, w, backends.requested_backend(backend))

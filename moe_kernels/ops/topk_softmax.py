"""``topk_softmax``: softmax over E experts in fp32, then the top K (ties to the lower index).

Shape letters: T tokens, E experts, K choices per token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_kernels import backends
from moe_kernels.ops._common import FLOAT_DTYPES, check_int, check_tensor

MAX_EXPERTS = 256
MAX_K = 8


@torch.library.custom_op("moe_kernels::topk_softmax", mutates_args=())
def _topk_softmax(logits: Tensor, k: int, renormalize: bool, backend: str) -> tuple[Tensor, Tensor]:
    _, impl = backends.choose("topk_softmax", backend, logits.device, logits.dtype)
    return impl(logits, k, renormalize)


@_topk_softmax.register_fake
def _(logits, k, renormalize, backend):
    wdtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    T = logits.shape[0]
    return logits.new_empty(T, k, dtype=wdtype), logits.new_empty(T, k, dtype=torch.int64)


@torch.library.custom_op("moe_kernels::topk_softmax_backward", mutates_args=())
def _topk_softmax_backward(
    grad_weights: Tensor, logits: Tensor, indices: Tensor, renormalize: bool, backend: str
) -> Tensor:
    _, impl = backends.choose("topk_softmax_backward", backend, logits.device, logits.dtype)
    return impl(grad_weights, logits, indices, renormalize)


@_topk_softmax_backward.register_fake
def _(grad_weights, logits, indices, renormalize, backend):
    return torch.empty_like(logits)


def _setup(ctx, inputs, output):
    logits, _, renormalize, backend = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.renormalize = renormalize
    ctx.backend = backend


def _backward(ctx, grad_weights, grad_indices):
    logits, indices = ctx.saved_tensors
    grad = _topk_softmax_backward(grad_weights.contiguous(), logits, indices, ctx.renormalize, ctx.backend)
    return grad, None, None, None


_topk_softmax.register_autograd(_backward, setup_context=_setup)


def topk_softmax(logits: Tensor, k: int, *, renormalize: bool = False, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Fused gating: softmax over experts, then the K most probable experts of each token.

    Args:
        logits: ``[T, E]`` router logits, fp32/fp16/bf16 (fp64 for gradcheck); 1 <= E <= 256.
        k: experts per token, 1 <= k <= min(E, 8).
        renormalize: divide the K selected probabilities by their sum (V-MoE does not).
        backend: ``auto`` or a name of ``moe_kernels.backends.BACKENDS``.

    Returns:
        ``(weights [T, K] fp32 (fp64 for fp64 logits), indices [T, K] int64)``, each row in
        descending order of probability; equal probabilities go to the lower expert index.
    """
    op = "topk_softmax"
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES, op=op)
    E = logits.shape[1]
    check_int("logits.shape[1] (num_experts)", E, low=1, high=MAX_EXPERTS, op=op)
    check_int("k", k, low=1, high=min(E, MAX_K), op=op)
    return _topk_softmax(logits.contiguous(), k, bool(renormalize), backends.requested_backend(backend))

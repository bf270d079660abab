"""The expert-parallel exchange (below the layer): ``MoEMlp(process_group=...)`` calls it.

Checkpoint and gradient helpers for sharded models live above the layer, in
``moe_kernels.distributed`` (which re-exports these functions).

Expert parallelism over ``torch.distributed``: experts sharded across the ranks of a group.

With a process group of W ranks, rank r holds experts ``[r*E/W, (r+1)*E/W)``; the router (and
every other parameter of the model) is replicated. One forward of an ``MoEMlp`` built with
``process_group=`` runs:

1. route the rank's own T tokens exactly as the single-process layer would (capacity per group
   of its tokens), then dispatch them into a *packed* buffer: only kept assignments, sorted by
   expert, so the rows for rank j are one contiguous range (the padded layout's empty slots are
   never sent);
2. exchange the per-expert counts (``all_to_all_single`` of W*E/W int64s) and read them on the
   host: the variable split sizes of the next collective must be Python ints, so this is the one
   host sync of the layer (and it is unavoidable for a variable-size exchange);
3. ``all_to_all_single`` the token rows; the received rows come grouped by source rank, then
   local expert, and are permuted to expert-major order so that one ``grouped_mm`` per weight
   covers all of a local expert's rows (see ``_ExchangePlan``);
4. run the local experts, undo the permutation, send the outputs back with the reverse exchange,
   and combine them with the router weights on the rank that owns the tokens.

Both exchanges are differentiable (``all_to_all``): the backward of an exchange is the
exchange with the split sizes swapped, so input gradients return to their tokens and each
rank's expert-weight gradients sum the contributions of every rank's tokens.

Shape letters: T local tokens, D input width, H hidden width, Dout output width, E experts of the
layer, W ranks, El = E/W local experts, N rows this rank sends (its kept assignments), M rows it
receives, K choices per token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from moe_kernels.ops import Routing, combine, dispatch

__all__ = ["all_to_all", "expert_parallel", "local_experts"]


def local_experts(num_experts: int, process_group) -> tuple[int, int]:
    """``(first, count)``: the experts ``[first, first + count)`` this rank of ``process_group`` holds.

    Raises ``ValueError`` unless ``num_experts`` is a multiple of the group's size.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert parallelism needs torch.distributed initialised (init_process_group) first")
    W = dist.get_world_size(process_group)
    r = dist.get_rank(process_group)
    if num_experts % W != 0:
        raise ValueError(
            f"expert parallelism: num_experts={num_experts} must be a multiple of the process group's world"
            f" size {W} (each rank holds num_experts / world_size experts)"
        )
    El = num_experts // W
    return r * El, El


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with variable splits; its backward is the reverse exchange.

    ``torch.distributed.nn.functional.all_to_all_single`` does the same with gloo and NCCL, but
    it is deprecated (a ``FutureWarning`` on every call in torch 2.14) in favour of the private
    ``torch.distributed._functional_collectives``; this is the stable public
    ``dist.all_to_all_single`` with a dozen lines of autograd around it.
    """

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.splits = (out_splits, in_splits)
        ctx.group = group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group=None) -> Tensor:
    """Differentiable ``all_to_all_single`` over dim 0 with variable split sizes.

    Args:
        x: ``[sum(in_splits), ...]``; rows ``in_splits[:j].sum() + [0, in_splits[j])`` go to rank j.
        out_splits: rows received from each rank (what each rank's ``in_splits`` names for us).
        in_splits: rows sent to each rank.
        group: the process group (``None``: the default group).

    Returns:
        ``[sum(out_splits), ...]``, the rows of rank 0, then rank 1, ...
    """
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


class _Permute(torch.autograd.Function):
    """``x[index]`` for a permutation ``index``, whose backward is the gather by the inverse
    permutation (``index_select``'s backward would scatter-add: atomics on a GPU)."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse, index)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        inverse, index = ctx.saved_tensors
        return _Permute.apply(grad, inverse, index), None, None


@dataclasses.dataclass
class _ExchangePlan:
    """Who sends how many rows to whom, and the order of the received rows.

    Received rows arrive as ``(source rank, local expert)`` blocks. ``to_expert_major`` permutes
    them to ``(local expert, source rank)`` so one ``grouped_mm`` per weight covers every local
    expert with all its rows. The alternative, one ``grouped_mm`` per source chunk, launches W
    times as many (and W times smaller) GEMMs per weight and redoes the offsets checks W times;
    the permutation is a row gather of M*D elements before the experts and M*Dout after, small
    next to the 2*M*D*H + 2*M*H*Dout flops of the expert MLP. With one local expert the received
    order already is expert-major and no permutation is made.
    """

    send_splits: list[int]  # [W] rows to each rank
    recv_splits: list[int]  # [W] rows from each rank
    local_offsets: Tensor  # [El+1] expert-major offsets of the received rows
    to_expert_major: Tensor | None  # [M] received row of each expert-major row
    to_source_major: Tensor | None  # [M] its inverse


def _exchange_plan(counts: Tensor, W: int, group) -> _ExchangePlan:
    E = counts.shape[0]
    El = E // W
    send = counts.reshape(W, El)  # [W, El] rows for expert (j, e) of rank j
    recv = torch.empty_like(send)  # [W, El] rows from rank j for local expert e
    # gloo's all_to_all wants CPU tensors, NCCL device tensors: the counts live with the tokens.
    dist.all_to_all_single(recv, send.contiguous(), group=group)
    # The one host sync: split sizes of a collective are Python ints.
    send_splits = send.sum(1).tolist()
    recv_splits = recv.sum(1).tolist()
    dev = counts.device
    local_offsets = torch.cat([recv.new_zeros(1), torch.cumsum(recv.sum(0), 0)])  # [El+1]
    M = sum(recv_splits)
    if El == 1 or W == 1:
        return _ExchangePlan(send_splits, recv_splits, local_offsets, None, None)
    # Received row i lies in block (j, e) at offset o; its expert-major row is dst_start[e, j] + o.
    flat = recv.reshape(-1)  # [W*El] block sizes, source-major
    src_start = torch.cumsum(flat, 0) - flat  # [W*El]
    dst_start = (torch.cumsum(recv.t().reshape(-1), 0) - recv.t().reshape(-1)).reshape(El, W).t().reshape(-1)  # [W*El]
    block = torch.repeat_interleave(torch.arange(W * El, device=dev), flat, output_size=M)  # [M]
    i = torch.arange(M, device=dev)  # [M]
    dst = dst_start[block] + (i - src_start[block])  # [M] expert-major row of received row i
    src = torch.empty_like(dst).scatter_(0, dst, i)  # [M] received row of expert-major row
    return _ExchangePlan(send_splits, recv_splits, local_offsets, src, dst)


def expert_parallel(
    x: Tensor,
    routing: Routing | None,
    weights: Tensor | None,
    expert_mlp: Callable[[Tensor, Tensor], Tensor],
    *,
    num_experts: int,
    out_features: int,
    process_group=None,
    backend: str = "auto",
) -> Tensor:
    """The expert half of an MoE layer with experts sharded across ``process_group``.

    Every rank of the group must call it (a rank without tokens too: pass ``routing=None``), as
    it runs two collectives.

    Args:
        x: ``[T, D]`` this rank's tokens, in the dtype the experts compute in.
        routing: the single-process plan of these T tokens over all E experts (``None`` when
            T = 0).
        weights: ``[T, K]`` combine weights.
        expert_mlp: ``(rows [M, D], offsets [El+1]) -> [M, Dout]``, this rank's experts on rows
            grouped by local expert.
        num_experts: E.
        out_features: Dout.
        process_group: the group the experts are sharded over (``None``: the default group).
        backend: for ``dispatch`` and ``combine``.

    Returns:
        ``[T, Dout]``, what the single-process layer returns for these tokens.
    """
    W = dist.get_world_size(process_group)
    if routing is None:
        counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device)
    else:
        # Only the kept assignments, sorted by expert: the rows for rank j are
        # offsets[j*E/W] : offsets[(j+1)*E/W], and nothing but real tokens is sent.
        routing = routing.packed()
        counts = routing.counts
    plan = _exchange_plan(counts, W, process_group)
    if routing is None:
        buf = x.new_zeros(0, x.shape[1]) + x.sum() * 0  # [0, D], attached so backward reaches x
    else:
        buf = dispatch(x, routing, backend=backend)  # [N, D] packed, expert-major
    recv = all_to_all(buf, plan.recv_splits, plan.send_splits, process_group)  # [M, D] source-major
    if plan.to_expert_major is not None:
        recv = _Permute.apply(recv, plan.to_expert_major, plan.to_source_major)  # [M, D] expert-major
    y = expert_mlp(recv, plan.local_offsets)  # [M, Dout]
    if plan.to_expert_major is not None:
        y = _Permute.apply(y, plan.to_source_major, plan.to_expert_major)  # [M, Dout] source-major
    back = all_to_all(y, plan.send_splits, plan.recv_splits, process_group)  # [N, Dout]
    if routing is None:
        return back.new_zeros(0, out_features) + back.sum() * 0
    return combine(back, routing, weights, backend=backend)  # [T, Dout]

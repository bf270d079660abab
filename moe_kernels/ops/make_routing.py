"""``compute_capacity`` and ``make_routing``: which expert row every (token, choice) lands in.

Shape letters: T tokens, K choices per token, E experts, G groups of S tokens, C capacity per
(group, expert), R rows of the expert buffer (E*G*C, or T*K when dropless).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from moe_kernels import backends
from moe_kernels.ops._common import check_int, check_same_device, check_tensor
from moe_kernels.validation import check_positive_number

_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def compute_capacity(
    num_tokens: int,
    num_experts: int,
    k: int,
    capacity_factor: float,
    *,
    multiple_of: int = 4,
    rounding: str = "ceil",
) -> int:
    """Slots per (group, expert): ``ceil(S*K*c/E)`` rounded up to a multiple of ``multiple_of``.

    Computed in V-MoE's order (``(S*K) * c / E``) so the results match its code exactly, e.g.
    S=400, E=8, K=2, c=1.05 -> 108 and S=1576, E=32, K=2, c=1.05 -> 104.

    Args:
        num_tokens: S, the tokens of one routing group.
        num_experts: E.
        k: K, experts chosen per token.
        capacity_factor: c > 0.
        multiple_of: round the capacity up to a multiple of this (0 or 1: no rounding).
        rounding: ``"ceil"`` or ``"round"`` for the fractional capacity before that.
    """
    op = "compute_capacity"
    check_int("num_tokens", num_tokens, low=0, op=op)
    check_int("num_experts", num_experts, low=1, op=op)
    check_int("k", k, low=1, high=num_experts, op=op)
    check_int("multiple_of", multiple_of, low=0, op=op)
    check_positive_number(f"{op}: capacity_factor", capacity_factor)
    raw = num_tokens * k * capacity_factor / num_experts
    if rounding == "ceil":
        capacity = int(math.ceil(raw))
    elif rounding == "round":
        capacity = int(round(raw))
    else:
        raise ValueError(f"{op}: rounding must be 'ceil' or 'round', got {rounding!r}")
    if capacity < 1:
        raise ValueError(
            f"{op}: capacity {raw:.4g} (num_tokens={num_tokens} * k={k} * capacity_factor={capacity_factor}"
            f" / num_experts={num_experts}) rounds below 1; raise capacity_factor or num_tokens"
        )
    if multiple_of > 1:
        capacity += (-capacity) % multiple_of
    return capacity


@dataclasses.dataclass(frozen=True)
class Routing:
    """A routing plan: where each of the T*K assignments goes in the expert buffer.

    Attributes:
        indices: ``[T, K]`` int64 expert of each assignment.
        slot: ``[T, K]`` int64 row inside the expert (capacity: ``g*C + position``; dropless:
            rank within the expert), ``-1`` if dropped.
        rows: ``[T, K]`` int64 flat buffer row, ``offsets[e] + slot``, ``-1`` if dropped.
        row_src: ``[R]`` int64 ``t*K + k`` of the assignment each buffer row holds, ``-1`` if empty.
        counts: ``[E]`` int64 assignments kept per expert.
        offsets: ``[E+1]`` int64 first buffer row of each expert.
        num_experts: E.
        capacity: C, or ``None`` when dropless.
        num_groups: G.
        group_size: S.
    """

    indices: Tensor
    slot: Tensor
    rows: Tensor
    row_src: Tensor
    counts: Tensor
    offsets: Tensor
    num_experts: int
    capacity: int | None
    num_groups: int
    group_size: int

    @classmethod
    def build(
        cls,
        *,
        indices: Tensor,
        offsets: Tensor,
        num_experts: int,
        capacity: int | None,
        num_groups: int,
        group_size: int,
        num_rows: int,
        slot: Tensor | None = None,
        rows: Tensor | None = None,
        row_src: Tensor | None = None,
        counts: Tensor | None = None,
    ) -> Routing:
        """The one way a plan is made: give ``slot`` or ``rows`` (and whatever a kernel already
        computed); the rest is derived with static shapes (no host sync):
        ``rows = offsets[indices] + slot`` (``-1`` where dropped), ``slot`` back from ``rows``,
        the inverse map ``row_src`` (``t*K + k`` per held row, ``-1`` for empty rows, of length
        ``num_rows``) and ``counts`` (kept assignments per expert).
        """
        if slot is None and rows is None:
            raise ValueError("Routing.build: give slot or rows")
        if rows is None:
            rows = torch.where(slot >= 0, offsets[indices] + slot, -1)  # [T, K]
        if slot is None:
            slot = torch.where(rows >= 0, rows - offsets[indices], -1)  # [T, K]
        kept = rows >= 0  # [T, K]
        if row_src is None:
            # Scatter t*K + k to its row; dropped assignments land in one spare row, cut off.
            src = torch.arange(rows.numel(), device=rows.device)  # [T*K]
            target = torch.where(kept, rows, num_rows).reshape(-1)  # [T*K]
            row_src = torch.full((num_rows + 1,), -1, dtype=torch.int64, device=rows.device)
            row_src = row_src.scatter(0, target, src)[:num_rows]  # [R]
        if counts is None:
            expert = torch.where(kept, indices, num_experts).reshape(-1)  # [T*K], E for dropped
            counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=rows.device)
            counts = counts.scatter_add(0, expert, torch.ones_like(expert))[:num_experts]  # [E]
        return cls(indices, slot, rows, row_src, counts, offsets, num_experts, capacity, num_groups, group_size)

    @property
    def num_tokens(self) -> int:
        return self.indices.shape[0]

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    @property
    def dropless(self) -> bool:
        return self.capacity is None

    @property
    def num_rows(self) -> int:
        return self.row_src.shape[0]

    def packed(self) -> Routing:
        """The same assignments without the empty slots of a capacity buffer: ``[N, D]`` rows,
        N the kept assignments, in the padded buffer's order (expert, then group, then
        position), ``offsets`` from ``counts``. Returned as a dropless-shaped plan (``capacity``
        None, one group); a dropless plan is returned as is.

        Its size depends on the data: boolean indexing syncs with a GPU and makes shapes
        dynamic under ``torch.compile``. ``MoEMlp`` uses it on the CPU, in eager mode, so its
        expert GEMMs skip the empty slots.
        """
        if self.capacity is None:
            return self
        held = self.row_src >= 0  # [R]
        packed_row = torch.cumsum(held, 0) - 1  # [R] row in the packed buffer of each held row
        rows = torch.where(self.rows >= 0, packed_row[self.rows.clamp(min=0)], -1)  # [T, K]
        row_src = self.row_src[held]  # [N]
        offsets = torch.cat([self.counts.new_zeros(1), torch.cumsum(self.counts, 0)])  # [E+1]
        return Routing.build(
            indices=self.indices, rows=rows, row_src=row_src, counts=self.counts, offsets=offsets,
            num_experts=self.num_experts, capacity=None, num_groups=1, group_size=self.num_tokens,
            num_rows=row_src.shape[0],
        )  # fmt: skip

    def buffer_shape(self, width: int) -> tuple[int, ...]:
        """``(E, G*C, width)`` with a capacity, ``(T*K, width)`` when dropless."""
        if self.capacity is None:
            return (self.num_rows, width)
        return (self.num_experts, self.num_groups * self.capacity, width)


@torch.library.custom_op("moe_kernels::make_routing", mutates_args=())
def _make_routing(
    indices: Tensor,
    num_experts: int,
    capacity: int | None,
    group_size: int,
    priority: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _, impl = backends.choose("make_routing", backend, indices.device)
    return impl(indices, num_experts, capacity, group_size, priority)


@_make_routing.register_fake
def _(indices, num_experts, capacity, group_size, priority, backend):
    T, K = indices.shape
    G = T // group_size if group_size > 0 else 0
    R = num_experts * G * capacity if capacity is not None else T * K
    i64 = dict(dtype=torch.int64)
    return (
        indices.new_empty(T, K, **i64),
        indices.new_empty(T, K, **i64),
        indices.new_empty(R, **i64),
        indices.new_empty(num_experts, **i64),
        indices.new_empty(num_experts + 1, **i64),
    )


def make_routing(
    indices: Tensor,
    num_experts: int,
    capacity: int | None,
    *,
    priority: Tensor | None = None,
    group_size: int | None = None,
    backend: str = "auto",
) -> Routing:
    """Assign every (token, choice) a row of the expert buffer, V-MoE style.

    Tokens are cut into consecutive groups of ``group_size``; inside a group every token's 1st
    choice is placed before any token's 2nd choice (K-major), tokens in their order or, with
    ``priority``, in descending priority (Batch Prioritized Routing, stable). An assignment whose
    position in its (group, expert) is >= ``capacity`` is dropped.

    Args:
        indices: ``[T, K]`` integer expert indices in ``[0, num_experts)``.
        num_experts: E >= 1.
        capacity: C >= 1 slots per (group, expert), or ``None`` for dropless routing.
        priority: optional ``[T]`` float priority (e.g. each token's top-1 weight).
        group_size: S, tokens per group; must divide T. Default: all T tokens form one group.
        backend: ``auto`` or a name of ``moe_kernels.backends.BACKENDS``.
    """
    op = "make_routing"
    check_tensor("indices", indices, ndim=2, dtypes=_INDEX_DTYPES, op=op)
    check_int("num_experts", num_experts, low=1, op=op)
    if capacity is not None:
        check_int("capacity", capacity, low=1, op=op)
    T, K = indices.shape
    check_int("indices.shape[1] (k)", K, low=1, op=op)
    if group_size is None:
        group_size = T
    else:
        check_int("group_size", group_size, low=1, op=op)
        if T % group_size != 0:
            raise ValueError(f"{op}: group_size must divide the number of tokens T={T}, got group_size={group_size}")
    if priority is not None:
        floats = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
        check_tensor("priority", priority, ndim=1, dtypes=floats, op=op)
        if priority.shape[0] != T:
            raise ValueError(f"{op}: priority must have shape [T]=[{T}], got {tuple(priority.shape)}")
        check_same_device(op, indices=indices, priority=priority)
    indices = indices.to(torch.int64).contiguous()
    if T > 0 and indices.device.type == "cpu" and not torch.compiler.is_compiling():
        # A range check needs the values: free on the CPU, a host sync on a GPU (and a graph
        # break under torch.compile), so there the kernels check where the data lives.
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"{op}: indices must be in [0, num_experts={num_experts}), got values in [{lo}, {hi}]")
    slot, rows, row_src, counts, offsets = _make_routing(
        indices,
        num_experts,
        capacity,
        group_size,
        None if priority is None else priority.float().contiguous(),
        backends.requested_backend(backend),
    )
    G = T // group_size if group_size > 0 else 0
    return Routing.build(
        indices=indices, slot=slot, rows=rows, row_src=row_src, counts=counts, offsets=offsets,
        num_experts=num_experts, capacity=capacity, num_groups=G, group_size=group_size, num_rows=row_src.shape[0],
    )  # fmt: skip

"""``compute_capacity`` and ``make_routing`` on every available backend against the reference:
routing integers exactly, hand-computed golden cases for capacity dropping, invariants.
"""

from __future__ import annotations

import pytest
import torch

import moe_kernels as mk
from moe_kernels import reference as ref
from tests.op_helpers import (
    BACKENDS,
    random_indices,
    routing_tuple,
)

# ---------------------------------------------------------------- compute_capacity


@pytest.mark.parametrize(
    "S,E,K,c,expected",
    [
        (400, 8, 2, 1.05, 108),  # DESIGN.md: V-MoE-S/32 group
        (1576, 32, 2, 1.05, 104),  # DESIGN.md: V-MoE-B/16 group
        (1576, 32, 2, 4.0, 396),  # evaluation capacity factor
        (8, 8, 1, 1.0, 4),  # ceil(1) = 1 -> rounded up to 4
        (197, 10, 2, 1.0, 40),  # ceil(39.4) = 40
    ],
)
def test_compute_capacity_golden(S, E, K, c, expected):
    assert mk.compute_capacity(S, E, K, c) == expected


def test_compute_capacity_options():
    assert mk.compute_capacity(197, 10, 2, 1.0, multiple_of=1) == 40
    assert mk.compute_capacity(197, 10, 2, 1.0, multiple_of=1, rounding="round") == 39
    assert mk.compute_capacity(100, 8, 1, 1.0, multiple_of=0) == 13
    with pytest.raises(ValueError, match="rounds below 1"):
        mk.compute_capacity(1, 8, 1, 1.0, rounding="round")
    with pytest.raises(ValueError, match="capacity_factor"):
        mk.compute_capacity(16, 8, 1, -1.0)
    with pytest.raises(ValueError, match="k must be in"):
        mk.compute_capacity(16, 8, 9, 1.0)
    with pytest.raises(ValueError, match="rounding"):
        mk.compute_capacity(16, 8, 1, 1.0, rounding="floor")

# ---------------------------------------------------------------- make_routing


ROUTING_CASES = [
    # (T, E, K, capacity, group_size, edge)
    (1, 4, 1, 1, None, "T=1"),
    (12, 4, 2, 3, 6, "two groups, drops"),
    (60, 7, 3, 4, 20, "prime E, three groups"),
    (50, 5, 5, 8, 10, "K = E"),
    (48, 8, 2, None, 16, "dropless with groups"),
    (33, 3, 1, 100, None, "ample capacity: nothing dropped"),
    (64, 16, 2, 2, 8, "tiny capacity, many groups"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,E,K,capacity,group_size,edge", ROUTING_CASES, ids=[c[-1] for c in ROUTING_CASES])
@pytest.mark.parametrize("bpr", [False, True], ids=["vanilla", "bpr"])
def test_make_routing_matches_reference(backend, T, E, K, capacity, group_size, edge, bpr):
    idx = random_indices(T, E, K)
    prio = torch.rand(T) if bpr else None
    got = mk.make_routing(idx, E, capacity, priority=prio, group_size=group_size, backend=backend)
    want = ref.make_routing(idx, E, capacity, group_size or T, prio)
    for name, a, b in zip(("slot", "rows", "row_src", "counts", "offsets"), routing_tuple(got), want, strict=False):
        assert torch.equal(a, b), f"{name} differs ({edge})"
    assert got.num_groups == T // (group_size or T)


@pytest.mark.parametrize("backend", BACKENDS)
def test_make_routing_skewed(backend):
    """All tokens on one expert (others empty), and priorities with ties."""
    T, E, _K = 40, 6, 2
    idx = torch.stack([torch.full((T,), 3), torch.full((T,), 5)], dim=1)
    prio = torch.randint(0, 3, (T,)).float()  # many ties: order must stay stable
    for cap, gs in ((4, 10), (None, 20), (100, None)):
        got = mk.make_routing(idx, E, cap, priority=prio, group_size=gs, backend=backend)
        want = ref.make_routing(idx, E, cap, gs or T, prio)
        assert all(torch.equal(a, b) for a, b in zip(routing_tuple(got), want, strict=False))
        assert got.counts[[0, 1, 2, 4]].sum() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_make_routing_golden(backend):
    """Hand-computed: K-major priority, capacity 2, one group, then BPR."""
    idx = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])
    r = mk.make_routing(idx, 2, 2, backend=backend)
    # 1st choices: t0->e0 p0, t1->e0 p1, t2->e1 p0, t3->e0 p2 (dropped);
    # 2nd choices: t0->e1 p1, t1->e1 p2 (dropped), t2->e0 p3 (dropped), t3->e1 p3 (dropped).
    assert r.slot.tolist() == [[0, 1], [1, -1], [0, -1], [-1, -1]]
    assert r.rows.tolist() == [[0, 3], [1, -1], [2, -1], [-1, -1]]
    assert r.row_src.tolist() == [0, 2, 4, 1]
    assert r.counts.tolist() == [2, 2] and r.offsets.tolist() == [0, 2, 4]

    # BPR with priorities 0.1, 0.9, 0.5, 0.3: order t1, t2, t3, t0.
    r = mk.make_routing(idx, 2, 2, priority=torch.tensor([0.1, 0.9, 0.5, 0.3]), backend=backend)
    # 1st: t1->e0 p0, t2->e1 p0, t3->e0 p1, t0->e0 p2 (dropped); 2nd: t1->e1 p1, rest dropped.
    assert r.slot.tolist() == [[-1, -1], [0, 1], [0, -1], [1, -1]]

    # Two groups of 2 tokens, capacity 1: slot = g*C + position.
    r = mk.make_routing(idx, 2, 1, group_size=2, backend=backend)
    # group 0: t0->e0 p0, t1->e0 p1 (dropped); t0->e1 p0, t1->e1 p1 (dropped)
    # group 1: t2->e1 p0, t3->e0 p0; t2->e0 p1 (dropped), t3->e1 p1 (dropped)
    assert r.slot.tolist() == [[0, 0], [-1, -1], [1, -1], [1, -1]]
    assert r.buffer_shape(5) == (2, 2, 5)

    # Dropless: rows sorted by expert, group-major then K-major inside.
    r = mk.make_routing(idx, 2, None, backend=backend)
    assert r.offsets.tolist() == [0, 4, 8]
    # e0: t0 p0, t1 p1, t3 p2 (1st choices), t2 p3; e1: t2 p0, then t0 p1, t1 p2, t3 p3.
    assert r.slot.tolist() == [[0, 1], [1, 2], [0, 3], [2, 3]]
    assert r.buffer_shape(5) == (8, 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_make_routing_invariants(backend):
    T, E, K, C, S = 96, 5, 2, 7, 24
    idx = random_indices(T, E, K)
    r = mk.make_routing(idx, E, C, group_size=S, backend=backend)
    kept = r.slot >= 0
    assert (r.slot[kept] < (T // S) * C).all()
    # each (expert, slot) is used once, and kept counts equal the histogram of kept indices
    pairs = idx[kept] * 10_000 + r.slot[kept]
    assert pairs.unique().numel() == pairs.numel()
    assert torch.equal(torch.bincount(idx[kept], minlength=E), r.counts)
    assert (r.row_src >= 0).sum() == kept.sum()

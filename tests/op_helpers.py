"""Helpers shared by the op test modules (test_topk_softmax, test_make_routing,
test_dispatch_combine, test_grouped_mm, test_ops): the backends under test, tolerances and
small routing plans."""

from __future__ import annotations

import torch

import moe_kernels as mk
from tests.conftest import DTYPES, backends_under_test

BACKENDS = backends_under_test("cpu")
DTYPE_IDS = list(DTYPES)

# (T, E, K): the hard shapes, each commented with the edge it covers.
GATING_SHAPES = [
    (1, 1, 1),  # one token, one expert
    (1, 8, 2),  # T=1
    (7, 2, 2),  # K = E
    (64, 13, 3),  # prime E, odd K
    (33, 256, 8),  # largest E and K
    (17, 8, 1),  # K=1, T not a multiple of anything
]


def assert_close(actual, expected, dtype_id):
    _, atol, rtol = DTYPES[dtype_id]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def random_indices(T, E, K, *, gen=None):
    """Distinct experts per token, like top-K output."""
    return torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K].contiguous()


def routing_tuple(r: mk.Routing):
    return (r.slot, r.rows, r.row_src, r.counts, r.offsets)


def make_plan(T, E, K, capacity, group_size=None, dtype=torch.float32):
    idx = random_indices(T, E, K)
    return mk.make_routing(idx, E, capacity, group_size=group_size, backend="torch")


PLANS = [
    (1, 3, 1, 4, None),  # T=1
    (30, 5, 2, 4, 10),  # drops, groups
    (24, 7, 3, None, None),  # dropless
    (20, 4, 4, 2, 5),  # K = E, heavy dropping
]

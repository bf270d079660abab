"""pytest-benchmark cases for each op and the whole layer at small shapes.

``make test`` runs them once with ``--benchmark-disable`` (so they cannot rot, and are never
timed there); ``pytest bench --benchmark-enable`` times them.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moe_kernels as mk
from bench import baselines as bl
from bench.cases import VMOE_S32
from bench.measure import backward
from bench.suite import build_impl

SMALL = dataclasses.replace(VMOE_S32, name="small", tokens=96, width=32, hidden=64, group_size=48)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    T, D, E, K = SMALL.tokens, SMALL.width, SMALL.experts, SMALL.k
    logits = torch.randn(T, E, generator=g)
    w, idx = mk.topk_softmax(logits, K)
    plan = mk.make_routing(idx, E, SMALL.capacity, group_size=SMALL.group_size)
    x = torch.randn(T, D, generator=g)
    return dict(logits=logits, w=w, idx=idx, plan=plan, x=x, buf=mk.dispatch(x, plan))


def test_bench_gating(benchmark, data):
    w, idx = benchmark(mk.topk_softmax, data["logits"], SMALL.k)
    assert torch.equal(idx, data["idx"])


def test_bench_routing(benchmark, data):
    plan = benchmark(mk.make_routing, data["idx"], SMALL.experts, SMALL.capacity, group_size=SMALL.group_size)
    assert torch.equal(plan.rows, data["plan"].rows)


def test_bench_dispatch(benchmark, data):
    buf = benchmark(mk.dispatch, data["x"], data["plan"])
    assert torch.equal(buf, data["buf"])


def test_bench_combine(benchmark, data):
    out = benchmark(mk.combine, data["buf"], data["plan"], data["w"])
    want = mk.reference.combine(data["buf"].reshape(-1, SMALL.width), data["plan"].rows, data["plan"].row_src,
                                data["w"])
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("impl", bl.IMPLS)
def test_bench_layer_fwd_bwd(benchmark, impl):
    p = bl.Params.make(SMALL, torch.float32, torch.device("cpu"))
    x = torch.randn(SMALL.tokens, SMALL.width)
    ours, _ = bl.moe_kernels_impl(SMALL, p)
    if impl == "grouped_mm" and bl.grouped_mm_unsupported(torch.float32, x.device):
        pytest.skip(bl.grouped_mm_unsupported(torch.float32, x.device))
    fn, inp, _ = build_impl(impl, SMALL, p, x, kept=SMALL.tokens * SMALL.k)
    if impl in bl.BASELINES or impl == "moe_kernels_eval":
        with torch.no_grad():
            torch.testing.assert_close(fn(x), ours(x), atol=1e-4, rtol=1e-4)

    def step():
        out = fn(inp)
        backward(out, torch.ones_like(out[0] if isinstance(out, tuple) else out))
        return out[0] if isinstance(out, tuple) else out

    out = benchmark(step)
    assert inp.grad is not None and torch.isfinite(inp.grad).all() and out.shape[-1] == SMALL.width

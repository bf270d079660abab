"""``dispatch``, ``combine`` and ``combine_weights_grad`` on every available backend against the
reference: floats within conftest.DTYPES, gradients by gradcheck in fp64, the packed plan.
"""

from __future__ import annotations

import pytest
import torch

import moe_kernels as mk
from moe_kernels import reference as ref
from tests.conftest import DTYPES, interpreting
from tests.op_helpers import (
    BACKENDS,
    DTYPE_IDS,
    PLANS,
    assert_close,
    make_plan,
)

# ---------------------------------------------------------------- dispatch / combine


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype_id", DTYPE_IDS)
@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"T{p[0]}E{p[1]}K{p[2]}C{p[3]}")
@pytest.mark.parametrize("D", [1, 13, 64])  # odd widths and a vector-friendly one
def test_dispatch_combine_match_reference(backend, dtype_id, plan, D):
    dtype = DTYPES[dtype_id][0]
    r = make_plan(*plan)
    T = plan[0]
    x = torch.randn(T, D).to(dtype)
    buf = mk.dispatch(x, r, backend=backend)
    assert buf.shape == r.buffer_shape(D) and buf.dtype == dtype
    want = ref.dispatch(x, r.rows, r.row_src, None).view(r.buffer_shape(D))
    assert torch.equal(buf, want)  # a copy: bitwise
    y = torch.randn(r.buffer_shape(D)).to(dtype)
    w = torch.rand(T, plan[2])
    out = mk.combine(y, r, w, backend=backend)
    assert_close(out, ref.combine(y.reshape(-1, D), r.rows, r.row_src, w), dtype_id)
    out1 = mk.combine(y, r, backend=backend)  # unweighted
    assert_close(out1, ref.combine(y.reshape(-1, D), r.rows, r.row_src, None), dtype_id)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_dispatch_and_weights_grad_match_reference(backend):
    r = make_plan(30, 5, 2, 4, 10)
    x, w = torch.randn(30, 9), torch.rand(30, 2)
    got = torch.ops.moe_kernels.dispatch(x, r.rows, r.row_src, w, backend)
    torch.testing.assert_close(got, ref.dispatch(x, r.rows, r.row_src, w))
    b = torch.randn(r.num_rows, 9)
    got = torch.ops.moe_kernels.combine_weights_grad(x, b, r.rows, r.row_src, backend)
    torch.testing.assert_close(got, ref.combine_weights_grad(x, b, r.rows), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("capacity", [3, None], ids=["capacity", "dropless"])
def test_dispatch_combine_gradcheck(backend, capacity):
    if backend == "triton" and interpreting():
        pytest.skip("gradcheck needs fp64; the Triton kernels are checked against the reference in fp32")
    r = make_plan(12, 4, 2, capacity, 6 if capacity else None)
    f64 = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(12, 5, **f64)
    y = torch.randn(r.buffer_shape(5), **f64)
    w = torch.rand(12, 2, **f64)
    assert torch.autograd.gradcheck(lambda x: mk.dispatch(x, r, backend=backend), (x,))
    assert torch.autograd.gradcheck(lambda y, w: mk.combine(y, r, w, backend=backend), (y, w))
    # second derivatives close over the same three ops
    assert torch.autograd.gradgradcheck(lambda y, w: mk.combine(y, r, w, backend=backend), (y, w))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("plan", PLANS, ids=str)
def test_packed_plan_is_the_padded_one_without_empty_slots(backend, plan):
    r = make_plan(*plan)
    p = r.packed()
    x = torch.randn(r.num_tokens, 6)
    w = torch.rand(r.num_tokens, r.k)
    buf = mk.dispatch(x, r, backend=backend).reshape(r.num_rows, 6)
    held = r.row_src >= 0
    assert p.num_rows == int(held.sum()) and p.capacity is None
    assert torch.equal(p.offsets, torch.cat([torch.zeros(1, dtype=torch.int64), r.counts.cumsum(0)]))
    assert torch.equal(p.row_src, r.row_src[held])
    assert torch.equal(p.rows >= 0, r.rows >= 0)  # the same assignments kept
    pbuf = mk.dispatch(x, p, backend=backend)
    assert torch.equal(pbuf, buf[held])  # the padded buffer's rows, empty slots squeezed out
    y = torch.randn(r.num_rows, 6)
    assert_close(mk.combine(y[held], p, w, backend=backend), mk.combine(y, r, w, backend=backend), "f32")
    assert p.packed() is p and (p is r) == (r.capacity is None)

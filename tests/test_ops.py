"""Every public op on every available backend against the reference (moe_kernels.reference).

Routing integers must match exactly; floats within the tolerances of conftest.DTYPES; gradients
by gradcheck in fp64. Run one backend alone with e.g.
``MOE_KERNELS_BACKEND=triton TRITON_INTERPRET=1 pytest tests/test_ops.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moe_kernels as mk
from moe_kernels import reference as ref
from tests.conftest import DTYPES, backends_under_test, interpreting

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


# ---------------------------------------------------------------- topk_softmax


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype_id", DTYPE_IDS)
@pytest.mark.parametrize("T,E,K", GATING_SHAPES)
@pytest.mark.parametrize("renormalize", [False, True], ids=["raw", "renorm"])
def test_topk_softmax_matches_reference(backend, dtype_id, T, E, K, renormalize):
    dtype = DTYPES[dtype_id][0]
    logits = (torch.randn(T, E) * 3).to(dtype)
    w, i = mk.topk_softmax(logits, K, renormalize=renormalize, backend=backend)
    rw, ri = ref.topk_softmax(logits, K, renormalize)
    assert i.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.equal(i, ri)
    # Inputs are upcast exactly, so all dtypes meet the fp32 tolerance.
    torch.testing.assert_close(w, rw, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_softmax_ties_go_to_lower_index(backend):
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0], [5.0, -1.0, 5.0, 5.0, 5.0]])
    w, i = mk.topk_softmax(logits, 2, backend=backend)
    assert i.tolist() == [[1, 2], [0, 1], [0, 2]]
    torch.testing.assert_close(w[1], torch.full((2,), 0.2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_softmax_nan_ranks_like_minus_inf(backend):
    logits = torch.tensor([[float("nan"), 1.0, 3.0, 2.0]])
    w, i = mk.topk_softmax(logits, 3, backend=backend)
    assert i.tolist() == [[2, 3, 1]]
    assert torch.isnan(w).all()  # the softmax of a row holding NaN is NaN: reported, not hidden


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("renormalize", [False, True], ids=["raw", "renorm"])
def test_topk_softmax_backward_matches_reference(backend, renormalize):
    logits = torch.randn(40, 11)
    i = ref.topk_softmax(logits, 3, renormalize)[1]
    g = torch.randn(40, 3)
    got = torch.ops.moe_kernels.topk_softmax_backward(g, logits, i, renormalize, backend)
    torch.testing.assert_close(got, ref.topk_softmax_backward(g, logits, i, renormalize), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("renormalize", [False, True], ids=["raw", "renorm"])
def test_topk_softmax_gradcheck(backend, renormalize):
    if backend == "triton" and interpreting():
        pytest.skip("gradcheck needs fp64; the Triton kernels compute in fp32")
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    fn = lambda lg: mk.topk_softmax(lg, 2, renormalize=renormalize, backend=backend)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,))


# ---------------------------------------------------------------- make_routing


def routing_tuple(r: mk.Routing):
    return (r.slot, r.rows, r.row_src, r.counts, r.offsets)


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


# ---------------------------------------------------------------- dispatch / combine


def _plan(T, E, K, capacity, group_size=None, dtype=torch.float32):
    idx = random_indices(T, E, K)
    return mk.make_routing(idx, E, capacity, group_size=group_size, backend="torch")


PLANS = [
    (1, 3, 1, 4, None),  # T=1
    (30, 5, 2, 4, 10),  # drops, groups
    (24, 7, 3, None, None),  # dropless
    (20, 4, 4, 2, 5),  # K = E, heavy dropping
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype_id", DTYPE_IDS)
@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"T{p[0]}E{p[1]}K{p[2]}C{p[3]}")
@pytest.mark.parametrize("D", [1, 13, 64])  # odd widths and a vector-friendly one
def test_dispatch_combine_match_reference(backend, dtype_id, plan, D):
    dtype = DTYPES[dtype_id][0]
    r = _plan(*plan)
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
    r = _plan(30, 5, 2, 4, 10)
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
    r = _plan(12, 4, 2, capacity, 6 if capacity else None)
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
    r = _plan(*plan)
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


# ---------------------------------------------------------------- grouped_mm


GMM_CASES = [
    # (rows per expert, Din, N, padding rows past offsets[E])
    ([3, 0, 5], 7, 11, 0),  # an empty expert, odd sizes
    ([1], 1, 1, 0),  # one row, one expert
    ([0, 0, 4, 9, 2], 16, 8, 3),  # leading empty experts, padding rows
    ([17, 1, 0, 6, 3, 8, 2], 33, 20, 0),  # prime E
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype_id", DTYPE_IDS)
@pytest.mark.parametrize("case", GMM_CASES, ids=lambda c: f"E{len(c[0])}D{c[1]}N{c[2]}P{c[3]}")
def test_grouped_mm_matches_reference(backend, dtype_id, case):
    sizes, Din, N, pad = case
    dtype = DTYPES[dtype_id][0]
    offsets = torch.tensor([0] + sizes).cumsum(0)
    M = int(offsets[-1]) + pad
    x = torch.randn(M, Din).to(dtype)
    w = (torch.randn(len(sizes), N, Din) / Din**0.5).to(dtype)
    out = mk.grouped_mm(x, w, offsets, backend=backend)
    assert out.shape == (M, N) and out.dtype == dtype
    assert_close(out, ref.grouped_mm(x, w, offsets), dtype_id)
    if pad:
        assert (out[-pad:] == 0).all()
    b = torch.randn(len(sizes), N).to(dtype)
    out_b = mk.grouped_mm(x, w, offsets, bias=b, backend=backend)
    assert_close(out_b, ref.grouped_mm(x, w, offsets, b), dtype_id)
    if pad:
        assert (out_b[-pad:] == 0).all()  # padding rows get no bias either
    g = torch.randn(M, N).to(dtype)
    dw = torch.ops.moe_kernels.grouped_mm_weight_grad(x, g, offsets, backend)
    assert_close(dw, ref.grouped_mm_weight_grad(x, g, offsets), dtype_id)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_mm_gradcheck(backend):
    if backend == "triton" and interpreting():
        pytest.skip("gradcheck needs fp64; the Triton kernels are checked against the reference in fp32")
    offsets = torch.tensor([0, 2, 2, 5])  # an empty expert and a padding row
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: mk.grouped_mm(x, w, offsets, backend=backend), (x, w))
    assert torch.autograd.gradcheck(lambda x, w, b: mk.grouped_mm(x, w, offsets, bias=b, backend=backend), (x, w, b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype_id", DTYPE_IDS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_grouped_mm_equals_the_unfused_pair(backend, dtype_id, approximate):
    # The fused op recomputes gelu(h) in its backward: the same kernels on the same operands,
    # so the output and every gradient are bitwise those of gelu followed by grouped_mm.
    dtype = DTYPES[dtype_id][0]
    offsets = torch.tensor([0, 5, 5, 12])  # an empty expert and 2 padding rows
    h = torch.randn(14, 9).to(dtype).requires_grad_(True)
    w = (torch.randn(3, 6, 9) / 3).to(dtype).requires_grad_(True)
    b = torch.randn(3, 6).to(dtype).requires_grad_(True)
    y = mk.ops.gelu_grouped_mm(h, w, offsets, bias=b, approximate=approximate, backend=backend)
    y_ref = mk.grouped_mm(F.gelu(h, approximate=approximate), w, offsets, bias=b, backend=backend)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (h, w, b), g)
    grads_ref = torch.autograd.grad(y_ref, (h, w, b), g)
    assert torch.equal(y, y_ref)
    for a, r in zip(grads, grads_ref, strict=True):
        assert torch.equal(a, r)
    assert (grads[0][12:] == 0).all()  # padding rows: no gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_gelu_grouped_mm_gradcheck_and_errors(backend):
    if backend == "triton" and interpreting():
        pytest.skip("gradcheck needs fp64; the Triton kernels are checked against the reference in fp32")
    offsets = torch.tensor([0, 2, 2, 5])
    h = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    for approximate in ("none", "tanh"):
        assert torch.autograd.gradcheck(
            lambda h, w, b, a=approximate: mk.ops.gelu_grouped_mm(h, w, offsets, bias=b, approximate=a, backend=backend),  # noqa: E501
            (h, w, b),
        )
    with pytest.raises(ValueError, match=r"approximate must be 'none' or 'tanh', got 'erf'"):
        mk.ops.gelu_grouped_mm(h, w, offsets, approximate="erf", backend=backend)
    with pytest.raises(ValueError, match=r"gelu_grouped_mm: w must have shape \[E, N, Din=4\]"):
        mk.ops.gelu_grouped_mm(h, torch.randn(3, 3, 5, dtype=torch.float64), offsets, backend=backend)
    with pytest.raises(TypeError, match=r"w must have the dtype of h"):
        mk.ops.gelu_grouped_mm(h, w.float(), offsets, backend=backend)


# ---------------------------------------------------------------- opcheck, empty, strides


def _opcheck_samples(backend):
    r = _plan(12, 4, 2, 3, 6)
    rd = _plan(8, 3, 2, None)
    logits = torch.randn(12, 4)
    x = torch.randn(12, 5, requires_grad=True)
    y = torch.randn(r.num_rows, 5, requires_grad=True)
    w = torch.rand(12, 2, requires_grad=True)
    off = torch.tensor([0, 3, 3, 7])
    gx = torch.randn(8, 6, requires_grad=True)
    gw = torch.randn(3, 4, 6, requires_grad=True)
    ops = torch.ops.moe_kernels
    return [
        (ops.topk_softmax.default, (logits.requires_grad_(), 2, False, backend)),
        (ops.topk_softmax_backward.default, (torch.randn(12, 2), logits.detach(), r.indices, True, backend)),
        (ops.make_routing.default, (r.indices, 4, 3, 6, torch.rand(12), backend)),
        (ops.make_routing.default, (rd.indices, 3, None, 8, None, backend)),
        (ops.dispatch.default, (x, r.rows, r.row_src, None, backend)),
        (ops.dispatch.default, (x, r.rows, r.row_src, w, backend)),
        (ops.combine.default, (y, r.rows, r.row_src, w, backend)),
        (ops.combine_weights_grad.default, (x, y, r.rows, r.row_src, backend)),
        (ops.grouped_mm.default, (gx, gw, off, None, backend)),
        (ops.grouped_mm.default, (gx, gw, off, torch.randn(3, 4, requires_grad=True), backend)),
        (ops.grouped_mm_weight_grad.default, (gx.detach(), torch.randn(8, 4), off, backend)),
        (ops.gelu_grouped_mm.default, (gx, gw, off, torch.randn(3, 4, requires_grad=True), "none", backend)),
        (ops.gelu_grouped_mm.default, (gx, gw, off, None, "tanh", backend)),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_every_op(backend):
    for op, args in _opcheck_samples(backend):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    idx = torch.empty(0, 2, dtype=torch.int64)
    w, i = mk.topk_softmax(torch.empty(0, 4), 2, backend=backend)
    assert w.shape == (0, 2) and i.shape == (0, 2)
    r = mk.make_routing(idx, 4, 3, backend=backend)
    assert r.buffer_shape(5) == (4, 0, 5) and r.counts.tolist() == [0, 0, 0, 0]
    buf = mk.dispatch(torch.empty(0, 5), r, backend=backend)
    assert buf.shape == (4, 0, 5)
    assert mk.combine(buf, r, torch.empty(0, 2), backend=backend).shape == (0, 5)
    rd = mk.make_routing(idx, 4, None, backend=backend)
    assert rd.buffer_shape(5) == (0, 5)
    out = mk.grouped_mm(torch.empty(0, 5), torch.randn(4, 3, 5), torch.zeros(5, dtype=torch.int64), backend=backend)
    assert out.shape == (0, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    T, E, K, D = 20, 5, 2, 8
    logits = torch.randn(E, T).t()  # transposed view
    assert not logits.is_contiguous()
    w, i = mk.topk_softmax(logits, K, backend=backend)
    w2, i2 = mk.topk_softmax(logits.contiguous(), K, backend=backend)
    assert torch.equal(i, i2) and torch.equal(w, w2)
    r = mk.make_routing(i.t().contiguous().t(), E, 4, priority=w[:, 0], backend=backend)
    x = torch.randn(D * 2, T).t()[:, ::2]  # strided columns
    buf = mk.dispatch(x, r, backend=backend)
    assert torch.equal(buf, mk.dispatch(x.contiguous(), r, backend=backend))
    y = torch.randn(r.buffer_shape(D * 2))[..., ::2]
    assert torch.equal(mk.combine(y, r, w, backend=backend), mk.combine(y.contiguous(), r, w, backend=backend))
    W = torch.randn(E, D, 6).transpose(1, 2)  # [E, 6, D] as a strided view
    off = torch.tensor([0, 4, 4, 10, 12, 20])
    xx = torch.randn(20, D)
    torch.testing.assert_close(
        mk.grouped_mm(xx, W, off, backend=backend), mk.grouped_mm(xx, W.contiguous(), off, backend=backend)
    )


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_messages(backend):
    logits = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"k must be in \[1, 6\], got 7"):
        mk.topk_softmax(logits, 7, backend=backend)
    with pytest.raises(ValueError, match=r"logits must have 2 dimensions"):
        mk.topk_softmax(torch.randn(6), 1, backend=backend)
    with pytest.raises(TypeError, match=r"logits must have dtype"):
        mk.topk_softmax(torch.ones(2, 2, dtype=torch.int32), 1, backend=backend)
    idx = torch.tensor([[0, 1], [2, 6]])
    with pytest.raises(ValueError, match=r"indices must be in \[0, num_experts=6\), got values in \[0, 6\]"):
        mk.make_routing(idx, 6, 2, backend=backend)
    with pytest.raises(TypeError, match=r"indices must have dtype"):
        mk.make_routing(idx.float(), 7, 2, backend=backend)
    with pytest.raises(ValueError, match=r"capacity must be in \[1, inf\], got 0"):
        mk.make_routing(idx, 7, 0, backend=backend)
    with pytest.raises(ValueError, match=r"group_size must divide the number of tokens T=2, got group_size=3"):
        mk.make_routing(idx, 7, 2, group_size=3, backend=backend)
    with pytest.raises(ValueError, match=r"priority must have shape \[T\]=\[2\]"):
        mk.make_routing(idx, 7, 2, priority=torch.rand(3), backend=backend)
    r = mk.make_routing(idx, 7, 2, backend=backend)
    with pytest.raises(ValueError, match=r"x must have routing.num_tokens=2 rows"):
        mk.dispatch(torch.randn(3, 4), r, backend=backend)
    with pytest.raises(TypeError, match=r"routing must be a moe_kernels.Routing"):
        mk.dispatch(torch.randn(2, 4), "plan", backend=backend)
    with pytest.raises(ValueError, match=r"y must have shape"):
        mk.combine(torch.randn(3, 4), r, backend=backend)
    with pytest.raises(ValueError, match=r"weights must have shape \[T, K\]"):
        mk.combine(torch.randn(r.buffer_shape(4)), r, torch.rand(2, 3), backend=backend)
    x, w = torch.randn(6, 4), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"offsets must have shape \[E\+1\]=\[3\]"):
        mk.grouped_mm(x, w, torch.tensor([0, 6]), backend=backend)
    with pytest.raises(ValueError, match=r"offsets must be non-decreasing from 0 to at most M=6"):
        mk.grouped_mm(x, w, torch.tensor([0, 4, 2]), backend=backend)
    with pytest.raises(ValueError, match=r"offsets must be non-decreasing from 0 to at most M=6"):
        mk.grouped_mm(x, w, torch.tensor([0, 4, 7]), backend=backend)
    with pytest.raises(ValueError, match=r"w must have shape \[E, N, Din=4\]"):
        mk.grouped_mm(x, torch.randn(2, 3, 5), torch.tensor([0, 3, 6]), backend=backend)
    with pytest.raises(TypeError, match=r"w must have the dtype of x"):
        mk.grouped_mm(x, w.double(), torch.tensor([0, 3, 6]), backend=backend)
    with pytest.raises(ValueError, match=r"bias must have shape \[E, N\]=\[2, 3\]"):
        mk.grouped_mm(x, w, torch.tensor([0, 3, 6]), bias=torch.randn(2, 4), backend=backend)
    with pytest.raises(ValueError, match=r"backend must be one of"):
        mk.topk_softmax(logits, 2, backend="fastest")


@pytest.mark.skipif(not mk._ext.LOADED, reason="moe_kernels._C did not load")
def test_cpp_checks_name_the_argument():
    """The C++ ops validate on their own (TORCH_CHECK), for callers that bypass Python."""
    ops = torch.ops.moe_kernels_C
    with pytest.raises(RuntimeError, match=r"k must be in \[1, min\(E=4, 8\)\], got 5"):
        ops.topk_softmax(torch.randn(3, 4), 5, False)
    with pytest.raises(RuntimeError, match=r"indices must be in \[0, num_experts=3\), got 3"):
        ops.make_routing(torch.tensor([[0], [3]]), 3, 2, 2, None)
    with pytest.raises(RuntimeError, match=r"group_size must divide the number of tokens T=2, got group_size=3"):
        ops.make_routing(torch.tensor([[0], [1]]), 3, 2, 3, None)
    with pytest.raises(RuntimeError, match=r"capacity must be >= 1"):
        ops.make_routing(torch.tensor([[0], [1]]), 3, 0, 2, None)
    with pytest.raises(RuntimeError, match=r"indices must be int64"):
        ops.make_routing(torch.tensor([[0], [1]], dtype=torch.int32), 3, 2, 2, None)
    rows, src = torch.tensor([[0], [5]]), torch.tensor([0, -1])
    with pytest.raises(RuntimeError, match=r"rows must be in \[-1, R=2\), got 5"):
        ops.combine(torch.randn(2, 3), rows, src, None)
    with pytest.raises(RuntimeError, match=r"row_src must be in \[-1, T\*K=2\), got 9"):
        ops.dispatch(torch.randn(2, 3), rows, torch.tensor([9, -1]), None)
    with pytest.raises(RuntimeError, match=r"offsets must be non-decreasing"):
        ops.grouped_mm(torch.randn(4, 3), torch.randn(2, 5, 3), torch.tensor([0, 3, 2]))
    with pytest.raises(RuntimeError, match=r"offsets must end at most at M=4"):
        ops.grouped_mm(torch.randn(4, 3), torch.randn(2, 5, 3), torch.tensor([0, 3, 5]))
    with pytest.raises(RuntimeError, match=r"w must have the dtype of x"):
        ops.grouped_mm(torch.randn(4, 3), torch.randn(2, 5, 3).double(), torch.tensor([0, 3, 4]))


def test_explicit_backend_that_cannot_run_raises_with_reasons():
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run topk_softmax on cpu tensors: .*CUDA tensors"):
        mk.topk_softmax(torch.randn(3, 4), 2, backend="cuda")


# ---------------------------------------------------------------- determinism


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ CPU backend is not under test")
def test_routing_and_combine_bitwise_identical_for_1_and_2_threads():
    T, E, K, D = 65_536, 32, 2, 16
    logits = torch.randn(T, E)
    w, idx = mk.topk_softmax(logits, K, backend="cpu")
    y = torch.randn(E * 4096, D)
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            runs = []
            for cap, gs, prio in ((None, None, None), (4096, None, None), (256, 4096, w[:, 0])):
                r = mk.make_routing(idx, E, cap, priority=prio, group_size=gs, backend="cpu")
                runs.append(routing_tuple(r))
            r = mk.make_routing(idx, E, 4096, backend="cpu")
            runs.append((mk.combine(y, r, w, backend="cpu"),))
            results.append(runs)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results, strict=False):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=False))
    # and the same integers as the reference
    want = ref.make_routing(idx, E, 256, 4096, w[:, 0])
    assert all(torch.equal(u, v) for u, v in zip(results[0][2], want, strict=False))

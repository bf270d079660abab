"""The C++/CUDA kernels (backend "cuda") against the reference, on a GPU.

Routing integers must match exactly, dispatch bitwise (a copy), floats within conftest.DTYPES,
gradients by gradcheck in fp64. Each case names the edge it covers; the gating shapes walk every
lane layout of the kernel (E below, at and above a warp, packed 16-byte loads and the scalar
fallback). Skipped without a GPU or without the CUDA part of moe_kernels._C.

A device-side check that fails (``__trap()``, e.g. an index out of range) poisons the CUDA
context of its process: every later CUDA call there fails. So this module runs in a process of
its own: tests/test_gpu_cuda_process.py starts it as a child pytest with
``MOE_KERNELS_CUDA_CHILD=1`` (``make gpu-check`` does the same), and in any other process its
tests skip.

Shape letters: T tokens, E experts, K choices, D width, C capacity, S group size.
"""

from __future__ import annotations

import os

import pytest
import torch

import moe_kernels as mk
from moe_kernels import _ext, backends
from moe_kernels import reference as ref
from tests.conftest import DTYPES

CHILD_ENV = "MOE_KERNELS_CUDA_CHILD"
pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch"),
    pytest.mark.skipif(
        os.environ.get(CHILD_ENV) != "1", reason="runs in a process of its own (tests/test_gpu_cuda_process.py)"
    ),
    pytest.mark.skipif(not _ext.cuda_kernels_built(), reason="moe_kernels._C was built without CUDA kernels"),
]

B = "cuda"
DEV = "cuda"
# fp64 runs the same kernels with fp64 accumulation (gradcheck needs it).
GATING_DTYPES = {**{k: v[0] for k, v in DTYPES.items()}, "f64": torch.float64}
DATA_DTYPES = list(DTYPES)


def random_indices(T, E, K, device=DEV):
    """Distinct experts per token, like top-K output."""
    return torch.rand(T, E, device=device).argsort(dim=1)[:, :K].contiguous()


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t whose data starts one element past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = flat[1:].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


def routing_tuple(r):
    return (r.slot, r.rows, r.row_src, r.counts, r.offsets)


# ---------------------------------------------------------------- topk_softmax

GATING_SHAPES = [
    # (T, E, K, edge)
    (1, 1, 1, "one token, one expert"),
    (1, 8, 2, "T=1"),
    (5, 2, 2, "K = E"),
    (300, 3, 1, "E=3: one lane per row (scalar), many rows per warp"),
    (129, 8, 2, "E=8: packed loads, one lane per row for fp16"),
    (64, 13, 3, "prime E, odd K"),
    (77, 32, 4, "E = a warp"),
    (70, 33, 5, "E just above a warp: two logits per lane"),
    (50, 64, 8, "K = 8"),
    (40, 100, 2, "E=100: not a multiple of the pack for fp16"),
    (33, 256, 8, "largest E and K"),
    (4099, 16, 2, "many blocks, T not a multiple of the block's rows"),
]


@pytest.mark.parametrize("dtype_id", list(GATING_DTYPES))
@pytest.mark.parametrize("T,E,K,edge", GATING_SHAPES, ids=[s[-1] for s in GATING_SHAPES])
@pytest.mark.parametrize("renormalize", [False, True], ids=["raw", "renorm"])
def test_topk_softmax_matches_reference(dtype_id, T, E, K, edge, renormalize):
    dtype = GATING_DTYPES[dtype_id]
    logits = (torch.randn(T, E, device=DEV) * 3).to(dtype)
    for lg in (logits, misaligned(logits)):  # 16-byte packs and the scalar fallback
        w, i = mk.topk_softmax(lg, K, renormalize=renormalize, backend=B)
        rw, ri = ref.topk_softmax(lg, K, renormalize)
        assert i.dtype == torch.int64 and w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert torch.equal(i, ri), edge
        torch.testing.assert_close(w, rw, atol=1e-6, rtol=1e-5)
        # and the CPU kernel's integers
        assert torch.equal(i.cpu(), mk.topk_softmax(lg.cpu(), K, renormalize=renormalize, backend="cpu")[1])


@pytest.mark.parametrize("dtype_id", list(GATING_DTYPES))
def test_topk_softmax_ties_and_nan(dtype_id):
    dtype = GATING_DTYPES[dtype_id]
    logits = torch.tensor(
        [[1.0, 2.0, 2.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0], [5.0, -1.0, 5.0, 5.0, 5.0]], device=DEV
    ).to(dtype)
    w, i = mk.topk_softmax(logits, 2, backend=B)
    assert i.tolist() == [[1, 2], [0, 1], [0, 2]]
    torch.testing.assert_close(w[1], torch.full((2,), 0.2, device=DEV, dtype=w.dtype))
    nan = torch.tensor([[float("nan"), 1.0, 3.0, 2.0]], device=DEV).to(dtype)
    w, i = mk.topk_softmax(nan, 3, backend=B)
    assert i.tolist() == [[2, 3, 1]]
    assert torch.isnan(w).all()
    # ties across the lanes of a warp (E=64, all equal): the lowest indices win, in order
    w, i = mk.topk_softmax(torch.zeros(3, 64, device=DEV, dtype=dtype), 8, backend=B)
    assert i.tolist() == [list(range(8))] * 3


@pytest.mark.parametrize("dtype_id", list(GATING_DTYPES))
@pytest.mark.parametrize("T,E,K", [(1, 1, 1), (40, 11, 3), (9, 64, 8), (33, 256, 2), (17, 7, 7)])
@pytest.mark.parametrize("renormalize", [False, True], ids=["raw", "renorm"])
def test_topk_softmax_backward_matches_reference(dtype_id, T, E, K, renormalize):
    dtype = GATING_DTYPES[dtype_id]
    logits = torch.randn(T, E, device=DEV).to(dtype)
    i = ref.topk_softmax(logits, K, renormalize)[1]
    g = torch.randn(T, K, device=DEV)
    for lg in (logits, misaligned(logits)):
        got = torch.ops.moe_kernels.topk_softmax_backward(g, lg, i, renormalize, B)
        want = ref.topk_softmax_backward(g, lg, i, renormalize)
        assert got.dtype == dtype
        # the output is rounded to the logits' dtype
        atol, rtol = (1e-6, 1e-5) if dtype in (torch.float32, torch.float64) else DTYPES[dtype_id][1:]
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("renormalize", [False, True], ids=["raw", "renorm"])
def test_topk_softmax_gradcheck(renormalize):
    logits = torch.randn(6, 5, dtype=torch.float64, device=DEV, requires_grad=True)
    fn = lambda lg: mk.topk_softmax(lg, 2, renormalize=renormalize, backend=B)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,))


# ---------------------------------------------------------------- make_routing

ROUTING_CASES = [
    # (T, E, K, capacity, group_size, edge)
    (1, 4, 1, 1, None, "T=1"),
    (1, 3, 3, None, None, "T=1, K = E, dropless"),
    (12, 4, 2, 3, 6, "two groups, drops"),
    (60, 7, 3, 4, 20, "prime E, three groups"),
    (50, 5, 5, 8, 10, "K = E"),
    (48, 8, 2, None, 16, "dropless with groups"),
    (33, 3, 1, 100, None, "ample capacity: nothing dropped"),
    (64, 16, 2, 2, 8, "tiny capacity, many groups"),
    (64, 16, 2, 4, 1, "one token per group"),
    (3152, 32, 2, 104, 1576, "V-MoE-B/16: 8 images of 197 tokens per group"),
    (65536, 32, 2, None, 4096, "large, dropless"),
    (65536, 257, 1, 300, 8192, "large, E above 256"),
]


@pytest.mark.parametrize("T,E,K,capacity,group_size,edge", ROUTING_CASES, ids=[c[-1] for c in ROUTING_CASES])
@pytest.mark.parametrize("bpr", [False, True], ids=["vanilla", "bpr"])
def test_make_routing_matches_reference(T, E, K, capacity, group_size, edge, bpr):
    idx = random_indices(T, E, K)
    prio = torch.rand(T, device=DEV) if bpr else None
    got = mk.make_routing(idx, E, capacity, priority=prio, group_size=group_size, backend=B)
    want = ref.make_routing(idx, E, capacity, group_size or T, prio)
    for name, a, b in zip(("slot", "rows", "row_src", "counts", "offsets"), routing_tuple(got), want, strict=True):
        assert a.device.type == "cuda"
        assert torch.equal(a, b), f"{name} differs ({edge})"


def test_make_routing_skewed_and_priority_ties():
    """All tokens on one expert (the others empty), priorities with ties, NaN and signed zeros."""
    T, E = 40, 6
    idx = torch.stack([torch.full((T,), 3), torch.full((T,), 5)], dim=1).to(DEV)
    prio = torch.randint(0, 3, (T,), device=DEV).float()
    prio[::7] = float("nan")
    prio[1::9] = -0.0
    prio[2::9] = 0.0
    # the CPU kernel's rank_key ranks NaN like -inf and keeps infinities; the reference maps
    # infinities to the largest finite floats, so the infinite case is checked against the CPU
    inf_prio = prio.clone()
    inf_prio[3], inf_prio[4] = float("-inf"), float("inf")
    for cap, gs in ((4, 10), (None, 20), (100, None), (1, 1)):
        for p in (prio, prio.half(), prio.double(), None, inf_prio):
            got = mk.make_routing(idx, E, cap, priority=p, group_size=gs, backend=B)
            if p is not inf_prio:
                want = ref.make_routing(idx, E, cap, gs or T, p)
                assert all(torch.equal(a, b) for a, b in zip(routing_tuple(got), want, strict=True)), (cap, gs)
            p_cpu = None if p is None else p.cpu()
            cpu = mk.make_routing(idx.cpu(), E, cap, priority=p_cpu, group_size=gs, backend="cpu")
            assert all(torch.equal(a.cpu(), b) for a, b in zip(routing_tuple(got), routing_tuple(cpu), strict=True))
            assert got.counts[[0, 1, 2, 4]].sum() == 0


def test_make_routing_golden():
    idx = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]], device=DEV)
    r = mk.make_routing(idx, 2, 2, backend=B)
    assert r.slot.tolist() == [[0, 1], [1, -1], [0, -1], [-1, -1]]
    assert r.row_src.tolist() == [0, 2, 4, 1]
    r = mk.make_routing(idx, 2, 2, priority=torch.tensor([0.1, 0.9, 0.5, 0.3], device=DEV), backend=B)
    assert r.slot.tolist() == [[-1, -1], [0, 1], [0, -1], [1, -1]]
    r = mk.make_routing(idx, 2, None, backend=B)
    assert r.offsets.tolist() == [0, 4, 8]
    assert r.slot.tolist() == [[0, 1], [1, 2], [0, 3], [2, 3]]


def test_make_routing_is_bitwise_deterministic():
    T, E, K = 32768, 64, 2
    w, idx = mk.topk_softmax(torch.randn(T, E, device=DEV), K, backend=B)
    for cap, gs, prio in ((None, None, None), (256, 4096, w[:, 0]), (1024, None, w[:, 0])):
        runs = [routing_tuple(mk.make_routing(idx, E, cap, priority=prio, group_size=gs, backend=B)) for _ in range(3)]
        for other in runs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(runs[0], other, strict=True))


def test_empty_batch():
    idx = torch.empty(0, 2, dtype=torch.int64, device=DEV)
    w, i = mk.topk_softmax(torch.empty(0, 4, device=DEV), 2, backend=B)
    assert w.shape == (0, 2) and i.shape == (0, 2)
    r = mk.make_routing(idx, 4, 3, backend=B)
    assert r.buffer_shape(5) == (4, 0, 5) and r.counts.tolist() == [0, 0, 0, 0] and r.offsets.tolist() == [0] * 5
    buf = mk.dispatch(torch.empty(0, 5, device=DEV), r, backend=B)
    assert buf.shape == (4, 0, 5)
    assert mk.combine(buf, r, torch.empty(0, 2, device=DEV), backend=B).shape == (0, 5)
    rd = mk.make_routing(idx, 4, None, backend=B)
    assert rd.buffer_shape(5) == (0, 5) and rd.offsets.tolist() == [0] * 5


# ---------------------------------------------------------------- dispatch / combine

PLANS = [
    # (T, E, K, capacity, group_size, edge)
    (1, 3, 1, 4, None, "T=1"),
    (30, 5, 2, 4, 10, "drops, groups"),
    (24, 7, 3, None, None, "dropless, prime E"),
    (20, 4, 4, 2, 5, "K = E, heavy dropping"),
    (600, 8, 2, 160, None, "most rows filled"),
]


def plan(T, E, K, capacity, group_size, edge, *, skew=False):
    idx = torch.zeros(T, K, dtype=torch.int64, device=DEV) if skew else random_indices(T, E, K)
    if skew:  # every token's 1st choice on expert 0, the others spread: empty experts remain
        idx[:, 1:] = torch.arange(1, K, device=DEV)
    return mk.make_routing(idx, E, capacity, group_size=group_size, backend=B)


@pytest.mark.parametrize("dtype_id", DATA_DTYPES)
@pytest.mark.parametrize("p", PLANS, ids=[p[-1] for p in PLANS])
@pytest.mark.parametrize("D", [1, 13, 64, 191, 768])  # odd widths and 16-byte-friendly ones
def test_dispatch_combine_match_reference(dtype_id, p, D):
    dtype = DTYPES[dtype_id][0]
    _, atol, rtol = DTYPES[dtype_id]
    T, K = p[0], p[2]
    r = plan(*p)
    x = torch.randn(T, D, device=DEV).to(dtype)
    y = torch.randn(r.buffer_shape(D), device=DEV).to(dtype)
    w = torch.rand(T, K, device=DEV)
    for xx, yy in ((x, y), (misaligned(x), misaligned(y))):
        buf = mk.dispatch(xx, r, backend=B)
        assert buf.shape == r.buffer_shape(D) and buf.dtype == dtype
        assert torch.equal(buf.reshape(-1, D), ref.dispatch(xx, r.rows, r.row_src, None))  # a copy: bitwise
        got = torch.ops.moe_kernels.dispatch(xx, r.rows, r.row_src, w, B)
        torch.testing.assert_close(got, ref.dispatch(xx, r.rows, r.row_src, w), atol=atol, rtol=rtol)
        yf = yy.reshape(-1, D)
        for ww in (w, None):
            want = ref.combine(yf, r.rows, r.row_src, ww)
            torch.testing.assert_close(mk.combine(yy, r, ww, backend=B), want, atol=atol, rtol=rtol)
        b = torch.randn(r.num_rows, D, device=DEV).to(dtype)
        got = torch.ops.moe_kernels.combine_weights_grad(xx, b, r.rows, r.row_src, B)
        want = ref.combine_weights_grad(xx, b, r.rows)
        torch.testing.assert_close(got, want, atol=1e-4 * max(1, D**0.5), rtol=1e-4)


@pytest.mark.parametrize("capacity", [3, None], ids=["capacity", "dropless"])
def test_all_tokens_on_one_expert(capacity):
    T, E, K, D = 64, 5, 2, 24
    r = plan(T, E, K, capacity, 16, "skew", skew=True)
    x = torch.randn(T, D, device=DEV)
    buf = mk.dispatch(x, r, backend=B)
    assert torch.equal(buf.reshape(-1, D), ref.dispatch(x, r.rows, r.row_src, None))
    assert r.counts[2:].sum() == 0
    w = torch.rand(T, K, device=DEV)
    torch.testing.assert_close(mk.combine(buf, r, w, backend=B), ref.combine(buf.reshape(-1, D), r.rows, r.row_src, w))


@pytest.mark.parametrize("capacity", [3, None], ids=["capacity", "dropless"])
def test_dispatch_combine_gradcheck(capacity):
    idx = random_indices(12, 4, 2)
    r = mk.make_routing(idx, 4, capacity, group_size=6 if capacity else None, backend=B)
    f64 = dict(dtype=torch.float64, device=DEV, requires_grad=True)
    x = torch.randn(12, 5, **f64)
    y = torch.randn(r.buffer_shape(5), **f64)
    w = torch.rand(12, 2, **f64)
    assert torch.autograd.gradcheck(lambda x: mk.dispatch(x, r, backend=B), (x,))
    assert torch.autograd.gradcheck(lambda y, w: mk.combine(y, r, w, backend=B), (y, w))
    assert torch.autograd.gradgradcheck(lambda y, w: mk.combine(y, r, w, backend=B), (y, w))


@pytest.mark.parametrize("dtype_id", DATA_DTYPES)
def test_gating_to_combine_forward_and_backward(dtype_id):
    """The ops chained as a layer uses them, gradients of x, logits and expert outputs included."""
    dtype = DTYPES[dtype_id][0]
    _, atol, rtol = DTYPES[dtype_id]
    T, E, K, D, S = 96, 7, 2, 40, 48
    C = mk.compute_capacity(S, E, K, 1.05)
    torch.manual_seed(0)
    x0 = torch.randn(T, D, device=DEV).to(dtype)
    lg0 = torch.randn(T, E, device=DEV).to(dtype)
    scale = torch.randn(E, 1, 1, device=DEV).to(dtype)
    # one BPR priority for both: the backends' fp32 weights may differ in the last bit
    prio = ref.topk_softmax(lg0, K, False)[0][:, 0]
    results = {}
    for backend in (B, "torch"):
        x = x0.clone().requires_grad_()
        lg = lg0.clone().requires_grad_()
        w, i = mk.topk_softmax(lg, K, backend=backend)
        r = mk.make_routing(i, E, C, priority=prio, group_size=S, backend=backend)
        buf = mk.dispatch(x, r, backend=backend)
        out = mk.combine(buf * scale, r, w, backend=backend)
        out.float().square().sum().backward()
        results[backend] = (out, x.grad, lg.grad, r.slot)
    got, want = results[B], results["torch"]
    assert torch.equal(got[3], want[3])
    for a, b in zip(got[:3], want[:3], strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=4 * atol, rtol=4 * rtol)


def test_auto_backend_picks_the_cuda_kernels():
    dev = torch.device(DEV, torch.cuda.current_device())
    for op in ("topk_softmax", "topk_softmax_backward", "make_routing", "dispatch", "combine", "combine_weights_grad"):
        assert backends.choose(op, "auto", dev)[0] == "cuda", op
    assert backends.choose("grouped_mm", "auto", dev)[0] != "cuda"


def test_runs_on_the_current_stream():
    """Work goes to torch's current stream: results read on that stream need no device sync."""
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        logits = torch.randn(2048, 32, device=DEV)
        w, i = mk.topk_softmax(logits, 2, backend=B)
        r = mk.make_routing(i, 32, 256, priority=w[:, 0], group_size=1024, backend=B)
        out = mk.combine(mk.dispatch(torch.randn(2048, 64, device=DEV), r, backend=B), r, w, backend=B)
        want = ref.make_routing(i, 32, 256, 1024, w[:, 0])
        same = all(torch.equal(a, b) for a, b in zip(routing_tuple(r), want, strict=True))
    s.synchronize()
    assert same and torch.isfinite(out).all()


def test_cpp_checks_name_the_argument():
    ops = torch.ops.moe_kernels_C
    with pytest.raises(RuntimeError, match=r"k must be in \[1, min\(E=4, 8\)\], got 5"):
        ops.topk_softmax(torch.randn(3, 4, device=DEV), 5, False)
    with pytest.raises(RuntimeError, match=r"logits.shape\[1\] \(experts\) must be in \[1, 256\], got 300"):
        ops.topk_softmax(torch.randn(3, 300, device=DEV), 2, False)
    with pytest.raises(RuntimeError, match=r"group_size must divide the number of tokens T=2, got group_size=3"):
        ops.make_routing(torch.tensor([[0], [1]], device=DEV), 3, 2, 3, None)
    with pytest.raises(RuntimeError, match=r"capacity must be >= 1"):
        ops.make_routing(torch.tensor([[0], [1]], device=DEV), 3, 0, 2, None)
    with pytest.raises(RuntimeError, match=r"indices must be int64"):
        ops.make_routing(torch.tensor([[0], [1]], dtype=torch.int32, device=DEV), 3, 2, 2, None)
    with pytest.raises(RuntimeError, match=r"must be on one device"):
        ops.dispatch(torch.randn(2, 3, device=DEV), torch.tensor([[0], [1]]), torch.tensor([0, 1]), None)


def test_no_host_syncs():
    """No launcher reads device values on the host (torch reports any sync it makes)."""
    ops = torch.ops.moe_kernels_C
    logits = torch.randn(256, 16, device=DEV)
    x = torch.randn(256, 32, device=DEV, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        w, i = ops.topk_softmax(logits, 2, False)
        ops.topk_softmax_backward(torch.ones_like(w), logits, i, True)
        for cap, prio in ((64, w[:, 0]), (None, None), (8, None)):
            slot, rows, row_src, counts, offsets = ops.make_routing(i, 16, cap, 128, prio)
            buf = ops.dispatch(x, rows, row_src, None)
            ops.dispatch(x, rows, row_src, w)
            ops.combine(buf, rows, row_src, w)
            ops.combine_weights_grad(x, buf, rows)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_non_contiguous_inputs():
    T, E, K, D = 20, 5, 2, 8
    logits = torch.randn(E, T, device=DEV).t()
    w, i = mk.topk_softmax(logits, K, backend=B)
    w2, i2 = mk.topk_softmax(logits.contiguous(), K, backend=B)
    assert torch.equal(i, i2) and torch.equal(w, w2)
    r = mk.make_routing(i.t().contiguous().t(), E, 4, priority=w[:, 0], backend=B)
    x = torch.randn(D * 2, T, device=DEV).t()[:, ::2]
    assert torch.equal(mk.dispatch(x, r, backend=B), mk.dispatch(x.contiguous(), r, backend=B))
    y = torch.randn(r.buffer_shape(D * 2), device=DEV)[..., ::2]
    assert torch.equal(mk.combine(y, r, w, backend=B), mk.combine(y.contiguous(), r, w, backend=B))

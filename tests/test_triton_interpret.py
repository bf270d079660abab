"""The ``triton`` backend against the reference, run by Triton's CPU interpreter.

``TRITON_INTERPRET=1`` must be set before triton is imported, so this module runs twice:
in the normal suite only the two drivers run: ``test_interpreter_suite`` starts a child pytest
on this same file with ``TRITON_INTERPRET=1 MOE_KERNELS_BACKEND=triton``, where every other
test runs (and the drivers skip), and ``test_op_suite_through_triton`` runs the op test
modules (tests/test_topk_softmax.py ... tests/test_ops.py) the same way. Shapes are small
because the interpreter costs about a millisecond per program instance.

bf16: the interpreter's bf16 arithmetic and bf16 ``tl.dot`` are wrong, but its bf16 loads and
stores are right. The kernels do their math in fp32 after loading, and under the interpreter
the grouped GEMM upcasts its operands before ``tl.dot`` (DOT_FP32), so bf16 runs here too; the
GPU's bf16 tensor-core path is covered by tests/test_triton_compile.py and tests/test_gpu.py.

Integers (indices, routing plans) must equal the reference exactly; floats within the
tolerances below; gradients through the public ops' autograd (which calls the backward ops).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

import moe_kernels as mk
from moe_kernels import reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

in_child = pytest.mark.skipif(not INTERPRET, reason="runs in the TRITON_INTERPRET=1 child of test_interpreter_suite")

# (dtype, atol, rtol) for outputs rounded once from an fp32 accumulation, as the reference does.
DTYPES = {
    "f32": (torch.float32, 1e-5, 1e-5),
    "f16": (torch.float16, 2e-3, 2e-3),
    "bf16": (torch.bfloat16, 1.6e-2, 1.6e-2),
}
dtypes = pytest.mark.parametrize("dt", list(DTYPES), ids=list(DTYPES))


def _run_child(paths: list[str], *args: str) -> None:
    """pytest ``paths`` in a child process with the interpreter and the triton backend."""
    if INTERPRET:
        pytest.skip("this process is the interpreter child; the cases run here")
    pytest.importorskip("triton", reason="triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", MOE_KERNELS_BACKEND="triton")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, *paths]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    took = time.perf_counter() - start
    tail = (proc.stdout[-6000:] + "\n" + proc.stderr[-3000:]).strip()
    assert proc.returncode == 0, f"interpreter run of {paths} failed after {took:.0f}s:\n{tail}"
    assert " passed" in proc.stdout, tail


def test_interpreter_suite():
    """This module's cases under the interpreter, in a child process (~30 s on 2 cores)."""
    _run_child([os.path.abspath(__file__)])


# The op test modules, one per op file of moe_kernels/ops, plus what every op shares.
OP_TESTS = ("test_topk_softmax.py", "test_make_routing.py", "test_dispatch_combine.py", "test_grouped_mm.py",
            "test_ops.py")  # fmt: skip


def test_op_suite_through_triton():
    """The project's op tests with ``MOE_KERNELS_BACKEND=triton TRITON_INTERPRET=1`` (~1 min)."""
    paths = [os.path.join(ROOT, "tests", name) for name in OP_TESTS]
    missing = [p for p in paths if not os.path.exists(p)]
    assert not missing, f"op test modules missing: {missing}"
    _run_child(paths)


def test_hardening_suite_through_triton():
    """The property and determinism tests on the triton backend, interpreted (~20 s; the leak
    test's 10,000 steps are for the compiled backends)."""
    _run_child([os.path.join(ROOT, "tests", "test_hardening.py")], "-k", "not leak")


def _close(actual: torch.Tensor, expected: torch.Tensor, dt: str) -> None:
    _, atol, rtol = DTYPES[dt]
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def _close_lowp(actual: torch.Tensor, expected: torch.Tensor, exact: torch.Tensor, dt: str) -> None:
    """Matmul outputs: fp32 within tolerance; fp16/bf16 no more than 2x the reference's own
    error against the fp64 result (STYLE.md), plus one ulp of slack for summation order."""
    if dt == "f32":
        return _close(actual, expected, dt)
    assert actual.dtype == expected.dtype
    ours = (actual.double() - exact.double()).abs().max().item()
    theirs = (expected.double() - exact.double()).abs().max().item()
    ulp = exact.abs().max().item() * torch.finfo(actual.dtype).eps
    assert ours <= 2 * theirs + ulp, f"error {ours:.3g} vs reference {theirs:.3g}"


# ---------------------------------------------------------------------------------------------
# topk_softmax and its backward
# (T, E, K): T=1; T not a multiple of the row block; prime E with K=E; the largest E and K;
# E=3 with integer logits (many ties: the lower index must win).
GATING = [(1, 4, 1), (37, 8, 2), (5, 7, 7), (9, 256, 8), (16, 3, 2)]


@in_child
@dtypes
@pytest.mark.parametrize("renormalize", [False, True], ids=["plain", "renorm"])
@pytest.mark.parametrize("T,E,K", GATING, ids=[f"T{t}-E{e}-K{k}" for t, e, k in GATING])
def test_topk_softmax(T, E, K, renormalize, dt):
    dtype = DTYPES[dt][0]
    logits = torch.randn(T, E) * 3
    if E == 3:
        logits = torch.randint(0, 2, (T, E)).float()
    logits = logits.to(dtype).requires_grad_()
    w, i = mk.topk_softmax(logits, K, renormalize=renormalize, backend="triton")
    w_ref, i_ref = mk.topk_softmax(logits, K, renormalize=renormalize, backend="torch")
    assert torch.equal(i, i_ref)
    _close(w, w_ref, "f32")  # weights are fp32 for every input dtype
    g = torch.randn(T, K)
    (grad,) = torch.autograd.grad(w, logits, g)
    (grad_ref,) = torch.autograd.grad(w_ref, logits, g)
    _close(grad, grad_ref, dt)


@in_child
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # numpy, inside the interpreter
def test_topk_softmax_nan_ranks_last():
    logits = torch.tensor([[0.5, float("nan"), 2.0, -1.0], [float("nan")] * 4])
    _, i = mk.topk_softmax(logits, 3, backend="triton")
    _, i_ref = mk.topk_softmax(logits, 3, backend="torch")
    assert torch.equal(i, i_ref)


# ---------------------------------------------------------------------------------------------
# make_routing: every output must equal the reference exactly.
# (T, E, K, C, S, bpr, pattern). The interpreter's routing block is 32 entries, so K*S > 32
# spans several chunks (the cross-chunk scan).
ROUTING = [
    (64, 4, 2, 8, 32, False, "random"),  # capacity drops, 2 groups, 2 chunks each
    (64, 4, 2, 8, 16, True, "random"),  # BPR with tied priorities, 4 groups
    (64, 5, 2, None, 32, True, "random"),  # dropless over groups: offsets across groups
    (96, 7, 3, None, 96, False, "random"),  # dropless, one group, 9 chunks, prime E
    (1, 3, 1, 4, 1, False, "random"),  # T=1
    (50, 3, 2, 4, 25, True, "one-expert"),  # all tokens on experts 0 and 2: drops, empty expert
    (40, 6, 1, 12, 40, False, "one-expert"),  # K=1, everything on one expert
    (24, 4, 4, 3, 8, False, "random"),  # K=E
]


def _indices(T, E, K, pattern):
    if pattern == "one-expert":
        return torch.tensor([0, 2, 1, 3][:K]).remainder(E).expand(T, K).contiguous()
    return torch.stack([torch.randperm(E)[:K] for _ in range(T)])


@in_child
@pytest.mark.parametrize(
    "T,E,K,C,S,bpr,pattern",
    ROUTING,
    ids=[f"T{r[0]}-E{r[1]}-K{r[2]}-C{r[3]}-S{r[4]}-{'bpr' if r[5] else 'vanilla'}" for r in ROUTING],
)
def test_make_routing(T, E, K, C, S, bpr, pattern):
    indices = _indices(T, E, K, pattern)
    priority = torch.randint(0, 4, (T,)).float() / 4 if bpr else None  # ties on purpose
    got = mk.make_routing(indices, E, C, priority=priority, group_size=S, backend="triton")
    want = mk.make_routing(indices, E, C, priority=priority, group_size=S, backend="torch")
    for name in ("slot", "rows", "row_src", "counts", "offsets"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype == torch.int64, name
        assert torch.equal(a, b), f"{name}:\n{a}\n{b}"


@in_child
def test_make_routing_golden_drop():
    # Hand-computed: one group of 3 tokens, C=1, K=2. K-major: 1st choices t0->e0, t1->e0
    # (dropped, e0 full), t2->e1; then 2nd choices t0->e1 (dropped), t1->e2, t2->e2 (dropped).
    indices = torch.tensor([[0, 1], [0, 2], [1, 2]])
    r = mk.make_routing(indices, 3, 1, backend="triton")
    assert r.slot.tolist() == [[0, -1], [-1, 0], [0, -1]]
    assert r.rows.tolist() == [[0, -1], [-1, 2], [1, -1]]
    assert r.row_src.tolist() == [0, 4, 3]
    assert r.counts.tolist() == [1, 1, 1]


# ---------------------------------------------------------------------------------------------
# dispatch / combine (+ combine_weights_grad through the weights' gradient)
# (T, E, K, C, S, D): capacity with drops and odd D wider than one column block; dropless;
# T=1 with D=1.
GATHER = [(40, 5, 2, 6, 20, 150), (33, 3, 2, None, 33, 17), (1, 2, 1, 4, 1, 1)]


@in_child
@dtypes
@pytest.mark.parametrize("T,E,K,C,S,D", GATHER, ids=[f"T{g[0]}-E{g[1]}-K{g[2]}-C{g[3]}-D{g[5]}" for g in GATHER])
def test_dispatch_combine(T, E, K, C, S, D, dt):
    dtype = DTYPES[dt][0]
    routing = mk.make_routing(_indices(T, E, K, "random"), E, C, group_size=S, backend="torch")
    x0 = torch.randn(T, D).to(dtype)
    scale = torch.randn(routing.buffer_shape(D)).to(dtype)  # stands in for the experts
    w0 = torch.rand(T, K)
    outs, grads = [], []
    for backend in ("triton", "torch"):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        buf = mk.dispatch(x, routing, backend=backend)
        y = mk.combine(buf * scale, routing, w, backend=backend)
        g = torch.randn(T, D, generator=torch.Generator().manual_seed(1)).to(dtype)
        outs.append((buf, y))
        grads.append(torch.autograd.grad(y, (x, w), g))
    assert torch.equal(outs[0][0], outs[1][0])  # a copy: bitwise
    _close(outs[0][1], outs[1][1], dt)
    _close(grads[0][0], grads[1][0], dt)
    _close(grads[0][1], grads[1][1], dt)


@in_child
@dtypes
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_backend_functions_direct(dt, weighted):
    """The launchers themselves (also the weighted dispatch, used by second derivatives)."""
    from moe_kernels.ops import _triton

    dtype = DTYPES[dt][0]
    T, E, K, D = 30, 4, 2, 40
    _, rows, row_src, _, _ = reference.make_routing(_indices(T, E, K, "random"), E, 7, 15, None)
    x = torch.randn(T, D).to(dtype)
    y = torch.randn(row_src.shape[0], D).to(dtype)
    w = torch.rand(T, K) if weighted else None
    buf, buf_ref = _triton.dispatch(x, rows, row_src, w), reference.dispatch(x, rows, row_src, w)
    if dt == "bf16" and weighted:
        # The interpreter's fp32 -> bf16 conversion does not round like the GPU's (to nearest
        # even), so the weighted product can differ in the last bit here.
        _close(buf, buf_ref, dt)
    else:
        assert torch.equal(buf, buf_ref)
    _close(_triton.combine(y, rows, row_src, w), reference.combine(y, rows, row_src, w), dt)
    g, g_ref = _triton.combine_weights_grad(x, y, rows), reference.combine_weights_grad(x, y, rows)
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# grouped_mm: forward, dX (the transposed-weight view) and dW.
# (M, Din, N, sizes): sizes are the rows per expert; rows past their sum are padding.
GMM = [
    (70, 40, 24, [10, 0, 35, 15], "empty expert, tiles straddling 3 experts, padding rows"),
    (33, 17, 9, [33], "E=1, odd widths"),
    (5, 16, 48, [0, 0, 5], "M below a block, leading empty experts"),
    (64, 32, 32, [0, 64, 0, 0, 0], "all rows on one expert"),
    (20, 24, 8, [0, 0, 0], "no rows assigned: all padding"),
]


@in_child
@dtypes
@pytest.mark.parametrize("M,Din,N,sizes,why", GMM, ids=[f"M{g[0]}-Din{g[1]}-N{g[2]}-E{len(g[3])}" for g in GMM])
def test_grouped_mm(M, Din, N, sizes, why, dt):
    dtype = DTYPES[dt][0]
    offsets = torch.tensor([0] + sizes).cumsum(0)
    x0 = torch.randn(M, Din).to(dtype)
    w0 = (torch.randn(len(sizes), N, Din) / Din**0.5).to(dtype)
    gy = torch.randn(M, N).to(dtype)
    res = {}
    for backend in ("triton", "torch"):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = mk.grouped_mm(x, w, offsets, backend=backend)
        res[backend] = (y, *torch.autograd.grad(y, (x, w), gy))
    x, w = x0.double().requires_grad_(), w0.double().requires_grad_()
    y = mk.grouped_mm(x, w, offsets, backend="torch")
    exact = (y, *torch.autograd.grad(y, (x, w), gy.double()))
    for name, a, b, e in zip(("y", "dx", "dw"), res["triton"], res["torch"], exact, strict=True):
        _close_lowp(a, b, e, dt)
        if name != "dw":
            assert not a[int(offsets[-1]) :].any(), f"{name}: padding rows must be 0"


@in_child
def test_grouped_mm_strided_weight():
    """dX passes w.transpose(1, 2): the kernel must read any strides."""
    from moe_kernels.ops import _triton

    offsets = torch.tensor([0, 7, 7, 30])
    x = torch.randn(30, 20)
    w = torch.randn(3, 20, 12).transpose(1, 2)  # [E, N=12, Din=20], not contiguous
    torch.testing.assert_close(_triton.grouped_mm(x, w, offsets), reference.grouped_mm(x, w, offsets))


@in_child
def test_fp64_runs_reference_for_gradcheck():
    offsets = torch.tensor([0, 3, 8])
    x = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: mk.grouped_mm(a, b, offsets, backend="triton"), (x, w))


@in_child
def test_bad_offsets_and_indices_stay_in_bounds():
    """GPU inputs are not validated on the host (a sync): the kernels must not overrun."""
    from moe_kernels.ops import _triton

    x, w = torch.randn(10, 16), torch.randn(2, 8, 16)
    bad = torch.tensor([0, 6, 14])  # offsets[E] > M
    y = _triton.grouped_mm(x, w, bad)
    torch.testing.assert_close(y[6:], x[6:] @ w[1].T)
    dw = _triton.grouped_mm_weight_grad(x, torch.ones(10, 8), bad)
    torch.testing.assert_close(dw[1], torch.ones(4, 8).T @ x[6:])
    slot, rows, row_src, counts, _ = _triton.make_routing(torch.tensor([[0], [5], [1]]), 2, 2, 3, None)
    assert slot.tolist() == [[0], [-1], [0]] and rows.tolist() == [[0], [-1], [2]]
    assert row_src.tolist() == [0, -1, 2, -1] and counts.tolist() == [1, 1]


@in_child
@dtypes
def test_grouped_mm_fused_bias(dt):
    """The bias is added in fp32 before the single rounding, as the reference does."""
    from moe_kernels.ops import _triton

    dtype = DTYPES[dt][0]
    offsets = torch.tensor([0, 9, 9, 25])
    x, w, b = torch.randn(30, 20).to(dtype), torch.randn(3, 12, 20).to(dtype), torch.randn(3, 12).to(dtype)
    got, want = _triton.grouped_mm(x, w, offsets, b), reference.grouped_mm(x, w, offsets, b)
    exact = reference.grouped_mm(x.double(), w.double(), offsets, b.double())
    _close_lowp(got, want, exact, dt)
    assert not got[25:].any()


# ---------------------------------------------------------------------------------------------
# The weight gradient split over rows (split-K over M: fp32 partial sums per split, then a sum
# in split order). (rows per expert, padding rows, Din, N, splits).
WGRAD_SPLIT = [
    ([200], 0, 40, 24, 3),  # one expert, the router's case: 7 row blocks over 3 splits
    ([0, 130, 1, 59], 0, 40, 24, 4),  # an empty expert; one of 1 row (fewer blocks than splits)
    ([10, 20], 7, 17, 9, 5),  # padding rows past offsets[E]; odd widths; most splits empty
    ([64, 0, 0], 0, 32, 32, 2),  # all rows on one expert, exactly 2 blocks
]


@in_child
@pytest.mark.parametrize("dt", ["f32", "f16"])
@pytest.mark.parametrize(
    "sizes,pad,Din,N,split", WGRAD_SPLIT, ids=[f"E{len(c[0])}-M{sum(c[0]) + c[1]}-S{c[4]}" for c in WGRAD_SPLIT]
)
def test_grouped_mm_weight_grad_split(sizes, pad, Din, N, split, dt):
    from moe_kernels.ops import _triton

    dtype = DTYPES[dt][0]
    offsets = torch.tensor([0] + sizes).cumsum(0)
    M = int(offsets[-1]) + pad
    x, g = torch.randn(M, Din).to(dtype), torch.randn(M, N).to(dtype)
    got = _triton.grouped_mm_weight_grad(x, g, offsets, split=split)
    assert torch.equal(got, _triton.grouped_mm_weight_grad(x, g, offsets, split=split))  # run to run
    want = reference.grouped_mm_weight_grad(x, g, offsets)
    _close_lowp(got, want, reference.grouped_mm_weight_grad(x.double(), g.double(), offsets), dt)
    for e, n in enumerate(sizes):
        if n == 0:
            assert not got[e].any(), f"expert {e} has no rows: its gradient must be 0"


@in_child
def test_router_weight_grad_splits_and_matches_reference():
    """The router's logits through the public path: 600 tokens are split in 2 by the launcher
    (SPLIT_MIN_ROWS rows each) and the weight gradient equals the reference's."""
    from moe_kernels import routers
    from moe_kernels.ops import _triton

    assert _triton.wgrad_split(600, 5, 40, 1, [_triton.GEMM_KERNELS["grouped_mm_weight_grad"][2][0]], 132) == 2
    x0, w0, gy = torch.randn(600, 40), torch.randn(5, 40), torch.randn(600, 5)
    res = {}
    for backend in ("triton", "torch"):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        logits = routers._logits(x, w, backend=backend)
        res[backend] = (logits, *torch.autograd.grad(logits, (x, w), gy))
    for a, b in zip(res["triton"], res["torch"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    x = x0.clone().requires_grad_()
    w = w0.clone().requires_grad_()
    (gw,) = torch.autograd.grad(routers._logits(x, w, backend="triton"), (w,), gy)
    assert torch.equal(gw, res["triton"][2])  # bitwise from run to run


# ---------------------------------------------------------------------------------------------
# The forward's tile schedule (kernels/grouped_mm.py: _tile_of): expert e's rows and the
# padding rows cut into BLOCK_M tiles from their own first row, at most cdiv(M, BLOCK_M) + E
# tiles, no tile across two segments, every row in exactly one tile.
SCHEDULES = [
    ([10, 0, 35, 15], 10, 32),  # empty expert, ragged sizes, padding rows
    ([31, 32, 33, 64, 1], 0, 32),  # sizes at and next to the tile height
    ([0, 0, 0], 20, 32),  # every assignment dropped: only padding
    ([0, 100, 0], 0, 32),  # one expert takes everything
    ([1] * 130, 3, 16),  # more segments than one scan chunk (SCHED_LANES = 128)
    ([7], 0, 64),  # fewer rows than a tile
]


if INTERPRET:  # the kernel's globals must hold _tile_of, so it lives at module level
    import triton
    import triton.language as tl

    from moe_kernels.kernels.grouped_mm import _tile_of

    @triton.jit
    def _schedule_table_kernel(Off_ptr, Out_ptr, M, E, BLOCK_M: tl.constexpr):
        t = tl.program_id(0)
        seg, first, end = _tile_of(Off_ptr, M, E, t, BLOCK_M)
        tl.store(Out_ptr + 3 * t, seg.to(tl.int64))
        tl.store(Out_ptr + 3 * t + 1, first.to(tl.int64))
        tl.store(Out_ptr + 3 * t + 2, end.to(tl.int64))


def _schedule_table(offsets, M, block_m):
    """(segment, first row, segment end) of each of the cdiv(M, block_m) + E schedule entries."""
    E = offsets.shape[0] - 1
    n = -(-M // block_m) + E
    out = torch.full((n, 3), -7, dtype=torch.int64)
    _schedule_table_kernel[(n,)](offsets, out, M, E, BLOCK_M=block_m)
    return out


@in_child
@pytest.mark.parametrize("sizes,pad,block_m", SCHEDULES, ids=[f"E{len(c[0])}-P{c[1]}-BM{c[2]}" for c in SCHEDULES])
def test_tile_schedule(sizes, pad, block_m):
    offsets = torch.tensor([0] + sizes).cumsum(0)
    M, E = int(offsets[-1]) + pad, len(sizes)
    table = _schedule_table(offsets, M, block_m).tolist()
    bounds = offsets.tolist() + [M]
    owner = [None] * M
    used = [row for row in table if row[0] <= E]
    assert all(row[0] == E + 1 for row in table[len(used) :]), "unused entries must come last"
    want = sum(-(-(bounds[s + 1] - bounds[s]) // block_m) for s in range(E + 1))
    assert len(used) == want  # the tiles segments need, not one more
    for seg, first, end in used:  # end: the segment's end (the kernel masks rows past it)
        assert end == bounds[seg + 1] and bounds[seg] <= first < end, "a tile must stay inside its segment"
        assert (first - bounds[seg]) % block_m == 0, "tiles start BLOCK_M apart from the segment's first row"
        for r in range(first, min(first + block_m, end)):
            assert owner[r] is None, f"row {r} in two tiles"
            owner[r] = seg
    assert all(o is not None for o in owner), "every row must be in a tile"


@in_child
def test_tile_schedule_clamps_bad_offsets():
    """GPU offsets are not validated on the host: boundaries past M or going down are clamped
    to [0, M] and made non-decreasing, so tiles stay in bounds and never overlap."""
    for offsets in ([0, 6, 14, 3], [5, 2, 9, -4], [0, 12, 1, 30]):
        table = _schedule_table(torch.tensor(offsets), 10, 4).tolist()
        covered = [r for seg, first, end in table if seg <= 3 for r in range(first, min(first + 4, end))]
        assert sorted(covered) == list(range(10)), (offsets, table)


# The routed shapes the forward's schedule must get right, through make_routing and dispatch as
# a layer runs them: (T, E, K, C, S, pattern).
ROUTED = [
    (48, 4, 2, 8, 16, "random"),  # capacity, G=3 groups: expert ranges of 24 rows, drops
    (40, 5, 1, None, 40, "skewed"),  # dropless, skewed: one expert has most rows, two have none
    (32, 3, 1, 4, 16, "one-expert"),  # capacity, everything on expert 0: others' slots all empty
    (64, 6, 2, None, 32, "one-expert"),  # dropless, G=2: all rows on experts 0 and 2
]


@in_child
@pytest.mark.parametrize("dt", ["f32", "f16"])
@pytest.mark.parametrize("T,E,K,C,S,pattern", ROUTED, ids=[f"T{r[0]}-E{r[1]}-C{r[3]}-S{r[4]}-{r[5]}" for r in ROUTED])
def test_grouped_mm_on_routed_buffers(T, E, K, C, S, pattern, dt):
    dtype = DTYPES[dt][0]
    if pattern == "skewed":
        indices = torch.where(torch.rand(T, K) < 0.7, 1, torch.randint(0, 3, (T, K)) * 2).clamp(max=E - 1)
    else:
        indices = _indices(T, E, K, pattern)
    routing = mk.make_routing(indices, E, C, group_size=S, backend="torch")
    Din, N = 24, 40
    buf0 = mk.dispatch(torch.randn(T, Din).to(dtype), routing, backend="torch").reshape(-1, Din)
    w0, b = (torch.randn(E, N, Din) / Din**0.5).to(dtype), torch.randn(E, N).to(dtype)
    gy = torch.randn(buf0.shape[0], N).to(dtype)
    res = {}
    for backend in ("triton", "torch"):
        buf, w = buf0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = mk.grouped_mm(buf, w, routing.offsets, bias=b, backend=backend)
        res[backend] = (y, *torch.autograd.grad(y, (buf, w), gy))
    buf, w = buf0.double().requires_grad_(), w0.double().requires_grad_()
    y = mk.grouped_mm(buf, w, routing.offsets, bias=b.double(), backend="torch")
    exact = (y, *torch.autograd.grad(y, (buf, w), gy.double()))
    for a, r, e in zip(res["triton"], res["torch"], exact, strict=True):
        _close_lowp(a, r, e, dt)
    assert not res["triton"][0][int(routing.offsets[-1]) :].any()


@in_child
@pytest.mark.parametrize("dt", ["f32", "f16"])
def test_grouped_mm_bitwise_independent_of_padding_and_neighbours(dt):
    """Tiles start at their expert's first row: an expert's output bits do not change with
    the padding rows after it or with the sizes of the experts before it."""
    from moe_kernels.ops import _triton

    dtype = DTYPES[dt][0]
    Din, N = 40, 24
    w = torch.randn(3, N, Din).to(dtype)
    rows = torch.randn(45, Din).to(dtype)  # expert 2's rows
    lead = torch.randn(50, Din).to(dtype)
    base = None
    for before, pad in ((0, 0), (13, 0), (13, 17), (50, 40)):  # rows of experts 0 and 1; padding
        x = torch.cat([lead[:before], rows, torch.randn(pad, Din).to(dtype)])
        offsets = torch.tensor([0, before // 2, before, before + 45])
        y = _triton.grouped_mm(x, w, offsets)[before : before + 45]
        base = y if base is None else base
        assert torch.equal(y, base), f"{before} rows before, {pad} padding"
    assert torch.equal(base, _triton.grouped_mm(rows, w[2:], torch.tensor([0, 45])))

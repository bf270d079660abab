"""What every public op shares, on every available backend: ``torch.library.opcheck``, empty
batches, strided inputs, errors that name the argument, and bitwise determinism across thread
counts. Each op against the reference: tests/test_topk_softmax.py, test_make_routing.py,
test_dispatch_combine.py, test_grouped_mm.py (run one backend alone with e.g.
``MOE_KERNELS_BACKEND=triton TRITON_INTERPRET=1 pytest tests/test_ops.py ...``).
"""

from __future__ import annotations

import pytest
import torch

import moe_kernels as mk
from moe_kernels import reference as ref
from tests.op_helpers import (
    BACKENDS,
    make_plan,
    routing_tuple,
)

# ---------------------------------------------------------------- opcheck, empty, strides


def _opcheck_samples(backend):
    r = make_plan(12, 4, 2, 3, 6)
    rd = make_plan(8, 3, 2, None)
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

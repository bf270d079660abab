"""``topk_softmax`` and its backward on every available backend against the reference
(``moe_kernels.reference``): indices exactly, weights within conftest.DTYPES, gradients by
gradcheck in fp64. One backend alone: e.g. ``MOE_KERNELS_BACKEND=triton TRITON_INTERPRET=1``.
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
    GATING_SHAPES,
)

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

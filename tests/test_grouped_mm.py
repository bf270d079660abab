"""``grouped_mm``, its weight gradient and ``gelu_grouped_mm`` on every available backend
against the reference (fp32 accumulation; gradients by gradcheck in fp64).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moe_kernels as mk
from moe_kernels import reference as ref
from tests.conftest import DTYPES, interpreting
from tests.op_helpers import (
    BACKENDS,
    DTYPE_IDS,
    assert_close,
)

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

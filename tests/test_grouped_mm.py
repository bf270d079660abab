"""``grouped_mm``, its weight gradient, ``gelu_grouped_mm`` and ``gelu_mlp`` on every available
backend against the reference (fp32 accumulation; gradients by gradcheck in fp64). Backends
with fused epilogues (Triton) are held to the dtype's tolerance where they round differently
from the unfused pair (tests/test_fused_gelu.py has their own cases).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moe_kernels as mk
from moe_kernels import backends
from moe_kernels import reference as ref
from moe_kernels.ops.grouped_mm import gelu_mlp
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


def _fuses(backend: str, dtype: torch.dtype) -> bool:
    return backends.fused("grouped_mm_act", backend, torch.device("cpu"), dtype) is not None


def _close_to_pair(actual, pair, exact, dtype_id):
    """A fused result against the unfused pair's: fp32 within tolerance; fp16/bf16 no further
    from the fp64 result than twice the pair's own error, plus one ulp (STYLE.md)."""
    if dtype_id == "f32":
        return assert_close(actual, pair, dtype_id)
    ours = (actual.double() - exact).abs().max().item()
    theirs = (pair.double() - exact).abs().max().item()
    ulp = exact.abs().max().item() * torch.finfo(actual.dtype).eps
    assert ours <= 2 * theirs + ulp, f"error {ours:.3g} vs the unfused pair's {theirs:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype_id", DTYPE_IDS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_grouped_mm_equals_the_unfused_pair(backend, dtype_id, approximate):
    # The fused op recomputes gelu(h) in its backward: the same kernels on the same operands,
    # so the output and every gradient are bitwise those of gelu followed by grouped_mm. With
    # fused epilogues the backward applies GELU' in dX's epilogue (one rounding fewer) and
    # GELU to h as dW loads it: within the dtype's tolerance.
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
    if _fuses(backend, dtype):
        h64, w64, b64 = (t.detach().double().requires_grad_() for t in (h, w, b))
        y64 = mk.grouped_mm(F.gelu(h64, approximate=approximate), w64, offsets, bias=b64, backend="torch")
        for a, r, e in zip(grads, grads_ref, torch.autograd.grad(y64, (h64, w64, b64), g.double()), strict=True):
            _close_to_pair(a, r, e, dtype_id)
    else:
        for a, r in zip(grads, grads_ref, strict=True):
            assert torch.equal(a, r)
    assert (grads[0][12:] == 0).all()  # padding rows: no gradient


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype_id,approximate", [("f32", "none"), ("f16", "tanh"), ("bf16", "none")])
def test_gelu_mlp_equals_the_unfused_pair(backend, dtype_id, approximate):
    """The expert MLP: grouped_mm, then gelu_grouped_mm (exactly that where nothing is fused)."""
    dtype = DTYPES[dtype_id][0]
    offsets = torch.tensor([0, 5, 5, 12])  # an empty expert and 2 padding rows
    x0, gy = torch.randn(14, 7).to(dtype), torch.randn(14, 6).to(dtype)
    params = [(torch.randn(3, 9, 7) / 3).to(dtype), torch.randn(3, 9).to(dtype),
              (torch.randn(3, 6, 9) / 3).to(dtype), torch.randn(3, 6).to(dtype)]  # fmt: skip
    res = []
    for fused, be, dt in ((True, backend, dtype), (False, backend, dtype), (False, "torch", torch.float64)):
        x, w1, b1, w2, b2 = (t.to(dt).requires_grad_() for t in (x0, *params))
        if fused:
            y = gelu_mlp(x, w1, w2, offsets, bias1=b1, bias2=b2, approximate=approximate, backend=be)
        else:
            h = mk.grouped_mm(x, w1, offsets, bias=b1, backend=be)
            y = mk.ops.gelu_grouped_mm(h, w2, offsets, bias=b2, approximate=approximate, backend=be)
        res.append((y, *torch.autograd.grad(y, (x, w1, b1, w2, b2), gy.to(dt))))
    for a, r, e in zip(*res, strict=True):
        if _fuses(backend, dtype):
            _close_to_pair(a, r, e, dtype_id)
        else:
            assert torch.equal(a, r)
    assert not res[0][0][12:].any() and not res[0][1][12:].any()  # padding rows


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
            lambda h, w, b, a=approximate: mk.ops.gelu_grouped_mm(
                h, w, offsets, bias=b, approximate=a, backend=backend
            ),
            (h, w, b),
        )
    with pytest.raises(ValueError, match=r"approximate must be 'none' or 'tanh', got 'erf'"):
        mk.ops.gelu_grouped_mm(h, w, offsets, approximate="erf", backend=backend)
    with pytest.raises(ValueError, match=r"gelu_grouped_mm: w must have shape \[E, N, Din=4\]"):
        mk.ops.gelu_grouped_mm(h, torch.randn(3, 3, 5, dtype=torch.float64), offsets, backend=backend)
    with pytest.raises(TypeError, match=r"w must have the dtype of h"):
        mk.ops.gelu_grouped_mm(h, w.float(), offsets, backend=backend)

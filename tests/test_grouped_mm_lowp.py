"""The C++ CPU grouped GEMM in bf16/fp16: where the CPU has no low-precision matmul units it
converts each tile to fp32, runs sgemm and rounds once (csrc/cpu/grouped_mm.cpp); elsewhere it
keeps ATen's native path. ``MOE_KERNELS_CPU_LOWP_GEMM=fp32|native`` forces either path, so both
are tested on any CPU.

Shape letters: M rows, E experts, Din input width, N output width.
"""

from __future__ import annotations

import os
import platform

import pytest
import torch

import moe_kernels as mk
from moe_kernels import _ext
from moe_kernels import reference as ref
from tests.op_helpers import assert_close
from tests.test_grouped_mm import GMM_CASES

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason=f"moe_kernels._C did not load ({_ext.LOAD_ERROR})")

ENV = "MOE_KERNELS_CPU_LOWP_GEMM"
LOWP = {"bf16": torch.bfloat16, "f16": torch.float16}
# Explicit mantissa bits: one ulp of v is 2**(floor(log2|v|) - bits).
MANTISSA = {torch.bfloat16: 7, torch.float16: 10}
# The CPU flags that give each dtype native matmuls (as /proc/cpuinfo spells them).
UNITS = {torch.bfloat16: {"avx512_bf16", "amx_bf16"}, torch.float16: {"avx512_fp16", "amx_fp16"}}


def _native(dtype: torch.dtype) -> bool:
    return torch.ops.moe_kernels_C.cpu_lowp_gemm_native(dtype)


def _assert_within_one_ulp(actual: torch.Tensor, want_fp32: torch.Tensor, scale: torch.Tensor) -> None:
    """``actual`` is ``want_fp32`` rounded once to ``actual``'s dtype, give or take one ulp: the
    tiles' fp32 sums may be ordered differently from the reference GEMM's, which moves a value
    across a rounding boundary, or, where the sum cancels to far below its terms, by fp32's
    reordering error itself (allowed: 1e-6 of ``scale``, the sum of the terms' magnitudes)."""
    dt = actual.dtype
    want = want_fp32.to(dt).float()
    # The larger magnitude's ulp: one step across a power of two is the upper binade's ulp.
    mag = torch.maximum(want.abs(), actual.float().abs()).clamp_min(torch.finfo(dt).tiny)
    ulp = torch.exp2(torch.floor(torch.log2(mag)) - MANTISSA[dt])
    diff = (actual.float() - want).abs()
    bound = ulp + 1e-6 * scale
    assert (diff <= bound).all(), f"{int((diff > bound).sum())} elements more than one ulp off (max {diff.max()})"


def _operands(sizes, Din, N, pad, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0] + sizes).cumsum(0)  # [E+1]
    M = int(offsets[-1]) + pad
    x = torch.randn(M, Din, generator=g).to(dtype)  # [M, Din]
    w = (torch.randn(len(sizes), N, Din, generator=g) / Din**0.5).to(dtype)  # [E, N, Din]
    b = torch.randn(len(sizes), N, generator=g).to(dtype)  # [E, N]
    gy = torch.randn(M, N, generator=g).to(dtype)  # [M, N]
    return x, w, b, gy, offsets


def _upcast_reference(x, w, b, gy, offsets):
    """fp32 GEMMs of the upcast operands, per expert: ``[(out, scale), (out with bias, scale),
    (weight grad, scale)]`` in fp32, each ``scale`` the same GEMM of the operands' magnitudes."""
    o = offsets.tolist()
    E, N, Din = w.shape
    out, out_b, mag = (torch.zeros(x.shape[0], N) for _ in range(3))  # [M, N], padding rows 0
    dw, dw_mag = torch.zeros(E, N, Din), torch.zeros(E, N, Din)
    for e in range(E):
        xe, ge, we = x[o[e]:o[e + 1]].float(), gy[o[e]:o[e + 1]].float(), w[e].float()  # [n, Din], [n, N], [N, Din]
        out[o[e]:o[e + 1]] = xe @ we.t()
        out_b[o[e]:o[e + 1]] = torch.addmm(b[e].float(), xe, we.t())
        mag[o[e]:o[e + 1]] = xe.abs() @ we.abs().t() + b[e].float().abs()
        dw[e] = ge.t() @ xe
        dw_mag[e] = ge.abs().t() @ xe.abs()
    return [(out, mag), (out_b, mag), (dw, dw_mag)]


# (rows per expert, Din, N, padding rows): GMM_CASES' hard shapes, plus an expert of 1100 rows
# (three forward row tiles) and N=300 (three weight-gradient column tiles).
CASES = GMM_CASES + [([1100, 0, 37], 40, 300, 5)]


@pytest.mark.parametrize("dtype_id", list(LOWP))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"E{len(c[0])}D{c[1]}N{c[2]}P{c[3]}")
def test_converted_path_is_fp32_gemm_rounded_once(monkeypatch, dtype_id, case):
    monkeypatch.setenv(ENV, "fp32")
    dtype = LOWP[dtype_id]
    assert not _native(dtype)
    x, w, b, gy, offsets = _operands(*case, dtype)
    ops = torch.ops.moe_kernels_C
    out, out_b = ops.grouped_mm(x, w, offsets, None), ops.grouped_mm(x, w, offsets, b)
    dw = ops.grouped_mm_weight_grad(x, gy, offsets)
    for got, (exp, scale) in zip((out, out_b, dw), _upcast_reference(x, w, b, gy, offsets), strict=True):
        assert got.dtype == dtype
        _assert_within_one_ulp(got, exp, scale)
    # Bitwise: the same tiles and GEMMs as the fp32 kernel on the upcast operands, one rounding.
    xf, wf, bf, gf = (t.float() for t in (x, w, b, gy))
    assert torch.equal(out, ops.grouped_mm(xf, wf, offsets, None).to(dtype))
    assert torch.equal(out_b, ops.grouped_mm(xf, wf, offsets, bf).to(dtype))
    assert torch.equal(dw, ops.grouped_mm_weight_grad(xf, gf, offsets).to(dtype))
    pad = case[3]
    if pad:
        assert (out_b[-pad:] == 0).all()  # padding rows: no bias, as on the native path


@pytest.mark.parametrize("mode", ["fp32", "native"])
@pytest.mark.parametrize("dtype_id", list(LOWP))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"E{len(c[0])}D{c[1]}N{c[2]}P{c[3]}")
def test_both_paths_match_reference_with_gradients(monkeypatch, mode, dtype_id, case):
    """The public op (forward, dx, dw, dbias through autograd) within the reference's tolerance."""
    monkeypatch.setenv(ENV, mode)
    dtype = LOWP[dtype_id]
    x, w, b, gy, offsets = _operands(*case, dtype, seed=1)
    xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
    out = mk.grouped_mm(xs, ws, offsets, bias=bs, backend="cpu")
    out.backward(gy)
    xr, wr, br = (t.clone().requires_grad_(True) for t in (x, w, b))
    want = ref.grouped_mm(xr, wr, offsets, br)
    want.backward(gy)
    assert_close(out, want, dtype_id)
    for got, exp in ((xs.grad, xr.grad), (ws.grad, wr.grad), (bs.grad, br.grad)):
        assert_close(got, exp, dtype_id)


@pytest.mark.parametrize("dtype_id", list(LOWP))
def test_converted_path_is_thread_count_invariant(monkeypatch, dtype_id):
    """Forward over several row tiles and uneven experts; weight gradient over several column
    tiles and an expert of 2,500 rows (past where one MKL sgemm over the rows would split its
    reduction by the thread count: the kernel reduces in fixed chunks of rows)."""
    monkeypatch.setenv(ENV, "fp32")
    x, w, b, _, offsets = _operands([1100, 3, 700], 96, 260, 2, LOWP[dtype_id], seed=2)
    xg, _, _, gy, offsets_g = _operands([2500, 3, 700], 96, 260, 2, LOWP[dtype_id], seed=3)
    ops = torch.ops.moe_kernels_C
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            results.append((ops.grouped_mm(x, w, offsets, b), ops.grouped_mm_weight_grad(xg, gy, offsets_g)))
    finally:
        torch.set_num_threads(before)
    for a, c in zip(*results, strict=True):
        assert torch.equal(a, c)


def test_env_override_and_errors(monkeypatch):
    monkeypatch.setenv(ENV, "fp32")
    assert not _native(torch.bfloat16) and not _native(torch.float16)
    monkeypatch.setenv(ENV, "native")
    assert _native(torch.bfloat16) and _native(torch.float16)
    assert _native(torch.float32) and _native(torch.float64)  # never converted
    monkeypatch.setenv(ENV, "sometimes")
    x, w, offsets = torch.randn(4, 3).bfloat16(), torch.randn(1, 2, 3).bfloat16(), torch.tensor([0, 4])
    with pytest.raises(RuntimeError, match=f"{ENV} must be auto, fp32 or native, got 'sometimes'"):
        torch.ops.moe_kernels_C.grouped_mm(x, w, offsets, None)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="CPU feature detection is x86-only")
@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="no /proc/cpuinfo to compare with")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_auto_detection_agrees_with_proc_cpuinfo(monkeypatch, dtype):
    """CPUID in C++ against the kernel's own flags: native exactly where the CPU has the units."""
    monkeypatch.delenv(ENV, raising=False)
    with open("/proc/cpuinfo") as f:
        flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    assert _native(dtype) == bool(UNITS[dtype] & set(flags))
    monkeypatch.setenv(ENV, "auto")
    assert _native(dtype) == bool(UNITS[dtype] & set(flags))

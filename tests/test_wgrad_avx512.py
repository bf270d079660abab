"""The CPU weight gradient's AVX-512 kernel (csrc/cpu/wgrad_avx512.cpp, #15).

fp32 weight gradients of experts of at most ``cpu_wgrad_avx512_rows()`` rows run a register-tiled
kernel that writes the gradient with non-temporal stores; longer experts keep the ATen (MKL)
path, and ``MOE_KERNELS_CPU_WGRAD=aten`` forces that path everywhere. Checked here: both paths
against a float64 reference at the kernel's edges (rows 0, 1, 12, at and past the row limit;
output rows and columns that are not multiples of the 12 x 32 register tile; operands whose rows
start off a 64-byte boundary, where the stores cannot be non-temporal), GELU and the bias sums,
that the kernel really runs (no ATen matmul under the profiler) and that its results do not
depend on the thread count.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moe_kernels  # noqa: F401  (registers the ops)
from tests.conftest import backends_under_test

ops = torch.ops.moe_kernels_C
ENV = "MOE_KERNELS_CPU_WGRAD"

pytestmark = [
    pytest.mark.skipif("cpu" not in backends_under_test("cpu"), reason="the C++ CPU backend is not under test"),
]


def _kernel_on() -> bool:
    return bool(ops.cpu_wgrad_avx512())


needs_avx512 = pytest.mark.skipif(not _kernel_on(), reason="this CPU has no AVX-512F: the ATen path runs alone")
LIMIT = int(ops.cpu_wgrad_avx512_rows())


def _case(sizes, N, Din, *, seed=0, offset_rows=1, pad=2):
    """x [M, Din] and grad_out [M, N] whose data start ``offset_rows`` rows into a wider buffer
    (so rows need not be 64-byte aligned), with ``pad`` padding rows past offsets[E]."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    M = int(offsets[-1]) + pad
    xb = torch.randn(M + offset_rows, Din + 3, generator=g)
    gb = torch.randn(M + offset_rows, N + 5, generator=g)
    return offsets, xb[offset_rows:, :Din], gb[offset_rows:, :N]


def _reference(x, g, offsets, act):
    a = x.double() if act is None else F.gelu(x.double(), approximate=act)
    dw = torch.stack([g[lo:hi].double().T @ a[lo:hi] for lo, hi in zip(offsets[:-1], offsets[1:], strict=True)])
    db = torch.stack([g[lo:hi].double().sum(0) for lo, hi in zip(offsets[:-1], offsets[1:], strict=True)])
    return dw, db


EDGES = [
    ((0, 1, 12, 13), 13, 33),  # empty expert, one row; output rows and columns off the register tile
    ((100, 7, 64), 40, 64),  # full-width tiles, non-temporal where aligned
    ((LIMIT, LIMIT + 1, 5), 25, 70),  # at the row limit, and one past it (the ATen path)
    ((700, 0, 30), 12, 32),  # a long expert (ATen, row chunks) next to short ones
]


@needs_avx512
@pytest.mark.parametrize("sizes,N,Din", EDGES)
@pytest.mark.parametrize("act", [None, "none", "tanh"])
@pytest.mark.parametrize("offset_rows", [0, 1])
def test_kernel_matches_the_reference_and_the_aten_path(monkeypatch, sizes, N, Din, act, offset_rows):
    offsets, x, g = _case(sizes, N, Din, offset_rows=offset_rows)
    want_dw, want_db = _reference(x, g, offsets, act)
    got = {}
    for mode in ("auto", "aten"):
        monkeypatch.setenv(ENV, mode)
        got[mode] = ops.grouped_mm_weight_grad_fused(x, g, offsets, act, True, True)
    for mode, (dw, db) in got.items():
        torch.testing.assert_close(dw.double(), want_dw, atol=2e-4, rtol=1e-5, msg=f"dw, {mode}")
        torch.testing.assert_close(db.double(), want_db, atol=2e-4, rtol=1e-5, msg=f"db, {mode}")
    torch.testing.assert_close(got["auto"][0], got["aten"][0], atol=1e-4, rtol=1e-5)
    assert torch.equal(got["auto"][1], got["aten"][1])  # the bias sums are one routine
    empty = [e for e, n in enumerate(sizes) if n == 0]
    for e in empty:
        assert not got["auto"][0][e].any()


@needs_avx512
def test_plain_op_matches_the_reference(monkeypatch):
    offsets, x, g = _case((50, 3, 0, 90), 36, 40)
    monkeypatch.setenv(ENV, "auto")
    dw = ops.grouped_mm_weight_grad(x, g, offsets)
    torch.testing.assert_close(dw.double(), _reference(x, g, offsets, None)[0], atol=2e-4, rtol=1e-5)


def _aten_matmuls(fn) -> int:
    """ATen matmul calls of fn, on one thread (the profiler sees the calling thread's ops)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
    finally:
        torch.set_num_threads(before)
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::addmm_"))


@needs_avx512
def test_the_kernel_runs_instead_of_aten_matmuls(monkeypatch):
    """Short experts make no ATen matmul call on the kernel's path; an expert past the row limit
    does, and so does every expert with MOE_KERNELS_CPU_WGRAD=aten."""
    offsets, x, g = _case((100, 30), 48, 64)
    monkeypatch.setenv(ENV, "auto")
    assert _aten_matmuls(lambda: ops.grouped_mm_weight_grad(x, g, offsets)) == 0
    monkeypatch.setenv(ENV, "aten")
    assert _aten_matmuls(lambda: ops.grouped_mm_weight_grad(x, g, offsets)) > 0
    monkeypatch.setenv(ENV, "auto")
    # fc2's fused form (GELU on the rows, bias sums) takes the kernel as well
    assert _aten_matmuls(lambda: ops.grouped_mm_weight_grad_fused(x, g, offsets, "tanh", True, True)) == 0
    long_offsets, lx, lg = _case((LIMIT + 1, 30), 48, 64)
    assert _aten_matmuls(lambda: ops.grouped_mm_weight_grad(lx, lg, long_offsets)) > 0


@needs_avx512
@pytest.mark.parametrize("act", [None, "tanh"])
def test_kernel_is_thread_count_invariant(monkeypatch, act):
    monkeypatch.setenv(ENV, "auto")
    offsets, x, g = _case((120, LIMIT + 40, 0, 9, 64), 100, 72, seed=3)
    before = torch.get_num_threads()
    out = []
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            out.append(ops.grouped_mm_weight_grad_fused(x, g, offsets, act, True, True))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*out, strict=True):
        assert torch.equal(a, b)


def test_bad_setting_is_named(monkeypatch):
    offsets, x, g = _case((4, 4), 12, 16)
    monkeypatch.setenv(ENV, "fast")
    with pytest.raises(RuntimeError, match="MOE_KERNELS_CPU_WGRAD must be auto or aten, got 'fast'"):
        ops.grouped_mm_weight_grad(x, g, offsets)


def test_aten_setting_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv(ENV, "aten")
    assert not ops.cpu_wgrad_avx512()

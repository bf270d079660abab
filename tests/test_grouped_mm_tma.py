"""The persistent TMA grouped GEMM (``kernels/grouped_mm_tma.py``) without a GPU.

Three parts:
- under Triton's interpreter (a ``TRITON_INTERPRET=1 MOE_KERNELS_TRITON_TMA=1`` child of
  ``test_tma_interpreter_suite``, as tests/test_triton_interpret.py runs its cases), the kernel
  itself, tensor descriptors included (the interpreter implements ``tl.make_tensor_descriptor``
  and its loads, zero fill past the edges too), with 3 programs standing for the SMs so that
  each loops over several schedule entries: the forward and dX against the reference at
  expert boundaries inside a tile, empty experts, every assignment dropped, one expert taking
  everything, skewed dropless and routed capacity buffers of G > 1 groups; bits independent
  of the padding, of the other experts' sizes and of the number of programs; the fused GELU
  epilogues; layouts TMA cannot read falling back to the non-persistent kernel. fp32 (with TF32 allowed: IEEE fp32
  runs the other kernel) and fp16; the interpreter's bf16 is wrong.
- compiled for sm_90 (``triton.compile``, no GPU): every config of the autotune list (the
  first by default, all with ``MOE_KERNELS_COMPILE_ALL=1``) with TMA loads (UTMALDG) and wgmma
  in the SASS, no spills, at most 255 registers, within sm_90's shared memory.
- the launcher's choice (``tma_reasons``) on CPU tensors.

What only a GPU shows (speed, the TMA path's bits against the other kernel's, the allocator
under CUDA graphs or torch.compile) is left to ``make gpu-check``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from moe_kernels import reference  # noqa: E402
from moe_kernels.ops import _triton  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
in_child = pytest.mark.skipif(not INTERPRET, reason="runs in the interpreter child of test_tma_interpreter_suite")
not_in_child = pytest.mark.skipif(INTERPRET, reason="runs in the parent process")
COMPILE_ALL = os.environ.get("MOE_KERNELS_COMPILE_ALL") == "1"

DTYPES = {"f32": (torch.float32, 1e-5), "f16": (torch.float16, 2e-3)}
dtypes = pytest.mark.parametrize("dt", list(DTYPES), ids=list(DTYPES))


def _run_child(paths: list[str]) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", MOE_KERNELS_BACKEND="triton", MOE_KERNELS_TRITON_TMA="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout[-6000:] + "\n" + proc.stderr[-3000:]).strip()
    assert proc.returncode == 0, f"interpreter run of {paths} failed after {time.perf_counter() - start:.0f}s:\n{tail}"
    assert " passed" in proc.stdout, tail


@not_in_child
def test_tma_interpreter_suite():
    """This module's interpreter cases in a child process (~1 min on one core)."""
    _run_child([os.path.abspath(__file__)])


@not_in_child
def test_op_suites_with_tma():
    """The grouped GEMM's op tests and the fused expert MLP's interpreter cases (launchers,
    ``gelu_mlp``, ``MoEMlp`` with every gradient) with the TMA kernel allowed on the
    interpreter's CPU tensors: fp16/bf16 launches with TMA-readable rows run it (~40 s)."""
    _run_child([os.path.join(ROOT, "tests", "test_grouped_mm.py"), os.path.join(ROOT, "tests", "test_fused_gelu.py")])


class _Spy:
    """Stands for a GEMM_KERNELS entry: records the name of each launch, then launches."""

    def __init__(self, name: str, kernel, calls: list):
        self.name, self.kernel, self.calls = name, kernel, calls

    def __getitem__(self, grid):
        self.calls.append((self.name, grid))
        return self.kernel[grid]


@pytest.fixture
def launches(monkeypatch):
    """The names (and grids) of the GEMM launches; 3 programs stand for the device's SMs; TF32
    allowed, so fp32 takes the TMA kernel (the interpreter computes it in fp32 anyway)."""
    calls = []
    spied = {n: (_Spy(n, a, calls), _Spy(n, b, calls), c) for n, (a, b, c) in _triton.GEMM_KERNELS.items()}
    monkeypatch.setattr(_triton, "GEMM_KERNELS", spied)
    monkeypatch.setattr(_triton, "DEFAULT_NUM_SMS", 3)
    tf32 = torch.backends.cuda.matmul.allow_tf32  # a property: monkeypatch cannot restore it
    torch.backends.cuda.matmul.allow_tf32 = True
    yield calls
    torch.backends.cuda.matmul.allow_tf32 = tf32


def _layout(sizes: list[int], pad: int, Din: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    return torch.randn(int(offsets[-1]) + pad, Din).to(dtype), offsets


# (expert sizes, padding rows, what it covers); the interpreter's tile is 32x32x32 (GROUP_M 2).
CASES = [
    ([5, 40, 19], 7, "boundaries inside tiles, padding"),
    ([0, 33, 0, 0, 12], 0, "empty experts, one a tile and a row"),
    ([0, 0, 0], 40, "every assignment dropped: all padding"),
    ([0, 70, 0], 0, "one expert takes everything"),
    ([1, 2, 90, 3], 0, "skewed dropless"),
    ([], 9, "one expert without rows, all padding"),
]


@in_child
@dtypes
@pytest.mark.parametrize("sizes,pad,why", CASES, ids=[c[2] for c in CASES])
def test_forward_and_dx_against_reference(sizes, pad, why, dt, launches):
    dtype, tol = DTYPES[dt]
    sizes = sizes or [0]
    E, Din, N = len(sizes), 40, 48
    x, offsets = _layout(sizes, pad, Din, dtype)
    w, b = (torch.randn(E, N, Din) / Din**0.5).to(dtype), torch.randn(E, N).to(dtype)
    y = _triton.grouped_mm(x, w, offsets, b)
    g = torch.randn(x.shape[0], N).to(dtype)
    dx = _triton.grouped_mm(g, w.transpose(1, 2), offsets)  # dX: the transposed view (W_T)
    assert [name for name, _ in launches] == ["grouped_mm_tma", "grouped_mm_tma"], launches
    assert all(grid[0] <= 3 for _, grid in launches)
    torch.testing.assert_close(y, reference.grouped_mm(x, w, offsets, b), atol=tol, rtol=tol)
    torch.testing.assert_close(dx, reference.grouped_mm(g, w.transpose(1, 2), offsets), atol=tol, rtol=tol)
    end = int(offsets[-1])
    assert not y[end:].any() and not dx[end:].any()


ROUTED = [(48, 4, 2, 8, 16), (64, 6, 2, None, 32)]  # capacity with G=3 groups; dropless with G=2


@in_child
@dtypes
@pytest.mark.parametrize("T,E,K,C,S", ROUTED, ids=["capacity-G3", "dropless-G2"])
def test_routed_buffers_with_gradients(T, E, K, C, S, dt, launches):
    """Through the public op and its autograd, on buffers the routing builds (G > 1 groups:
    each expert's kept rows are G runs with empty slots between them)."""
    import moe_kernels as mk

    dtype, tol = DTYPES[dt]
    indices = torch.randint(0, E, (T, K))
    indices[: T // 2] = 1  # skewed: expert 1 gets at least half
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
    assert {"grouped_mm_tma"} <= {name for name, _ in launches}
    for a, r in zip(res["triton"], res["torch"], strict=True):
        torch.testing.assert_close(a, r, atol=tol * 4, rtol=tol * 4)


@in_child
@dtypes
def test_bits_independent_of_padding_neighbours_and_programs(dt, launches, monkeypatch):
    """An expert's output bits do not change with the padding after it, the sizes of the
    experts before it (whose rows its tiles may load past their end: only the store is
    masked), or the number of programs sharing the schedule."""
    dtype = DTYPES[dt][0]
    Din, N = 40, 24
    w = torch.randn(3, N, Din).to(dtype)
    rows = torch.randn(45, Din).to(dtype)  # expert 2's rows
    lead = torch.randn(50, Din).to(dtype)
    base = None
    for before, pad, sms in ((0, 0, 3), (13, 0, 3), (13, 17, 1), (50, 40, 2), (13, 17, 132)):
        monkeypatch.setattr(_triton, "DEFAULT_NUM_SMS", sms)
        x = torch.cat([lead[:before], rows, torch.randn(pad, Din).to(dtype)])
        offsets = torch.tensor([0, before // 2, before, before + 45])
        y = _triton.grouped_mm(x, w, offsets)[before : before + 45]
        dx = _triton.grouped_mm(x[:, :N].contiguous(), w.transpose(1, 2), offsets)  # [M, Din]
        base = (y, dx[before : before + 45]) if base is None else base
        assert torch.equal(y, base[0]), f"{before} rows before, {pad} padding, {sms} programs"
        assert torch.equal(dx[before : before + 45], base[1]), f"dX: {before} rows before, {pad} padding"
    assert {name for name, _ in launches} == {"grouped_mm_tma"}
    assert torch.equal(base[0], _triton.grouped_mm(rows, w[2:], torch.tensor([0, 45])))


@in_child
@dtypes
@pytest.mark.parametrize("pin", [None, "grouped_mm_tma=128x256x64:8:1"], ids=["32x32", "128x256-sliced"])
def test_fused_epilogues(dt, pin, launches, monkeypatch):
    """fc1's GELU (keeping the pre-activation, or not) and fc2's dX times GELU' in the TMA
    kernel's epilogue, both GELU forms, against the unfused ops and the non-persistent
    kernel. Pinned to 128x256 tiles (under the interpreter
    too), the epilogue runs on 8 column slices of 4096 elements; N = 296 leaves a partial
    column block and expert 1's rows end inside a tile."""
    import torch.nn.functional as F

    if pin:
        monkeypatch.setenv("MOE_KERNELS_TRITON_CONFIG", pin)
    dtype, tol = DTYPES[dt]
    Din, N = 40, 296  # 296 fp16 = 592 bytes: rows TMA can read (300 would fall back)
    x, offsets = _layout([5, 140, 19], 7, Din, dtype)
    E, M = 3, x.shape[0]
    w, b = (torch.randn(E, N, Din) / Din**0.5).to(dtype), torch.randn(E, N).to(dtype)
    for approx in ("none", "tanh"):
        launches.clear()
        y, pre = _triton.grouped_mm_act(x, w, offsets, b, approx, True)
        y_eval, _ = _triton.grouped_mm_act(x, w, offsets, b, approx, False)
        g = torch.randn(M, N).to(dtype)
        h = (3 * torch.randn(M, Din)).to(dtype)
        gh = _triton.grouped_mm_act_grad(g, w.transpose(1, 2), offsets, h, approx)
        assert [name for name, _ in launches] == ["grouped_mm_tma"] * 3, launches
        torch.testing.assert_close(pre, reference.grouped_mm(x, w, offsets, b), atol=tol, rtol=tol)
        torch.testing.assert_close(y, F.gelu(pre.float(), approximate=approx).to(dtype), atol=tol, rtol=tol)
        assert torch.equal(y, y_eval), "EPI_ACT and EPI_ACT_SAVE give the same activation"
        end = int(offsets[-1])
        assert not y[end:].any() and not pre[end:].any() and not gh[end:].any()
        dx = reference.grouped_mm(g.double(), w.transpose(1, 2).double(), offsets)
        want = torch.ops.aten.gelu_backward(dx, h.double(), approximate=approx)
        torch.testing.assert_close(gh.double(), want, atol=tol * 4, rtol=tol * 4)
        if pin is None:  # the non-persistent kernel with the same 32x32x32 tile
            # (not bitwise: the interpreter's numpy matmul of a transposed w tile may add
            # in another order)
            monkeypatch.setenv(_triton.TMA_ENV, "0")
            old_y = _triton.grouped_mm_act(x, w, offsets, b, approx, True)[0]
            old_gh = _triton.grouped_mm_act_grad(g, w.transpose(1, 2), offsets, h, approx)
            monkeypatch.setenv(_triton.TMA_ENV, "1")
            torch.testing.assert_close(y, old_y, atol=tol, rtol=tol)
            torch.testing.assert_close(gh, old_gh, atol=tol, rtol=tol)


@in_child
def test_layouts_tma_cannot_read_fall_back(launches):
    """Strides TMA cannot use (an inner stride not 1, a row stride not a multiple of 16 bytes,
    neither of w's last two strides 1) and IEEE fp32 run the non-persistent kernel, with the
    same results as the reference."""
    E, Din, N = 2, 24, 16
    offsets = torch.tensor([0, 7, 20])
    x = torch.randn(20, Din)
    w = torch.randn(E, N, Din)
    cases = {
        "x inner stride 2": (torch.randn(20, 2 * Din)[:, ::2], w),
        "x row stride 3 elements (fp16: 6 bytes)": (torch.randn(20, 3).half(), torch.randn(E, N, 3).half()),
        "w inner strides not 1": (x, torch.randn(E, 2 * N, 2 * Din)[:, ::2, ::2]),
    }
    for why, (xi, wi) in cases.items():
        launches.clear()
        y = _triton.grouped_mm(xi, wi, offsets)
        assert [name for name, _ in launches] == ["grouped_mm"], (why, launches)
        tol = 2e-3 if xi.dtype == torch.float16 else 1e-5
        torch.testing.assert_close(y, reference.grouped_mm(xi, wi, offsets), atol=tol, rtol=tol)
    launches.clear()
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _triton.grouped_mm(x, w, offsets)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = True
    assert [name for name, _ in launches] == ["grouped_mm"], "IEEE fp32"


@in_child
def test_a_failing_tma_kernel_falls_back_once_with_a_warning(launches, monkeypatch):
    """In auto mode a TMA kernel that raises at compile or launch (e.g. a Triton without the
    device-side descriptor API) is turned off for the process with one warning, and the call
    still returns the right result from the non-persistent kernel; with the variable at 1 the
    error is raised."""
    offsets = torch.tensor([0, 7, 20])
    x, w = torch.randn(20, 24), torch.randn(2, 16, 24)
    tried = []

    def broken(*args, **kwargs):
        tried.append(1)
        raise RuntimeError("no tensor descriptors here")

    monkeypatch.setattr(_triton, "_forward_tma", broken)
    monkeypatch.setattr(_triton, "tma_reasons", lambda *args: [])
    monkeypatch.setitem(_triton.TMA_FAILURE, "error", None)
    with pytest.raises(RuntimeError, match="no tensor descriptors here"):
        _triton.grouped_mm(x, w, offsets)  # MOE_KERNELS_TRITON_TMA=1 in this child
    monkeypatch.setenv(_triton.TMA_ENV, "auto")
    launches.clear()
    with pytest.warns(RuntimeWarning, match="persistent TMA grouped GEMM failed .*no tensor descriptors here"):
        y = _triton.grouped_mm(x, w, offsets)
    torch.testing.assert_close(y, reference.grouped_mm(x, w, offsets), atol=1e-5, rtol=1e-5)
    assert [name for name, _ in launches] == ["grouped_mm"]
    _triton.grouped_mm(x, w, offsets)
    assert len(tried) == 2  # not tried again after the fallback


# ------------------------------------------------------------------ the launcher's choice (CPU)
def _dot(ieee: bool = False) -> dict:
    return {"INPUT_PRECISION": "ieee" if ieee else "tf32", "DOT_FP32": False}


@not_in_child
def test_tma_reasons(monkeypatch):
    from moe_kernels.kernels import _config

    x, w = torch.randn(8, 32, dtype=torch.float16), torch.randn(2, 16, 32, dtype=torch.float16)
    monkeypatch.delenv(_triton.TMA_ENV, raising=False)
    assert any("interpreter" in r for r in _triton.tma_reasons(x, w, _dot())), "CPU without the interpreter"
    monkeypatch.setattr(_config, "interpreting", lambda: True)
    assert _triton.tma_reasons(x, w, _dot()), "auto: CPU tensors only with MOE_KERNELS_TRITON_TMA=1"
    monkeypatch.setenv(_triton.TMA_ENV, "1")
    assert _triton.tma_reasons(x, w, _dot()) == []
    assert _triton.tma_reasons(x, w.transpose(1, 2), _dot()) == [], "dX's transposed view: W_T"
    assert _triton.tma_reasons(x, w, _dot(ieee=True)), "IEEE fp32 products"
    assert _triton.tma_reasons(torch.randn(8, 64, dtype=torch.float16)[:, ::2], w, _dot()), "x inner stride"
    assert _triton.tma_reasons(torch.randn(8, 33, dtype=torch.float16)[:, :32], w, _dot()), "x row stride 66 B"
    assert _triton.tma_reasons(x, torch.randn(2, 16, 33, dtype=torch.float16)[:, :, :32], _dot()), "w row stride"
    assert _triton.tma_reasons(x, torch.randn(2, 32, 64, dtype=torch.float16)[:, ::2, ::2], _dot()), "w strides"
    assert _triton.tma_reasons(torch.randn(8, 0, dtype=torch.float16), w[:, :, :0], _dot()), "KD = 0"
    assert _triton.tma_reasons(x, w[:0], _dot()), "E = 0"
    monkeypatch.setenv(_triton.TMA_ENV, "0")
    assert _triton.tma_reasons(x, w, _dot()) == [f"{_triton.TMA_ENV}=0"]
    monkeypatch.setenv(_triton.TMA_ENV, "yes")
    with pytest.raises(ValueError, match="auto, 0 or 1"):
        _triton.tma_reasons(x, w, _dot())


# ------------------------------------------------------------------ compiled for sm_90 (no GPU)
def _tma_cases():
    from bench.kernels import TMA_KINDS, config_id, gemm_configs

    cases = []
    for kind in TMA_KINDS:
        for dt, es in (("fp16", 2), ("bf16", 2), ("fp32", 4)):
            configs = gemm_configs(kind, 90, es)
            for i, c in enumerate(configs if COMPILE_ALL else configs[:1]):
                cases.append(pytest.param(kind, dt, i, id=f"{kind}-{dt}-{config_id(c)}"))
    return cases


@not_in_child
@pytest.mark.parametrize("kind,dt,index", _tma_cases())
def test_compiles_for_sm90_with_tma(kind, dt, index, tmp_path):
    from bench.kernels import SHARED_LIMIT, analyze_cubin, compile_kernel, find_cuobjdump, gemm_configs, gemm_signature

    cfg = gemm_configs(kind, 90, 4 if dt == "fp32" else 2)[index]
    fn, sig, const, div = gemm_signature(kind, dt)
    const.update(INPUT_PRECISION="tf32", DOT_FP32=False, **cfg.kwargs)
    kernel = compile_kernel(fn, 90, sig, const, div, cfg.num_warps, cfg.num_stages)
    assert kernel.metadata.shared <= SHARED_LIMIT[90], kernel.metadata.shared
    assert "wgmma" in kernel.asm["ptx"]
    assert "cp.async.bulk.tensor" in kernel.asm["ptx"], "operands not loaded by TMA"
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump: the SASS checks need one (the PTX checks ran)")
    path = tmp_path / "k.cubin"
    path.write_bytes(kernel.asm["cubin"])
    r = analyze_cubin(str(path), cuobjdump)
    assert r["tma"] > 0 and r["wgmma"] > 0, r
    assert r["n_spills"] == 0 and r["n_regs"] <= 255, r

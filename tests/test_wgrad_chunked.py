"""The weight gradient over row chunks (``kernels/grouped_mm_chunked.py``) without a GPU.

- ``wgrad_chunk``'s decision from the shapes alone, and what the launcher would launch
  (recorders in place of the kernels): the grid, the workspace, the table and sum kernels.
- Under Triton's interpreter (a ``TRITON_INTERPRET=1`` child of ``test_chunked_interpreter_suite``),
  with a forced chunk size: dW and the bias gradient against the reference with one expert
  taking every row, skewed dropless, empty experts, every row dropped (all padding), chunk
  boundaries inside and at BLOCK_M steps, G > 1-style runs, GELU on the operand; bitwise from
  run to run; and an expert of one chunk bitwise equal to the unchunked kernel (same rows in
  the same order), fp32 and fp16.
The compile checks (every weight-gradient config, sm_80 and sm_90, no spills) are
``python -m bench.kernels`` records ``grouped_mm_weight_grad_chunked*`` (tests/test_triton_compile.py
runs its CLI) and ``test_chunked_compiles`` below.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from moe_kernels.kernels import grouped_mm as gm  # noqa: E402
from moe_kernels.ops import _triton  # noqa: E402
from tests.test_autotune import Recorder  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
in_child = pytest.mark.skipif(not INTERPRET, reason="runs in the interpreter child")
not_in_child = pytest.mark.skipif(INTERPRET, reason="runs in the parent process")
H100_SHARED = 232448


@not_in_child
def test_chunked_interpreter_suite():
    """This module's interpreter cases in a child process (~20 s on one core)."""
    env = dict(os.environ, TRITON_INTERPRET="1", MOE_KERNELS_BACKEND="triton")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout[-6000:] + "\n" + proc.stderr[-3000:]).strip()
    assert proc.returncode == 0, f"interpreter run failed after {time.perf_counter() - start:.0f}s:\n{tail}"
    assert " passed" in proc.stdout, tail


# ------------------------------------------------------------------ the decision and the launch
@not_in_child
def test_wgrad_chunk_decision():
    cfgs = [gm._cfg(64, 128, 128, 8, 3)]  # 1 tile for N = KD = 128
    # one expert: no skew possible (the row split serves small grids)
    assert _triton.wgrad_chunk(100_000, 128, 128, 1, cfgs, 132) == 0
    # enough dW tiles per expert for two waves: no chunks
    assert _triton.wgrad_chunk(100_000, 128 * 24, 128 * 12, 8, cfgs, 132) == 0
    # rows too few for a chunk of CHUNK_MIN_ROWS to cut anything
    assert _triton.wgrad_chunk(_triton.CHUNK_MIN_ROWS, 128, 128, 8, cfgs, 132) == 0
    # CH = M * tiles / (2 * SMs), aligned: one expert holding every row gets >= 2 waves
    M = 1_000_000
    ch = _triton.wgrad_chunk(M, 128, 128, 8, cfgs, 132)
    assert ch % _triton.CHUNK_ALIGN == 0 and ch >= _triton.CHUNK_MIN_ROWS
    assert triton.cdiv(M, ch) * 1 >= 250  # 2 x 132 less the rounding up of CH
    # at least CHUNK_MIN_ROWS rows
    assert _triton.wgrad_chunk(20_000, 128, 128, 8, cfgs, 132) == _triton.CHUNK_MIN_ROWS
    # the workspace (2 * cdiv(M, CH) slots of N*KD + N fp32) stays within the budget
    N, KD = 1024, 512  # 32 tiles per expert
    ch = _triton.wgrad_chunk(M, N, KD, 8, cfgs, 132)
    assert 2 * triton.cdiv(M, ch) * (N * KD + N) * 4 <= _triton.SPLIT_WORKSPACE_BYTES


@not_in_child
def test_chunked_launch(monkeypatch):
    """A V-MoE-B-like fc1 weight gradient in fp16 with a bias (N=3072, KD=768, E=8,
    M=65536): 144 dW tiles per expert for the first candidate, fewer than 2 x 132, so the
    rows are chunked; the grid is (bias + dW tiles, cdiv(M, CH) + E) for every candidate."""
    rec = {name: (Recorder(), Recorder()) for name in _triton.GEMM_KERNELS}
    patched = {name: (rec[name][0], rec[name][1], c) for name, (_, _, c) in _triton.GEMM_KERNELS.items()}
    monkeypatch.setattr(_triton, "GEMM_KERNELS", patched)
    table, sums = Recorder(), Recorder()
    monkeypatch.setattr(_triton, "CHUNK_TABLE_KERNEL", table)
    monkeypatch.setattr(_triton, "CHUNK_SUM_KERNEL", sums)
    monkeypatch.setattr(gm, "_device_max_shared", lambda: H100_SHARED)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("MOE_KERNELS_TRITON_CONFIG", "autotune")
    M, KD, N, E = 65536, 768, 3072, 8
    x = torch.empty(1, KD, dtype=torch.float16).expand(M, KD)  # nothing runs: no memory needed
    g = torch.empty(1, N, dtype=torch.float16).expand(M, N)
    offsets = torch.tensor([0, M, M, M, M, M, M, M, M])
    dw, db = _triton.grouped_mm_weight_grad_fused(x, g, offsets, None, True, True)
    assert dw.shape == (E, N, KD) and db.shape == (E, N)
    assert not rec["grouped_mm_weight_grad"][0].calls and not rec["grouped_mm_weight_grad_split"][0].calls
    ((grid_fn, args, kwargs),) = rec["grouped_mm_weight_grad_chunked"][0].calls
    fitting = gm.prune_configs(gm.wgrad_configs(False), 2, H100_SHARED, wgrad=True)
    ch = _triton.wgrad_chunk(M, N, KD, E, fitting, 132)
    assert ch > 0
    nch = triton.cdiv(M, ch) + E
    for c in fitting:
        n_tiles = triton.cdiv(N, c.kwargs["BLOCK_N"])
        grid = grid_fn(c.kwargs)
        assert grid == (n_tiles + n_tiles * triton.cdiv(KD, c.kwargs["BLOCK_K"]), nch)
        # one expert with every row: at least two waves of dW programs
        assert (grid[0] - n_tiles) * triton.cdiv(M, ch) >= 2 * 132, (c, grid, ch)
    ws, dbws, sched = args[4], args[5], args[6]
    assert ws.dtype == torch.float32 and ws.shape == (2 * triton.cdiv(M, ch), N, KD)
    assert dbws.shape == (2 * triton.cdiv(M, ch), N) and sched.shape == (nch, 4)
    assert ws.numel() * 4 + dbws.numel() * 4 <= _triton.SPLIT_WORKSPACE_BYTES
    assert kwargs["HAS_DB"] is True
    ((tgrid, targs, _),) = table.calls
    assert tgrid == (nch,) and targs[1] is sched and targs[5] == ch
    assert len(sums.calls) == 2 and sums.calls[0][1][1] is dw and sums.calls[1][1][1] is db
    assert sums.calls[0][0] == (_triton.CHUNK_SUM_PROGRAMS, E)


@not_in_child
@pytest.mark.parametrize("cc", [80, 90], ids=["sm80", "sm90"])
def test_chunked_compiles(cc):
    """The first config of each family (all of them: ``python -m bench.kernels``) compiles
    without spills, with the target's tensor-core instruction."""
    from bench.kernels import aot_records, find_cuobjdump

    recs = aot_records(cc, dtypes=("bf16", "fp32"), kinds=("weight_grad_chunked",), limit=1)
    assert {r["kernel"] for r in recs} == {
        "grouped_mm_weight_grad_chunked", "grouped_mm_chunk_sum", "grouped_mm_chunk_table"}  # fmt: skip
    if find_cuobjdump() is None:
        pytest.skip("no cuobjdump")
    for r in recs:
        assert r["n_spills"] == 0 and r["n_regs"] <= 255, r
        if r["kernel"] == "grouped_mm_weight_grad_chunked" and r["dtype"] == "bf16":
            assert (r["wgmma"] if cc == 90 else r["mma"]) > 0, r


# ------------------------------------------------------------------ under the interpreter
DTYPES = {"f32": (torch.float32, 1e-4), "f16": (torch.float16, 2e-2)}

# (expert sizes, padding rows, chunk rows, what it covers); the interpreter's BLOCK_M is 32.
CASES = [
    ([0, 150, 0], 0, 64, "one expert takes every row, chunks of two BLOCK_M steps"),
    ([3, 150, 0, 40], 5, 64, "skewed dropless, an empty expert, padding"),
    ([1, 2, 130, 3], 0, 32, "skewed, chunks of one step"),
    ([0, 0, 0], 20, 64, "every assignment dropped: all padding"),
    ([64, 64, 65], 0, 64, "chunk boundaries at expert ends; the last expert has two chunks"),
    ([24, 24, 24], 0, 96, "runs of a capacity buffer: every expert one chunk"),
]


def _reference(x, g, offsets, act):
    E = offsets.shape[0] - 1
    xa = torch.nn.functional.gelu(x.double()) if act else x.double()
    dw = torch.stack([g[offsets[e] : offsets[e + 1]].double().T @ xa[offsets[e] : offsets[e + 1]] for e in range(E)])
    db = torch.stack([g[offsets[e] : offsets[e + 1]].double().sum(0) for e in range(E)])
    return dw, db


@in_child
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("sizes,pad,chunk,why", CASES, ids=[c[3] for c in CASES])
def test_chunked_against_reference(sizes, pad, chunk, why, dt, monkeypatch):
    # 3 programs of 128-element blocks: each partial-sum program loops over several blocks
    monkeypatch.setattr(_triton, "CHUNK_SUM_BLOCK", 128)
    monkeypatch.setattr(_triton, "CHUNK_SUM_PROGRAMS", 3)
    dtype, tol = DTYPES[dt]
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    M = int(offsets[-1]) + pad
    x, g = torch.randn(M, 40).to(dtype), torch.randn(M, 24).to(dtype)
    for act in (None, "none"):
        dw, db = _triton.grouped_mm_weight_grad_fused(x, g, offsets, act, True, True, chunk=chunk)
        rdw, rdb = _reference(x, g, offsets, act)
        scale = max(1.0, float(rdw.abs().max()))
        torch.testing.assert_close(dw.double(), rdw, atol=tol * scale, rtol=tol)
        torch.testing.assert_close(db.double(), rdb, atol=tol * scale, rtol=tol)
        again = _triton.grouped_mm_weight_grad_fused(x, g, offsets, act, True, True, chunk=chunk)
        assert torch.equal(dw, again[0]) and torch.equal(db, again[1]), "run to run"
    only_dw = _triton.grouped_mm_weight_grad(x, g, offsets, chunk=chunk)
    assert torch.equal(only_dw, _triton.grouped_mm_weight_grad_fused(x, g, offsets, None, True, False, chunk=chunk)[0])
    _, only_db = _triton.grouped_mm_weight_grad_fused(x, g, offsets, None, False, True, chunk=chunk)
    torch.testing.assert_close(only_db.double(), _reference(x, g, offsets, None)[1], atol=tol * 10, rtol=tol)
    # An expert of one chunk reduces its rows as the unchunked kernel does: the same bits.
    plain = _triton.grouped_mm_weight_grad(x, g, offsets, split=1)
    for e, n in enumerate(sizes):
        if 0 < n <= chunk:
            assert torch.equal(only_dw[e], plain[e]), f"expert {e} ({n} rows)"

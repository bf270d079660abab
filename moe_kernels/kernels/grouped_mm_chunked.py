"""The weight gradient over fixed row chunks: a skewed expert is no tail.

The unsplit weight gradient gives each (dW tile, expert) program all of the expert's rows, so
when one expert holds most rows its few programs run long after the others finish; when the
dW tiles of one expert cannot fill the device (``tiles < 2 * NUM_SMS``) that is a tail. Here
the reduction is cut into chunks of at most CH rows, laid out like the forward's tile schedule
(``grouped_mm._tile_of``) with CH in place of BLOCK_M: each expert's rows from its first row
into CH-row chunks, numbered expert after expert, at most ``cdiv(M, CH) + E`` of them (a static
grid, no host sync). No program reduces more than CH rows, whatever the routing.

An expert with one chunk (at most CH rows: every expert when the load is balanced) has its dW
tile rounded and stored by that chunk's program, as the unsplit kernel does. The chunks of an
expert with more rows store fp32 partial sums in a workspace slot each (slots numbered over
the multi-chunk experts' chunks; fewer than ``2 * cdiv(M, CH)``, since each such expert has
more than CH rows), and ``_chunk_sum_kernel`` adds them in chunk order and rounds once (and
writes the zeros of experts without rows). No atomics: the bits depend on the shapes, CH and
the config, never on timing.

Shape letters: M rows, KD reduction width of the forward (dW's columns), N output width
(dW's rows), E experts, CH rows per chunk.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_kernels.kernels.grouped_mm import _WGRAD_ALL, SCHED_LANES, _max_combine, _prune_wgrad, _row_sums, _wgrad_tile


@triton.jit
def _expert_bounds(Off_ptr, M, E, c0, low):
    """Experts ``i = c0 + lanes``: clamped, non-decreasing row ranges ``[lo, hi)`` (as
    ``_tile_of`` makes them: GPU offsets are not validated on the host), given ``low``, the
    end of the experts before c0."""
    i = c0 + tl.arange(0, SCHED_LANES)
    lo = tl.minimum(tl.maximum(tl.load(Off_ptr + i, mask=(i < E) & (i > 0), other=0), 0), M)
    lo = tl.maximum(tl.associative_scan(lo, 0, _max_combine), low)
    hi = tl.minimum(tl.maximum(tl.load(Off_ptr + i + 1, mask=i < E, other=0), 0), M)
    return i, lo, tl.maximum(hi, lo)


@triton.jit
def _chunk_of(Off_ptr, M, E, t, e_query, CH):
    """Chunk ``t`` of the schedule -> (expert, first row, stop row, the expert's chunk count,
    its workspace slot), expert E when t is past the last chunk; and for expert ``e_query``
    (-1: none) its chunk count and first slot."""
    before = t.to(tl.int64) * 0  # chunks of the experts already scanned
    low = before
    slots = before  # workspace slots of the multi-chunk experts already scanned
    found = t * 0
    seg = t * 0
    first = before
    stop = before
    count = before
    slot = before
    q_count = before
    q_slot = before
    for c0 in range(0, E, SCHED_LANES):
        i, lo, hi = _expert_bounds(Off_ptr, M, E, c0, low)
        n = tl.where(i < E, tl.cdiv(hi - lo, CH), 0)
        incl = tl.cumsum(n, 0) + before
        multi = tl.where(n > 1, n, 0)
        slot0 = tl.cumsum(multi, 0) + slots - multi  # the expert's first slot
        j = t - (incl - n)  # the chunk's index within its expert
        mine = (j >= 0) & (t < incl)
        found += tl.sum(mine.to(tl.int32), 0)
        seg += tl.sum(tl.where(mine, i, 0), 0)
        first += tl.sum(tl.where(mine, lo + j * CH, 0), 0)
        stop += tl.sum(tl.where(mine, tl.minimum(lo + (j + 1) * CH, hi), 0), 0)
        count += tl.sum(tl.where(mine, n, 0), 0)
        slot += tl.sum(tl.where(mine, slot0 + j, 0), 0)
        q_count += tl.sum(tl.where(i == e_query, n, 0), 0)
        q_slot += tl.sum(tl.where(i == e_query, slot0, 0), 0)
        before += tl.sum(n, 0)
        slots += tl.sum(multi, 0)
        low = tl.max(hi, 0)
    seg = tl.where(found > 0, seg, E)
    return seg, first, stop, count, slot, q_count, q_slot


@triton.jit
def _chunk_table_kernel(Off_ptr, Sched_ptr, Exp_ptr, M, E, CH):
    """Grid ``(cdiv(M, CH) + E,)``: program t writes chunk t's ``(expert, first row, stop row,
    slot)`` to sched[t] ([NCH, 4] int64; slot -1 when the expert has one chunk, whose programs
    then round into dw directly; expert E past the last chunk) and, for t < E, expert t's
    ``(chunk count, first slot)`` to exp[t] ([E, 2] int64). The scan runs once per chunk here
    rather than in every GEMM program: inside the GEMM kernel it made ptxas spill (fp32/IEEE
    64x64x64 with 8 warps on sm_80: 32 registers and 928 spill words)."""
    t = tl.program_id(0)
    e, first, stop, count, slot, q_count, q_slot = _chunk_of(Off_ptr, M, E, t, t, CH)
    row = Sched_ptr + t.to(tl.int64) * 4
    tl.store(row, e.to(tl.int64))
    tl.store(row + 1, first)
    tl.store(row + 2, stop)
    tl.store(row + 3, tl.where(count == 1, -1, slot))
    if t < E:
        tl.store(Exp_ptr + t.to(tl.int64) * 2, q_count)
        tl.store(Exp_ptr + t.to(tl.int64) * 2 + 1, q_slot)


@triton.jit
def _grouped_mm_weight_grad_chunked_kernel(
    X_ptr,
    G_ptr,
    DW_ptr,
    DB_ptr,
    WS_ptr,
    DBWS_ptr,
    Sched_ptr,
    M,
    N,
    KD,
    E,
    M_BUCKET,
    stride_xm,
    stride_xk,
    stride_gm,
    stride_gn,
    ACT: tl.constexpr,
    HAS_DB: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Grid ``(B + T, NCH)`` with B = ``cdiv(N, BLOCK_N)`` bias tiles (0 without HAS_DB),
    T = ``cdiv(N, BLOCK_N) * cdiv(KD, BLOCK_K)`` dW tiles (0 for KD = 0) and NCH =
    ``cdiv(M, CH) + E`` chunks. Program (B + t, c) owns the [BLOCK_N, BLOCK_K] tile t of
    g[rows].T @ act(x[rows]) over the rows of chunk c (sched[c] from ``_chunk_table_kernel``:
    at most CH rows of one expert e, BLOCK_M rows a step in row order); program (b < B, c) the
    [BLOCK_N] tile b of the sum of g over them. When e has one chunk the tile is rounded into
    dw[e] ([E, N, KD], contiguous) or db[e] ([E, N], contiguous), else stored in fp32 to the
    chunk's slot of ws ([slots, N, KD]) or dbws ([slots, N]) for ``_chunk_sum_kernel``. Chunks
    past the last do nothing. ``M`` and ``M_BUCKET`` are read only by the autotuner's key.
    """
    pid = tl.program_id(0)
    c = tl.program_id(1)
    if HAS_DB:
        num_db = tl.cdiv(N, BLOCK_N)
        if pid < num_db:
            _chunk_db_program(G_ptr, DB_ptr, DBWS_ptr, Sched_ptr, pid, c, N, E, stride_gm, stride_gn, BLOCK_M,
                              BLOCK_N)  # fmt: skip
        else:
            _chunk_dw_program(X_ptr, G_ptr, DW_ptr, WS_ptr, Sched_ptr, pid - num_db, c, N, KD, E, stride_xm,
                              stride_xk, stride_gm, stride_gn, ACT, INPUT_PRECISION, DOT_FP32, BLOCK_M, BLOCK_N,
                              BLOCK_K)  # fmt: skip
    else:
        _chunk_dw_program(X_ptr, G_ptr, DW_ptr, WS_ptr, Sched_ptr, pid, c, N, KD, E, stride_xm, stride_xk, stride_gm,
                          stride_gn, ACT, INPUT_PRECISION, DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip


@triton.jit
def _sched_entry(Sched_ptr, c):
    """Chunk c's (expert, first row, stop row, slot) from the table."""
    row = Sched_ptr + c.to(tl.int64) * 4
    return tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)


@triton.jit
def _chunk_db_program(G_ptr, DB_ptr, DBWS_ptr, Sched_ptr, pid, c, N, E, stride_gm, stride_gn, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):  # fmt: skip
    """Bias tile ``pid`` of chunk c: the chunk's column sums of g, into db[e] or its slot."""
    e, first, stop, slot = _sched_entry(Sched_ptr, c)
    if e < E:
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        db = _row_sums(G_ptr, first, stop, rn, n_ok, stride_gm, stride_gn, BLOCK_M, BLOCK_N)
        if slot < 0:
            tl.store(DB_ptr + e * N + rn, db.to(DB_ptr.dtype.element_ty), mask=n_ok)
        else:
            tl.store(DBWS_ptr + slot * N + rn, db, mask=n_ok)


@triton.jit
def _chunk_dw_program(X_ptr, G_ptr, DW_ptr, WS_ptr, Sched_ptr, t, c, N, KD, E, stride_xm, stride_xk, stride_gm,
                      stride_gn, ACT: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """dW tile ``t`` of chunk c: rounded into dw[e] when e has one chunk, else fp32 into its slot."""
    e, first, stop, slot = _sched_entry(Sched_ptr, c)
    if e < E:
        num_k = tl.cdiv(KD, BLOCK_K)
        rn = (t // num_k) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = (t % num_k) * BLOCK_K + tl.arange(0, BLOCK_K)
        n_ok = rn < N
        k_ok = rk < KD
        acc = _wgrad_tile(X_ptr, G_ptr, first, stop, rn, rk, n_ok, k_ok, stride_xm, stride_xk, stride_gm, stride_gn,
                          ACT, INPUT_PRECISION, DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
        tile = rn[:, None].to(tl.int64) * KD + rk[None, :]
        ok = n_ok[:, None] & k_ok[None, :]
        if slot < 0:
            tl.store(DW_ptr + e * N * KD + tile, acc.to(DW_ptr.dtype.element_ty), mask=ok)
        else:
            tl.store(WS_ptr + slot * N * KD + tile, acc, mask=ok)


@triton.jit
def _chunk_sum_kernel(WS_ptr, Out_ptr, Exp_ptr, NUMEL, BLOCK: tl.constexpr):
    """Grid ``(P, E)``: program (p, e) owns the BLOCK-element blocks p, p + P, ... of out[e]
    (out [E, NUMEL], contiguous): when expert e has several chunks, the sum of their fp32
    partials ws[slot0], ws[slot0 + 1], ... (ws [slots, NUMEL]) in that order, rounded once;
    zeros when it has no rows; nothing when it has one chunk (its programs stored it). Expert
    e's chunk count and first slot are exp[e] ([E, 2], ``_chunk_table_kernel``). P is small
    (the launcher's CHUNK_SUM_PROGRAMS at most): with a balanced load every expert has one
    chunk and every program exits at once."""
    e = tl.program_id(1).to(tl.int64)
    count = tl.load(Exp_ptr + e * 2)
    slot0 = tl.load(Exp_ptr + e * 2 + 1)
    if count != 1:
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in range(tl.program_id(0).to(tl.int64) * BLOCK, NUMEL, step):
            offs = start + tl.arange(0, BLOCK)
            ok = offs < NUMEL
            acc = tl.zeros((BLOCK,), dtype=tl.float32)
            for s in range(0, count.to(tl.int32)):
                acc += tl.load(WS_ptr + (slot0 + s) * NUMEL + offs, mask=ok, other=0.0)
            tl.store(Out_ptr + e * NUMEL + offs, acc.to(Out_ptr.dtype.element_ty), mask=ok)


# The weight gradient's candidates and pruning (every family; the launch's dtype, precision and
# activation pick one). CH follows M, so the key's M_BUCKET covers it.
grouped_mm_weight_grad_chunked_kernel = triton.autotune(
    configs=_WGRAD_ALL,
    key=["M_BUCKET", "N", "KD", "INPUT_PRECISION", "ACT", "HAS_DB"],
    prune_configs_by={"early_config_prune": _prune_wgrad},
)(_grouped_mm_weight_grad_chunked_kernel)

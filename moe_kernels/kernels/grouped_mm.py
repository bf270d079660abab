"""Grouped GEMM: one matmul per expert over the row ranges ``offsets[e]:offsets[e+1]``.

The forward cuts each expert's rows (and the padding rows past offsets[E]) into BLOCK_M-row
tiles from the expert's first row; each program finds its tile from the offsets on the device
(``_tile_of``: a vector scan, no binary search), over a static worst-case grid of
``cdiv(M, BLOCK_M) + E`` tiles per column block. So no tile straddles two experts, the host
needs no knowledge of the group sizes (no sync), and the dropless layout and the padded
``[E, G*C]`` buffer are served alike. dX is this same kernel with each expert's matrix
transposed (a strided view: every operand is read through its strides). The weight gradient
reduces over each expert's rows, split over rows when its grid is small (the router).

DOT_FP32 upcasts the operands before ``tl.dot``; launchers set it only under the interpreter,
whose bf16 ``tl.dot`` is wrong (its loads, stores and fp32 math are right), so bf16 inputs
give right answers there too. On a GPU it is False and bf16/fp16 go to the tensor cores.

Shape letters: M rows, KD reduction width, N output width, E experts.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_kernels.kernels._config import autotune_configs, interpreting


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int, group_m: int = 8) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m}, num_warps=warps, num_stages=stages
    )


# Candidates follow Triton's matmul tutorial and ScatterMoE: BLOCK_M >= 64 with 4/8 warps is
# what makes Triton emit wgmma on sm_90 (checked in tests/test_triton_compile.py); the small
# tiles serve narrow layers and experts with few rows. None spills registers on sm_80 or sm_90
# (read from the cubins, tested): 128x256x64 (8 warps) kept 40-180 spill words and 64x128x64
# with 4 warps 12 on sm_80, so they are gone. The first is what MOE_KERNELS_TRITON_CONFIG=first
# pins: 128x128x64, 8 warps, 4 stages (128 KiB of shared memory on sm_90, 96 KiB on sm_80).
GROUPED_MM_CONFIGS = autotune_configs(
    [
        _cfg(128, 128, 64, 8, 4),
        _cfg(128, 128, 64, 8, 3),
        _cfg(128, 64, 64, 4, 4),
        _cfg(64, 128, 64, 8, 4),
        _cfg(64, 64, 64, 4, 3),
        _cfg(64, 32, 32, 4, 4),
    ],
    interpret=_cfg(32, 32, 32, 4, 1, group_m=2),
)

# fp32 with IEEE products (the router's logits and their dX; fp32 without TF32): tl.dot lowers
# to FMAs and the list above spills (sm_80 64x64x64: 154 words, sm_90 128x64x64: 34; read from
# the SASS). These spill on neither sm_80 nor sm_90, forward or dX (tests/test_triton_compile.py).
GROUPED_MM_IEEE_CONFIGS = autotune_configs(
    [
        _cfg(64, 128, 32, 8, 3),
        _cfg(64, 32, 32, 4, 4),
        _cfg(32, 64, 32, 4, 3),
    ],
    interpret=GROUPED_MM_CONFIGS[0],
)

# Weight gradient: the tile is [BLOCK_N, BLOCK_K] of dW and BLOCK_M rows are reduced per step.
GROUPED_MM_WGRAD_CONFIGS = autotune_configs(
    [
        _cfg(64, 128, 128, 8, 3),
        _cfg(64, 128, 64, 4, 3),
        _cfg(32, 64, 128, 4, 4),
        _cfg(64, 64, 64, 4, 3),
        _cfg(32, 64, 64, 4, 4),
    ],
    interpret=_cfg(32, 32, 32, 4, 1),
)


# fp32 with IEEE products (the router's GEMMs; fp32 training without TF32) lowers tl.dot to
# FMAs, which hold far more per thread than tensor-core tiles: on sm_80 the list above spills
# (64x128x64/4 warps 1868 words, 64x64x64/4 warps 6, 32x64x128 18, 32x64x64/4 warps 52 in
# the unsplit kernel; read from the SASS). These spill on neither sm_80 nor sm_90, split or
# not (tests/test_triton_compile.py).
GROUPED_MM_WGRAD_IEEE_CONFIGS = autotune_configs(
    [
        _cfg(64, 64, 64, 8, 3),
        _cfg(32, 64, 32, 4, 3),
        _cfg(32, 32, 64, 4, 3),
    ],
    interpret=GROUPED_MM_WGRAD_CONFIGS[0],
)


def fwd_configs(ieee_fp32: bool) -> list:
    """The forward/dX candidates for fp32 with IEEE products, or for everything else."""
    return GROUPED_MM_IEEE_CONFIGS if ieee_fp32 else GROUPED_MM_CONFIGS


def wgrad_configs(ieee_fp32: bool) -> list:
    """The weight-gradient candidates for fp32 with IEEE products, or for everything else."""
    return GROUPED_MM_WGRAD_IEEE_CONFIGS if ieee_fp32 else GROUPED_MM_WGRAD_CONFIGS


def smem_estimate(cfg: triton.Config, elem_size: int, wgrad: bool = False) -> int:
    """Bytes of shared memory the software pipeline needs for the two operand tiles."""
    bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    per_stage = (bn * bm + bm * bk) if wgrad else (bm * bk + bk * bn)
    return per_stage * elem_size * max(cfg.num_stages, 1)


def prune_configs(configs: list, elem_size: int, max_shared: int, wgrad: bool = False) -> list:
    """The configs whose operand tiles fit ``max_shared`` bytes (fp32 needs twice fp16's)."""
    kept = [c for c in configs if smem_estimate(c, elem_size, wgrad) <= max_shared]
    return kept or [min(configs, key=lambda c: smem_estimate(c, elem_size, wgrad))]


def _device_max_shared() -> int:
    driver = triton.runtime.driver.active
    return driver.utils.get_device_properties(driver.get_current_device())["max_shared_mem"]


def _prune_fwd(configs, named_args, **kwargs):
    elem_size = named_args["X_ptr"].element_size()
    family = fwd_configs(elem_size == 4 and kwargs.get("INPUT_PRECISION") == "ieee")
    return prune_configs([c for c in configs if c in family], elem_size, _device_max_shared())


def _prune_wgrad(configs, named_args, **kwargs):
    elem_size = named_args["X_ptr"].element_size()
    family = wgrad_configs(elem_size == 4 and kwargs.get("INPUT_PRECISION") == "ieee")
    return prune_configs([c for c in configs if c in family], elem_size, _device_max_shared(), wgrad=True)


# Lanes of the tile schedule's scan: the segment boundaries are read this many at a time (one
# pass for up to 127 experts), as one vector load instead of a chain of dependent loads.
SCHED_LANES = tl.constexpr(128)


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _tile_of(Off_ptr, M, E, t, BLOCK_M: tl.constexpr):
    """Tile ``t`` of the forward's schedule -> (segment, first row, segment end).

    The rows are E+1 segments: expert e's ``[offsets[e], offsets[e+1])`` for e < E and the
    padding rows ``[offsets[E], M)`` as segment E. Each segment is cut into BLOCK_M-row tiles
    from its own first row, numbered segment after segment, so no tile straddles two
    segments; there are at most ``cdiv(M, BLOCK_M) + E`` of them. A ``t`` past the last tile
    gives segment E+1 (nothing to do). GPU offsets are not validated on the host (that would
    be a sync), so offsets[0] is taken as 0 and the boundaries are clamped to [0, M] and made
    non-decreasing (a running max): whatever the offsets, the segments are disjoint and cover
    every row.
    """
    lanes = tl.arange(0, SCHED_LANES)
    before = t.to(tl.int64) * 0  # tiles of the chunks already scanned
    low = before  # the boundary where this chunk starts (running max of the offsets so far)
    found = t * 0
    seg = t * 0
    first = before
    end = before
    for c0 in range(0, E + 1, SCHED_LANES):
        i = c0 + lanes
        lo = tl.minimum(tl.maximum(tl.load(Off_ptr + i, mask=(i <= E) & (i > 0), other=0), 0), M)
        lo = tl.maximum(tl.associative_scan(lo, 0, _max_combine), low)
        hi = tl.minimum(tl.maximum(tl.load(Off_ptr + i + 1, mask=i < E, other=M), 0), M)
        hi = tl.maximum(hi, lo)
        n = tl.where(i <= E, tl.cdiv(hi - lo, BLOCK_M), 0)
        incl = tl.cumsum(n, 0) + before
        mine = (incl - n <= t) & (t < incl)  # one lane of all chunks, or none
        found += tl.sum(mine.to(tl.int32), 0)
        seg += tl.sum(tl.where(mine, i, 0), 0)
        first += tl.sum(tl.where(mine, lo + (t - (incl - n)) * BLOCK_M, 0), 0)
        end += tl.sum(tl.where(mine, hi, 0), 0)
        before += tl.sum(n, 0)
        low = tl.max(hi, 0)
    seg = tl.where(found > 0, seg, E + 1)
    return seg, first, end


@triton.jit
def _grouped_mm_kernel(
    X_ptr,
    W_ptr,
    Y_ptr,
    Off_ptr,
    B_ptr,
    M,
    N,
    KD,
    E,
    M_BUCKET,
    stride_xm,
    stride_xk,
    stride_we,
    stride_wn,
    stride_wk,
    stride_ym,
    stride_yn,
    stride_be,
    stride_bn,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Grid ``((cdiv(M, BLOCK_M) + E) * cdiv(N, BLOCK_N),)``, the worst case of the tile
    schedule (``_tile_of``) per column block: each program owns the [BLOCK_M, BLOCK_N] tile
    of y [M, N] of one schedule entry, either up to BLOCK_M rows of one expert e,
    ``x [rows, KD] @ w[e] [N, KD].T (+ bias[e] [N] when HAS_BIAS)``, fp32 accumulation and
    bias add rounded once to y's dtype, or up to BLOCK_M padding rows (at or past
    offsets[E]), written as zeros without a K-loop. Entries past the schedule's used count
    exit at once. Every row is written by exactly one program, and a row's value depends only
    on its own expert's rows and tile position, not on the other experts' sizes or the
    padding. ``M_BUCKET`` (``_config.m_bucket(M)``) is read only by the autotuner's key.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M) + E
    num_n = tl.cdiv(N, BLOCK_N)
    # Column blocks of GROUP_M consecutive row tiles run together, so their w tiles stay in L2.
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows
    e, row0, row_end = _tile_of(Off_ptr, M, E, pid_m, BLOCK_M)

    rm64 = row0 + tl.arange(0, BLOCK_M).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    out_ok = (rm64 < row_end)[:, None] & n_ok[None, :]
    y_ptrs = Y_ptr + rm64[:, None] * stride_ym + rn[None, :].to(tl.int64) * stride_yn
    if e < E:
        in_e = rm64 < row_end
        x_ptrs = X_ptr + rm64[:, None] * stride_xm + rk[None, :] * stride_xk
        w_ptrs = W_ptr + e.to(tl.int64) * stride_we + rn[None, :].to(tl.int64) * stride_wn + rk[:, None] * stride_wk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, KD, BLOCK_K):
            k_ok = (k0 + rk) < KD
            a = tl.load(x_ptrs, mask=in_e[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if DOT_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        if HAS_BIAS:
            b_ptrs = B_ptr + e.to(tl.int64) * stride_be + rn * stride_bn
            acc += tl.load(b_ptrs, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(Y_ptr.dtype.element_ty), mask=out_ok)
    elif e == E:
        tl.store(y_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=Y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _wgrad_tile(
    X_ptr,
    G_ptr,
    row_first,
    row_end,
    rn,
    rk,
    n_ok,
    k_ok,
    stride_xm,
    stride_xk,
    stride_gm,
    stride_gn,
    INPUT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """g[rows].T @ x[rows] over rows [row_first, row_end), BLOCK_M rows a step in row order:
    the [BLOCK_N, BLOCK_K] fp32 accumulator both weight-gradient kernels share."""
    rm = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(row_first, row_end, BLOCK_M):
        rows = (m0 + rm).to(tl.int64)
        m_ok = rows < row_end
        g = tl.load(
            G_ptr + rows[None, :] * stride_gm + rn[:, None].to(tl.int64) * stride_gn,
            mask=n_ok[:, None] & m_ok[None, :],
            other=0.0,
        )
        x = tl.load(
            X_ptr + rows[:, None] * stride_xm + rk[None, :].to(tl.int64) * stride_xk,
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        if DOT_FP32:
            g = g.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(g, x, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _wgrad_coords(Off_ptr, pid, e, M, N, KD, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The dW tile of program ``pid`` (columns ``rn`` of N, ``rk`` of KD, with their masks) and
    expert e's rows ``[start, end)``, clamped to [0, M]: GPU offsets are not validated on the
    host (that would be a sync)."""
    num_k = tl.cdiv(KD, BLOCK_K)
    rn = (pid // num_k) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = (pid % num_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    start = tl.maximum(tl.load(Off_ptr + e), 0)
    end = tl.minimum(tl.load(Off_ptr + e + 1), M)
    return rn, rk, rn < N, rk < KD, start, end


@triton.jit
def _grouped_mm_weight_grad_kernel(
    X_ptr,
    G_ptr,
    DW_ptr,
    Off_ptr,
    M,
    N,
    KD,
    M_BUCKET,
    stride_xm,
    stride_xk,
    stride_gm,
    stride_gn,
    stride_we,
    stride_wn,
    stride_wk,
    INPUT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Grid ``(cdiv(N, BLOCK_N) * cdiv(KD, BLOCK_K), E)``: each program owns a [BLOCK_N, BLOCK_K]
    tile of dw[e] = g[rows of e].T @ x[rows of e] (dw [E, N, KD], g [M, N], x [M, KD]) and
    reduces over the expert's rows BLOCK_M at a time; experts without rows get zeros.
    ``M_BUCKET`` is read only by the autotuner's key.
    """
    pid = tl.program_id(0)
    e = tl.program_id(1)
    rn, rk, n_ok, k_ok, start, end = _wgrad_coords(Off_ptr, pid, e, M, N, KD, BLOCK_N, BLOCK_K)
    acc = _wgrad_tile(X_ptr, G_ptr, start, end, rn, rk, n_ok, k_ok, stride_xm, stride_xk, stride_gm, stride_gn,
                      INPUT_PRECISION, DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    dw_ptrs = DW_ptr + e.to(tl.int64) * stride_we + rn[:, None].to(tl.int64) * stride_wn + rk[None, :] * stride_wk
    tl.store(dw_ptrs, acc.to(DW_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


@triton.jit
def _grouped_mm_weight_grad_split_kernel(
    X_ptr,
    G_ptr,
    WS_ptr,
    Off_ptr,
    M,
    N,
    KD,
    M_BUCKET,
    SPLIT,
    stride_xm,
    stride_xk,
    stride_gm,
    stride_gn,
    stride_ws,
    stride_we,
    stride_wn,
    INPUT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Grid ``(cdiv(N, BLOCK_N) * cdiv(KD, BLOCK_K), E, SPLIT)``: the weight gradient split over
    rows (split-K over M) for grids too small to fill the GPU (the router: E=1, N=32). Program
    (tile, e, s) owns the [BLOCK_N, BLOCK_K] tile of the fp32 workspace ws[s, e] (ws [SPLIT, E,
    N, KD], inner stride 1): g.T @ x over the s-th of SPLIT near-equal runs of whole BLOCK_M
    row blocks of expert e (block b of the expert's nb goes to the split s with
    s*nb//SPLIT <= b < (s+1)*nb//SPLIT). Blocks start at the expert's first row, as in the
    unsplit kernel; a split without rows writes zeros. ``_split_sum_kernel`` then adds the
    SPLIT partial sums in split order: no atomics, so the bits depend on the shapes and the
    config, never on timing. ``M_BUCKET`` and ``SPLIT`` are read by the autotuner's key too.
    """
    pid = tl.program_id(0)
    e = tl.program_id(1)
    s = tl.program_id(2)
    rn, rk, n_ok, k_ok, start, end = _wgrad_coords(Off_ptr, pid, e, M, N, KD, BLOCK_N, BLOCK_K)
    blocks = tl.cdiv(tl.maximum(end - start, 0), BLOCK_M)
    first = start + (s * blocks // SPLIT) * BLOCK_M
    stop = tl.minimum(start + ((s + 1) * blocks // SPLIT) * BLOCK_M, end)
    acc = _wgrad_tile(X_ptr, G_ptr, first, stop, rn, rk, n_ok, k_ok, stride_xm, stride_xk, stride_gm, stride_gn,
                      INPUT_PRECISION, DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    ws_ptrs = (WS_ptr + s.to(tl.int64) * stride_ws + e.to(tl.int64) * stride_we
               + rn[:, None].to(tl.int64) * stride_wn + rk[None, :])  # fmt: skip
    tl.store(ws_ptrs, acc, mask=n_ok[:, None] & k_ok[None, :])


@triton.jit
def _split_sum_kernel(WS_ptr, Out_ptr, NUMEL, SPLIT, BLOCK: tl.constexpr):
    """Grid ``(cdiv(NUMEL, BLOCK),)``: each program owns BLOCK consecutive elements of out
    [NUMEL] = sum over s of ws[s] (ws [SPLIT, NUMEL] fp32, contiguous), added in the order
    s = 0, 1, ... in fp32 and rounded once to out's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < NUMEL
    ws_ptrs = WS_ptr + offs
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(0, SPLIT):
        acc += tl.load(ws_ptrs, mask=ok, other=0.0)
        ws_ptrs += NUMEL
    tl.store(Out_ptr + offs, acc.to(Out_ptr.dtype.element_ty), mask=ok)


def fitting_configs(configs: list, elem_size: int, wgrad: bool = False) -> list:
    """The candidates whose tiles fit the current device's shared memory (for pinning)."""
    return prune_configs(configs, elem_size, _device_max_shared(), wgrad=wgrad)


# The key buckets M (kernels/_config.py says why); tensor dtypes join the key by themselves.
grouped_mm_kernel = triton.autotune(
    # stride_wk is 1 for the forward and Din for dX (the transposed view): tuned separately.
    configs=GROUPED_MM_CONFIGS if interpreting() else GROUPED_MM_CONFIGS + GROUPED_MM_IEEE_CONFIGS,
    key=["M_BUCKET", "N", "KD", "stride_wk", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_fwd},
)(_grouped_mm_kernel)

# Both candidate families (as for the forward), the pruning keeps the one for the launch's
# dtype and precision (the interpreter has one config, which is both families).
_WGRAD_ALL = GROUPED_MM_WGRAD_CONFIGS if interpreting() else GROUPED_MM_WGRAD_CONFIGS + GROUPED_MM_WGRAD_IEEE_CONFIGS

grouped_mm_weight_grad_kernel = triton.autotune(
    configs=_WGRAD_ALL,
    key=["M_BUCKET", "N", "KD", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_wgrad},
)(_grouped_mm_weight_grad_kernel)

grouped_mm_weight_grad_split_kernel = triton.autotune(
    configs=_WGRAD_ALL,
    key=["M_BUCKET", "N", "KD", "INPUT_PRECISION", "SPLIT"],
    prune_configs_by={"early_config_prune": _prune_wgrad},
)(_grouped_mm_weight_grad_split_kernel)

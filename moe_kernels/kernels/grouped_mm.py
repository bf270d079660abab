"""Grouped GEMM: one matmul per expert over the row ranges ``offsets[e]:offsets[e+1]``.

The forward cuts each expert's rows (and the padding rows past offsets[E]) into BLOCK_M-row
tiles from the expert's first row; each program finds its tile from the offsets on the device
(``_tile_of``: a vector scan, no binary search), over a static worst-case grid of
``cdiv(M, BLOCK_M) + E`` tiles per column block. So no tile straddles two experts, the host
needs no knowledge of the group sizes (no sync), and the dropless layout and the padded
``[E, G*C]`` buffer are served alike. dX is this same kernel with each expert's matrix
transposed (a strided view: every operand is read through its strides). The weight gradient
reduces over each expert's rows, split over rows when its grid is small (the router).

Fused epilogues (the expert MLP's GELU, docs/triton.md): the forward can write
``act(x @ w.T + b)`` and keep the pre-activation (fc1 with GELU), or multiply by ``act'(h)``
(fc2's dX giving GELU's input gradient); the weight gradient can apply ``act`` to its x operand
as it loads it (fc2's dW from h) and sum the gradient's rows per expert (the bias gradient).
``ACT`` is ``ACT_NONE``, ``ACT_GELU`` (erf) or ``ACT_GELU_TANH``, computed in fp32 as torch does.

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


# The weight gradient applying GELU to x as it loads it (fc2's, from h): the values GELU works on
# are held in registers, which on sm_80 (mma.sync operands) and for IEEE products (FMA operands)
# are the tile's per-warp fragments, several times the tile. The lists above then spill: 64x128x64
# with 4 warps (bf16, tanh, sm_80: 4 words) and, for IEEE products, 64x64x64 with 8 warps (70-104
# words on sm_80 and sm_90; 64x64x32, 64x32x64, 32x64x64 spill too). These do not
# (tests/test_fused_gelu_compile.py); the IEEE ones use ~250 registers.
GROUPED_MM_WGRAD_ACT_CONFIGS = autotune_configs(
    [GROUPED_MM_WGRAD_CONFIGS[0], _cfg(64, 128, 64, 8, 3), *GROUPED_MM_WGRAD_CONFIGS[2:]],
    interpret=GROUPED_MM_WGRAD_CONFIGS[0],
)
GROUPED_MM_WGRAD_ACT_IEEE_CONFIGS = autotune_configs(
    GROUPED_MM_WGRAD_IEEE_CONFIGS[1:],
    interpret=GROUPED_MM_WGRAD_CONFIGS[0],
)


def fwd_configs(ieee_fp32: bool) -> list:
    """The forward/dX candidates for fp32 with IEEE products, or for everything else."""
    return GROUPED_MM_IEEE_CONFIGS if ieee_fp32 else GROUPED_MM_CONFIGS


def wgrad_configs(ieee_fp32: bool, act: bool = False) -> list:
    """The weight-gradient candidates for fp32 with IEEE products, or for everything else; with
    ``act``, those for GELU applied to x on load."""
    if act:
        return GROUPED_MM_WGRAD_ACT_IEEE_CONFIGS if ieee_fp32 else GROUPED_MM_WGRAD_ACT_CONFIGS
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
    family = wgrad_configs(elem_size == 4 and kwargs.get("INPUT_PRECISION") == "ieee", kwargs.get("ACT", 0) != 0)
    return prune_configs([c for c in configs if c in family], elem_size, _device_max_shared(), wgrad=True)


# Activations the GEMMs can fuse (the ``ACT`` constexpr): none, GELU with erf (torch's
# approximate="none") and GELU's tanh form (approximate="tanh"). Launchers pass ``.value``.
ACT_NONE, ACT_GELU, ACT_GELU_TANH = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
GELU_ACT = {"none": ACT_GELU.value, "tanh": ACT_GELU_TANH.value}

# The forward's epilogues (``EPILOGUE``): y = acc (+ bias); y = act(acc + bias), also writing the
# pre-activation acc + bias to AUX when ``EPI_ACT_SAVE`` (the backward needs it); y = acc *
# act'(AUX) (dX of act's input: AUX holds the pre-activation h).
EPI_NONE, EPI_ACT, EPI_ACT_SAVE, EPI_ACT_GRAD = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)

# torch's constants (aten/src/ATen/native/cpu/GeluKernel.cpp): 1/sqrt(2), 1/sqrt(2*pi),
# sqrt(2/pi) and the cubic term's coefficient. They multiply tensors from the right: under the
# interpreter ``constexpr * tensor`` stays a constexpr, which tl functions then reject.
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_TANH_BETA = tl.constexpr(0.7978845608028654)
_TANH_KAPPA = tl.constexpr(0.044715)


@triton.jit
def _tanh(u):
    # (1 - e^{-2|u|}) / (1 + e^{-2|u|}) with u's sign: the exponential never overflows, and the
    # same formula runs under the interpreter (no libdevice). Its absolute error (~1 ulp of 1)
    # is all GELU sees, since tanh enters as 1 + tanh.
    t = tl.exp(-2.0 * tl.maximum(u, -u))
    r = (1.0 - t) / (1.0 + t)
    return tl.where(u < 0, -r, r)


@triton.jit
def _act(x, ACT: tl.constexpr):
    """``act(x)`` of fp32 ``x``, GELU as torch's formulas."""
    if ACT == ACT_GELU:
        return 0.5 * x * (1.0 + tl.math.erf(x * _SQRT1_2))
    elif ACT == ACT_GELU_TANH:
        return 0.5 * x * (1.0 + _tanh((x + x * x * x * _TANH_KAPPA) * _TANH_BETA))
    else:
        return x


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    """``act'(x)`` of fp32 ``x`` (``ACT`` GELU or GELU tanh), as torch's gelu_backward."""
    if ACT == ACT_GELU:
        return 0.5 * (1.0 + tl.math.erf(x * _SQRT1_2)) + x * tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
    else:
        x_sq = x * x
        t = _tanh((x + x_sq * x * _TANH_KAPPA) * _TANH_BETA)
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _TANH_BETA * (1.0 + x_sq * (3.0 * _TANH_KAPPA))


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
def _act_epilogue(acc, rm64, rn, row_end, N, Y_ptr, AUX_ptr, stride_ym, stride_yn, stride_am, stride_an,
                  EPILOGUE: tl.constexpr, ACT: tl.constexpr):  # fmt: skip
    """Stores the fused epilogue of the fp32 tile ``acc`` (rows ``rm64`` up to ``row_end``,
    columns ``rn`` of N): act(p) to y and p to aux (``EPI_ACT``, ``EPI_ACT_SAVE``; p = acc
    rounded to y's dtype), or acc * act'(aux) to y (``EPI_ACT_GRAD``)."""
    ok = (rm64 < row_end)[:, None] & (rn < N)[None, :]
    y_ptrs = Y_ptr + rm64[:, None] * stride_ym + rn[None, :].to(tl.int64) * stride_yn
    aux_ptrs = AUX_ptr + rm64[:, None] * stride_am + rn[None, :].to(tl.int64) * stride_an
    if EPILOGUE == EPI_ACT_GRAD:
        h = tl.load(aux_ptrs, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (acc * _act_grad(h, ACT)).to(Y_ptr.dtype.element_ty), mask=ok)
    else:
        pre = acc.to(Y_ptr.dtype.element_ty)
        if EPILOGUE == EPI_ACT_SAVE:
            tl.store(aux_ptrs, pre, mask=ok)
        tl.store(y_ptrs, _act(pre.to(tl.float32), ACT).to(Y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _grouped_mm_kernel(
    X_ptr,
    W_ptr,
    Y_ptr,
    Off_ptr,
    B_ptr,
    AUX_ptr,
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
    stride_am,
    stride_an,
    HAS_BIAS: tl.constexpr,
    EPILOGUE: tl.constexpr,
    ACT: tl.constexpr,
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

    ``EPILOGUE`` (aux [M, N], same tile): ``EPI_ACT`` stores ``act(p)`` with p the rounded
    acc + bias, ``EPI_ACT_SAVE`` also stores p to aux (act is computed from the rounded p, as
    an unfused ``act(h)`` would be, so the backward's recomputation from aux matches);
    ``EPI_ACT_GRAD`` stores ``acc * act'(aux)`` rounded once. Padding rows are zeros in y and
    in a stored aux.
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
    # Where the output pointers are set up decides whether ptxas spills (read from the SASS):
    # before the K-loop for the plain store and for GELU' (set up after it, the fp32 32x64x32
    # dX on sm_80 and 64x32x32 with EPI_ACT_GRAD on sm_90 spilled), after it for GELU (fp32
    # 32x64x32 with EPI_ACT on sm_80 spilled with them live across the loop).
    early: tl.constexpr = EPILOGUE == EPI_NONE or EPILOGUE == EPI_ACT_GRAD
    if early:
        out_ok = (rm64 < row_end)[:, None] & n_ok[None, :]
        y_ptrs = Y_ptr + rm64[:, None] * stride_ym + rn[None, :].to(tl.int64) * stride_yn
        if EPILOGUE == EPI_ACT_GRAD:
            aux_ptrs = AUX_ptr + rm64[:, None] * stride_am + rn[None, :].to(tl.int64) * stride_an
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
        if EPILOGUE == EPI_NONE:
            tl.store(y_ptrs, acc.to(Y_ptr.dtype.element_ty), mask=out_ok)
        elif BLOCK_M * BLOCK_N >= 8192:
            # Half a tile at a time: GELU's temporaries (and the aux tile) for all of a
            # 128-wide tile spilled registers on sm_80 (tests/test_fused_gelu_compile.py).
            half: tl.constexpr = BLOCK_N // 2
            acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, half)), (0, 2, 1)))
            rn0 = pid_n * BLOCK_N + tl.arange(0, half)
            _act_epilogue(acc0, rm64, rn0, row_end, N, Y_ptr, AUX_ptr, stride_ym, stride_yn, stride_am, stride_an,
                          EPILOGUE, ACT)  # fmt: skip
            _act_epilogue(acc1, rm64, rn0 + half, row_end, N, Y_ptr, AUX_ptr, stride_ym, stride_yn, stride_am,
                          stride_an, EPILOGUE, ACT)  # fmt: skip
        elif EPILOGUE == EPI_ACT_GRAD:
            h = tl.load(aux_ptrs, mask=out_ok, other=0.0).to(tl.float32)
            tl.store(y_ptrs, (acc * _act_grad(h, ACT)).to(Y_ptr.dtype.element_ty), mask=out_ok)
        else:
            _act_epilogue(acc, rm64, rn, row_end, N, Y_ptr, AUX_ptr, stride_ym, stride_yn, stride_am, stride_an,
                          EPILOGUE, ACT)  # fmt: skip
    elif e == E:
        zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=Y_ptr.dtype.element_ty)
        if not early:
            out_ok = (rm64 < row_end)[:, None] & n_ok[None, :]
            y_ptrs = Y_ptr + rm64[:, None] * stride_ym + rn[None, :].to(tl.int64) * stride_yn
        tl.store(y_ptrs, zeros, mask=out_ok)
        if EPILOGUE == EPI_ACT_SAVE:
            tl.store(AUX_ptr + rm64[:, None] * stride_am + rn[None, :].to(tl.int64) * stride_an, zeros, mask=out_ok)


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
    ACT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """g[rows].T @ act(x[rows]) over rows [row_first, row_end), BLOCK_M rows a step in row
    order: the [BLOCK_N, BLOCK_K] fp32 accumulator both weight-gradient kernels share. act(x)
    is computed in fp32 and rounded to x's dtype before the product, as a materialised act(x)
    would be (act(0) = 0, so masked rows and columns stay out)."""
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
        if ACT != ACT_NONE:
            x = _act(x.to(tl.float32), ACT).to(X_ptr.dtype.element_ty)
        if DOT_FP32:
            g = g.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(g, x, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _row_sums(G_ptr, row_first, row_end, rn, n_ok, stride_gm, stride_gn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The [BLOCK_N] fp32 sums of g[rows, rn] over rows [row_first, row_end), BLOCK_M rows a
    step in row order (a fixed tree within a step): the bias gradient's tile."""
    rm = tl.arange(0, BLOCK_M)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(row_first, row_end, BLOCK_M):
        rows = (m0 + rm).to(tl.int64)
        g = tl.load(
            G_ptr + rows[:, None] * stride_gm + rn[None, :].to(tl.int64) * stride_gn,
            mask=(rows < row_end)[:, None] & n_ok[None, :],
            other=0.0,
        )
        db += tl.sum(g.to(tl.float32), axis=0)
    return db


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
    DB_ptr,
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
    stride_be,
    stride_bn,
    ACT: tl.constexpr,
    HAS_DB: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Grid ``(B + T, E)`` with B = ``cdiv(N, BLOCK_N)`` bias tiles (0 without HAS_DB) and
    T = ``cdiv(N, BLOCK_N) * cdiv(KD, BLOCK_K)`` dW tiles (0 for KD = 0: the bias alone).
    Program (B + t, e) owns a [BLOCK_N, BLOCK_K] tile of dw[e] = g[rows of e].T @ act(x[rows
    of e]) (dw [E, N, KD], g [M, N], x [M, KD]) and reduces over the expert's rows BLOCK_M at
    a time; program (b < B, e) owns the [BLOCK_N] tile b of db[e] = the sum of g over the
    expert's rows (the bias gradient, db [E, N]), in the same row order. Experts without rows
    get zeros. ``M_BUCKET`` is read only by the autotuner's key.
    """
    pid = tl.program_id(0)
    e = tl.program_id(1)
    if HAS_DB:
        num_db = tl.cdiv(N, BLOCK_N)
        if pid < num_db:
            rn, _, n_ok, _, start, end = _wgrad_coords(Off_ptr, pid, e, M, N, 1, BLOCK_N, BLOCK_K)
            db = _row_sums(G_ptr, start, end, rn, n_ok, stride_gm, stride_gn, BLOCK_M, BLOCK_N)
            tl.store(DB_ptr + e.to(tl.int64) * stride_be + rn * stride_bn, db.to(DB_ptr.dtype.element_ty), mask=n_ok)
        else:
            _wgrad_program(X_ptr, G_ptr, DW_ptr, Off_ptr, pid - num_db, e, M, N, KD, stride_xm, stride_xk, stride_gm,
                           stride_gn, stride_we, stride_wn, stride_wk, ACT, INPUT_PRECISION, DOT_FP32,
                           BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    else:
        _wgrad_program(X_ptr, G_ptr, DW_ptr, Off_ptr, pid, e, M, N, KD, stride_xm, stride_xk, stride_gm, stride_gn,
                       stride_we, stride_wn, stride_wk, ACT, INPUT_PRECISION, DOT_FP32,
                       BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip


@triton.jit
def _wgrad_program(X_ptr, G_ptr, DW_ptr, Off_ptr, pid, e, M, N, KD, stride_xm, stride_xk, stride_gm, stride_gn,
                   stride_we, stride_wn, stride_wk, ACT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                   DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):  # fmt: skip
    """dW tile ``pid`` of expert e of the unsplit kernel: reduce, round once, store."""
    rn, rk, n_ok, k_ok, start, end = _wgrad_coords(Off_ptr, pid, e, M, N, KD, BLOCK_N, BLOCK_K)
    acc = _wgrad_tile(X_ptr, G_ptr, start, end, rn, rk, n_ok, k_ok, stride_xm, stride_xk, stride_gm, stride_gn,
                      ACT, INPUT_PRECISION, DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    dw_ptrs = DW_ptr + e.to(tl.int64) * stride_we + rn[:, None].to(tl.int64) * stride_wn + rk[None, :] * stride_wk
    tl.store(dw_ptrs, acc.to(DW_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


@triton.jit
def _split_rows(start, end, s, SPLIT, BLOCK_M: tl.constexpr):
    """Rows ``[first, stop)`` of split s: the s-th of SPLIT near-equal runs of the whole BLOCK_M
    row blocks of ``[start, end)``."""
    blocks = tl.cdiv(tl.maximum(end - start, 0), BLOCK_M)
    first = start + (s * blocks // SPLIT) * BLOCK_M
    return first, tl.minimum(start + ((s + 1) * blocks // SPLIT) * BLOCK_M, end)


@triton.jit
def _grouped_mm_weight_grad_split_kernel(
    X_ptr,
    G_ptr,
    WS_ptr,
    DBWS_ptr,
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
    stride_dbs,
    stride_dbe,
    ACT: tl.constexpr,
    HAS_DB: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Grid ``(B + T, E, SPLIT)`` (B bias tiles, T dW tiles, as the unsplit kernel): the weight
    gradient split over rows (split-K over M) for grids too small to fill the GPU (the router:
    E=1, N=32). Program (B + t, e, s) owns the [BLOCK_N, BLOCK_K] tile t of the fp32
    workspace ws[s, e] (ws [SPLIT, E, N, KD], inner stride 1): g.T @ act(x) over the s-th of
    SPLIT near-equal runs of whole BLOCK_M row blocks of expert e (block b of the expert's nb
    goes to the split s with s*nb//SPLIT <= b < (s+1)*nb//SPLIT); program (b < B, e, s) the
    [BLOCK_N] tile b of the run's row sums of g in dbws[s, e] ([SPLIT, E, N] fp32, inner
    stride 1). Blocks start at the expert's first row, as in the unsplit kernel; a split
    without rows writes zeros. ``_split_sum_kernel`` then adds the SPLIT partial sums in split
    order: no atomics, so the bits depend on the shapes and the config, never on timing.
    ``M_BUCKET`` and ``SPLIT`` are read by the autotuner's key too.
    """
    pid = tl.program_id(0)
    e = tl.program_id(1)
    s = tl.program_id(2)
    if HAS_DB:
        num_db = tl.cdiv(N, BLOCK_N)
        if pid < num_db:
            rn, _, n_ok, _, start, end = _wgrad_coords(Off_ptr, pid, e, M, N, 1, BLOCK_N, BLOCK_K)
            first, stop = _split_rows(start, end, s, SPLIT, BLOCK_M)
            db = _row_sums(G_ptr, first, stop, rn, n_ok, stride_gm, stride_gn, BLOCK_M, BLOCK_N)
            tl.store(DBWS_ptr + s.to(tl.int64) * stride_dbs + e.to(tl.int64) * stride_dbe + rn, db, mask=n_ok)
        else:
            _wgrad_split_program(X_ptr, G_ptr, WS_ptr, Off_ptr, pid - num_db, e, s, M, N, KD, SPLIT, stride_xm,
                                 stride_xk, stride_gm, stride_gn, stride_ws, stride_we, stride_wn, ACT,
                                 INPUT_PRECISION, DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    else:
        _wgrad_split_program(X_ptr, G_ptr, WS_ptr, Off_ptr, pid, e, s, M, N, KD, SPLIT, stride_xm, stride_xk,
                             stride_gm, stride_gn, stride_ws, stride_we, stride_wn, ACT, INPUT_PRECISION, DOT_FP32,
                             BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip


@triton.jit
def _wgrad_split_program(X_ptr, G_ptr, WS_ptr, Off_ptr, pid, e, s, M, N, KD, SPLIT, stride_xm, stride_xk, stride_gm,
                         stride_gn, stride_ws, stride_we, stride_wn, ACT: tl.constexpr,
                         INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """dW tile ``pid`` of expert e and split s: the run's fp32 partial sum into ws[s, e]."""
    rn, rk, n_ok, k_ok, start, end = _wgrad_coords(Off_ptr, pid, e, M, N, KD, BLOCK_N, BLOCK_K)
    first, stop = _split_rows(start, end, s, SPLIT, BLOCK_M)
    acc = _wgrad_tile(X_ptr, G_ptr, first, stop, rn, rk, n_ok, k_ok, stride_xm, stride_xk, stride_gm, stride_gn,
                      ACT, INPUT_PRECISION, DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
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
    # The fused epilogues change what a tile costs after its K-loop: tuned separately too.
    key=["M_BUCKET", "N", "KD", "stride_wk", "INPUT_PRECISION", "EPILOGUE", "ACT"],
    prune_configs_by={"early_config_prune": _prune_fwd},
)(_grouped_mm_kernel)

# Every candidate family (as for the forward), the pruning keeps the one for the launch's
# dtype, precision and activation (the interpreter has one config, which is every family).
_WGRAD_FAMILIES = (
    GROUPED_MM_WGRAD_CONFIGS,
    GROUPED_MM_WGRAD_IEEE_CONFIGS,
    GROUPED_MM_WGRAD_ACT_CONFIGS,
    GROUPED_MM_WGRAD_ACT_IEEE_CONFIGS,
)
_WGRAD_ALL = list({id(c): c for family in _WGRAD_FAMILIES for c in family}.values())  # each config once

grouped_mm_weight_grad_kernel = triton.autotune(
    configs=_WGRAD_ALL,
    key=["M_BUCKET", "N", "KD", "INPUT_PRECISION", "ACT", "HAS_DB"],
    prune_configs_by={"early_config_prune": _prune_wgrad},
)(_grouped_mm_weight_grad_kernel)

grouped_mm_weight_grad_split_kernel = triton.autotune(
    configs=_WGRAD_ALL,
    key=["M_BUCKET", "N", "KD", "INPUT_PRECISION", "SPLIT", "ACT", "HAS_DB"],
    prune_configs_by={"early_config_prune": _prune_wgrad},
)(_grouped_mm_weight_grad_split_kernel)

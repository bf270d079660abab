"""Persistent grouped GEMM with TMA operand loads (sm_90+): the forward and dX of
``grouped_mm`` for layouts TMA can read.

The same tile schedule as ``grouped_mm._grouped_mm_kernel`` (``_tile_of``: each tile within
one expert's rows, or within the padding rows past offsets[E]), but a grid of at most NUM_SMS
programs, each looping over schedule entries ``pid, pid + P, pid + 2P, ...`` (P programs).
The operands are read through tensor descriptors built on the device
(``tl.make_tensor_descriptor``; on sm_90 Triton lowers their loads to TMA, ``UTMALDG``): x as a
2-D descriptor ``[M, KD]``, the expert weights as a 3-D one over their storage, ``[E, N, KD]``
for the forward (block ``[1, BLOCK_N, BLOCK_K]``) or ``[E, KD, N]`` for dX (``W_T``: dX
multiplies by ``w[e]`` itself, which the launcher passes as ``w.transpose(1, 2)``; the
descriptor is built on the untransposed storage and the tile used as loaded). TMA fills what
lies past the tensor's edges with zeros, so the K-loop has no masks (the K tail is zeros); a
tile that ends inside its expert's last BLOCK_M block loads rows of the next segment, which
only reach output rows that the store's mask (to the tile's own segment) drops. An output row
depends only on its own x row, so results do not depend on what those extra rows hold.

Launch conditions (ops/_triton.py checks them and otherwise uses the non-persistent kernel):
x's and the weights' inner stride 1, the other strides and the base pointers 16-byte aligned,
fp16/bf16 or fp32 with TF32 products, and a device of compute capability 9.0+ (or the
interpreter, when asked). The bias and the fused GELU epilogues are those of the
non-persistent kernel, applied to column slices of the tile. Device-side descriptors need a small
global workspace per program, allocated through ``triton.set_allocator``.

Shape letters: M rows, KD reduction width, N output width, E experts.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_kernels.kernels._config import autotune_configs
from moe_kernels.kernels.grouped_mm import EPI_ACT_SAVE, EPI_NONE, _act_epilogue, _cfg, _tile_of

# sm_90 candidates: Triton's persistent TMA matmul tutorial and the 4-stage
# 128x256x64 (8 warps: a 128x256 fp32 accumulator is 128 registers a thread), then smaller
# tiles for narrow layers and small experts. Operand stages: 128x256x64 fp16 is 48 KiB a stage,
# 192 KiB for 4 (sm_90 has 227 KiB). Registers and spills of each are checked from the SASS
# (tests/test_grouped_mm_tma.py, python -m bench.kernels).
GROUPED_MM_TMA_CONFIGS = autotune_configs(
    [
        _cfg(128, 256, 64, 8, 4),
        _cfg(128, 256, 64, 8, 3),
        _cfg(128, 128, 64, 8, 4),
        _cfg(128, 128, 64, 4, 4),
        _cfg(128, 64, 64, 4, 4),
        _cfg(64, 128, 64, 4, 4),
        _cfg(64, 64, 64, 4, 4),
    ],
    interpret=_cfg(32, 32, 32, 4, 1, group_m=2),
)


@triton.jit
def _grouped_mm_tma_kernel(
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
    stride_we,
    stride_w1,
    stride_ym,
    stride_yn,
    stride_be,
    stride_bn,
    stride_am,
    stride_an,
    W_T: tl.constexpr,
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
    """Grid ``(min(NUM_SMS, S),)`` with S = ``(cdiv(M, BLOCK_M) + E) * cdiv(N, BLOCK_N)``, the
    schedule's worst case (as ``_grouped_mm_kernel``'s grid): program p owns schedule entries
    p, p + P, ... (P programs). Entry s is the [BLOCK_M, BLOCK_N] tile of y [M, N] of one
    schedule tile: up to BLOCK_M rows of one expert e, ``x [rows, KD] @ w[e].T (+ bias[e] [N]
    when HAS_BIAS)`` accumulated in fp32 and rounded once, or up to BLOCK_M padding rows,
    stored as zeros without a K-loop; entries past the used count do nothing. Every row is
    written by exactly one program. The weights are read as stored: ``[E, N, KD]`` with
    strides ``(stride_we, stride_w1, 1)``, or with ``W_T`` ``[E, KD, N]`` with strides
    ``(stride_we, stride_w1, 1)`` (the storage of dX's transposed view). x [M, KD] has
    strides ``(stride_xm, 1)``. ``M_BUCKET`` is read only by the autotuner's key.

    ``EPILOGUE`` and ``ACT`` as ``_grouped_mm_kernel``'s (aux [M, N]: the pre-activation,
    stored with ``EPI_ACT_SAVE``, read with ``EPI_ACT_GRAD``), applied to column slices of the
    tile (``_sliced_epilogue``).
    """
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    num_m = tl.cdiv(M, BLOCK_M) + E
    num_n = tl.cdiv(N, BLOCK_N)
    x_desc = tl.make_tensor_descriptor(X_ptr, shape=[M, KD], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    if W_T:
        w_desc = tl.make_tensor_descriptor(W_ptr, shape=[E, KD, N], strides=[stride_we, stride_w1, 1],
                                           block_shape=[1, BLOCK_K, BLOCK_N])  # fmt: skip
    else:
        w_desc = tl.make_tensor_descriptor(W_ptr, shape=[E, N, KD], strides=[stride_we, stride_w1, 1],
                                           block_shape=[1, BLOCK_N, BLOCK_K])  # fmt: skip
    width = GROUP_M * num_n
    for s in range(pid, num_m * num_n, programs):
        # Column blocks of GROUP_M consecutive row tiles run together (w tiles stay in L2).
        first_m = (s // width) * GROUP_M
        group_rows = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (s % width) % group_rows
        pid_n = (s % width) // group_rows
        e, row0, row_end = _tile_of(Off_ptr, M, E, pid_m, BLOCK_M)
        if e < E:
            m0 = row0.to(tl.int32)
            n0 = pid_n * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, KD, BLOCK_K):
                a = x_desc.load([m0, k0])
                if W_T:
                    b = tl.reshape(w_desc.load([e, k0, n0]), (BLOCK_K, BLOCK_N))
                else:
                    b = tl.trans(tl.reshape(w_desc.load([e, n0, k0]), (BLOCK_N, BLOCK_K)))
                if DOT_FP32:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            # The output's rows and pointers after the K-loop: nothing but the descriptors and the
            # accumulator is live across it (set up before it, fp16 128x256x64 with GELU spilled).
            rm64 = row0 + tl.arange(0, BLOCK_M).to(tl.int64)
            rn = n0 + tl.arange(0, BLOCK_N)
            if HAS_BIAS:
                b_ptrs = B_ptr + e.to(tl.int64) * stride_be + rn * stride_bn
                acc += tl.load(b_ptrs, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            if EPILOGUE == EPI_NONE:
                out_ok = (rm64 < row_end)[:, None] & (rn < N)[None, :]
                y_ptrs = Y_ptr + rm64[:, None] * stride_ym + rn[None, :].to(tl.int64) * stride_yn
                tl.store(y_ptrs, acc.to(Y_ptr.dtype.element_ty), mask=out_ok)
            else:
                _sliced_epilogue(acc, rm64, n0, row_end, N, Y_ptr, AUX_ptr, stride_ym, stride_yn, stride_am, stride_an,
                                 EPILOGUE, ACT, BLOCK_M, BLOCK_N)  # fmt: skip
        elif e == E:
            rm64 = row0 + tl.arange(0, BLOCK_M).to(tl.int64)
            rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            out_ok = (rm64 < row_end)[:, None] & (rn < N)[None, :]
            y_ptrs = Y_ptr + rm64[:, None] * stride_ym + rn[None, :].to(tl.int64) * stride_yn
            zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=Y_ptr.dtype.element_ty)
            tl.store(y_ptrs, zeros, mask=out_ok)
            if EPILOGUE == EPI_ACT_SAVE:
                aux_ptrs = AUX_ptr + rm64[:, None] * stride_am + rn[None, :].to(tl.int64) * stride_an
                tl.store(aux_ptrs, zeros, mask=out_ok)


@triton.jit
def _halves(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The left and right column halves of the [BLOCK_M, BLOCK_N] tile."""
    return tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))


# Elements of the tile one epilogue slice handles: 16 a thread with 8 warps (GELU's temporaries
# and the aux tile for 32 a thread next to a 128x256 accumulator spilled: bf16 with erf GELU).
EPI_SLICE = tl.constexpr(4096)


@triton.jit
def _sliced_epilogue(acc, rm64, n0, row_end, N, Y_ptr, AUX_ptr, stride_ym, stride_yn, stride_am, stride_an,
                     EPILOGUE: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr,
                     WIDTH: tl.constexpr):  # fmt: skip
    """``_act_epilogue`` of the [BLOCK_M, WIDTH] tile ``acc`` (columns from ``n0``) in column
    slices of at most EPI_SLICE elements (up to 8): halves, then ``_slices2`` of each."""
    if BLOCK_M * WIDTH <= EPI_SLICE:
        _act_epilogue(acc, rm64, n0 + tl.arange(0, WIDTH), row_end, N, Y_ptr, AUX_ptr, stride_ym, stride_yn,
                      stride_am, stride_an, EPILOGUE, ACT)  # fmt: skip
    else:
        half: tl.constexpr = WIDTH // 2
        left, right = _halves(acc, BLOCK_M, WIDTH)
        _slices2(left, rm64, n0, row_end, N, Y_ptr, AUX_ptr, stride_ym, stride_yn, stride_am, stride_an, EPILOGUE,
                 ACT, BLOCK_M, half)  # fmt: skip
        _slices2(right, rm64, n0 + half, row_end, N, Y_ptr, AUX_ptr, stride_ym, stride_yn, stride_am, stride_an,
                 EPILOGUE, ACT, BLOCK_M, half)  # fmt: skip


@triton.jit
def _slices2(acc, rm64, n0, row_end, N, Y_ptr, AUX_ptr, stride_ym, stride_yn, stride_am, stride_an,
             EPILOGUE: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):  # fmt: skip
    """Up to 4 slices: the tile whole, or ``_slices1`` of each half."""
    if BLOCK_M * WIDTH <= EPI_SLICE:
        _act_epilogue(acc, rm64, n0 + tl.arange(0, WIDTH), row_end, N, Y_ptr, AUX_ptr, stride_ym, stride_yn,
                      stride_am, stride_an, EPILOGUE, ACT)  # fmt: skip
    else:
        half: tl.constexpr = WIDTH // 2
        left, right = _halves(acc, BLOCK_M, WIDTH)
        _slices1(left, rm64, n0, row_end, N, Y_ptr, AUX_ptr, stride_ym, stride_yn, stride_am, stride_an, EPILOGUE,
                 ACT, BLOCK_M, half)  # fmt: skip
        _slices1(right, rm64, n0 + half, row_end, N, Y_ptr, AUX_ptr, stride_ym, stride_yn, stride_am, stride_an,
                 EPILOGUE, ACT, BLOCK_M, half)  # fmt: skip


@triton.jit
def _slices1(acc, rm64, n0, row_end, N, Y_ptr, AUX_ptr, stride_ym, stride_yn, stride_am, stride_an,
             EPILOGUE: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):  # fmt: skip
    """Up to 2 slices: the tile whole, or its halves."""
    if BLOCK_M * WIDTH <= EPI_SLICE:
        _act_epilogue(acc, rm64, n0 + tl.arange(0, WIDTH), row_end, N, Y_ptr, AUX_ptr, stride_ym, stride_yn,
                      stride_am, stride_an, EPILOGUE, ACT)  # fmt: skip
    else:
        half: tl.constexpr = WIDTH // 2
        left, right = _halves(acc, BLOCK_M, WIDTH)
        _act_epilogue(left, rm64, n0 + tl.arange(0, half), row_end, N, Y_ptr, AUX_ptr, stride_ym, stride_yn,
                      stride_am, stride_an, EPILOGUE, ACT)  # fmt: skip
        _act_epilogue(right, rm64, n0 + half + tl.arange(0, half), row_end, N, Y_ptr, AUX_ptr, stride_ym, stride_yn,
                      stride_am, stride_an, EPILOGUE, ACT)  # fmt: skip


def _prune_tma(configs, named_args, **kwargs):
    # fp32 (TF32 products) needs twice fp16's shared memory a stage: 128x256x64 does not fit.
    from moe_kernels.kernels.grouped_mm import _device_max_shared, prune_configs

    return prune_configs(configs, named_args["X_ptr"].element_size(), _device_max_shared())


# The key as the non-persistent kernel's (W_T: forward or dX); the grid is not in it.
grouped_mm_tma_kernel = triton.autotune(
    configs=GROUPED_MM_TMA_CONFIGS,
    key=["M_BUCKET", "N", "KD", "W_T", "INPUT_PRECISION", "HAS_BIAS", "EPILOGUE", "ACT"],
    prune_configs_by={"early_config_prune": _prune_tma},
)(_grouped_mm_tma_kernel)

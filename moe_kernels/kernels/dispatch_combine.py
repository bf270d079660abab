"""Row gathers between tokens [T, D] and the expert buffer [R, D], vectorised over D.

Both directions are gathers (each output row reads its sources), so no atomics are needed and
results are bitwise reproducible: dispatch reads through ``row_src``, combine reads each token's
K rows through ``rows``.

Shape letters: T tokens, K choices, D width, R buffer rows.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dispatch_kernel(
    X_ptr,
    Src_ptr,
    Wt_ptr,
    Out_ptr,
    R,
    D,
    K,
    stride_xt,
    stride_xd,
    stride_or,
    stride_od,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid ``(cdiv(R, BLOCK_R), cdiv(D, BLOCK_D))``: each program owns a [BLOCK_R, BLOCK_D]
    tile of out [R, D]: ``out[r] = w[src] * x[src // K]`` with src = row_src[r], 0 if src < 0.

    Wt_ptr: flat [T*K] weights (read when HAS_WEIGHTS); math in fp32, stored in out's dtype.
    """
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    r_ok = r < R
    d_ok = d < D
    src = tl.load(Src_ptr + r, mask=r_ok, other=-1)
    held = src >= 0
    t = tl.where(held, src // K, 0)
    v = tl.load(
        X_ptr + t[:, None] * stride_xt + d[None, :] * stride_xd, mask=held[:, None] & d_ok[None, :], other=0.0
    ).to(tl.float32)
    if HAS_WEIGHTS:
        w = tl.load(Wt_ptr + src, mask=held, other=0.0).to(tl.float32)
        v = v * w[:, None]
    tl.store(
        Out_ptr + r[:, None] * stride_or + d[None, :] * stride_od,
        v.to(Out_ptr.dtype.element_ty),
        mask=r_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def _combine_kernel(
    Y_ptr,
    Rows_ptr,
    Wt_ptr,
    Out_ptr,
    T,
    D,
    K,
    stride_yr,
    stride_yd,
    stride_ot,
    stride_od,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid ``(cdiv(T, BLOCK_T), cdiv(D, BLOCK_D))``: each program owns a [BLOCK_T, BLOCK_D]
    tile of out [T, D] and sums, in fp32 and in k order, ``w[t, k] * y[rows[t, k]]`` over the
    kept choices (rows >= 0). Rows_ptr / Wt_ptr: contiguous [T, K].
    """
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = t < T
    d_ok = d < D
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in range(K):
        row = tl.load(Rows_ptr + t * K + k, mask=t_ok, other=-1)
        kept = row >= 0
        v = tl.load(
            Y_ptr + row[:, None] * stride_yr + d[None, :] * stride_yd, mask=kept[:, None] & d_ok[None, :], other=0.0
        ).to(tl.float32)
        if HAS_WEIGHTS:
            w = tl.load(Wt_ptr + t * K + k, mask=kept, other=0.0).to(tl.float32)
            v = v * w[:, None]
        acc += v
    tl.store(
        Out_ptr + t[:, None] * stride_ot + d[None, :] * stride_od,
        acc.to(Out_ptr.dtype.element_ty),
        mask=t_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def _combine_weights_grad_kernel(
    A_ptr,
    B_ptr,
    Rows_ptr,
    G_ptr,
    T,
    D,
    K,
    stride_at,
    stride_ad,
    stride_br,
    stride_bd,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid ``(cdiv(T, BLOCK_T),)``: each program owns BLOCK_T tokens and writes
    ``g[t, k] = <a[t], b[rows[t, k]]>`` (fp32; 0 for dropped choices) into contiguous g [T, K].
    """
    pid = tl.program_id(0)
    t = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    for k in range(K):
        row = tl.load(Rows_ptr + t * K + k, mask=t_ok, other=-1)
        kept = row >= 0
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            m = kept[:, None] & (d < D)[None, :]
            a = tl.load(A_ptr + t[:, None] * stride_at + d[None, :] * stride_ad, mask=m, other=0.0)
            b = tl.load(B_ptr + row[:, None] * stride_br + d[None, :] * stride_bd, mask=m, other=0.0)
            acc += a.to(tl.float32) * b.to(tl.float32)
        dots = tl.sum(acc, axis=1)
        tl.store(G_ptr + t * K + k, tl.where(kept, dots, 0.0), mask=t_ok)

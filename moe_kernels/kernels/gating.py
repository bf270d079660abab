"""Fused gating: softmax over E experts, then the top K, in one pass over the logits.

Shape letters: T tokens, E experts, K choices per token.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _softmax_rows(L_ptr, rows, cols, T, E, stride_lt, stride_le):
    """fp32 logits (``-inf`` in padding) and softmax probabilities (0 in padding) of a tile."""
    row_ok = rows < T
    col_ok = cols < E
    ptrs = L_ptr + rows.to(tl.int64)[:, None] * stride_lt + cols[None, :] * stride_le
    x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=float("-inf")).to(tl.float32)
    # Rows past T are all -inf; a 0 maximum keeps them finite (they are never stored).
    m = tl.where(row_ok, tl.max(x, axis=1), 0.0)
    p = tl.where(col_ok[None, :], tl.exp(x - m[:, None]), 0.0)
    s = tl.sum(p, axis=1)
    s = tl.where(row_ok, s, 1.0)
    return x, p / s[:, None]


@triton.jit
def _topk_softmax_kernel(
    L_ptr,
    W_ptr,
    I_ptr,
    T,
    E,
    stride_lt,
    stride_le,
    K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grid ``(cdiv(T, BLOCK_T),)``: each program owns BLOCK_T whole rows of logits [T, E] and
    writes their weights [T, K] (fp32) and indices [T, K] (int64).

    Selection is on the fp32 logits (softmax is monotone, so this is exact on the inputs, as in
    the reference); among equal maxima the lowest expert index wins.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    x, p = _softmax_rows(L_ptr, rows, cols, T, E, stride_lt, stride_le)

    # NaN ranks like -inf (as in the reference), so a row with NaN still picks K distinct experts.
    x = tl.where(x != x, float("-inf"), x)
    avail = (cols < E)[None, :] & (rows >= 0)[:, None]  # [BLOCK_T, BLOCK_E]
    w_out = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    i_out = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for k in tl.static_range(K):
        cand = tl.where(avail, x, float("-inf"))
        best = tl.max(cand, axis=1)
        hit = avail & (cand == best[:, None])
        idx = tl.min(tl.where(hit, cols[None, :], BLOCK_E), axis=1)  # ties: lowest index
        sel = cols[None, :] == idx[:, None]
        w = tl.sum(tl.where(sel, p, 0.0), axis=1)
        avail = avail & (~sel)
        w_out = tl.where(kcols[None, :] == k, w[:, None], w_out)
        i_out = tl.where(kcols[None, :] == k, idx[:, None], i_out)
    if RENORMALIZE:
        total = tl.where(rows < T, tl.sum(w_out, axis=1), 1.0)
        w_out = w_out / total[:, None]

    out_offs = rows.to(tl.int64)[:, None] * K + kcols[None, :]
    out_mask = (rows < T)[:, None] & (kcols < K)[None, :]
    tl.store(W_ptr + out_offs, w_out, mask=out_mask)
    tl.store(I_ptr + out_offs, i_out.to(tl.int64), mask=out_mask)


@triton.jit
def _topk_softmax_backward_kernel(
    G_ptr,
    L_ptr,
    I_ptr,
    DL_ptr,
    T,
    E,
    stride_lt,
    stride_le,
    stride_dt,
    stride_de,
    K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Grid ``(cdiv(T, BLOCK_T),)``: each program owns BLOCK_T rows; it recomputes the softmax,
    scatters grad_weights [T, K] onto the chosen experts and applies the softmax Jacobian,
    writing grad_logits [T, E] in the logits' dtype. Contiguous [T, K] grad_weights / indices.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    _, p = _softmax_rows(L_ptr, rows, cols, T, E, stride_lt, stride_le)

    s = tl.full((BLOCK_T,), 1.0, dtype=tl.float32)
    gw = tl.zeros((BLOCK_T,), dtype=tl.float32)
    if RENORMALIZE:
        # w_k = p_k / s with s = sum of the selected p: the gradient w.r.t. the selected p is
        # (g_k - sum_j g_j w_j) / s.
        s = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for k in tl.static_range(K):
            idx = tl.load(I_ptr + rows64 * K + k, mask=row_ok, other=-1)
            g = tl.load(G_ptr + rows64 * K + k, mask=row_ok, other=0.0).to(tl.float32)
            sel = tl.sum(tl.where(cols[None, :] == idx[:, None], p, 0.0), axis=1)
            s += sel
            gw += g * sel
        s = tl.where(row_ok, s, 1.0)
        gw = gw / s

    gp = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for k in tl.static_range(K):
        idx = tl.load(I_ptr + rows64 * K + k, mask=row_ok, other=-1)
        g = tl.load(G_ptr + rows64 * K + k, mask=row_ok, other=0.0).to(tl.float32)
        g = (g - gw) / s
        gp += tl.where(cols[None, :] == idx[:, None], g[:, None], 0.0)
    dot = tl.sum(gp * p, axis=1)
    dl = p * (gp - dot[:, None])
    ptrs = DL_ptr + rows64[:, None] * stride_dt + cols[None, :] * stride_de
    tl.store(ptrs, dl.to(DL_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < E)[None, :])

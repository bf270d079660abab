"""Pure-PyTorch specification of every moe_kernels op: the fallback and the test oracle.

Every other implementation (C++ CPU, CUDA, Triton) must give the same integers and, within a
stated tolerance, the same floats as these functions. They favour clarity over speed.

Shape letters: T tokens, D model width, E experts, K choices per token, G groups,
S group size (T = G*S), C capacity per (group, expert), R rows of the expert buffer
(E*G*C with a capacity, T*K dropless), M rows of a grouped matmul, N = Dout.

Routing plan (what ``make_routing`` returns and the other ops consume):
  slot[T, K]     position of the assignment inside its expert's rows, -1 if dropped
                 (capacity: g*C + position in the (group, expert); dropless: rank in the expert)
  rows[T, K]     flat row of the expert buffer, offsets[e] + slot, -1 if dropped
  row_src[R]     inverse map: t*K + k of the assignment held by each row, -1 for an empty row
  counts[E]      assignments kept per expert
  offsets[E+1]   first row of each expert (capacity: e*G*C; dropless: exclusive scan of counts)
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_kernels.backends import OPS, Support


@contextlib.contextmanager
def _one_thread():
    """ATen/BLAS on one thread for the matmuls below. A threaded GEMM may pick its blocking, and
    so the order of a reduction, by the thread count (seen on the router's weight gradient);
    on one thread the oracle too is bitwise the same for any ``torch.set_num_threads``. It is
    the reference: the ``cpu`` backend is the fast path."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs (so gradcheck can run in fp64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _up(t: Tensor) -> Tensor:
    return t.to(_acc(t.dtype))


__all__ = list(OPS)

# Every op, any device, every float dtype (fp64 natively): the fallback that always runs.
SUPPORTS = {"torch": Support(devices=())}


def topk_softmax(logits: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """Softmax over E in fp32, then the K largest; ties go to the lower expert index."""
    logits32 = _up(logits)  # [T, E]
    probs = torch.softmax(logits32, dim=-1)  # [T, E]
    # Selection on the logits (softmax is monotone) is exact on the input values, so every
    # backend picks the same experts; a stable descending sort puts the lower index first.
    # NaN ranks like -inf (a row holding NaN gets NaN probabilities, reported as they are).
    key = torch.nan_to_num(logits32, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))  # [T, E]
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices  # [T, E]
    indices = order[:, :k].contiguous()  # [T, K]
    weights = probs.gather(1, indices)  # [T, K]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)  # [T, K]
    return weights, indices


def topk_softmax_backward(
    grad_weights: Tensor, logits: Tensor, indices: Tensor, renormalize: bool
) -> Tensor:
    """Gradient of ``topk_softmax``'s weights w.r.t. the logits (indices carry no gradient)."""
    probs = torch.softmax(_up(logits), dim=-1)  # [T, E]
    g = grad_weights.to(probs.dtype)  # [T, K]
    if renormalize:
        sel = probs.gather(1, indices)  # [T, K]
        s = sel.sum(dim=-1, keepdim=True)  # [T, 1]
        w = sel / s  # [T, K]
        g = (g - (g * w).sum(dim=-1, keepdim=True)) / s  # [T, K] gradient w.r.t. selected probs
    grad_probs = torch.zeros_like(probs).scatter_(1, indices, g)  # [T, E]
    dot = (grad_probs * probs).sum(dim=-1, keepdim=True)  # [T, 1]
    return (probs * (grad_probs - dot)).to(logits.dtype)  # [T, E]


def make_routing(
    indices: Tensor,
    num_experts: int,
    capacity: int | None,
    group_size: int,
    priority: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """V-MoE routing: K-major priority per group, optional BPR order, capacity or dropless.

    Returns ``(slot, rows, row_src, counts, offsets)`` as described in the module docstring.
    """
    T, K = indices.shape
    E = num_experts
    dev = indices.device
    S = group_size
    G = T // S if S > 0 else 0
    idx = indices.reshape(G, S, K)  # [G, S, K]
    if priority is not None:
        # Batch Prioritized Routing: descending priority, ties keep token order, NaN ranks last.
        inf = float("inf")
        key = torch.nan_to_num(priority.float().reshape(G, S), nan=-inf, posinf=inf, neginf=-inf)  # [G, S]
        order = torch.sort(key, dim=1, descending=True, stable=True).indices  # [G, S]
    else:
        order = torch.arange(S, device=dev).expand(G, S)  # [G, S]
    ordered = idx.gather(1, order[..., None].expand(G, S, K))  # [G, S, K] in priority order
    seq = ordered.transpose(1, 2).reshape(G, K * S)  # [G, K*S] K-major: all 1st choices first
    onehot = F.one_hot(seq, E)  # [G, K*S, E]
    pos = (onehot.cumsum(dim=1) - 1).gather(2, seq[..., None]).squeeze(2)  # [G, K*S] rank in (g, e)
    per_group = onehot.sum(dim=1)  # [G, E] assignments per (group, expert)

    if capacity is not None:
        C = capacity
        kept = pos < C  # [G, K*S]
        slot_seq = torch.where(kept, torch.arange(G, device=dev)[:, None] * C + pos, -1)  # [G, K*S]
        counts = per_group.clamp(max=C).sum(dim=0)  # [E]
        offsets = torch.arange(E + 1, device=dev) * (G * C)  # [E+1]
        R = E * G * C
    else:
        before = per_group.cumsum(dim=0) - per_group  # [G, E] kept in earlier groups
        slot_seq = pos + before.gather(1, seq)  # [G, K*S] rank in the expert over all groups
        counts = per_group.sum(dim=0)  # [E]
        offsets = F.pad(counts.cumsum(0), (1, 0))  # [E+1]
        R = T * K

    # Undo the K-major / priority ordering: back to [T, K].
    slot_gsk = slot_seq.reshape(G, K, S).transpose(1, 2)  # [G, S, K] in priority order
    slot = torch.empty(G, S, K, dtype=torch.int64, device=dev)  # [G, S, K]
    slot.scatter_(1, order[..., None].expand(G, S, K), slot_gsk)
    slot = slot.reshape(T, K)  # [T, K]
    rows = torch.where(slot >= 0, offsets[indices] + slot, -1)  # [T, K]

    row_src = torch.full((R,), -1, dtype=torch.int64, device=dev)  # [R]
    kept_flat = rows.reshape(-1) >= 0  # [T*K]
    row_src[rows.reshape(-1)[kept_flat]] = torch.arange(T * K, device=dev)[kept_flat]
    return slot, rows, row_src, counts.to(torch.int64), offsets.to(torch.int64)


def dispatch(x: Tensor, rows: Tensor, row_src: Tensor, weights: Tensor | None) -> Tensor:
    """buf[r] = w[src] * x[src // K] for the assignment src held by row r; empty rows are 0."""
    K = rows.shape[1]
    held = row_src >= 0  # [R]
    src = row_src.clamp(min=0)  # [R]
    out = _up(x)[src // K]  # [R, D]
    if weights is not None:
        out = out * weights.to(out.dtype).reshape(-1)[src][:, None]  # [R, D]
    return torch.where(held[:, None], out, 0.0).to(x.dtype)  # [R, D]


def combine(y: Tensor, rows: Tensor, row_src: Tensor, weights: Tensor | None) -> Tensor:
    """out[t] = sum_k w[t, k] * y[rows[t, k]] over the kept assignments (fp32 accumulation)."""
    kept = rows >= 0  # [T, K]
    picked = _up(y)[rows.clamp(min=0)]  # [T, K, D]
    w = kept.to(picked.dtype) if weights is None else weights.to(picked.dtype) * kept  # [T, K]
    return (picked * w[..., None]).sum(dim=1).to(y.dtype)  # [T, D]


def combine_weights_grad(a: Tensor, b: Tensor, rows: Tensor) -> Tensor:
    """g[t, k] = <a[t], b[rows[t, k]]> for kept assignments, 0 for dropped ones (fp32, fp64 for fp64)."""
    kept = rows >= 0  # [T, K]
    picked = _up(b)[rows.clamp(min=0)]  # [T, K, D]
    dots = (picked * _up(a)[:, None, :]).sum(dim=-1)  # [T, K]
    return torch.where(kept, dots, 0.0)  # [T, K]


def grouped_mm(x: Tensor, w: Tensor, offsets: Tensor, bias: Tensor | None = None) -> Tensor:
    """out[m] = x[m] @ w[e].T (+ bias[e]) for offsets[e] <= m < offsets[e+1]; rows past offsets[E] are 0."""
    out = torch.zeros(x.shape[0], w.shape[1], dtype=_acc(x.dtype), device=x.device)  # [M, N]
    bounds = offsets.tolist()  # the oracle may sync; the fast backends never do
    with _one_thread():
        for e in range(w.shape[0]):
            lo, hi = bounds[e], bounds[e + 1]
            out[lo:hi] = _up(x[lo:hi]) @ _up(w[e]).T  # [m_e, N]
            if bias is not None:
                out[lo:hi] += _up(bias[e])  # [m_e, N]
    return out.to(x.dtype)


def grouped_mm_weight_grad(x: Tensor, grad_out: Tensor, offsets: Tensor) -> Tensor:
    """dw[e] = grad_out[rows of e].T @ x[rows of e]; experts without rows get zeros."""
    E = offsets.shape[0] - 1
    dw = torch.zeros(E, grad_out.shape[1], x.shape[1], dtype=_acc(x.dtype), device=x.device)  # [E, N, Din]
    bounds = offsets.tolist()
    with _one_thread():
        for e in range(E):
            lo, hi = bounds[e], bounds[e + 1]
            dw[e] = _up(grad_out[lo:hi]).T @ _up(x[lo:hi])  # [N, Din]
    return dw.to(x.dtype)

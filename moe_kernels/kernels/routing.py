"""V-MoE routing: positions of every (token, choice) in its expert, from scans, never atomics.

Inside a group the T*K assignments form a K-major sequence of length L = K*S (every token's
1st choice, then every 2nd choice; tokens in group order or in the BPR order the launcher
sorted). The sequence is cut into chunks of BLOCK; two kernels and one scan give each
assignment its rank among the earlier assignments of the same expert:

  1. ``_routing_histogram_kernel``: per (group, chunk) counts of each expert.
  2. an exclusive scan of those counts over chunks (and over groups when dropless), done by
     the launcher with ``torch.cumsum`` on the small [G, NCHUNK, E] table (integers, so the
     order of summation cannot change the result);
  3. ``_routing_positions_kernel``: rank inside the chunk (a stable exclusive scan of the
     chunk's one-hot, computed as a count of equal earlier entries) plus the chunk's base
     gives the position; capacity drops, slot, buffer row and the inverse map follow.

Shape letters: T tokens, K choices, E experts, G groups, S group size, C capacity.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _sequence_entries(I_ptr, O_ptr, g, j, S, K, HAS_ORDER: tl.constexpr):
    """Token, choice and expert of the K-major sequence entries ``j`` of group ``g``."""
    valid = j < K * S
    k = j // S
    s = j % S
    if HAS_ORDER:
        s = tl.load(O_ptr + g.to(tl.int64) * S + s, mask=valid, other=0)
    t = g.to(tl.int64) * S + s
    e = tl.load(I_ptr + t * K + k, mask=valid, other=-1)
    return t, k, e, valid


@triton.jit
def _routing_histogram_kernel(
    I_ptr,
    O_ptr,
    H_ptr,
    S,
    K,
    E,
    NCHUNK,
    HAS_ORDER: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Grid ``(G * NCHUNK,)``: each program owns one chunk of BLOCK sequence entries of one
    group and writes that chunk's expert counts to H[g, chunk, :] (int32, [G, NCHUNK, E]).

    I_ptr: indices [T, K] int64; O_ptr: BPR order [G, S] int64 (read when HAS_ORDER).
    """
    pid = tl.program_id(0)
    g = pid // NCHUNK
    c = pid % NCHUNK
    j = c * BLOCK + tl.arange(0, BLOCK)
    _, _, e, _ = _sequence_entries(I_ptr, O_ptr, g, j, S, K, HAS_ORDER)
    base = H_ptr + pid.to(tl.int64) * E
    for e0 in range(0, E, BLOCK_E):
        ecols = e0 + tl.arange(0, BLOCK_E)
        cnt = tl.sum((e[:, None] == ecols[None, :]).to(tl.int32), axis=0)
        tl.store(base + ecols, cnt, mask=ecols < E)


@triton.jit
def _routing_positions_kernel(
    I_ptr,
    O_ptr,
    B_ptr,
    Off_ptr,
    Slot_ptr,
    Rows_ptr,
    Src_ptr,
    S,
    K,
    E,
    NCHUNK,
    C,
    HAS_ORDER: tl.constexpr,
    DROPLESS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Grid ``(G * NCHUNK,)``: each program owns one chunk of BLOCK sequence entries of one
    group and writes slot[t, k], rows[t, k] and row_src[row] for them.

    B_ptr: [G, NCHUNK, E] int64 assignments of each expert before the chunk (within the group
    with a capacity; over all earlier groups and chunks when DROPLESS). Off_ptr: offsets
    [E+1] int64. row_src must hold -1 beforehand; every kept row is written exactly once.
    """
    pid = tl.program_id(0)
    g = pid // NCHUNK
    c = pid % NCHUNK
    jj = tl.arange(0, BLOCK)
    t, k, e, valid = _sequence_entries(I_ptr, O_ptr, g, c * BLOCK + jj, S, K, HAS_ORDER)

    # Exclusive rank among equal experts earlier in the chunk: a stable scan of the one-hot,
    # counted pairwise so the cost is BLOCK**2 whatever E is.
    earlier = (jj[None, :] < jj[:, None]) & (e[None, :] == e[:, None])
    rank = tl.sum(earlier.to(tl.int32), axis=1)
    # Indices are range-checked on the host only for CPU tensors (on a GPU that would be a
    # sync): an expert outside [0, E) is dropped instead of addressing out of bounds.
    known = valid & (e >= 0) & (e < E)
    e_safe = tl.where(known, e, 0)
    before = tl.load(B_ptr + pid.to(tl.int64) * E + e_safe, mask=known, other=0)
    pos = before + rank
    if DROPLESS:
        kept = known
        slot = tl.where(kept, pos, -1)
    else:
        kept = known & (pos < C)
        slot = tl.where(kept, g.to(tl.int64) * C + pos, -1)
    start = tl.load(Off_ptr + e_safe, mask=known, other=0)
    row = tl.where(kept, start + slot, -1)
    tk = t * K + k
    tl.store(Slot_ptr + tk, slot, mask=valid)
    tl.store(Rows_ptr + tk, row, mask=valid)
    tl.store(Src_ptr + row, tk, mask=kept)

// Per-row logic shared by the CPU and CUDA kernels: top-k selection, softmax statistics and the
// slot arithmetic of a routing plan. Plain C++ on plain pointers, callable from host and device,
// so the CPU tests exercise exactly what the GPU kernels run.
//
// Shape letters: T tokens, E experts, K choices, G groups of S tokens, C capacity, R buffer rows.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MOEK_HD __host__ __device__ __forceinline__
#else
#define MOEK_HD inline
#endif

namespace moek {

constexpr int kMaxExperts = 256;
constexpr int kMaxK = 8;

// Selection key of a logit: NaN ranks like -inf (the reference does the same), so selection is
// defined for any input; the probabilities of a row holding NaN are NaN and are returned as is.
template <typename V>
MOEK_HD V rank_key(V v) {
  return v != v ? -static_cast<V>(__builtin_huge_valf()) : v;
}

// True when key `a` at index `ia` ranks before key `b` at index `ib`: larger first, ties to the
// lower index.
template <typename V>
MOEK_HD bool ranks_before(V a, int ia, V b, int ib) {
  return a > b || (a == b && ia < ib);
}

// Top-k of one row by insertion into a sorted list of length k (k <= kMaxK, E <= kMaxExperts).
// Writes the chosen indices (and their keys) in rank order; `load(e)` reads logit e as V (float,
// or double for fp64 inputs).
template <typename V, typename LoadFn>
MOEK_HD void topk_row(LoadFn load, int E, int k, int* out_idx, V* out_val) {
  int n = 0;
  for (int e = 0; e < E; ++e) {
    const V v = rank_key<V>(load(e));
    if (n == k && !ranks_before(v, e, out_val[k - 1], out_idx[k - 1])) continue;
    int j = n < k ? n++ : k - 1;
    while (j > 0 && ranks_before(v, e, out_val[j - 1], out_idx[j - 1])) {
      out_val[j] = out_val[j - 1];
      out_idx[j] = out_idx[j - 1];
      --j;
    }
    out_val[j] = v;
    out_idx[j] = e;
  }
}

// Sort key of a Batch Prioritized Routing priority: keys in ascending order are priorities in
// descending order, NaN ranking like -inf (rank_key) and -0 like +0. A stable sort on this key
// orders tokens exactly as a stable sort on rank_key(priority) descending (the CPU kernel's
// comparator); the CUDA kernel radix-sorts it.
MOEK_HD uint32_t priority_order_key(float priority) {
  float v = rank_key(priority);
  if (v == 0.0f) v = 0.0f;
#if defined(__CUDA_ARCH__)
  const uint32_t u = __float_as_uint(v);
#else
  uint32_t u;
  __builtin_memcpy(&u, &v, sizeof(u));
#endif
  const uint32_t ascending = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return ~ascending;
}

// Slot of an assignment at `pos` in (group g, expert e): g*C + pos with a capacity (or -1 when
// pos >= C), pos itself when dropless (capacity < 0; pos then counts over all groups).
MOEK_HD int64_t slot_of(int64_t g, int64_t pos, int64_t capacity) {
  if (capacity < 0) return pos;
  return pos < capacity ? g * capacity + pos : -1;
}

// Flat buffer row of a slot: offsets[e] + slot, -1 stays -1.
MOEK_HD int64_t row_of(int64_t expert_offset, int64_t slot) { return slot < 0 ? -1 : expert_offset + slot; }

// The assignment (t, k) at position `i` of a group's K-major sequence: every token's 1st choice
// comes before any token's 2nd choice. `order` maps rank -> token within the group (BPR), or is
// null for the tokens' own order.
MOEK_HD void kmajor_assignment(int64_t i, int64_t S, const int64_t* order, int64_t* rank_token, int64_t* choice) {
  *choice = i / S;
  const int64_t r = i - *choice * S;
  *rank_token = order ? order[r] : r;
}

}  // namespace moek

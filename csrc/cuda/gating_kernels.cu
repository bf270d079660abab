// Fused top-k softmax gating (forward and backward) on CUDA.
//
// Layout: a row of E logits is owned by LPR = min(32, next_pow2(E / VEC)) consecutive lanes of a
// warp, so a warp holds 32 / LPR rows (several rows per warp when E is small). Lane `sub` of a row
// owns CHUNKS packs of VEC consecutive logits, pack c starting at element (c*LPR + sub)*VEC: with
// VEC = 16 / sizeof(element) every load is 16 bytes (when E is a multiple of VEC and the rows
// are aligned), else VEC = 1 (coalesced scalar loads). At most 8 logits per lane.
//
// Math in fp32 (fp64 for fp64 logits): row max, sum of exp(v - max), then K rounds of a warp
// arg-max over the logits not taken yet, ordered by moek::rank_key / moek::ranks_before (the
// order moek::topk_row uses on the CPU: larger first, ties to the lower index, NaN like -inf).
// ranks_before is a strict total order on (key, index), so the K winners and their order are the
// CPU's exactly; only the summation order of the softmax denominator differs.
#include <climits>

#include "device_utils.cuh"
#include "moe_kernels/routing_logic.h"

namespace moek::cuda {
namespace {

constexpr int kThreads = 128;  // 4 warps: enough rows per block, small enough for tiny T
constexpr int kMaxItems = 8;   // logits per lane (E <= 256 over 32 lanes)

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -static_cast<A>(__builtin_huge_valf());
}

// Where a lane's rows and logits are.
struct Lanes {
  int lpr;     // lanes per row (power of two)
  int sub;     // this lane's index within its row
  int64_t t;   // this lane's row
  bool active; // t < T (inactive lanes still join the shuffles)

  __device__ Lanes(int lpr_log2, int64_t T) {
    lpr = 1 << lpr_log2;
    const int lane = threadIdx.x % kWarp;
    sub = lane & (lpr - 1);
    const int64_t warp = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
    t = warp * (kWarp >> lpr_log2) + (lane >> lpr_log2);
    active = t < T;
  }

  // Expert of item i (pack i / VEC, element i % VEC) of this lane.
  template <int VEC>
  __device__ __forceinline__ int expert(int i) const {
    return ((i / VEC) * lpr + sub) * VEC + i % VEC;
  }
};

template <typename scalar_t, int VEC, int CHUNKS>
__device__ __forceinline__ void load_row(const scalar_t* row, int E, const Lanes& ln, acc_t<scalar_t>* v) {
  using A = acc_t<scalar_t>;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int e0 = (c * ln.lpr + ln.sub) * VEC;
    if (ln.active && e0 < E) {  // VEC > 1 only when E % VEC == 0: a pack is all in or all out
      if constexpr (VEC == 1) {
        v[c] = to_acc<A>(row[e0]);
      } else {
        const auto p = load_pack<scalar_t, VEC>(row + e0);
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[c * VEC + j] = to_acc<A>(p.v[j]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[c * VEC + j] = neg_inf<A>();
    }
  }
}

// Row max (NaN ignored, as on the CPU, so a row holding NaN still gets NaN through the sum) and
// sum of exp(v - max), reduced over the row's lanes.
template <int VEC, int CHUNKS, typename A>
__device__ __forceinline__ void row_stats(const A* v, int E, const Lanes& ln, A* mx, A* sum) {
  A m = neg_inf<A>();
#pragma unroll
  for (int i = 0; i < CHUNKS * VEC; ++i) {
    if (ln.expert<VEC>(i) < E && v[i] > m) m = v[i];
  }
  for (int o = ln.lpr / 2; o > 0; o /= 2) {
    const A x = __shfl_xor_sync(kFullMask, m, o);
    if (x > m) m = x;
  }
  A s = 0;
#pragma unroll
  for (int i = 0; i < CHUNKS * VEC; ++i) {
    if (ln.expert<VEC>(i) < E) s += exp_acc(v[i] - m);
  }
  *mx = m;
  *sum = warp_sum(s, ln.lpr);
}

template <typename scalar_t, int VEC, int CHUNKS>
__global__ void __launch_bounds__(kThreads) topk_softmax_kernel(const scalar_t* __restrict__ logits, int64_t T,
                                                                 int E, int k, int lpr_log2, bool renormalize,
                                                                 acc_t<scalar_t>* __restrict__ weights,
                                                                 int64_t* __restrict__ indices) {
  using A = acc_t<scalar_t>;
  const Lanes ln(lpr_log2, T);
  A v[CHUNKS * VEC];
  load_row<scalar_t, VEC, CHUNKS>(logits + ln.t * E, E, ln, v);
  A m, s;
  row_stats<VEC, CHUNKS>(v, E, ln, &m, &s);

  unsigned taken = 0;  // bit i: item i already selected
  A p_sel[kMaxK];
  int i_sel[kMaxK];
#pragma unroll
  for (int j = 0; j < kMaxK; ++j) {
    if (j >= k) break;
    // (key, index) of the best item not taken yet; (-inf, INT_MAX) ranks after every real one.
    A bk = neg_inf<A>(), braw = 0;
    int bi = INT_MAX;
#pragma unroll
    for (int i = 0; i < CHUNKS * VEC; ++i) {
      const int e = ln.expert<VEC>(i);
      if (e < E && !((taken >> i) & 1u)) {
        const A key = rank_key<A>(v[i]);
        if (ranks_before(key, e, bk, bi)) {
          bk = key;
          bi = e;
          braw = v[i];
        }
      }
    }
    for (int o = ln.lpr / 2; o > 0; o /= 2) {
      const A ok = __shfl_xor_sync(kFullMask, bk, o);
      const int oi = __shfl_xor_sync(kFullMask, bi, o);
      const A oraw = __shfl_xor_sync(kFullMask, braw, o);
      if (ranks_before(ok, oi, bk, bi)) {
        bk = ok;
        bi = oi;
        braw = oraw;
      }
    }
#pragma unroll
    for (int i = 0; i < CHUNKS * VEC; ++i) {
      if (ln.expert<VEC>(i) == bi) taken |= 1u << i;
    }
    p_sel[j] = exp_acc(braw - m) / s;  // from the raw logit: NaN rows give NaN, as on the CPU
    i_sel[j] = bi;
  }

  if (ln.active && ln.sub == 0) {
    A sel = 0;
#pragma unroll
    for (int j = 0; j < kMaxK; ++j) {
      if (j < k) sel += p_sel[j];
    }
#pragma unroll
    for (int j = 0; j < kMaxK; ++j) {
      if (j < k) {
        weights[ln.t * k + j] = renormalize ? p_sel[j] / sel : p_sel[j];
        indices[ln.t * k + j] = i_sel[j];
      }
    }
  }
}

template <typename scalar_t, int VEC, int CHUNKS>
__global__ void __launch_bounds__(kThreads)
    topk_softmax_backward_kernel(const acc_t<scalar_t>* __restrict__ grad, const scalar_t* __restrict__ logits,
                                 const int64_t* __restrict__ indices, int64_t T, int E, int k, int lpr_log2,
                                 bool renormalize, scalar_t* __restrict__ grad_logits) {
  using A = acc_t<scalar_t>;
  const Lanes ln(lpr_log2, T);
  const scalar_t* row = logits + ln.t * E;
  A v[CHUNKS * VEC];
  load_row<scalar_t, VEC, CHUNKS>(row, E, ln, v);
  A m, s;
  row_stats<VEC, CHUNKS>(v, E, ln, &m, &s);
  if (!ln.active) return;  // no shuffles below

  A g_sel[kMaxK], p_sel[kMaxK];
  int i_sel[kMaxK];
  A psum = 0, gw = 0;
#pragma unroll
  for (int j = 0; j < kMaxK; ++j) {
    if (j < k) {
      const int64_t e = indices[ln.t * k + j];
      if (e < 0 || e >= E) {
        if (ln.sub == 0) {
          printf("moe_kernels: topk_softmax_backward: indices must be in [0, %d), got %lld\n", E,
                 static_cast<long long>(e));
        }
        __trap();
      }
      i_sel[j] = static_cast<int>(e);
      p_sel[j] = exp_acc(to_acc<A>(row[e]) - m) / s;
      g_sel[j] = grad[ln.t * k + j];
      psum += p_sel[j];
      gw += g_sel[j] * p_sel[j];
    }
  }
  if (renormalize) {
    // w_j = p_j / s  =>  dL/dp_j = (g_j - sum_i g_i w_i) / s
#pragma unroll
    for (int j = 0; j < kMaxK; ++j) {
      if (j < k) g_sel[j] = (g_sel[j] - gw / psum) / psum;
    }
  }
  A dot = 0;  // sum_e dL/dp_e * p_e, nonzero only at the selected experts
#pragma unroll
  for (int j = 0; j < kMaxK; ++j) {
    if (j < k) dot += g_sel[j] * p_sel[j];
  }

  scalar_t* out = grad_logits + ln.t * E;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int e0 = (c * ln.lpr + ln.sub) * VEC;
    if (e0 >= E) continue;
    Pack<scalar_t, VEC> o;
#pragma unroll
    for (int jv = 0; jv < VEC; ++jv) {
      const int e = e0 + jv;
      const A p = exp_acc(v[c * VEC + jv] - m) / s;
      A g = -p * dot;
#pragma unroll
      for (int j = 0; j < kMaxK; ++j) {  // a repeated index: the last one wins, as on the CPU
        if (j < k && i_sel[j] == e) g = p * (g_sel[j] - dot);
      }
      o.v[jv] = from_acc<scalar_t>(g);
    }
    store_pack<scalar_t, VEC>(out + e0, o);
  }
}

// Lane layout of a row of E logits in packs of VEC.
struct Layout {
  int lpr_log2, chunks;
  int64_t blocks;
};

Layout layout(int E, int vec, int64_t T) {
  const int nvec = (E + vec - 1) / vec;
  int lpr_log2 = 0;
  while ((1 << lpr_log2) < nvec && lpr_log2 < 5) ++lpr_log2;
  const int per_lane = (nvec + (1 << lpr_log2) - 1) >> lpr_log2;
  int chunks = 1;
  while (chunks < per_lane) chunks *= 2;
  const int64_t rows_per_block = (kThreads / kWarp) * (kWarp >> lpr_log2);
  return {lpr_log2, chunks, ceil_div(T, rows_per_block)};
}

// Calls fn(Int<VEC>{}, Int<CHUNKS>{}) for the instantiated (VEC, CHUNKS) pair and returns true;
// every pair with VEC * CHUNKS <= kMaxItems exists, which covers every layout of E <= 256.
template <typename scalar_t, typename Fn>
bool with_layout(bool vectorised, int chunks, Fn&& fn) {
  bool launched = false;
  constexpr int V = kVec16<scalar_t>;
  auto pick = [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    switch (chunks) {
      case 1:
        fn(vec, Int<1>{});
        launched = true;
        break;
      case 2:
        if constexpr (2 * VEC <= kMaxItems) {
          fn(vec, Int<2>{});
          launched = true;
        }
        break;
      case 4:
        if constexpr (4 * VEC <= kMaxItems) {
          fn(vec, Int<4>{});
          launched = true;
        }
        break;
      default:
        if constexpr (8 * VEC <= kMaxItems) {
          fn(vec, Int<8>{});
          launched = true;
        }
        break;
    }
  };
  if (vectorised) {
    pick(Int<V>{});
  } else {
    pick(Int<1>{});
  }
  return launched;
}

}  // namespace

int launch_topk_softmax(const void* logits, DType dtype, int64_t T, int E, int k, bool renormalize, void* weights,
                        int64_t* indices, cudaStream_t stream) {
  if (T == 0) return 0;
  return MOEK_DISPATCH_DTYPE(dtype, [&] {
    using A = acc_t<scalar_t>;
    const bool vec = E % kVec16<scalar_t> == 0 && aligned16(logits);
    const Layout L = layout(E, vec ? kVec16<scalar_t> : 1, T);
    const bool launched = with_layout<scalar_t>(vec, L.chunks, [&](auto V, auto C) {
      topk_softmax_kernel<scalar_t, decltype(V)::value, decltype(C)::value>
          <<<static_cast<unsigned>(L.blocks), kThreads, 0, stream>>>(static_cast<const scalar_t*>(logits), T, E, k,
                                                                     L.lpr_log2, renormalize,
                                                                     static_cast<A*>(weights), indices);
    });
    return launched ? launch_status() : static_cast<int>(cudaErrorInvalidConfiguration);
  });
}

int launch_topk_softmax_backward(const void* grad_weights, const void* logits, DType dtype, const int64_t* indices,
                                 int64_t T, int E, int k, bool renormalize, void* grad_logits, cudaStream_t stream) {
  if (T == 0) return 0;
  return MOEK_DISPATCH_DTYPE(dtype, [&] {
    using A = acc_t<scalar_t>;
    const bool vec = E % kVec16<scalar_t> == 0 && aligned16(logits) && aligned16(grad_logits);
    const Layout L = layout(E, vec ? kVec16<scalar_t> : 1, T);
    const bool launched = with_layout<scalar_t>(vec, L.chunks, [&](auto V, auto C) {
      topk_softmax_backward_kernel<scalar_t, decltype(V)::value, decltype(C)::value>
          <<<static_cast<unsigned>(L.blocks), kThreads, 0, stream>>>(
              static_cast<const A*>(grad_weights), static_cast<const scalar_t*>(logits), indices, T, E, k,
              L.lpr_log2, renormalize, static_cast<scalar_t*>(grad_logits));
    });
    return launched ? launch_status() : static_cast<int>(cudaErrorInvalidConfiguration);
  });
}

}  // namespace moek::cuda

// The routing plan (make_routing) on CUDA: positions from stable radix sorts, never from atomics.
//
//   1. BPR only: sort the tokens of every group by descending priority, stably, in one CUB radix
//      sort of the keys (group << 32 | moek::priority_order_key(priority)); its values give each
//      group's order (rank -> token), the `order` of moek::kmajor_assignment.
//   2. Enumerate the N = T*K assignments group by group in K-major order (every 1st choice, then
//      every 2nd, ...; moek::kmajor_assignment) and key each by (expert, group) = e*G + g.
//   3. Stable radix sort of (key, assignment t*K+k): within a key the assignments stay in
//      K-major order, so an assignment's position in its (group, expert) is its sorted index
//      minus the first sorted index of its key, and (dropless) its rank in its expert over all
//      groups is its sorted index minus the first sorted index of its expert.
//   4. Segment boundaries of the sorted keys give the per-(expert, group) counts; offsets and
//      counts follow; every assignment then writes its slot (moek::slot_of), row (moek::row_of)
//      and the inverse map row_src.
// Radix sorts are deterministic, so the plan is bitwise the same on every run and every GPU.
#include <cub/device/device_radix_sort.cuh>

#include "device_utils.cuh"
#include "moe_kernels/routing_logic.h"

namespace moek::cuda {
namespace {

constexpr int kThreads = 256;

using Key = uint64_t;

// Bits needed for the values 0..max_value (at least 1).
int bit_width(uint64_t max_value) {
  int b = 1;
  while (b < 64 && (max_value >> b) != 0) ++b;
  return b;
}

__global__ void priority_keys_kernel(const float* __restrict__ priority, int64_t T, int64_t S, Key* __restrict__ keys,
                                     int64_t* __restrict__ token_in_group) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= T) return;
  const int64_t g = t / S;
  keys[t] = (static_cast<Key>(g) << 32) | priority_order_key(priority[t]);
  token_in_group[t] = t - g * S;
}

// Item i of the sequence = (group g, K-major position j) -> key e*G + g, value t*K + k.
__global__ void assignment_keys_kernel(const int64_t* __restrict__ indices, int64_t N, int K, int64_t E, int64_t S,
                                       int64_t G, const int64_t* __restrict__ order, Key* __restrict__ keys,
                                       int64_t* __restrict__ assignment) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N) return;
  const int64_t L = K * S;
  const int64_t g = i / L;
  int64_t r, kk;
  kmajor_assignment(i - g * L, S, order ? order + g * S : nullptr, &r, &kk);
  const int64_t a = (g * S + r) * K + kk;
  const int64_t e = indices[a];
  MOEK_DEVICE_CHECK(e >= 0 && e < E, "make_routing: indices must be in [0, num_experts=%lld), got %lld at [%lld, %lld]",
                    static_cast<long long>(E), static_cast<long long>(e), static_cast<long long>(a / K),
                    static_cast<long long>(kk));
  keys[i] = static_cast<Key>(e * G + g);
  assignment[i] = a;
}

// First and one-past-last sorted index of every key present; absent keys keep 0, 0.
__global__ void segment_bounds_kernel(const Key* __restrict__ keys, int64_t N, int64_t* __restrict__ seg_begin,
                                      int64_t* __restrict__ seg_end) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= N) return;
  const Key key = keys[j];
  if (j == 0 || keys[j - 1] != key) seg_begin[key] = j;
  if (j == N - 1 || keys[j + 1] != key) seg_end[key] = j + 1;
}

// First sorted index whose key is >= key.
__device__ __forceinline__ int64_t lower_bound(const Key* keys, int64_t N, Key key) {
  int64_t lo = 0, hi = N;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (keys[mid] < key) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// offsets[e]: e*G*C with a capacity; dropless, the first sorted index of expert e (the keys are
// expert-major), which is the exclusive scan of the counts.
__global__ void offsets_kernel(const Key* __restrict__ keys, int64_t N, int64_t E, int64_t G, int64_t C,
                               int64_t* __restrict__ offsets) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e > E) return;
  offsets[e] = C >= 0 ? e * G * C : (e == E ? N : lower_bound(keys, N, static_cast<Key>(e * G)));
}

// counts[e] = sum_g min(n[e, g], C) with a capacity (one block per expert, a fixed reduction
// tree), offsets[e+1] - offsets[e] dropless.
__global__ void counts_kernel(const int64_t* __restrict__ seg_begin, const int64_t* __restrict__ seg_end,
                              const int64_t* __restrict__ offsets, int64_t G, int64_t C, int64_t* __restrict__ counts) {
  const int64_t e = blockIdx.x;
  if (C < 0) {
    if (threadIdx.x == 0) counts[e] = offsets[e + 1] - offsets[e];
    return;
  }
  int64_t kept = 0;
  for (int64_t g = threadIdx.x; g < G; g += blockDim.x) {
    const int64_t n = seg_end[e * G + g] - seg_begin[e * G + g];
    kept += n < C ? n : C;
  }
  __shared__ int64_t partial[kThreads / kWarp];
  kept = warp_sum(kept);
  if (threadIdx.x % kWarp == 0) partial[threadIdx.x / kWarp] = kept;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t total = 0;
    for (int w = 0; w < kThreads / kWarp; ++w) total += partial[w];
    counts[e] = total;
  }
}

__global__ void assign_kernel(const Key* __restrict__ keys, const int64_t* __restrict__ assignment, int64_t N,
                              int64_t G, int64_t C, const int64_t* __restrict__ seg_begin,
                              const int64_t* __restrict__ offsets, int64_t* __restrict__ slot,
                              int64_t* __restrict__ rows, int64_t* __restrict__ row_src) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= N) return;
  const Key key = keys[j];
  const int64_t e = static_cast<int64_t>(key) / G;
  const int64_t g = static_cast<int64_t>(key) - e * G;
  const int64_t pos = C >= 0 ? j - seg_begin[key] : j - offsets[e];
  const int64_t s = slot_of(g, pos, C);
  const int64_t r = row_of(offsets[e], s);
  const int64_t a = assignment[j];
  slot[a] = s;
  rows[a] = r;
  if (r >= 0) row_src[r] = a;
}

// Scratch layout inside the one workspace allocation.
struct Workspace {
  Key* keys[2];
  int64_t* vals[2];
  Key* pkeys[2];       // BPR
  int64_t* pvals[2];   // BPR
  int64_t* seg_begin;  // capacity
  int64_t* seg_end;    // capacity
  void* temp;
  size_t temp_bytes;
  size_t total;
};

size_t sort_temp_bytes(int64_t n, int end_bit) {
  size_t bytes = 0;
  cub::DoubleBuffer<Key> k(nullptr, nullptr);
  cub::DoubleBuffer<int64_t> v(nullptr, nullptr);
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, k, v, static_cast<int>(n), 0, end_bit);
  return bytes;
}

int sort_bits_assignments(int64_t E, int64_t G) { return bit_width(static_cast<uint64_t>(E * G - 1)); }
int sort_bits_priority(int64_t G) { return 32 + bit_width(static_cast<uint64_t>(G - 1)); }

Workspace carve(char* base, int64_t T, int K, int64_t E, int64_t S, bool capacity, bool priority) {
  Workspace w{};
  const int64_t N = T * K, G = T / S;
  size_t at = 0;
  auto take = [&](size_t bytes) -> char* {
    char* p = base ? base + at : nullptr;
    at += (bytes + 255) / 256 * 256;
    return p;
  };
  for (int b = 0; b < 2; ++b) {
    w.keys[b] = reinterpret_cast<Key*>(take(N * sizeof(Key)));
    w.vals[b] = reinterpret_cast<int64_t*>(take(N * sizeof(int64_t)));
  }
  if (priority) {
    for (int b = 0; b < 2; ++b) {
      w.pkeys[b] = reinterpret_cast<Key*>(take(T * sizeof(Key)));
      w.pvals[b] = reinterpret_cast<int64_t*>(take(T * sizeof(int64_t)));
    }
  }
  if (capacity) {
    w.seg_begin = reinterpret_cast<int64_t*>(take(E * G * sizeof(int64_t)));
    w.seg_end = reinterpret_cast<int64_t*>(take(E * G * sizeof(int64_t)));
  }
  size_t temp = sort_temp_bytes(N, sort_bits_assignments(E, G));
  if (priority) {
    const size_t t2 = sort_temp_bytes(T, sort_bits_priority(G));
    temp = temp > t2 ? temp : t2;
  }
  w.temp = take(temp);
  w.temp_bytes = temp;
  w.total = at;
  return w;
}

unsigned blocks_for(int64_t n) { return static_cast<unsigned>(ceil_div(n, kThreads)); }

}  // namespace

size_t make_routing_workspace_bytes(int64_t T, int K, int64_t E, int64_t S, bool capacity, bool priority) {
  if (T == 0) return 0;
  return carve(nullptr, T, K, E, S, capacity, priority).total;
}

int launch_make_routing(const int64_t* indices, int64_t T, int K, int64_t E, int64_t capacity, int64_t S,
                        const float* priority, int64_t* slot, int64_t* rows, int64_t* row_src, int64_t* counts,
                        int64_t* offsets, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (T == 0) return 0;
  const int64_t N = T * K, G = T / S, C = capacity;
  Workspace w = carve(static_cast<char*>(workspace), T, K, E, S, C >= 0, priority != nullptr);
  if (w.total > workspace_bytes) return static_cast<int>(cudaErrorInvalidValue);
  cudaError_t err;

  const int64_t* order = nullptr;
  if (priority != nullptr) {
    priority_keys_kernel<<<blocks_for(T), kThreads, 0, stream>>>(priority, T, S, w.pkeys[0], w.pvals[0]);
    cub::DoubleBuffer<Key> k(w.pkeys[0], w.pkeys[1]);
    cub::DoubleBuffer<int64_t> v(w.pvals[0], w.pvals[1]);
    size_t bytes = w.temp_bytes;
    err = cub::DeviceRadixSort::SortPairs(w.temp, bytes, k, v, static_cast<int>(T), 0, sort_bits_priority(G), stream);
    if (err != cudaSuccess) return static_cast<int>(err);
    order = v.Current();  // which buffer holds the result is decided on the host: no sync
  }

  assignment_keys_kernel<<<blocks_for(N), kThreads, 0, stream>>>(indices, N, K, E, S, G, order, w.keys[0], w.vals[0]);
  cub::DoubleBuffer<Key> k(w.keys[0], w.keys[1]);
  cub::DoubleBuffer<int64_t> v(w.vals[0], w.vals[1]);
  size_t bytes = w.temp_bytes;
  err = cub::DeviceRadixSort::SortPairs(w.temp, bytes, k, v, static_cast<int>(N), 0, sort_bits_assignments(E, G),
                                        stream);
  if (err != cudaSuccess) return static_cast<int>(err);
  const Key* keys = k.Current();
  const int64_t* assignment = v.Current();

  if (C >= 0) {
    err = cudaMemsetAsync(w.seg_begin, 0, E * G * sizeof(int64_t), stream);
    if (err == cudaSuccess) err = cudaMemsetAsync(w.seg_end, 0, E * G * sizeof(int64_t), stream);
    // Rows no assignment reaches stay empty: -1 (all bytes 0xff).
    if (err == cudaSuccess) err = cudaMemsetAsync(row_src, 0xff, E * G * C * sizeof(int64_t), stream);
    if (err != cudaSuccess) return static_cast<int>(err);
    segment_bounds_kernel<<<blocks_for(N), kThreads, 0, stream>>>(keys, N, w.seg_begin, w.seg_end);
  }
  offsets_kernel<<<blocks_for(E + 1), kThreads, 0, stream>>>(keys, N, E, G, C, offsets);
  counts_kernel<<<static_cast<unsigned>(E), kThreads, 0, stream>>>(w.seg_begin, w.seg_end, offsets, G, C, counts);
  assign_kernel<<<blocks_for(N), kThreads, 0, stream>>>(keys, assignment, N, G, C, w.seg_begin, offsets, slot, rows,
                                                        row_src);
  return launch_status();
}

}  // namespace moek::cuda

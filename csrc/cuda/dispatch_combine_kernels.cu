// Dispatch (tokens -> buffer rows), combine (buffer rows -> tokens) and the combine-weight
// gradient on CUDA. One warp per output row (per (token, choice) pair for the weight gradient):
// every output element has exactly one writer, so there are no atomics and the results do not
// depend on scheduling. Rows move in 16-byte packs when the width and the pointers allow it
// (VEC = 16 / sizeof(element)), else element by element; accumulation in fp32 (fp64 for fp64),
// choices summed in k order like the CPU kernel.
#include <initializer_list>

#include "device_utils.cuh"

namespace moek::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarp;

__device__ __forceinline__ int64_t warp_id() {
  return static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
}

__device__ __forceinline__ int lane_id() { return threadIdx.x % kWarp; }

__device__ __forceinline__ void check_row_src(int64_t a, int64_t TK, int64_t r) {
  MOEK_DEVICE_CHECK(a < TK, "dispatch: row_src must be in [-1, T*K=%lld), got %lld at row %lld",
                    static_cast<long long>(TK), static_cast<long long>(a), static_cast<long long>(r));
}

__device__ __forceinline__ void check_row(const char* op, int64_t r, int64_t R, int64_t t, int k) {
  MOEK_DEVICE_CHECK(r < R, "%s: rows must be in [-1, R=%lld), got %lld at [%lld, %d]", op, static_cast<long long>(R),
                    static_cast<long long>(r), static_cast<long long>(t), k);
}

// Unweighted dispatch is a bitwise copy: W is an unsigned word of the row's granularity (16 bytes
// as uint4 when aligned, else the element size), `width` the row length in words.
template <typename W>
__global__ void __launch_bounds__(kThreads)
    dispatch_copy_kernel(const W* __restrict__ x, int64_t width, int K, const int64_t* __restrict__ row_src,
                         int64_t R, int64_t TK, W* __restrict__ out) {
  const int64_t r = warp_id();
  if (r >= R) return;
  const int64_t a = row_src[r];
  W* o = out + r * width;
  if (a < 0) {
    for (int64_t i = lane_id(); i < width; i += kWarp) o[i] = W{};
    return;
  }
  check_row_src(a, TK, r);
  const W* src = x + (a / K) * width;
  for (int64_t i = lane_id(); i < width; i += kWarp) o[i] = src[i];
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    dispatch_weighted_kernel(const scalar_t* __restrict__ x, int64_t D, int K, const int64_t* __restrict__ row_src,
                             int64_t R, int64_t TK, const acc_t<scalar_t>* __restrict__ weights,
                             scalar_t* __restrict__ out) {
  using A = acc_t<scalar_t>;
  const int64_t r = warp_id();
  if (r >= R) return;
  const int64_t a = row_src[r];
  scalar_t* o = out + r * D;
  const int64_t packs = D / VEC;
  if (a < 0) {
    Pack<scalar_t, VEC> z;
#pragma unroll
    for (int j = 0; j < VEC; ++j) z.v[j] = from_acc<scalar_t>(A(0));
    for (int64_t i = lane_id(); i < packs; i += kWarp) store_pack<scalar_t, VEC>(o + i * VEC, z);
    return;
  }
  check_row_src(a, TK, r);
  const scalar_t* src = x + (a / K) * D;
  const A s = weights[a];
  for (int64_t i = lane_id(); i < packs; i += kWarp) {
    auto p = load_pack<scalar_t, VEC>(src + i * VEC);
#pragma unroll
    for (int j = 0; j < VEC; ++j) p.v[j] = from_acc<scalar_t>(s * to_acc<A>(p.v[j]));
    store_pack<scalar_t, VEC>(o + i * VEC, p);
  }
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(const scalar_t* __restrict__ y, int64_t R, int64_t D, const int64_t* __restrict__ rows, int64_t T,
                   int K, const acc_t<scalar_t>* __restrict__ weights, scalar_t* __restrict__ out) {
  using A = acc_t<scalar_t>;
  const int64_t t = warp_id();
  if (t >= T) return;
  const int64_t* rt = rows + t * K;
  for (int k = 0; k < K; ++k) {
    if (rt[k] >= 0) check_row("combine", rt[k], R, t, k);
  }
  const int64_t packs = D / VEC;
  for (int64_t i = lane_id(); i < packs; i += kWarp) {
    A acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = 0;
    for (int k = 0; k < K; ++k) {
      const int64_t r = rt[k];
      if (r < 0) continue;
      const A s = weights ? weights[t * K + k] : A(1);
      const auto p = load_pack<scalar_t, VEC>(y + r * D + i * VEC);
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] += s * to_acc<A>(p.v[j]);
    }
    Pack<scalar_t, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = from_acc<scalar_t>(acc[j]);
    store_pack<scalar_t, VEC>(out + t * D + i * VEC, o);
  }
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    combine_weights_grad_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t T, int64_t R,
                                int64_t D, const int64_t* __restrict__ rows, int K,
                                acc_t<scalar_t>* __restrict__ out) {
  using A = acc_t<scalar_t>;
  const int64_t tk = warp_id();
  if (tk >= T * K) return;
  const int64_t r = rows[tk];  // uniform over the warp: the shuffles below see all 32 lanes
  if (r < 0) {
    if (lane_id() == 0) out[tk] = 0;
    return;
  }
  const int64_t t = tk / K;
  check_row("combine_weights_grad", r, R, t, static_cast<int>(tk - t * K));
  const scalar_t* ar = a + t * D;
  const scalar_t* br = b + r * D;
  A s = 0;
  for (int64_t i = lane_id(); i < D / VEC; i += kWarp) {
    const auto pa = load_pack<scalar_t, VEC>(ar + i * VEC);
    const auto pb = load_pack<scalar_t, VEC>(br + i * VEC);
#pragma unroll
    for (int j = 0; j < VEC; ++j) s += to_acc<A>(pa.v[j]) * to_acc<A>(pb.v[j]);
  }
  s = warp_sum(s);
  if (lane_id() == 0) out[tk] = s;
}

unsigned warps_to_blocks(int64_t warps) { return static_cast<unsigned>(ceil_div(warps, kWarpsPerBlock)); }

// Calls fn(Int<VEC>{}) with 16-byte packs when D and every pointer allow it, else single elements.
template <typename scalar_t, typename Fn>
void with_vec(int64_t D, std::initializer_list<const void*> ptrs, Fn&& fn) {
  bool ok = D % kVec16<scalar_t> == 0;
  for (const void* p : ptrs) ok = ok && (p == nullptr || aligned16(p));
  if (ok) {
    fn(Int<kVec16<scalar_t>>{});
  } else {
    fn(Int<1>{});
  }
}

template <typename W>
void launch_copy(const void* x, int64_t width, int K, const int64_t* row_src, int64_t R, int64_t TK, void* out,
                 cudaStream_t stream) {
  dispatch_copy_kernel<W><<<warps_to_blocks(R), kThreads, 0, stream>>>(static_cast<const W*>(x), width, K, row_src,
                                                                        R, TK, static_cast<W*>(out));
}

}  // namespace

const char* cuda_error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

int launch_dispatch(const void* x, DType dtype, int64_t T, int64_t D, int K, const int64_t* row_src, int64_t R,
                    const void* weights, void* out, cudaStream_t stream) {
  if (R == 0 || D == 0) return 0;
  const int64_t TK = T * K;
  return MOEK_DISPATCH_DTYPE(dtype, [&] {
    if (weights == nullptr) {
      const int64_t bytes = D * static_cast<int64_t>(sizeof(scalar_t));
      if (bytes % 16 == 0 && aligned16(x) && aligned16(out)) {
        launch_copy<uint4>(x, bytes / 16, K, row_src, R, TK, out, stream);
      } else if constexpr (sizeof(scalar_t) == 2) {
        launch_copy<uint16_t>(x, D, K, row_src, R, TK, out, stream);
      } else if constexpr (sizeof(scalar_t) == 4) {
        launch_copy<uint32_t>(x, D, K, row_src, R, TK, out, stream);
      } else {
        launch_copy<uint64_t>(x, D, K, row_src, R, TK, out, stream);
      }
    } else {
      with_vec<scalar_t>(D, {x, out}, [&](auto V) {
        dispatch_weighted_kernel<scalar_t, decltype(V)::value><<<warps_to_blocks(R), kThreads, 0, stream>>>(
            static_cast<const scalar_t*>(x), D, K, row_src, R, TK, static_cast<const acc_t<scalar_t>*>(weights),
            static_cast<scalar_t*>(out));
      });
    }
    return launch_status();
  });
}

int launch_combine(const void* y, DType dtype, int64_t R, int64_t D, const int64_t* rows, int64_t T, int K,
                   const void* weights, void* out, cudaStream_t stream) {
  if (T == 0 || D == 0) return 0;
  return MOEK_DISPATCH_DTYPE(dtype, [&] {
    with_vec<scalar_t>(D, {y, out}, [&](auto V) {
      combine_kernel<scalar_t, decltype(V)::value><<<warps_to_blocks(T), kThreads, 0, stream>>>(
          static_cast<const scalar_t*>(y), R, D, rows, T, K, static_cast<const acc_t<scalar_t>*>(weights),
          static_cast<scalar_t*>(out));
    });
    return launch_status();
  });
}

int launch_combine_weights_grad(const void* a, const void* b, DType dtype, int64_t T, int64_t R, int64_t D,
                                const int64_t* rows, int K, void* out, cudaStream_t stream) {
  if (T == 0 || K == 0) return 0;
  return MOEK_DISPATCH_DTYPE(dtype, [&] {
    with_vec<scalar_t>(D, {a, b}, [&](auto V) {
      combine_weights_grad_kernel<scalar_t, decltype(V)::value><<<warps_to_blocks(T * K), kThreads, 0, stream>>>(
          static_cast<const scalar_t*>(a), static_cast<const scalar_t*>(b), T, R, D, rows, K,
          static_cast<acc_t<scalar_t>*>(out));
    });
    return launch_status();
  });
}

}  // namespace moek::cuda

// Device-side helpers shared by the .cu files: element types and their fp32/fp64 conversions,
// 16-byte packs, warp reductions, the device-side argument check and the dtype switch.
// Light headers only (no torch): this is what keeps the CUDA part quick to compile.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <type_traits>

#include "launchers.h"

namespace moek::cuda {

constexpr int kWarp = 32;

template <int N>
using Int = std::integral_constant<int, N>;
constexpr unsigned kFullMask = 0xffffffffu;

// Accumulation type: fp32, fp64 for fp64 data.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Acc<T>::type;

// torch builds with __CUDA_NO_HALF_CONVERSIONS__, so every conversion is spelled out; both
// round to nearest even like c10::Half / c10::BFloat16.
template <typename A, typename T>
__device__ __forceinline__ A to_acc(T v) {
  return static_cast<A>(v);
}
template <>
__device__ __forceinline__ float to_acc<float, __half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T, typename A>
__device__ __forceinline__ T from_acc(A v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

// N consecutive elements moved as one load/store (16 bytes when N = 16 / sizeof(T)).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename V>
__device__ __forceinline__ V warp_sum(V v, int width = kWarp) {
  for (int o = width / 2; o > 0; o /= 2) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int launch_status() { return static_cast<int>(cudaGetLastError()); }

}  // namespace moek::cuda

// A bad value found on the device (an index out of range): print what and where, then trap, as
// PyTorch's own index kernels do. The error surfaces at the next synchronisation as a CUDA
// error; the host cannot check the values without a sync.
#define MOEK_DEVICE_CHECK(cond, fmt, ...)                                 \
  do {                                                                    \
    if (!(cond)) {                                                        \
      printf("moe_kernels: " fmt "\n", __VA_ARGS__);                      \
      __trap();                                                           \
    }                                                                     \
  } while (0)

// Runs the body with scalar_t bound to the element type of `dtype`.
#define MOEK_DISPATCH_DTYPE(dtype, ...)                      \
  [&] {                                                      \
    switch (dtype) {                                         \
      case ::moek::cuda::DType::kFloat32: {                  \
        using scalar_t = float;                              \
        return __VA_ARGS__();                                \
      }                                                      \
      case ::moek::cuda::DType::kFloat16: {                  \
        using scalar_t = __half;                             \
        return __VA_ARGS__();                                \
      }                                                      \
      case ::moek::cuda::DType::kBFloat16: {                 \
        using scalar_t = __nv_bfloat16;                      \
        return __VA_ARGS__();                                \
      }                                                      \
      default: {                                             \
        using scalar_t = double;                             \
        return __VA_ARGS__();                                \
      }                                                      \
    }                                                        \
  }()

// Plain-pointer launchers of the CUDA kernels: the only interface between the host code
// (csrc/cuda/*.cpp, compiled by the C++ compiler with ATen) and the kernels (csrc/cuda/*.cu,
// compiled by nvcc without any torch header, which keeps the CUDA part quick to build).
//
// This header includes no CUDA header either, so the host files compile against torch's headers
// alone. Every launcher enqueues its work on `stream`, never synchronises, never reads device
// memory from the host, and returns the cudaError_t of its launches as an int (0 = success;
// cuda_error_string names it). Empty problems launch nothing.
//
// Shape letters: T tokens, E experts, K choices per token, S group size, C capacity, D width,
// R buffer rows, N = T*K assignments.
#pragma once

#include <cstddef>
#include <cstdint>

// The runtime's own spelling, so a .cu file that also sees cuda_runtime.h agrees with this one.
typedef struct CUstream_st* cudaStream_t;

namespace moek::cuda {

// Element types of float tensors. Accumulation (and every weight/gradient buffer the launchers
// call "acc") is fp32, or fp64 for kFloat64.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

const char* cuda_error_string(int error);

// ---- gating (gating_kernels.cu)

// weights[T, k] (acc) and indices[T, k] of the top-k softmax probabilities of logits[T, E]
// (contiguous). E <= moek::kMaxExperts, k <= min(E, moek::kMaxK).
int launch_topk_softmax(const void* logits, DType dtype, int64_t T, int E, int k, bool renormalize, void* weights,
                        int64_t* indices, cudaStream_t stream);

// grad_logits[T, E] (dtype of logits) from grad_weights[T, k] (acc) and the chosen indices[T, k].
// An index outside [0, E) stops the kernel with a device-side error.
int launch_topk_softmax_backward(const void* grad_weights, const void* logits, DType dtype, const int64_t* indices,
                                 int64_t T, int E, int k, bool renormalize, void* grad_logits, cudaStream_t stream);

// ---- routing (routing_kernels.cu)

// Bytes of scratch memory launch_make_routing needs (sort buffers and CUB's temporary storage).
// Reads no device memory; call it with the stream's device current.
size_t make_routing_workspace_bytes(int64_t T, int K, int64_t E, int64_t S, bool capacity, bool priority);

// The routing plan of indices[T, K] (contiguous int64) in groups of S tokens: slot[T, K],
// rows[T, K], row_src[R], counts[E], offsets[E+1] as in moe_kernels/reference.py. capacity < 0:
// dropless. priority: [T] fp32 for Batch Prioritized Routing, or null. T > 0 and T*K < 2**31.
// An index outside [0, E) stops the kernel with a device-side error.
int launch_make_routing(const int64_t* indices, int64_t T, int K, int64_t E, int64_t capacity, int64_t S,
                        const float* priority, int64_t* slot, int64_t* rows, int64_t* row_src, int64_t* counts,
                        int64_t* offsets, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// ---- dispatch / combine (dispatch_combine_kernels.cu)

// out[r] = w[a] * x[a / K] for a = row_src[r] >= 0, zeros where a < 0. x[T, D], out[R, D]
// contiguous; weights: [T*K] acc or null (then a bitwise copy).
int launch_dispatch(const void* x, DType dtype, int64_t T, int64_t D, int K, const int64_t* row_src, int64_t R,
                    const void* weights, void* out, cudaStream_t stream);

// out[t] = sum_k w[t, k] * y[rows[t, k]] over rows >= 0 (acc accumulation, k in order). y[R, D],
// out[T, D] contiguous; weights: [T, K] acc or null (weight 1).
int launch_combine(const void* y, DType dtype, int64_t R, int64_t D, const int64_t* rows, int64_t T, int K,
                   const void* weights, void* out, cudaStream_t stream);

// out[t, k] = <a[t], b[rows[t, k]]> (acc), 0 where rows < 0. a[T, D], b[R, D] contiguous.
int launch_combine_weights_grad(const void* a, const void* b, DType dtype, int64_t T, int64_t R, int64_t D,
                                const int64_t* rows, int K, void* out, cudaStream_t stream);

}  // namespace moek::cuda

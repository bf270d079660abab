// The CPU weight gradient of a small expert on AVX-512: C = A^T B over few rows, written once.
//
// An expert's weight gradient reduces over its own rows only (about 100 in a V-MoE-S/32 or B/16
// routing group), so every output element gets few FMAs and the output (E times a dense layer's
// weight gradient) dominates the memory traffic. MKL's sgemm writes it through the cache, reading
// every line before it writes it; it ran at 0.8-0.85x its rate on the same GEMM over 800 rows.
// This kernel keeps 12 x 32 output elements in registers through the whole reduction (both
// operands packed, the 32 columns of B in L1) and writes each finished tile with non-temporal
// stores, which write a line without reading it first (this VM: 15.9 against 8.7 GB/s for a
// 64 MiB fill). A weight gradient is not read again until the optimizer step, which then reads it
// from memory rather than the cache: with AdamW right after the backward, a V-MoE-S/32 group step
// (64 MB of expert gradients) gained 3.4-4.7 ms in the backward and its optimizer step lost
// 0.6-2.1 ms, a net 1-4% of the whole step; at B/16 (577 MB of gradients, more than the cache
// holds) the optimizer lost nothing and the step gained 7% (measured, 2 threads).
//
// Plain C++ (no torch headers); the caller checks wgrad_avx512_available() first.
#pragma once

#include <cstdint>

namespace moek {

// At most this many rows (P) per call: the packed A (P x up to kWgradMaxCols) and a B strip
// (P x 32) stay in L2. Longer experts take the ATen path (MKL is efficient at that length).
constexpr int64_t kWgradMaxRows = 512;

// Whether this CPU and OS run AVX-512F (read once).
bool wgrad_avx512_available();

// C [I, J] (row stride ldc) = A^T B with A [P, I] (row stride lda) and B [P, J] (row stride ldb),
// fp32, unit column strides, P <= kWgradMaxRows. Every output element is one accumulator summed
// over p = 0..P-1 in order: the result depends on the shapes only, never on the thread that runs
// it. Single-threaded; the caller parallelises over calls.
void wgrad_avx512(int64_t I, int64_t J, int64_t P, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                  int64_t ldc);

}  // namespace moek

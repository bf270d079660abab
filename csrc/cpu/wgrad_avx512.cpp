// See wgrad_avx512.h. The intrinsics are compiled for AVX-512F through function attributes, so
// the rest of the extension keeps the baseline x86-64 target and this file builds everywhere;
// elsewhere (no x86, or a compiler without the attribute) the kernel reports itself unavailable.
#include "wgrad_avx512.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MOEK_WGRAD_AVX512 1
#endif

namespace moek {

#ifdef MOEK_WGRAD_AVX512

namespace {

constexpr int64_t kMR = 12;  // output rows per register tile (12 x 2 zmm accumulators)
constexpr int64_t kNR = 32;  // output columns per register tile

#define MOEK_REP12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

// One 12 x 32 tile: acc = sum_p a[p*12 + r] * b[p*32 + j]; a and b are packed and zero-padded.
// The ni x nj valid corner is stored to c (row stride ldc), non-temporally where the whole tile is
// full-width and 64-byte aligned.
__attribute__((target("avx512f"))) void tile(int64_t P, const float* a, const float* b, int64_t ni, int64_t nj,
                                             float* c, int64_t ldc) {
#define MOEK_DECL(r) __m512 c##r##0 = _mm512_setzero_ps(), c##r##1 = _mm512_setzero_ps();
  MOEK_REP12(MOEK_DECL)
#undef MOEK_DECL
#pragma GCC unroll 4
  for (int64_t p = 0; p < P; ++p, a += kMR, b += kNR) {
    const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
#define MOEK_STEP(r)                                   \
  {                                                    \
    const __m512 av = _mm512_set1_ps(a[r]);            \
    c##r##0 = _mm512_fmadd_ps(av, b0, c##r##0);        \
    c##r##1 = _mm512_fmadd_ps(av, b1, c##r##1);        \
  }
    MOEK_REP12(MOEK_STEP)
#undef MOEK_STEP
  }
  const bool stream = nj == kNR && (reinterpret_cast<uintptr_t>(c) % 64) == 0 && (ldc * sizeof(float)) % 64 == 0;
  const __mmask16 m0 = nj >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << nj) - 1);
  const __mmask16 m1 = nj >= 32 ? 0xFFFF : nj <= 16 ? 0 : static_cast<__mmask16>((1u << (nj - 16)) - 1);
#define MOEK_STORE(r)                                      \
  if (r < ni) {                                            \
    float* cr = c + r * ldc;                               \
    if (stream) {                                          \
      _mm512_stream_ps(cr, c##r##0);                       \
      _mm512_stream_ps(cr + 16, c##r##1);                  \
    } else {                                               \
      _mm512_mask_storeu_ps(cr, m0, c##r##0);              \
      _mm512_mask_storeu_ps(cr + 16, m1, c##r##1);         \
    }                                                      \
  }
  MOEK_REP12(MOEK_STORE)
#undef MOEK_STORE
}

#undef MOEK_REP12

__attribute__((target("avx512f"))) void fence() { _mm_sfence(); }

}  // namespace

bool wgrad_avx512_available() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;  // libgcc checks the OS's XCR0 state too
  }();
  return ok;
}

void wgrad_avx512(int64_t I, int64_t J, int64_t P, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                  int64_t ldc) {
  if (I <= 0 || J <= 0) return;
  const int64_t iblocks = (I + kMR - 1) / kMR;
  // Per-thread packing buffers, grown to the largest call and kept (at most ~1 MiB of A and a
  // 64 KiB B strip at kWgradMaxRows).
  thread_local std::vector<float> pack_a, pack_b;
  pack_a.resize(static_cast<size_t>(iblocks * P * kMR));
  pack_b.resize(static_cast<size_t>(P * kNR));
  // A's columns in panels of 12: panel ib holds A[p, 12*ib + r] at [ib][p][r], zero past I.
  for (int64_t ib = 0; ib < iblocks; ++ib) {
    const int64_t i0 = ib * kMR, ni = std::min(kMR, I - i0);
    float* dst = pack_a.data() + ib * P * kMR;
    for (int64_t p = 0; p < P; ++p) {
      std::memcpy(dst + p * kMR, A + p * lda + i0, ni * sizeof(float));
      if (ni < kMR) std::memset(dst + p * kMR + ni, 0, (kMR - ni) * sizeof(float));
    }
  }
  for (int64_t j0 = 0; j0 < J; j0 += kNR) {
    const int64_t nj = std::min(kNR, J - j0);
    // B's strip of 32 columns, [p][j], zero past J.
    for (int64_t p = 0; p < P; ++p) {
      float* dst = pack_b.data() + p * kNR;
      std::memcpy(dst, B + p * ldb + j0, nj * sizeof(float));
      if (nj < kNR) std::memset(dst + nj, 0, (kNR - nj) * sizeof(float));
    }
    for (int64_t ib = 0; ib < iblocks; ++ib) {
      const int64_t i0 = ib * kMR;
      tile(P, pack_a.data() + ib * P * kMR, pack_b.data(), std::min(kMR, I - i0), nj, C + i0 * ldc + j0, ldc);
    }
  }
  fence();  // the non-temporal stores are visible before the caller's region ends
}

#else

bool wgrad_avx512_available() { return false; }

// Unreachable: callers check wgrad_avx512_available() first.
void wgrad_avx512(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t) {
  __builtin_trap();
}

#endif

}  // namespace moek

// CPU grouped matmul: ATen GEMMs on fixed tiles of each expert's slice. The tiles depend only on
// the shapes and each runs single-threaded inside an OpenMP region (BLAS does not nest threads),
// so every output element is reduced in the same order whatever the thread count: results are
// bitwise identical for 1 or N threads, which a multi-threaded BLAS call does not promise (it
// may split a long reduction, as in a weight gradient over many rows). Rows past offsets[E]
// come out 0.
//
// bf16/fp16 on CPUs without low-precision matmul units: there ATen emulates the low-precision GEMM
// element by element (an S/32 bf16 training step took ~33x its fp32 time on an AVX2-only CPU), so
// each tile is converted to fp32, multiplied by sgemm and rounded once into the output. The CPU's
// features are read at run time (CPUID); where it has the units (avx512_bf16 or amx_bf16 for bf16,
// avx512_fp16 or amx_fp16 for fp16) the native path is kept. MOE_KERNELS_CPU_LOWP_GEMM overrides
// the choice: "auto" (default), "fp32" (always convert) or "native" (never).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define MOEK_X86_CPUID 1
#endif

#include "../checks.h"

namespace moek {
namespace {

// Rows per forward tile (at most) and output columns per weight-gradient tile. A row tile is one
// single-threaded BLAS call that packs the expert's whole weight, so it must be tall enough to
// amortise that: at 128 rows the packing cost 10-25% of a V-MoE-S/32 expert GEMM (torch's
// grouped_mm on whole slices was faster from 1600 tokens on); 512 still spreads a large expert
// over the cores.
constexpr int64_t kRowTile = 512;
constexpr int64_t kColTile = 128;

struct Tile {
  int64_t e, lo, hi;
};

struct LowpUnits {
  bool bf16, fp16;
};

#ifdef MOEK_X86_CPUID
uint64_t xcr0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}
#endif

// The CPU's low-precision matmul units, usable only where the OS saves their registers (XCR0:
// opmask and ZMM state for AVX-512, tile config and data for AMX).
LowpUnits detect_lowp_units() {
#ifdef MOEK_X86_CPUID
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return {false, false};  // no OSXSAVE
  const uint64_t x = xcr0();
  const bool avx512_os = (x & 0xE6) == 0xE6, amx_os = (x & (3ull << 17)) == (3ull << 17);
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return {false, false};
  const unsigned leaf7_edx = d, max_subleaf = a;
  unsigned leaf7_1_eax = 0;
  if (max_subleaf >= 1 && __get_cpuid_count(7, 1, &a, &b, &c, &d)) leaf7_1_eax = a;
  const bool avx512_bf16 = leaf7_1_eax & (1u << 5), amx_fp16 = leaf7_1_eax & (1u << 21);
  const bool amx_bf16 = leaf7_edx & (1u << 22), avx512_fp16 = leaf7_edx & (1u << 23);
  return {(avx512_os && avx512_bf16) || (amx_os && amx_bf16), (avx512_os && avx512_fp16) || (amx_os && amx_fp16)};
#else
  // Detection is x86-only: elsewhere (e.g. ARM with its own bf16 extensions) keep ATen's path.
  return {true, true};
#endif
}

// Whether dtype's GEMMs run natively (true) or on fp32 copies of the tiles (false). Decided once
// per op call, outside the parallel region; the environment is read each call so tests can force
// either path.
bool lowp_native(at::ScalarType dtype) {
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return true;
  static const LowpUnits units = detect_lowp_units();
  const char* env = std::getenv("MOE_KERNELS_CPU_LOWP_GEMM");
  const std::string mode = env ? env : "";
  if (mode.empty() || mode == "auto") return dtype == at::kBFloat16 ? units.bf16 : units.fp16;
  TORCH_CHECK(mode == "fp32" || mode == "native",
              "moe_kernels: MOE_KERNELS_CPU_LOWP_GEMM must be auto, fp32 or native, got '", mode, "'");
  return mode == "native";
}

// Splits [0, n) of every expert e into ceil(n / tile) near-equal tiles (n = rows of e, or a
// fixed width): 800 rows at tile 512 are 400 + 400, not 512 + 288.
template <typename LenFn>
std::vector<Tile> make_tiles(int64_t E, int64_t tile, LenFn len) {
  std::vector<Tile> tiles;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = len(e), parts = (n + tile - 1) / tile;
    for (int64_t p = 0; p < parts; ++p) tiles.push_back({e, n * p / parts, n * (p + 1) / parts});
  }
  return tiles;
}

// Runs fn(i) for every tile in an OpenMP region that is always opened, even for one tile: at::
// parallel_for would run a single tile on the calling thread, where BLAS is multi-threaded.
template <typename Fn>
void for_each_tile(int64_t n, Fn fn) {
  std::exception_ptr error = nullptr;
  const int threads = std::max(1, at::get_num_threads());
// Which thread runs a tile does not change its result (one single-threaded call), so the
// schedule is free to balance uneven experts.
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t i = 0; i < n; ++i) {
    if (error) continue;
    try {
      // Worker threads do not inherit the caller's dispatch state: stay below autograd.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      fn(i);
    } catch (...) {
#pragma omp critical(moek_tile_error)
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

void check_mm(const char* op, const at::Tensor& x, const char* other_name, const at::Tensor& other) {
  check_dim(op, "x", x, 2);
  check_float_tensor(op, "x", x);
  TORCH_CHECK(x.scalar_type() == other.scalar_type(), "moe_kernels::", op, ": ", other_name,
              " must have the dtype of x (", x.scalar_type(), "), got ", other.scalar_type());
  check_same_device(op, "x", x, other_name, other);
}

// bias [E, N] (optional) is fused into each expert's GEMM (addmm), as a padded bmm would do.
at::Tensor grouped_mm_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets,
                          const c10::optional<at::Tensor>& bias) {
  const char* op = "grouped_mm";
  check_mm(op, x, "w", w);
  check_dim(op, "w", w, 3);
  TORCH_CHECK(w.size(2) == x.size(1), "moe_kernels::", op, ": w must have shape [E, N, Din=", x.size(1),
              "], got ", shape_str(w));
  const int64_t E = w.size(0), M = x.size(0), N = w.size(1);
  check_offsets_host(op, offsets, E, M);
  if (bias.has_value()) {
    check_mm(op, x, "bias", *bias);
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == E && bias->size(1) == N, "moe_kernels::", op,
                ": bias must have shape [E=", E, ", N=", N, "], got ", shape_str(*bias));
  }
  const int64_t* o = offsets.data_ptr<int64_t>();
  auto out = at::empty({M, N}, x.options());
  const bool to_fp32 = !lowp_native(x.scalar_type());
  const auto tiles = make_tiles(E, kRowTile, [&](int64_t e) { return o[e + 1] - o[e]; });
  for_each_tile(static_cast<int64_t>(tiles.size()), [&](int64_t i) {
    const Tile& t = tiles[i];
    const int64_t r0 = o[t.e] + t.lo, n = t.hi - t.lo;
    at::Tensor dst = out.narrow(0, r0, n);
    if (to_fp32) {
      // fp32 copies of the tile's rows and the expert's weight (one per tile: the copy costs
      // Din*N of the GEMM's 2*n*Din*N), accumulated in fp32, rounded once by copy_.
      const at::Tensor a = x.narrow(0, r0, n).to(at::kFloat);             // [n, Din]
      const at::Tensor wt = w.select(0, t.e).to(at::kFloat).t();          // [Din, N]
      dst.copy_(bias.has_value() ? at::addmm(bias->select(0, t.e).to(at::kFloat), a, wt) : at::mm(a, wt));
    } else if (bias.has_value()) {
      at::addmm_out(dst, bias->select(0, t.e), x.narrow(0, r0, n), w.select(0, t.e).t());
    } else {
      at::mm_out(dst, x.narrow(0, r0, n), w.select(0, t.e).t());
    }
  });
  if (o[E] < M) out.narrow(0, o[E], M - o[E]).zero_();
  return out;
}

at::Tensor grouped_mm_weight_grad_cpu(const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& offsets) {
  const char* op = "grouped_mm_weight_grad";
  check_mm(op, x, "grad_out", grad_out);
  check_dim(op, "grad_out", grad_out, 2);
  TORCH_CHECK(grad_out.size(0) == x.size(0), "moe_kernels::", op, ": grad_out must have ", x.size(0),
              " rows like x, got shape ", shape_str(grad_out));
  const int64_t E = offsets.size(0) - 1, M = x.size(0);
  TORCH_CHECK(E >= 1, "moe_kernels::", op, ": offsets must have at least 2 entries, got ", offsets.size(0));
  check_offsets_host(op, offsets, E, M);
  const int64_t* o = offsets.data_ptr<int64_t>();
  const int64_t N = grad_out.size(1);
  auto dw = at::empty({E, N, x.size(1)}, x.options());
  const bool to_fp32 = !lowp_native(x.scalar_type());
  // Tiles over output columns: each keeps the whole reduction over the expert's rows.
  const auto tiles = make_tiles(E, kColTile, [&](int64_t) { return N; });
  for_each_tile(static_cast<int64_t>(tiles.size()), [&](int64_t i) {
    const Tile& t = tiles[i];
    const int64_t n = o[t.e + 1] - o[t.e];
    at::Tensor dst = dw.select(0, t.e).narrow(0, t.lo, t.hi - t.lo);
    if (n == 0) {
      dst.zero_();
    } else if (x.scalar_type() == at::kFloat || to_fp32) {
      // fp32 math: the reduction over the expert's rows in fixed chunks of at most kRowTile,
      // summed in chunk order. One MKL sgemm over more than about 1,000 rows splits the
      // reduction by the thread count (measured: 1 vs 2 threads differed from 1,100 rows), which
      // would break the bitwise thread-count invariance of DESIGN.md 3.9; at most 512 rows a call
      // it does not, and the extra accumulation is 1/512 of the FLOPs.
      const int64_t parts = (n + kRowTile - 1) / kRowTile;
      at::Tensor acc = x.scalar_type() == at::kFloat ? dst : at::empty(dst.sizes(), dst.options().dtype(at::kFloat));
      for (int64_t p = 0; p < parts; ++p) {
        const int64_t r0 = o[t.e] + n * p / parts, rows = n * (p + 1) / parts - n * p / parts;
        at::Tensor g = grad_out.narrow(0, r0, rows).narrow(1, t.lo, t.hi - t.lo);  // [rows, cols]
        at::Tensor a = x.narrow(0, r0, rows);                                       // [rows, Din]
        if (to_fp32) {
          // The expert's x rows are converted once per column tile: rows*Din against
          // 2*rows*Din*128 FLOPs.
          g = g.to(at::kFloat);
          a = a.to(at::kFloat);
        }
        if (p == 0) {
          at::mm_out(acc, g.t(), a);
        } else {
          acc.addmm_(g.t(), a);
        }
      }
      if (!acc.is_same(dst)) dst.copy_(acc);  // rounded once to the low-precision dtype
    } else {
      // Native bf16/fp16 (the CPU's low-precision units; thread-count invariant as measured).
      at::mm_out(dst, grad_out.narrow(0, o[t.e], n).narrow(1, t.lo, t.hi - t.lo).t(), x.narrow(0, o[t.e], n));
    }
  });
  return dw;
}

}  // namespace
}  // namespace moek

// Which path the CPU grouped GEMM takes for dtype now (MOE_KERNELS_CPU_LOWP_GEMM included): for
// tests and `python -m bench`. Catch-all, like cuda_built: no CPU kernel, so the op list is unchanged.
TORCH_LIBRARY_FRAGMENT(moe_kernels_C, m) {
  m.def("cpu_lowp_gemm_native(ScalarType dtype) -> bool", &moek::lowp_native);
}

TORCH_LIBRARY_IMPL(moe_kernels_C, CPU, m) {
  m.impl("grouped_mm", &moek::grouped_mm_cpu);
  m.impl("grouped_mm_weight_grad", &moek::grouped_mm_weight_grad_cpu);
}

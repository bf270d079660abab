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
//
// The fused ops of the expert MLP (backends.FUSED_OPS, declared by the cpu backend): GELU applied
// to each forward tile right after its GEMM (while the tile is in cache) instead of a pass over
// the whole [M, H]; GELU's derivative applied to each dX tile the same way; the weight gradient
// with GELU applied to the loaded rows (fc2's dW takes gelu(h) without materialising it) and the
// bias gradients as column sums in the same tiles, in a fixed row order. Every elementwise step
// runs the ATen kernel the unfused ops run (at::gelu, at::gelu_backward) on the tile.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
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
#include "buffer_cache.h"
#include "wgrad_avx512.h"

namespace moek {
namespace {

// Rows per forward tile (at most) and output columns per weight-gradient tile. A row tile is one
// single-threaded BLAS call that packs the expert's whole weight, so it must be tall enough to
// amortise that: at 128 rows the packing cost 10-25% of a V-MoE-S/32 expert GEMM (torch's
// grouped_mm on whole slices was faster from 1600 tokens on); 512 still spreads a large expert
// over the cores.
constexpr int64_t kRowTile = 512;
constexpr int64_t kColTile = 128;
// Native low-precision weight-gradient tiles are wider: an AMX bf16 GEMM of 128 output columns
// ran at 0.6-0.8x the rate of one over the whole expert (V-MoE-S/32 and B/16 shapes, measured),
// and 1024 keeps a few tiles per expert for the threads when E is small.
constexpr int64_t kColTileNative = 1024;

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
// fixed width): 800 rows at tile 512 are 400 + 400, not 512 + 288. With align > 1 the inner
// boundaries are rounded up to multiples of align (empty tiles dropped).
template <typename LenFn>
std::vector<Tile> make_tiles(int64_t E, int64_t tile, LenFn len, int64_t align = 1) {
  std::vector<Tile> tiles;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = len(e), parts = (n + tile - 1) / tile;
    auto bound = [&](int64_t p) { return p == parts ? n : std::min(n, (n * p / parts + align - 1) / align * align); };
    for (int64_t p = 0; p < parts; ++p) {
      if (bound(p + 1) > bound(p)) tiles.push_back({e, bound(p), bound(p + 1)});
    }
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

void check_bias(const char* op, const at::Tensor& x, const c10::optional<at::Tensor>& bias, int64_t E, int64_t N) {
  if (!bias.has_value()) return;
  check_mm(op, x, "bias", *bias);
  TORCH_CHECK(bias->dim() == 2 && bias->size(0) == E && bias->size(1) == N, "moe_kernels::", op,
              ": bias must have shape [E=", E, ", N=", N, "], got ", shape_str(*bias));
}

// x [M, Din] against w [E, N, Din] (any strides), offsets [E+1]; returns E.
int64_t check_forward(const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets,
                      const char* x_name = "x") {
  check_mm(op, x, "w", w);
  check_dim(op, "w", w, 3);
  TORCH_CHECK(w.size(2) == x.size(1), "moe_kernels::", op, ": w must have shape [E, N, Din=", x.size(1),
              "] (Din: the columns of ", x_name, "), got ", shape_str(w));
  check_offsets_host(op, offsets, w.size(0), x.size(0));
  return w.size(0);
}

// GELU's variant: torch's names, as F.gelu takes them.
void check_approximate(const char* op, const std::string& approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh", "moe_kernels::", op,
              ": approximate must be 'none' or 'tanh', got '", approximate, "'");
}

// dst [n, N] = a [n, Din] @ we [N, Din]^T (+ be [N]): one single-threaded GEMM, on fp32 copies of
// the operands when to_fp32 (one copy of the expert's weight per tile: Din*N against the GEMM's
// 2*n*Din*N), accumulated in fp32 and rounded once by copy_.
void tile_mm(at::Tensor dst, const at::Tensor& a, const at::Tensor& we, const c10::optional<at::Tensor>& be,
             bool to_fp32) {
  if (to_fp32) {
    const at::Tensor a32 = a.to(at::kFloat), wt = we.to(at::kFloat).t();  // [n, Din], [Din, N]
    dst.copy_(be.has_value() ? at::addmm(be->to(at::kFloat), a32, wt) : at::mm(a32, wt));
  } else if (be.has_value()) {
    at::addmm_out(dst, *be, a, we.t());
  } else {
    at::mm_out(dst, a, we.t());
  }
}

// Runs tile_mm over row tiles of every expert's rows of x; epilogue(i, rows r0, count n) runs on
// the same thread right after tile i's GEMM. Rows past offsets[E] of every output are zeroed.
template <typename Epilogue>
void forward_tiles(const at::Tensor& x, const at::Tensor& w, const int64_t* o, const c10::optional<at::Tensor>& bias,
                   at::Tensor gemm_out, Epilogue epilogue) {
  const int64_t E = w.size(0);
  const bool to_fp32 = !lowp_native(x.scalar_type());
  const auto tiles = make_tiles(E, kRowTile, [&](int64_t e) { return o[e + 1] - o[e]; });
  for_each_tile(static_cast<int64_t>(tiles.size()), [&](int64_t i) {
    const Tile& t = tiles[i];
    const int64_t r0 = o[t.e] + t.lo, n = t.hi - t.lo;
    c10::optional<at::Tensor> be;
    if (bias.has_value()) be = bias->select(0, t.e);
    tile_mm(gemm_out.narrow(0, r0, n), x.narrow(0, r0, n), w.select(0, t.e), be, to_fp32);
    epilogue(r0, n);
  });
}

void zero_padding(at::Tensor t, int64_t used) {
  if (t.size(0) > used) t.narrow(0, used, t.size(0) - used).zero_();
}

// bias [E, N] (optional) is fused into each expert's GEMM (addmm), as a padded bmm would do.
at::Tensor grouped_mm_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets,
                          const c10::optional<at::Tensor>& bias) {
  const char* op = "grouped_mm";
  const int64_t E = check_forward(op, x, w, offsets);
  check_bias(op, x, bias, E, w.size(1));
  const int64_t* o = offsets.data_ptr<int64_t>();
  auto out = cpu_empty({x.size(0), w.size(1)}, x.options());
  forward_tiles(x, w, o, bias, out, [](int64_t, int64_t) {});
  zero_padding(out, o[E]);
  return out;
}

// (gelu(p), p) with p = grouped_mm(x, w, offsets, bias): GELU on each tile after its GEMM. p is
// kept ([M, N]) only with keep_pre (the backward's input), else an empty [0, N] is returned and
// GELU runs in place on the GEMM's output. GELU reads p rounded to x's dtype, as the unfused
// F.gelu(h) does.
std::tuple<at::Tensor, at::Tensor> grouped_mm_act_cpu(const at::Tensor& x, const at::Tensor& w,
                                                      const at::Tensor& offsets,
                                                      const c10::optional<at::Tensor>& bias,
                                                      c10::string_view approximate, bool keep_pre) {
  const char* op = "grouped_mm_act";
  const int64_t E = check_forward(op, x, w, offsets);
  check_bias(op, x, bias, E, w.size(1));
  const std::string approx(approximate);
  check_approximate(op, approx);
  const int64_t M = x.size(0), N = w.size(1);
  const int64_t* o = offsets.data_ptr<int64_t>();
  auto y = cpu_empty({M, N}, x.options());
  auto pre = cpu_empty({keep_pre ? M : 0, N}, x.options());
  forward_tiles(x, w, o, bias, keep_pre ? pre : y, [&](int64_t r0, int64_t n) {
    at::Tensor yt = y.narrow(0, r0, n);
    if (keep_pre) {
      at::gelu_out(yt, pre.narrow(0, r0, n), approx);
    } else {
      at::gelu_(yt, approx);
    }
  });
  zero_padding(y, o[E]);
  zero_padding(pre, o[E]);
  return {y, pre};
}

// grouped_mm(grad, w, offsets) * gelu'(pre): GELU's derivative applied to each dX tile in place
// right after its GEMM (w: fc2's weight transposed, [E, H, Dout], a strided view).
at::Tensor grouped_mm_act_grad_cpu(const at::Tensor& grad, const at::Tensor& w, const at::Tensor& offsets,
                                   const at::Tensor& pre, c10::string_view approximate) {
  const char* op = "grouped_mm_act_grad";
  const int64_t E = check_forward(op, grad, w, offsets, "grad");
  check_mm(op, grad, "pre", pre);
  const std::string approx(approximate);
  check_approximate(op, approx);
  const int64_t M = grad.size(0), N = w.size(1);
  TORCH_CHECK(pre.dim() == 2 && pre.size(0) == M && pre.size(1) == N, "moe_kernels::", op,
              ": pre must have shape [M=", M, ", N=", N, "] (grad's rows, w's N), got ", shape_str(pre));
  const int64_t* o = offsets.data_ptr<int64_t>();
  auto out = cpu_empty({M, N}, grad.options());
  forward_tiles(grad, w, o, c10::nullopt, out, [&](int64_t r0, int64_t n) {
    at::Tensor t = out.narrow(0, r0, n);
    at::gelu_backward_out(t, t, pre.narrow(0, r0, n), approx);  // elementwise, in place
  });
  zero_padding(out, o[E]);
  return out;
}

// dst [cols] = the column sums of g [n, cols] (any strides), row after row in opmath (fp32 for
// fp16/bf16): a fixed order, whatever the thread count.
void col_sums(at::Tensor dst, const at::Tensor& g) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "moe_kernels_col_sums", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t n = g.size(0), cols = g.size(1), s0 = g.stride(0), s1 = g.stride(1);
    const scalar_t* p = g.data_ptr<scalar_t>();
    std::vector<acc_t> acc(cols, acc_t(0));
    for (int64_t r = 0; r < n; ++r) {
      const scalar_t* row = p + r * s0;
      for (int64_t c = 0; c < cols; ++c) acc[c] += static_cast<acc_t>(row[c * s1]);
    }
    at::Tensor sums = at::from_blob(acc.data(), {cols}, g.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    dst.copy_(sums);  // rounded once
  });
}

// dst [N', Din] = g [n, N']^T @ a [n, Din], a = x's rows of one expert, or gelu of them when
// approx is set (fc2's weight gradient: x = h; GELU in x's dtype, as the unfused F.gelu(h), once
// per row chunk, multiplied into every column part of dst while it is in cache). dst's rows are
// cut into near-equal parts of at most `width`.
//
// fp32 math in fixed chunks of at most kRowTile rows summed in chunk order: one MKL sgemm over
// more than about 1,000 rows splits the reduction by the thread count (measured: 1 vs 2 threads
// differed from 1,100 rows), which would break the bitwise thread-count invariance of DESIGN.md
// 3.9; at most 512 rows a call it does not, and the extra accumulation is 1/512 of the FLOPs
// (inside the GEMM, beta = 1, on a cache-resident tile). Native bf16/fp16 (the CPU's
// low-precision units; thread-count invariant as measured) is one GEMM over all rows.
void wgrad_rows(at::Tensor dst, const at::Tensor& g, const at::Tensor& x, const std::string* approx, int64_t width,
                bool to_fp32, bool native) {
  const int64_t n = g.size(0), N = g.size(1);
  if (n == 0) {
    dst.zero_();
    return;
  }
  const int64_t parts = native ? 1 : (n + kRowTile - 1) / kRowTile, col_parts = (N + width - 1) / width;
  const bool fp32_out = dst.scalar_type() == at::kFloat || dst.scalar_type() == at::kDouble;
  at::Tensor acc = native || fp32_out ? dst : at::empty(dst.sizes(), dst.options().dtype(at::kFloat));
  for (int64_t p = 0; p < parts; ++p) {
    const int64_t r0 = n * p / parts, rows = n * (p + 1) / parts - r0;
    at::Tensor gc = g.narrow(0, r0, rows), ac = x.narrow(0, r0, rows);  // [rows, N'], [rows, Din]
    if (approx) ac = at::gelu(ac, *approx);
    if (to_fp32) {
      gc = gc.to(at::kFloat);
      ac = ac.to(at::kFloat);
    }
    for (int64_t c = 0; c < col_parts; ++c) {
      const int64_t c0 = N * c / col_parts, cols = N * (c + 1) / col_parts - c0;
      at::Tensor part = acc.narrow(0, c0, cols);
      if (p == 0) {
        at::mm_out(part, gc.narrow(1, c0, cols).t(), ac);
      } else {
        part.addmm_(gc.narrow(1, c0, cols).t(), ac);
      }
    }
  }
  if (!acc.is_same(dst)) dst.copy_(acc);  // rounded once to the low-precision dtype
}

// Whether the weight gradient's AVX-512 kernel may run: the CPU has AVX-512F and
// MOE_KERNELS_CPU_WGRAD is not "aten" ("auto", the default, lets it run); read each call so tests
// and benchmarks can compare the two paths.
bool wgrad_avx512_on() {
  const char* env = std::getenv("MOE_KERNELS_CPU_WGRAD");
  const std::string mode = env ? env : "";
  TORCH_CHECK(mode.empty() || mode == "auto" || mode == "aten",
              "moe_kernels: MOE_KERNELS_CPU_WGRAD must be auto or aten, got '", mode, "'");
  return mode != "aten" && wgrad_avx512_available();
}

// Experts of at most kWgradRows rows take wgrad_avx512 (fp32, unit column strides), longer ones
// wgrad_rows (MKL). Measured at V-MoE-S/32 widths with 2 threads: 13-18% less time than MKL at
// ~100 rows per expert, ~7% at 128, even around 200, up to 7% more at 256 (at <= 256 rows the
// two gave bitwise the same sums); with one thread, even. On that path dw's tiles are at most
// kWgradColTile of its rows, cut at multiples of 12, so every register tile is the same
// computation whatever the split. Which path an expert takes depends on its row count only:
// results stay thread-count invariant.
constexpr int64_t kWgradRows = 192;
constexpr int64_t kWgradColTile = 384;
static_assert(kWgradRows <= kWgradMaxRows, "wgrad_avx512 takes at most kWgradMaxRows rows");

// (dw [E, N, Din], db [E, N]): per expert, grad_out^T @ a (a = x, or gelu(x) with approximate)
// and grad_out's column sums; an unneeded one is an empty [0].
//
// Without GELU the tiles cut dw's N (grad_out's columns): each tile reduces over its expert's
// rows for its columns of dw and of db, reading grad_out's tile once for both. With GELU, one
// tile per expert (GELU once per row) and db in the same tile. Cutting x's columns instead would
// also compute each GELU once, but its [N, 128] products ran 1.25x slower (measured). fp32
// experts of at most kWgradRows rows run wgrad_avx512, the others wgrad_rows.
std::tuple<at::Tensor, at::Tensor> weight_grad_impl(const char* op, const at::Tensor& x, const at::Tensor& grad_out,
                                                    const at::Tensor& offsets,
                                                    const c10::optional<std::string>& approximate, bool need_dw,
                                                    bool need_db) {
  check_mm(op, x, "grad_out", grad_out);
  check_dim(op, "grad_out", grad_out, 2);
  TORCH_CHECK(grad_out.size(0) == x.size(0), "moe_kernels::", op, ": grad_out must have ", x.size(0),
              " rows like x, got shape ", shape_str(grad_out));
  const int64_t E = offsets.size(0) - 1, M = x.size(0);
  TORCH_CHECK(E >= 1, "moe_kernels::", op, ": offsets must have at least 2 entries, got ", offsets.size(0));
  check_offsets_host(op, offsets, E, M);
  if (approximate.has_value()) check_approximate(op, *approximate);
  const int64_t* o = offsets.data_ptr<int64_t>();
  const int64_t N = grad_out.size(1), Din = x.size(1);
  auto dw = need_dw ? cpu_empty({E, N, Din}, x.options()) : at::empty({0}, x.options());
  auto db = need_db ? cpu_empty({E, N}, x.options()) : at::empty({0}, x.options());
  const at::ScalarType dtype = x.scalar_type();
  const bool native = (dtype == at::kBFloat16 || dtype == at::kHalf) && lowp_native(dtype);
  const bool to_fp32 = (dtype == at::kBFloat16 || dtype == at::kHalf) && !native;
  const bool per_expert = approximate.has_value() && need_dw;
  const bool avx512 = need_dw && dtype == at::kFloat && x.stride(1) == 1 && grad_out.stride(1) == 1 &&
                      wgrad_avx512_on();
  const int64_t width = per_expert ? N : avx512 ? kWgradColTile : native ? kColTileNative : kColTile;
  const auto tiles = make_tiles(E, width, [&](int64_t) { return N; }, avx512 ? 12 : 1);
  const std::string* approx = approximate.has_value() ? &*approximate : nullptr;
  for_each_tile(static_cast<int64_t>(tiles.size()), [&](int64_t i) {
    const Tile& t = tiles[i];
    const int64_t r0 = o[t.e], n = o[t.e + 1] - r0, cols = t.hi - t.lo;
    const at::Tensor g = grad_out.narrow(0, r0, n).narrow(1, t.lo, cols);  // [n, cols]
    if (need_dw) {
      at::Tensor dst = dw.select(0, t.e).narrow(0, t.lo, cols), a = x.narrow(0, r0, n);
      if (avx512 && n > 0 && n <= kWgradRows) {
        if (approx) a = at::gelu(a, *approx);  // fresh, contiguous
        wgrad_avx512(cols, Din, n, g.data_ptr<float>(), g.stride(0), a.data_ptr<float>(), a.stride(0),
                     dst.data_ptr<float>(), dst.stride(0));
      } else {
        // Column parts of the wide tiles (GELU's whole expert, the AVX-512 path's 384 rows) keep
        // each GEMM at kColTile (kColTileNative natively); the others are one GEMM per tile.
        const int64_t part = per_expert || avx512 ? (native ? kColTileNative : kColTile) : cols;
        wgrad_rows(dst, g, a, approx, part, to_fp32, native);
      }
    }
    if (need_db) col_sums(db.select(0, t.e).narrow(0, t.lo, cols), g);
  });
  return {dw, db};
}

at::Tensor grouped_mm_weight_grad_cpu(const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& offsets) {
  return std::get<0>(weight_grad_impl("grouped_mm_weight_grad", x, grad_out, offsets, c10::nullopt, true, false));
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_weight_grad_fused_cpu(const at::Tensor& x, const at::Tensor& grad_out,
                                                                    const at::Tensor& offsets,
                                                                    c10::optional<c10::string_view> approximate,
                                                                    bool need_dw, bool need_db) {
  c10::optional<std::string> approx;
  if (approximate.has_value()) approx = std::string(*approximate);
  return weight_grad_impl("grouped_mm_weight_grad_fused", x, grad_out, offsets, approx, need_dw, need_db);
}

}  // namespace
}  // namespace moek

// Which path the CPU grouped GEMM takes for dtype now (MOE_KERNELS_CPU_LOWP_GEMM included), and
// whether the weight gradient's AVX-512 kernel is on (MOE_KERNELS_CPU_WGRAD): for tests and
// `python -m bench`. Catch-all, like cuda_built: no CPU kernel, so the op list is unchanged.
TORCH_LIBRARY_FRAGMENT(moe_kernels_C, m) {
  m.def("cpu_lowp_gemm_native(ScalarType dtype) -> bool", &moek::lowp_native);
  // Whether fp32 weight gradients of experts of at most cpu_wgrad_avx512_rows() rows run the
  // AVX-512 kernel (wgrad_avx512.h) now: the CPU has AVX-512F and MOE_KERNELS_CPU_WGRAD allows it.
  m.def("cpu_wgrad_avx512() -> bool", &moek::wgrad_avx512_on);
  m.def("cpu_wgrad_avx512_rows() -> int", [] { return moek::kWgradRows; });
}

TORCH_LIBRARY_IMPL(moe_kernels_C, CPU, m) {
  m.impl("grouped_mm", &moek::grouped_mm_cpu);
  m.impl("grouped_mm_weight_grad", &moek::grouped_mm_weight_grad_cpu);
  m.impl("grouped_mm_act", &moek::grouped_mm_act_cpu);
  m.impl("grouped_mm_act_grad", &moek::grouped_mm_act_grad_cpu);
  m.impl("grouped_mm_weight_grad_fused", &moek::grouped_mm_weight_grad_fused_cpu);
}

// CPU grouped matmul: one ATen GEMM per expert slice of rows (ATen's GEMM is itself threaded, so
// the loop over experts stays sequential: a parallel loop of single-threaded GEMMs would idle
// cores whenever one expert holds most rows). Rows past offsets[E] are padding and come out 0.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"

namespace moek {
namespace {

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
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = o[e + 1] - o[e];
    if (n == 0) continue;
    at::Tensor dst = out.narrow(0, o[e], n);
    if (bias.has_value()) {
      at::addmm_out(dst, bias->select(0, e), x.narrow(0, o[e], n), w.select(0, e).t());
    } else {
      at::mm_out(dst, x.narrow(0, o[e], n), w.select(0, e).t());
    }
  }
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
  auto dw = at::empty({E, grad_out.size(1), x.size(1)}, x.options());
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = o[e + 1] - o[e];
    at::Tensor dst = dw.select(0, e);
    if (n > 0) {
      at::mm_out(dst, grad_out.narrow(0, o[e], n).t(), x.narrow(0, o[e], n));
    } else {
      dst.zero_();
    }
  }
  return dw;
}

}  // namespace
}  // namespace moek

TORCH_LIBRARY_IMPL(moe_kernels_C, CPU, m) {
  m.impl("grouped_mm", &moek::grouped_mm_cpu);
  m.impl("grouped_mm_weight_grad", &moek::grouped_mm_weight_grad_cpu);
}

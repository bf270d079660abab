// CPU top-k softmax gating and its backward. One row per token, rows in parallel; fp32 math (fp64
// for fp64 logits). Selection shares moek::topk_row with the CUDA kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>

#include "../checks.h"
#include "moe_kernels/routing_logic.h"

namespace moek {
namespace {

// Row max (NaN ignored, so a NaN row still yields NaN through the sum) and sum of exp(v - max).
template <typename acc_t, typename scalar_t>
void softmax_stats(const scalar_t* row, int64_t E, acc_t* mx, acc_t* sum) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t e = 0; e < E; ++e) {
    const acc_t v = static_cast<acc_t>(row[e]);
    if (v > m) m = v;
  }
  acc_t s = 0;
  for (int64_t e = 0; e < E; ++e) s += std::exp(static_cast<acc_t>(row[e]) - m);
  *mx = m;
  *sum = s;
}

std::tuple<at::Tensor, at::Tensor> topk_softmax_cpu(const at::Tensor& logits_in, int64_t k, bool renormalize) {
  check_gating("topk_softmax", logits_in, k);
  const auto logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  auto weights = at::empty({T, k}, logits.options().dtype(acc_type(logits.scalar_type())));
  auto indices = at::empty({T, k}, logits.options().dtype(at::kLong));
  int64_t* idx_out = indices.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "topk_softmax_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* in = logits.data_ptr<scalar_t>();
    acc_t* w_out = weights.data_ptr<acc_t>();
    at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
      int idx[kMaxK];
      acc_t key[kMaxK];
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* row = in + t * E;
        acc_t mx, sum;
        softmax_stats(row, E, &mx, &sum);
        topk_row<acc_t>([&](int e) { return static_cast<acc_t>(row[e]); }, static_cast<int>(E),
                        static_cast<int>(k), idx, key);
        acc_t sel = 0;
        for (int64_t j = 0; j < k; ++j) {
          const acc_t p = std::exp(static_cast<acc_t>(row[idx[j]]) - mx) / sum;
          w_out[t * k + j] = p;
          idx_out[t * k + j] = idx[j];
          sel += p;
        }
        if (renormalize) {
          for (int64_t j = 0; j < k; ++j) w_out[t * k + j] /= sel;
        }
      }
    });
  });
  return {weights, indices};
}

at::Tensor topk_softmax_backward_cpu(const at::Tensor& grad_in, const at::Tensor& logits_in,
                                     const at::Tensor& indices_in, bool renormalize) {
  const char* op = "topk_softmax_backward";
  check_dim(op, "logits", logits_in, 2);
  check_float_tensor(op, "logits", logits_in);
  check_dim(op, "indices", indices_in, 2);
  check_index_tensor(op, "indices", indices_in);
  const int64_t T = logits_in.size(0), E = logits_in.size(1), k = indices_in.size(1);
  TORCH_CHECK(indices_in.size(0) == T, "moe_kernels::", op, ": indices must have ", T, " rows, got shape ",
              shape_str(indices_in));
  TORCH_CHECK(grad_in.sizes() == indices_in.sizes(), "moe_kernels::", op,
              ": grad_weights must have the shape of indices ", shape_str(indices_in), ", got ",
              shape_str(grad_in));
  const auto logits = logits_in.contiguous();
  const auto indices = indices_in.contiguous();
  auto grad_logits = at::empty_like(logits);
  const int64_t* idx = indices.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "topk_softmax_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto grad = grad_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* g = grad.data_ptr<acc_t>();
    const scalar_t* in = logits.data_ptr<scalar_t>();
    scalar_t* out = grad_logits.data_ptr<scalar_t>();
    at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
      acc_t gsel[kMaxK];
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* row = in + t * E;
        const int64_t* ti = idx + t * k;
        acc_t mx, sum;
        softmax_stats(row, E, &mx, &sum);
        acc_t s = 0, gw = 0;
        for (int64_t j = 0; j < k; ++j) {
          TORCH_CHECK(ti[j] >= 0 && ti[j] < E, "moe_kernels::", op, ": indices must be in [0, ", E, "), got ",
                      ti[j]);
          const acc_t p = std::exp(static_cast<acc_t>(row[ti[j]]) - mx) / sum;
          gsel[j] = g[t * k + j];
          s += p;
          gw += gsel[j] * p;
        }
        if (renormalize) {
          // w_j = p_j / s  =>  dL/dp_j = (g_j - sum_i g_i w_i) / s
          for (int64_t j = 0; j < k; ++j) gsel[j] = (gsel[j] - gw / s) / s;
        }
        acc_t dot = 0;  // sum_e gp[e] * p[e], gp nonzero only at the selected experts
        for (int64_t j = 0; j < k; ++j) dot += gsel[j] * (std::exp(static_cast<acc_t>(row[ti[j]]) - mx) / sum);
        scalar_t* o = out + t * E;
        for (int64_t e = 0; e < E; ++e) {
          const acc_t p = std::exp(static_cast<acc_t>(row[e]) - mx) / sum;
          o[e] = static_cast<scalar_t>(-p * dot);
        }
        for (int64_t j = 0; j < k; ++j) {
          const acc_t p = std::exp(static_cast<acc_t>(row[ti[j]]) - mx) / sum;
          o[ti[j]] = static_cast<scalar_t>(p * (gsel[j] - dot));
        }
      }
    });
  });
  return grad_logits;
}

}  // namespace
}  // namespace moek

TORCH_LIBRARY_IMPL(moe_kernels_C, CPU, m) {
  m.impl("topk_softmax", &moek::topk_softmax_cpu);
  m.impl("topk_softmax_backward", &moek::topk_softmax_backward_cpu);
}

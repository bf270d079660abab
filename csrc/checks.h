// Argument checks shared by the host code of every kernel (CPU and CUDA): each failure names the
// argument, what was given and what is allowed.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <sstream>
#include <string>

#include "moe_kernels/routing_logic.h"

namespace moek {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream ss;
  ss << t.sizes();
  return ss.str();
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, "moe_kernels::", op, ": ", name, " must have ", dim, " dimensions, got shape ",
              shape_str(t));
}

inline void check_index_tensor(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kLong, "moe_kernels::", op, ": ", name, " must be int64, got ",
              t.scalar_type());
}

inline void check_float_tensor(const char* op, const char* name, const at::Tensor& t) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, "moe_kernels::", op,
              ": ", name, " must be float32, float16, bfloat16 or float64, got ", s);
}

inline void check_same_device(const char* op, const char* name_a, const at::Tensor& a, const char* name_b,
                              const at::Tensor& b) {
  TORCH_CHECK(a.device() == b.device(), "moe_kernels::", op, ": ", name_a, " and ", name_b,
              " must be on one device, got ", a.device(), " and ", b.device());
}

// logits [T, E] and k of the gating ops: E <= kMaxExperts, k <= min(E, kMaxK) (the limits of
// routing_logic.h; moe_kernels/ops/topk_softmax.py checks the same, tests/test_backends.py that
// they agree). Device checks stay with the caller.
inline void check_gating(const char* op, const at::Tensor& logits, int64_t k) {
  check_dim(op, "logits", logits, 2);
  check_float_tensor(op, "logits", logits);
  const int64_t E = logits.size(1);
  TORCH_CHECK(E >= 1 && E <= kMaxExperts, "moe_kernels::", op, ": logits.shape[1] (experts) must be in [1, ",
              kMaxExperts, "], got ", E);
  TORCH_CHECK(k >= 1 && k <= std::min<int64_t>(E, kMaxK), "moe_kernels::", op, ": k must be in [1, min(E=", E,
              ", ", kMaxK, ")], got ", k);
}

// The dtype routing math and accumulations run in: fp32, or fp64 for fp64 inputs.
inline at::ScalarType acc_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

// rows [T, K] and row_src [R] of a routing plan, for `tokens` tokens.
inline void check_plan(const char* op, const at::Tensor& rows, const at::Tensor& row_src, int64_t tokens) {
  check_dim(op, "rows", rows, 2);
  check_index_tensor(op, "rows", rows);
  check_dim(op, "row_src", row_src, 1);
  check_index_tensor(op, "row_src", row_src);
  TORCH_CHECK(rows.size(0) == tokens, "moe_kernels::", op, ": rows must have ", tokens,
              " rows (one per token), got shape ", shape_str(rows));
  check_same_device(op, "rows", rows, "row_src", row_src);
}

inline void check_weights(const char* op, const c10::optional<at::Tensor>& weights, const at::Tensor& rows) {
  if (!weights.has_value()) return;
  check_float_tensor(op, "weights", *weights);
  TORCH_CHECK(weights->sizes() == rows.sizes(), "moe_kernels::", op, ": weights must have the shape of rows ",
              shape_str(rows), ", got ", shape_str(*weights));
  check_same_device(op, "weights", *weights, "rows", rows);
}

// offsets [E+1]: non-decreasing from 0 to at most M. Reads the values: host tensors only.
inline void check_offsets_host(const char* op, const at::Tensor& offsets, int64_t E, int64_t M) {
  check_dim(op, "offsets", offsets, 1);
  check_index_tensor(op, "offsets", offsets);
  TORCH_CHECK(offsets.size(0) == E + 1, "moe_kernels::", op, ": offsets must have E+1=", E + 1,
              " entries, got shape ", shape_str(offsets));
  const int64_t* o = offsets.data_ptr<int64_t>();
  TORCH_CHECK(o[0] == 0, "moe_kernels::", op, ": offsets must start at 0, got offsets[0]=", o[0]);
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(o[e + 1] >= o[e], "moe_kernels::", op, ": offsets must be non-decreasing, got offsets[", e,
                "]=", o[e], " > offsets[", e + 1, "]=", o[e + 1]);
  }
  TORCH_CHECK(o[E] <= M, "moe_kernels::", op, ": offsets must end at most at M=", M, " rows, got offsets[", E,
              "]=", o[E]);
}

// make_routing's scalar arguments and indices [T, K] (int64); device checks stay with the caller.
inline void check_routing_args(const char* op, const at::Tensor& indices, int64_t E,
                               const c10::optional<int64_t>& capacity, int64_t S) {
  check_dim(op, "indices", indices, 2);
  check_index_tensor(op, "indices", indices);
  TORCH_CHECK(E >= 1, "moe_kernels::", op, ": num_experts must be >= 1, got ", E);
  TORCH_CHECK(!capacity.has_value() || *capacity >= 1, "moe_kernels::", op,
              ": capacity must be >= 1 (or None for dropless), got ", capacity.value_or(-1));
  const int64_t T = indices.size(0), K = indices.size(1);
  TORCH_CHECK(K >= 1, "moe_kernels::", op, ": indices must have at least one column (k >= 1), got shape ",
              shape_str(indices));
  TORCH_CHECK(S >= 1 || T == 0, "moe_kernels::", op, ": group_size must be >= 1, got ", S);
  TORCH_CHECK(T == 0 || T % S == 0, "moe_kernels::", op, ": group_size must divide the number of tokens T=", T,
              ", got group_size=", S);
}

// combine_weights_grad's a [T, D], b [R, D] (one dtype) and rows [T, K] (int64).
inline void check_weights_grad_args(const char* op, const at::Tensor& a, const at::Tensor& b,
                                    const at::Tensor& rows) {
  check_dim(op, "a", a, 2);
  check_dim(op, "b", b, 2);
  check_float_tensor(op, "a", a);
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "moe_kernels::", op, ": a and b must share a dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.size(1) == b.size(1), "moe_kernels::", op, ": a and b must have the same width, got ",
              shape_str(a), " and ", shape_str(b));
  check_dim(op, "rows", rows, 2);
  check_index_tensor(op, "rows", rows);
  TORCH_CHECK(rows.size(0) == a.size(0), "moe_kernels::", op, ": rows must have ", a.size(0), " rows, got shape ",
              shape_str(rows));
}

}  // namespace moek

// Host side of the CUDA kernels: the CPU kernels' argument checks (csrc/checks.h), output and
// scratch allocation, and the launches on torch's current stream; registered for the CUDA key of
// the moe_kernels_C ops. The kernels are in *_kernels.cu behind launchers.h.
//
// One translation unit on purpose: every file that includes ATen costs about a minute of
// compile time on its own. No CUDA header is included (the stream comes from c10's device-
// generic interface), so this builds with the C++ compiler and torch's headers alone.
//
// No host syncs: index values (indices, rows, row_src) are range-checked on the device, where a
// bad one stops the kernel with a device-side error that surfaces at the next synchronisation,
// as PyTorch's own index kernels do.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../checks.h"
#include "launchers.h"
#include "moe_kernels/routing_logic.h"

namespace moek::cuda {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kDouble:
      return DType::kFloat64;
    default:
      TORCH_CHECK(false, "moe_kernels: no CUDA kernel for dtype ", t.scalar_type());
  }
}

void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "moe_kernels::", op, ": ", name, " must be a CUDA tensor, got ", t.device());
}

// The current torch stream of `device` (the caller holds a guard for it).
cudaStream_t current_stream(const at::Device& device) {
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl.getStream(device).native_handle());
}

void check_launch(const char* op, int error) {
  TORCH_CHECK(error == 0, "moe_kernels::", op, ": CUDA error ", error, ": ", cuda_error_string(error));
}

// ---------------------------------------------------------------- gating

void check_gating_cuda(const char* op, const at::Tensor& logits, int64_t k) {
  check_gating(op, logits, k);
  check_cuda(op, "logits", logits);
}

std::tuple<at::Tensor, at::Tensor> topk_softmax_cuda(const at::Tensor& logits_in, int64_t k, bool renormalize) {
  const char* op = "topk_softmax";
  check_gating_cuda(op, logits_in, k);
  const c10::DeviceGuard guard(logits_in.device());
  const auto logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  auto weights = at::empty({T, k}, logits.options().dtype(acc_type(logits.scalar_type())));
  auto indices = at::empty({T, k}, logits.options().dtype(at::kLong));
  check_launch(op, launch_topk_softmax(logits.data_ptr(), dtype_of(logits), T, static_cast<int>(E),
                                       static_cast<int>(k), renormalize, weights.data_ptr(),
                                       indices.data_ptr<int64_t>(), current_stream(logits.device())));
  return {weights, indices};
}

at::Tensor topk_softmax_backward_cuda(const at::Tensor& grad_in, const at::Tensor& logits_in,
                                      const at::Tensor& indices_in, bool renormalize) {
  const char* op = "topk_softmax_backward";
  check_dim(op, "logits", logits_in, 2);
  check_float_tensor(op, "logits", logits_in);
  check_cuda(op, "logits", logits_in);
  check_dim(op, "indices", indices_in, 2);
  check_index_tensor(op, "indices", indices_in);
  check_same_device(op, "indices", indices_in, "logits", logits_in);
  check_same_device(op, "grad_weights", grad_in, "logits", logits_in);
  const int64_t T = logits_in.size(0), E = logits_in.size(1), k = indices_in.size(1);
  TORCH_CHECK(E >= 1 && E <= kMaxExperts, "moe_kernels::", op, ": logits.shape[1] (experts) must be in [1, ",
              kMaxExperts, "], got ", E);
  TORCH_CHECK(k >= 1 && k <= kMaxK, "moe_kernels::", op, ": indices.shape[1] (k) must be in [1, ", kMaxK, "], got ",
              k);
  TORCH_CHECK(indices_in.size(0) == T, "moe_kernels::", op, ": indices must have ", T, " rows, got shape ",
              shape_str(indices_in));
  TORCH_CHECK(grad_in.sizes() == indices_in.sizes(), "moe_kernels::", op,
              ": grad_weights must have the shape of indices ", shape_str(indices_in), ", got ",
              shape_str(grad_in));
  const c10::DeviceGuard guard(logits_in.device());
  const auto logits = logits_in.contiguous();
  const auto indices = indices_in.contiguous();
  const auto grad = grad_in.to(acc_type(logits.scalar_type())).contiguous();
  auto grad_logits = at::empty_like(logits, at::MemoryFormat::Contiguous);
  check_launch(op, launch_topk_softmax_backward(grad.data_ptr(), logits.data_ptr(), dtype_of(logits),
                                                indices.data_ptr<int64_t>(), T, static_cast<int>(E),
                                                static_cast<int>(k), renormalize, grad_logits.data_ptr(),
                                                current_stream(logits.device())));
  return grad_logits;
}

// ---------------------------------------------------------------- routing

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> make_routing_cuda(
    const at::Tensor& indices_in, int64_t E, c10::optional<int64_t> capacity_opt, int64_t S,
    const c10::optional<at::Tensor>& priority_opt) {
  const char* op = "make_routing";
  check_routing_args(op, indices_in, E, capacity_opt, S);
  check_cuda(op, "indices", indices_in);
  const int64_t C = capacity_opt.has_value() ? *capacity_opt : -1;
  const int64_t T = indices_in.size(0), K = indices_in.size(1);
  // CUB sorts with 32-bit item counts.
  TORCH_CHECK(T * K <= std::numeric_limits<int32_t>::max(), "moe_kernels::", op,
              ": the CUDA kernel handles at most 2**31-1 assignments (T*K), got T=", T, ", K=", K);
  const int64_t G = T == 0 ? 0 : T / S;
  const c10::DeviceGuard guard(indices_in.device());
  const auto indices = indices_in.contiguous();
  const auto i64 = indices.options().dtype(at::kLong);

  at::Tensor priority;
  if (priority_opt.has_value()) {
    const auto& pr = *priority_opt;
    check_dim(op, "priority", pr, 1);
    TORCH_CHECK(pr.size(0) == T, "moe_kernels::", op, ": priority must have shape [T]=[", T, "], got ",
                shape_str(pr));
    check_same_device(op, "priority", pr, "indices", indices);
    priority = pr.to(at::kFloat).contiguous();  // the CPU kernel ranks the fp32 values too
  }

  const int64_t R = C >= 0 ? E * G * C : T * K;
  auto slot = at::empty({T, K}, i64);
  auto rows = at::empty({T, K}, i64);
  auto row_src = at::empty({R}, i64);
  auto counts = at::empty({E}, i64);
  auto offsets = at::empty({E + 1}, i64);
  if (T == 0) {
    counts.zero_();
    offsets.zero_();
    return {slot, rows, row_src, counts, offsets};
  }
  const size_t bytes = make_routing_workspace_bytes(T, static_cast<int>(K), E, S, C >= 0, priority.defined());
  auto workspace = at::empty({static_cast<int64_t>(bytes)}, indices.options().dtype(at::kByte));
  check_launch(op, launch_make_routing(indices.data_ptr<int64_t>(), T, static_cast<int>(K), E, C, S,
                                       priority.defined() ? priority.data_ptr<float>() : nullptr,
                                       slot.data_ptr<int64_t>(), rows.data_ptr<int64_t>(),
                                       row_src.data_ptr<int64_t>(), counts.data_ptr<int64_t>(),
                                       offsets.data_ptr<int64_t>(), workspace.data_ptr(), bytes,
                                       current_stream(indices.device())));
  return {slot, rows, row_src, counts, offsets};
}

// ---------------------------------------------------------------- dispatch / combine

// weights as a contiguous tensor of the accumulation dtype, or undefined.
at::Tensor acc_weights(const c10::optional<at::Tensor>& w, at::ScalarType data) {
  return w.has_value() ? w->to(acc_type(data)).contiguous() : at::Tensor();
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

at::Tensor dispatch_cuda(const at::Tensor& x_in, const at::Tensor& rows, const at::Tensor& row_src_in,
                         const c10::optional<at::Tensor>& weights) {
  const char* op = "dispatch";
  check_dim(op, "x", x_in, 2);
  check_float_tensor(op, "x", x_in);
  check_cuda(op, "x", x_in);
  check_plan(op, rows, row_src_in, x_in.size(0));
  check_same_device(op, "x", x_in, "row_src", row_src_in);
  check_weights(op, weights, rows);
  const c10::DeviceGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto row_src = row_src_in.contiguous();
  const int64_t T = x.size(0), D = x.size(1), K = rows.size(1), R = row_src.size(0);
  auto out = at::empty({R, D}, x.options());
  const auto w = acc_weights(weights, x.scalar_type());
  check_launch(op, launch_dispatch(x.data_ptr(), dtype_of(x), T, D, static_cast<int>(K), row_src.data_ptr<int64_t>(),
                                   R, ptr_or_null(w), out.data_ptr(), current_stream(x.device())));
  return out;
}

at::Tensor combine_cuda(const at::Tensor& y_in, const at::Tensor& rows_in, const at::Tensor& row_src,
                        const c10::optional<at::Tensor>& weights) {
  const char* op = "combine";
  check_dim(op, "y", y_in, 2);
  check_float_tensor(op, "y", y_in);
  check_cuda(op, "y", y_in);
  check_plan(op, rows_in, row_src, rows_in.size(0));
  check_same_device(op, "y", y_in, "rows", rows_in);
  check_weights(op, weights, rows_in);
  const c10::DeviceGuard guard(y_in.device());
  const auto y = y_in.contiguous();
  const auto rows = rows_in.contiguous();
  const int64_t T = rows.size(0), K = rows.size(1), D = y.size(1), R = y.size(0);
  TORCH_CHECK(row_src.size(0) == R, "moe_kernels::", op, ": y must have row_src.shape[0]=", row_src.size(0),
              " rows, got shape ", shape_str(y));
  auto out = at::empty({T, D}, y.options());
  const auto w = acc_weights(weights, y.scalar_type());
  check_launch(op, launch_combine(y.data_ptr(), dtype_of(y), R, D, rows.data_ptr<int64_t>(), T, static_cast<int>(K),
                                  ptr_or_null(w), out.data_ptr(), current_stream(y.device())));
  return out;
}

at::Tensor combine_weights_grad_cuda(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& rows_in) {
  const char* op = "combine_weights_grad";
  check_weights_grad_args(op, a_in, b_in, rows_in);
  check_cuda(op, "a", a_in);
  check_same_device(op, "a", a_in, "b", b_in);
  check_same_device(op, "a", a_in, "rows", rows_in);
  const c10::DeviceGuard guard(a_in.device());
  const auto a = a_in.contiguous();
  const auto b = b_in.contiguous();
  const auto rows = rows_in.contiguous();
  const int64_t T = rows.size(0), K = rows.size(1), D = a.size(1), R = b.size(0);
  auto out = at::empty({T, K}, a.options().dtype(acc_type(a.scalar_type())));
  check_launch(op, launch_combine_weights_grad(a.data_ptr(), b.data_ptr(), dtype_of(a), T, R, D,
                                               rows.data_ptr<int64_t>(), static_cast<int>(K), out.data_ptr(),
                                               current_stream(a.device())));
  return out;
}

}  // namespace
}  // namespace moek::cuda

TORCH_LIBRARY_IMPL(moe_kernels_C, CUDA, m) {
  m.impl("topk_softmax", &moek::cuda::topk_softmax_cuda);
  m.impl("topk_softmax_backward", &moek::cuda::topk_softmax_backward_cuda);
  m.impl("make_routing", &moek::cuda::make_routing_cuda);
  m.impl("dispatch", &moek::cuda::dispatch_cuda);
  m.impl("combine", &moek::cuda::combine_cuda);
  m.impl("combine_weights_grad", &moek::cuda::combine_weights_grad_cuda);
}

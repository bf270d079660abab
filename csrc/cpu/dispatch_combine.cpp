// CPU dispatch (tokens -> buffer rows), combine (buffer rows -> tokens) and the combine-weight
// gradient. Dispatch is a gather over buffer rows through row_src, combine a gather of each
// token's K rows: every output element has one writer, so there are no atomics and the result
// does not depend on the thread count. Accumulation in fp32 (fp64 for fp64).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "buffer_cache.h"

namespace moek {
namespace {

template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// weights as a contiguous tensor of the accumulation dtype, or undefined.
at::Tensor acc_weights(const c10::optional<at::Tensor>& w, at::ScalarType data) {
  return w.has_value() ? w->to(acc_type(data)).contiguous() : at::Tensor();
}

at::Tensor dispatch_cpu(const at::Tensor& x_in, const at::Tensor& rows, const at::Tensor& row_src_in,
                        const c10::optional<at::Tensor>& weights) {
  const char* op = "dispatch";
  check_dim(op, "x", x_in, 2);
  check_float_tensor(op, "x", x_in);
  check_plan(op, rows, row_src_in, x_in.size(0));
  check_weights(op, weights, rows);
  const auto x = x_in.contiguous();
  const auto row_src = row_src_in.contiguous();
  const int64_t T = x.size(0), D = x.size(1), K = rows.size(1), R = row_src.size(0);
  auto out = cpu_empty({R, D}, x.options());
  const auto w = acc_weights(weights, x.scalar_type());
  const int64_t* src = row_src.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dispatch_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    const acc_t* wp = w.defined() ? w.data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t a = src[r];
        scalar_t* o = op_ + r * D;
        if (a < 0) {
          std::memset(static_cast<void*>(o), 0, sizeof(scalar_t) * D);
          continue;
        }
        TORCH_CHECK(a < T * K, "moe_kernels::", op, ": row_src must be in [-1, T*K=", T * K, "), got ", a,
                    " at row ", r);
        const scalar_t* xr = xp + (a / K) * D;
        if (wp == nullptr) {
          std::memcpy(static_cast<void*>(o), xr, sizeof(scalar_t) * D);
        } else {
          const acc_t s = wp[a];
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(s * static_cast<acc_t>(xr[d]));
        }
      }
    });
  });
  return out;
}

at::Tensor combine_cpu(const at::Tensor& y_in, const at::Tensor& rows_in, const at::Tensor& row_src,
                       const c10::optional<at::Tensor>& weights) {
  const char* op = "combine";
  check_dim(op, "y", y_in, 2);
  check_float_tensor(op, "y", y_in);
  check_plan(op, rows_in, row_src, rows_in.size(0));
  check_weights(op, weights, rows_in);
  const auto y = y_in.contiguous();
  const auto rows = rows_in.contiguous();
  const int64_t T = rows.size(0), K = rows.size(1), D = y.size(1), R = y.size(0);
  TORCH_CHECK(row_src.size(0) == R, "moe_kernels::", op, ": y must have row_src.shape[0]=", row_src.size(0),
              " rows, got shape ", shape_str(y));
  auto out = cpu_empty({T, D}, y.options());
  const auto w = acc_weights(weights, y.scalar_type());
  const int64_t* rp = rows.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "combine_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    const acc_t* wp = w.defined() ? w.data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, T, std::max<int64_t>(1, 8192 / std::max<int64_t>(D * K, 1)), [&](int64_t b, int64_t e) {
      std::vector<acc_t> acc(static_cast<size_t>(D));
      for (int64_t t = b; t < e; ++t) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t k = 0; k < K; ++k) {
          const int64_t r = rp[t * K + k];
          if (r < 0) continue;
          TORCH_CHECK(r < R, "moe_kernels::", op, ": rows must be in [-1, R=", R, "), got ", r, " at [", t, ", ",
                      k, "]");
          const acc_t s = wp ? wp[t * K + k] : acc_t(1);
          const scalar_t* yr = yp + r * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += s * static_cast<acc_t>(yr[d]);
        }
        scalar_t* o = op_ + t * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[d]);
      }
    });
  });
  return out;
}

at::Tensor combine_weights_grad_cpu(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& rows_in) {
  const char* op = "combine_weights_grad";
  check_weights_grad_args(op, a_in, b_in, rows_in);
  const auto a = a_in.contiguous();
  const auto b = b_in.contiguous();
  const auto rows = rows_in.contiguous();
  const int64_t T = rows.size(0), K = rows.size(1), D = a.size(1), R = b.size(0);
  auto out = at::empty({T, K}, a.options().dtype(acc_type(a.scalar_type())));
  const int64_t* rp = rows.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "combine_wgrad_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    acc_t* o = out.data_ptr<acc_t>();
    at::parallel_for(0, T, std::max<int64_t>(1, 8192 / std::max<int64_t>(D * K, 1)), [&](int64_t tb, int64_t te) {
      for (int64_t t = tb; t < te; ++t) {
        for (int64_t k = 0; k < K; ++k) {
          const int64_t r = rp[t * K + k];
          acc_t s = 0;
          if (r >= 0) {
            TORCH_CHECK(r < R, "moe_kernels::", op, ": rows must be in [-1, R=", R, "), got ", r);
            const scalar_t* ar = ap + t * D;
            const scalar_t* br = bp + r * D;
            for (int64_t d = 0; d < D; ++d) s += static_cast<acc_t>(ar[d]) * static_cast<acc_t>(br[d]);
          }
          o[t * K + k] = s;
        }
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace moek

TORCH_LIBRARY_IMPL(moe_kernels_C, CPU, m) {
  m.impl("dispatch", &moek::dispatch_cpu);
  m.impl("combine", &moek::combine_cpu);
  m.impl("combine_weights_grad", &moek::combine_weights_grad_cpu);
}

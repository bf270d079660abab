// CPU routing plan (make_routing): deterministic positions from a histogram and an exclusive scan,
// never from atomics. The K-major sequence of each group (all 1st choices, then all 2nd, ...) is
// cut into fixed-length chunks; chunk histograms are scanned in sequence order and each chunk
// then assigns its positions on its own. Chunking depends only on the shapes, so the result is
// bitwise the same for any number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "../checks.h"
#include "moe_kernels/routing_logic.h"

namespace moek {
namespace {

// Sequence positions per chunk: large enough to amortise the E-wide histogram, small enough that
// T=65,536, K=2 still splits into 32 chunks.
constexpr int64_t kChunk = 4096;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> make_routing_cpu(
    const at::Tensor& indices_in, int64_t E, c10::optional<int64_t> capacity_opt, int64_t S,
    const c10::optional<at::Tensor>& priority_opt) {
  const char* op = "make_routing";
  check_routing_args(op, indices_in, E, capacity_opt, S);
  const int64_t C = capacity_opt.has_value() ? *capacity_opt : -1;
  const int64_t T = indices_in.size(0), K = indices_in.size(1);
  const int64_t G = T == 0 ? 0 : T / S;
  const auto indices = indices_in.contiguous();
  const int64_t* idx = indices.data_ptr<int64_t>();
  const auto i64 = indices.options().dtype(at::kLong);

  // BPR: per group, tokens in descending priority, ties in token order, NaN last.
  std::vector<int64_t> order;
  if (priority_opt.has_value()) {
    const auto& pr = *priority_opt;
    check_dim(op, "priority", pr, 1);
    TORCH_CHECK(pr.size(0) == T, "moe_kernels::", op, ": priority must have shape [T]=[", T, "], got ",
                shape_str(pr));
    check_same_device(op, "priority", pr, "indices", indices);
    const auto p32 = pr.to(at::kFloat).contiguous();
    const float* p = p32.data_ptr<float>();
    order.resize(static_cast<size_t>(T));
    at::parallel_for(0, G, 1, [&](int64_t gb, int64_t ge) {
      for (int64_t g = gb; g < ge; ++g) {
        int64_t* o = order.data() + g * S;
        const float* pg = p + g * S;
        std::iota(o, o + S, int64_t{0});
        std::stable_sort(o, o + S, [&](int64_t a, int64_t b) { return rank_key(pg[a]) > rank_key(pg[b]); });
      }
    });
  }

  const int64_t L = K * S;  // sequence length of one group
  const int64_t chunks_per_group = L == 0 ? 0 : (L + kChunk - 1) / kChunk;
  const int64_t NC = G * chunks_per_group;
  std::vector<int64_t> hist(static_cast<size_t>(NC * E), 0);

  // Walks chunk c's part of its group's K-major sequence, calling fn(t, k, e, g).
  auto walk = [&](int64_t c, auto&& fn) {
    const int64_t g = c / chunks_per_group;
    const int64_t lo = (c % chunks_per_group) * kChunk, hi = std::min(L, lo + kChunk);
    const int64_t* og = order.empty() ? nullptr : order.data() + g * S;
    for (int64_t i = lo; i < hi; ++i) {
      int64_t r, kk;
      kmajor_assignment(i, S, og, &r, &kk);
      const int64_t t = g * S + r;
      fn(t, kk, idx[t * K + kk], g);
    }
  };

  // Pass 1: chunk histograms (and the index range check).
  at::parallel_for(0, NC, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      int64_t* h = hist.data() + c * E;
      walk(c, [&](int64_t t, int64_t kk, int64_t e, int64_t) {
        TORCH_CHECK(e >= 0 && e < E, "moe_kernels::", op, ": indices must be in [0, num_experts=", E, "), got ",
                    e, " at [", t, ", ", kk, "]");
        ++h[e];
      });
    }
  });

  // Pass 2 (sequential, NC*E): exclusive scan in sequence order. With a capacity, positions
  // restart in every group; dropless, they run on across groups.
  auto counts = at::zeros({E}, i64);
  int64_t* cnt = counts.data_ptr<int64_t>();
  {
    std::vector<int64_t> running(static_cast<size_t>(E), 0);
    for (int64_t c = 0; c < NC; ++c) {
      if (C >= 0 && c % chunks_per_group == 0) {
        if (c > 0) {
          for (int64_t e = 0; e < E; ++e) cnt[e] += std::min(running[e], C);
        }
        std::fill(running.begin(), running.end(), 0);
      }
      int64_t* h = hist.data() + c * E;
      for (int64_t e = 0; e < E; ++e) {
        const int64_t n = h[e];
        h[e] = running[e];
        running[e] += n;
      }
    }
    for (int64_t e = 0; e < E; ++e) cnt[e] += C >= 0 ? std::min(running[e], C) : running[e];
  }

  auto offsets = at::empty({E + 1}, i64);
  int64_t* off = offsets.data_ptr<int64_t>();
  off[0] = 0;
  for (int64_t e = 0; e < E; ++e) off[e + 1] = C >= 0 ? (e + 1) * G * C : off[e] + cnt[e];
  const int64_t R = C >= 0 ? E * G * C : T * K;

  auto slot = at::empty({T, K}, i64);
  auto rows = at::empty({T, K}, i64);
  auto row_src = at::empty({R}, i64);
  int64_t* slot_p = slot.data_ptr<int64_t>();
  int64_t* rows_p = rows.data_ptr<int64_t>();
  int64_t* src_p = row_src.data_ptr<int64_t>();
  if (C >= 0) {
    at::parallel_for(0, R, 1 << 14, [&](int64_t b, int64_t e) { std::fill(src_p + b, src_p + e, int64_t{-1}); });
  }

  // Pass 3: each chunk assigns positions from its scanned base.
  at::parallel_for(0, NC, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      int64_t* base = hist.data() + c * E;
      walk(c, [&](int64_t t, int64_t kk, int64_t e, int64_t g) {
        const int64_t s = slot_of(g, base[e]++, C);
        const int64_t r = row_of(off[e], s);
        slot_p[t * K + kk] = s;
        rows_p[t * K + kk] = r;
        if (r >= 0) src_p[r] = t * K + kk;
      });
    }
  });
  return {slot, rows, row_src, counts, offsets};
}

}  // namespace
}  // namespace moek

TORCH_LIBRARY_IMPL(moe_kernels_C, CPU, m) { m.impl("make_routing", &moek::make_routing_cpu); }

// The cache of large CPU blocks behind cpu_empty (buffer_cache.h).
//
// Why: with glibc's default malloc a block over its mmap threshold (128 KiB, raised dynamically up
// to 32 MiB) is mmapped on allocation and unmapped on free, so every training step's weight
// gradients (E x the dense MLP's: 576 MB at V-MoE-B/16) and [R, H] activations are fresh memory,
// and each 4 KiB page faults on first touch (measured at B/16: ~190,000 faults a step, the layer
// at 1.87x the dense MLP against 1.46x with memory kept for reuse).
//
// How: a c10::Allocator whose freed blocks go to a free list (best fit by size, up to 1.25x the
// request, since the kept rows and so the sizes vary a little from step to step) instead of back
// to the system, up to MOE_KERNELS_CPU_CACHE_MB of free blocks (default 2048; 0 turns the cache
// off: blocks are freed at once). Blocks of 2 MiB or more are 2 MiB aligned and advised for
// transparent huge pages, so that their first touch faults 2 MiB at a time where the kernel
// allows it. An allocation that fails empties the cache and tries once more. Allocations and
// frees are reported to the profiler like the CPU allocator's (torch.profiler's memory events,
// and so `python -m bench`'s peak memory, count the block sizes); a cached free block is not
// counted as tensor memory. moe_kernels.cpu_cache_info() / empty_cpu_cache() read and release it.
#include "buffer_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace moek {
namespace {

constexpr size_t kCacheMinBytes = size_t(1) << 20;  // 1 MiB: smaller tensors use at::empty
constexpr size_t kHuge = size_t(2) << 20;           // 2 MiB: a transparent huge page

size_t limit_from_env() {
  const char* env = std::getenv("MOE_KERNELS_CPU_CACHE_MB");
  if (env == nullptr || *env == '\0') return size_t(2048) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  TORCH_CHECK(end != env && *end == '\0' && mb >= 0,
              "moe_kernels: MOE_KERNELS_CPU_CACHE_MB must be a whole number of MiB >= 0, got '", env, "'");
  return static_cast<size_t>(mb) << 20;
}

struct Block {
  void* ptr;
  size_t size;
};

class BlockCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    const size_t size = rounded(nbytes);
    void* ptr = take(size);
    if (ptr == nullptr) ptr = fresh(size);
    Block* block = new Block{ptr, size};
    {
      std::lock_guard<std::mutex> lock(mu_);
      in_use_ += size;
      c10::reportMemoryUsageToProfiler(ptr, static_cast<int64_t>(size), in_use_, in_use_ + cached_,
                                       c10::Device(c10::DeviceType::CPU));
    }
    return {ptr, block, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }  // the context carries the size

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  void give_back(Block* block) {
    std::lock_guard<std::mutex> lock(mu_);
    in_use_ -= block->size;
    c10::reportMemoryUsageToProfiler(block->ptr, -static_cast<int64_t>(block->size), in_use_, in_use_ + cached_,
                                     c10::Device(c10::DeviceType::CPU));
    if (cached_ + block->size <= limit_) {
      free_.emplace(block->size, block->ptr);
      cached_ += block->size;
    } else {
      std::free(block->ptr);
    }
    delete block;
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& kv : free_) std::free(kv.second);
    free_.clear();
    cached_ = 0;
  }

  std::vector<int64_t> info() {
    std::lock_guard<std::mutex> lock(mu_);
    return {static_cast<int64_t>(in_use_), static_cast<int64_t>(cached_), static_cast<int64_t>(free_.size()),
            static_cast<int64_t>(limit_)};
  }

  void set_limit(size_t limit) {
    std::lock_guard<std::mutex> lock(mu_);
    limit_ = limit;
  }

 private:
  static size_t rounded(size_t n) {
    const size_t unit = n >= kHuge ? kHuge : 4096;
    return (n + unit - 1) / unit * unit;
  }

  // The smallest free block of at least size and at most 1.25x it, or nullptr.
  void* take(size_t size) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.lower_bound(size);
    if (it == free_.end() || it->first > size + size / 4) return nullptr;
    void* ptr = it->second;
    cached_ -= it->first;
    free_.erase(it);
    return ptr;
  }

  void* fresh(size_t size) {
    const size_t align = size >= kHuge ? kHuge : 64;
    void* ptr = nullptr;
    for (int attempt = 0; attempt < 2 && ptr == nullptr; ++attempt) {
      if (posix_memalign(&ptr, align, size) != 0) ptr = nullptr;
      if (ptr == nullptr && attempt == 0) clear();  // free the cache, then once more
    }
    TORCH_CHECK(ptr != nullptr, "moe_kernels: out of CPU memory allocating ", size, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (align == kHuge) madvise(ptr, size, MADV_HUGEPAGE);  // advice only: errors are ignored
#endif
    return ptr;
  }

  static void release(void* ctx);

  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0, in_use_ = 0;
  size_t limit_ = limit_from_env();
};

// Never destroyed: tensors may be freed after static destructors run (at interpreter exit).
BlockCache& cache() {
  static BlockCache* c = new BlockCache();
  return *c;
}

void BlockCache::release(void* ctx) { cache().give_back(static_cast<Block*>(ctx)); }

std::vector<int64_t> cpu_cache_info() { return cache().info(); }

void cpu_cache_clear() { cache().clear(); }

void cpu_cache_set_limit(int64_t mb) {
  TORCH_CHECK(mb >= 0, "moe_kernels: the CPU cache limit must be >= 0 MiB, got ", mb);
  cache().set_limit(static_cast<size_t>(mb) << 20);
  if (mb == 0) cache().clear();
}

}  // namespace

at::Tensor cpu_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (nbytes < kCacheMinBytes || options.has_pinned_memory() && options.pinned_memory()) {
    return at::empty(sizes, options);
  }
  return at::Tensor(at::detail::empty_generic(sizes, &cache(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                              c10::typeMetaToScalarType(options.dtype()), c10::nullopt));
}

}  // namespace moek

// Catch-all ops (no tensors), like cpu_lowp_gemm_native: moe_kernels.cpu_cache_info() and friends.
TORCH_LIBRARY_FRAGMENT(moe_kernels_C, m) {
  m.def("cpu_cache_info() -> int[]", &moek::cpu_cache_info);
  m.def("cpu_cache_clear() -> ()", &moek::cpu_cache_clear);
  m.def("cpu_cache_set_limit(int mb) -> ()", &moek::cpu_cache_set_limit);
}

// Large CPU outputs of the kernels (the grouped GEMMs' activations and weight gradients, the
// dispatch and combine buffers) come from a cache of freed blocks, as a GPU caching allocator
// serves them: a training step frees and re-allocates the same sizes every step, and from
// glibc's default allocator every such block is freshly mapped memory (a block over 32 MiB always
// is), whose first touch page-faults page by page. buffer_cache.cpp says more.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace moek {

// at::empty(sizes, options) for a CPU tensor, its storage from the cache when it is at least
// kCacheMinBytes (smaller ones: at::empty).
at::Tensor cpu_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace moek

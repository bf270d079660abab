// The moe_kernels_C operator library: schemas here, kernels registered per dispatch key in
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cpp (CUDA). Importing moe_kernels._C registers them; the
// public, autograd-aware ops are torch.library custom ops in moe_kernels/ops/ that call these.
#include <Python.h>
#include <torch/library.h>

#include <string>

#ifndef MOEK_BUILD_ARCHS
#define MOEK_BUILD_ARCHS ""
#endif

namespace {

bool cuda_built() {
#ifdef MOEK_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string build_info() {
  std::string info = "cpu";
#ifdef MOEK_WITH_CUDA
  info += " + cuda (archs " MOEK_BUILD_ARCHS ")";
#endif
#ifdef _OPENMP
  info += ", openmp";
#endif
#if defined(__SANITIZE_ADDRESS__)
  info += ", asan";
#endif
  return info;
}

}  // namespace

TORCH_LIBRARY(moe_kernels_C, m) {
  m.def("topk_softmax(Tensor logits, int k, bool renormalize) -> (Tensor, Tensor)");
  m.def("topk_softmax_backward(Tensor grad_weights, Tensor logits, Tensor indices, bool renormalize) -> Tensor");
  m.def(
      "make_routing(Tensor indices, int num_experts, int? capacity, int group_size, Tensor? priority)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("dispatch(Tensor x, Tensor rows, Tensor row_src, Tensor? weights) -> Tensor");
  m.def("combine(Tensor y, Tensor rows, Tensor row_src, Tensor? weights) -> Tensor");
  m.def("combine_weights_grad(Tensor a, Tensor b, Tensor rows) -> Tensor");
  m.def("grouped_mm(Tensor x, Tensor w, Tensor offsets, Tensor? bias=None) -> Tensor");
  m.def("grouped_mm_weight_grad(Tensor x, Tensor grad_out, Tensor offsets) -> Tensor");
  // The fused expert-MLP ops (backends.FUSED_OPS): CPU kernels only.
  m.def(
      "grouped_mm_act(Tensor x, Tensor w, Tensor offsets, Tensor? bias, str approximate, bool keep_pre)"
      " -> (Tensor, Tensor)");
  m.def("grouped_mm_act_grad(Tensor grad, Tensor w, Tensor offsets, Tensor pre, str approximate) -> Tensor");
  m.def(
      "grouped_mm_weight_grad_fused(Tensor x, Tensor grad_out, Tensor offsets, str? approximate, bool need_dw,"
      " bool need_db) -> (Tensor, Tensor)");
  m.def("cuda_built() -> bool", &cuda_built);
  m.def("build_info() -> str", &build_info);
}

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "moe_kernels C++/CUDA kernels, registered as torch.ops.moe_kernels_C", -1,
      nullptr};
  return PyModule_Create(&module_def);
}

"""The CUDA part of moe_kernels._C, checked without a GPU.

What a machine without a GPU can still show: the library holds device code for sm_80 (A100) and
sm_90a (H100), the CUDA kernels are registered for the CUDA dispatch key of every op they cover
(grouped_mm stays on Triton), the kernel sources stay free of torch headers (the build-time
budget depends on it), and ``python -m moe_kernels.info`` says what was built and why the cuda
backend cannot run here. Kernel results are checked against the reference in test_gpu_cuda.py.
"""

from __future__ import annotations

import glob
import importlib
import os
import re
import shutil
import subprocess

import pytest
import torch

from moe_kernels import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_OPS = ("topk_softmax", "topk_softmax_backward", "make_routing", "dispatch", "combine", "combine_weights_grad")
TRITON_ONLY_OPS = ("grouped_mm", "grouped_mm_weight_grad")
REQUIRED_ARCHS = {"sm_80", "sm_90a"}

needs_cuda_build = pytest.mark.skipif(
    not _ext.cuda_kernels_built(),
    reason="moe_kernels._C was built without CUDA kernels (no nvcc, torch without CUDA, or MOE_KERNELS_BUILD_CUDA=0)"
    if _ext.LOADED
    else f"moe_kernels._C did not load ({_ext.LOAD_ERROR})",
)


def _cuobjdump() -> str | None:
    """The toolkit's cuobjdump, else the copy Triton ships (the toolkit may come without it)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    candidates = [os.path.join(h, "bin", "cuobjdump") for h in (os.environ.get("CUDA_HOME"), "/usr/local/cuda") if h]
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


@needs_cuda_build
def test_library_holds_sm80_and_sm90a_code():
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (put the CUDA toolkit's bin on PATH or set CUDA_HOME)")
    library = importlib.import_module("moe_kernels._C").__file__
    listing = subprocess.run([tool, "--list-elf", library], capture_output=True, text=True, check=True).stdout
    # one line per cubin, e.g. "ELF file    1: gating_kernels.sm_80.cubin"
    archs = set(re.findall(r"\.(sm_\d+[a-z]?)\.cubin", listing))
    assert REQUIRED_ARCHS <= archs, f"cuobjdump --list-elf {library} lists {sorted(archs)}:\n{listing}"


@needs_cuda_build
def test_cuda_kernels_registered_for_the_cuda_key():
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for op in CUDA_OPS:
        assert has(f"moe_kernels_C::{op}", "CUDA"), f"no CUDA kernel registered for {op}"
        assert has(f"moe_kernels_C::{op}", "CPU"), f"no CPU kernel registered for {op}"
    for op in TRITON_ONLY_OPS:  # the grouped GEMM runs on Triton on GPUs
        assert not has(f"moe_kernels_C::{op}", "CUDA"), f"{op} should have no CUDA kernel"
    from moe_kernels.ops import _cpp

    assert _cpp.SUPPORTS["cuda"].ops() == CUDA_OPS


def test_kernel_sources_include_no_torch_headers():
    """nvcc compiles csrc/cuda/*.cu; a torch header there costs minutes per file on 2 cores."""
    cuda_dir = os.path.join(ROOT, "csrc", "cuda")
    sources = glob.glob(os.path.join(cuda_dir, "*.cu")) + glob.glob(os.path.join(cuda_dir, "*.cuh"))
    sources.append(os.path.join(cuda_dir, "launchers.h"))
    if not any(s.endswith(".cu") for s in sources):
        pytest.skip("no CUDA sources in this checkout")
    heavy = re.compile(r"#\s*include\s*[<\"](torch|ATen|c10|pybind11|Python)")
    for path in sources:
        with open(path) as f:
            bad = [line.strip() for line in f if heavy.search(line)]
        assert not bad, f"{os.path.relpath(path, ROOT)} includes torch headers: {bad}"


@needs_cuda_build
def test_info_reports_cuda_kernels_and_why_the_cuda_backend_cannot_run():
    from moe_kernels import backends, info

    text = info.report()
    assert re.search(r"_C CUDA kernels\s+built", text), text
    if torch.cuda.is_available():
        assert not backends.available("cuda")["cuda"]
    else:
        assert "no CUDA device visible to torch" in text, text
        assert "the cuda backend needs CUDA tensors" in text, text


_PRIORITY_KEY_MAIN = r"""
#include <cstdio>
#include "moe_kernels/routing_logic.h"
int main() {
  float p;
  while (std::scanf("%a", &p) == 1) std::printf("%u\n", moek::priority_order_key(p));
  return 0;
}
"""


def test_shared_priority_order_key_on_the_host(tmp_path):
    """The BPR sort key the CUDA kernel radix-sorts, compiled for the host from the shared header.

    A stable ascending sort on it must order tokens as the CPU kernel's stable descending sort
    of the priorities (NaN like -inf, -0 like +0, ties in token order).
    """
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    src = tmp_path / "key.cpp"
    src.write_text(_PRIORITY_KEY_MAIN)
    exe = tmp_path / "key"
    subprocess.run(
        [cxx, "-std=c++17", "-O1", "-I", os.path.join(ROOT, "csrc", "include"), str(src), "-o", str(exe)], check=True
    )
    g = torch.Generator().manual_seed(0)
    p = torch.cat(
        [
            torch.randn(200, generator=g),
            torch.randint(-2, 3, (100,), generator=g).float(),  # many ties
            torch.tensor([float("nan"), float("-inf"), float("inf"), -0.0, 0.0, 1e-45, -1e-45, 3.4e38, -3.4e38]),
        ]
    )
    p = p[torch.randperm(p.numel(), generator=g)]
    out = subprocess.run(
        [str(exe)], input="\n".join(float(v).hex() for v in p.tolist()), capture_output=True, text=True, check=True
    ).stdout
    keys = torch.tensor([int(k) for k in out.split()], dtype=torch.int64)
    assert keys.numel() == p.numel()
    got = torch.sort(keys, stable=True).indices
    # the CPU kernel's order: rank_key (NaN -> -inf, infinities kept), descending, stable
    key = torch.nan_to_num(p, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    want = torch.sort(key, descending=True, stable=True).indices
    assert torch.equal(got, want)

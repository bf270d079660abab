"""Builds the one extension, ``moe_kernels._C``: C++ CPU kernels always, CUDA kernels when possible.

Environment variables read here:
  MOE_KERNELS_BUILD_CUDA   unset/"auto": compile csrc/cuda/*.cu when torch has CUDA and nvcc is
                           found (otherwise warn and build the CPU part only); "0": never;
                           "1": always (fail if torch has no CUDA or nvcc is missing).
  TORCH_CUDA_ARCH_LIST     GPU targets, default "8.0;9.0a" (A100 and H100 code).
  MAX_JOBS                 parallel compile jobs of ninja (torch reads it; default: all cores).
  NVCC_THREADS             nvcc --threads, default 2 (parallel per-arch code generation).
  MOE_KERNELS_SKIP_BUILD   "1": install the pure-Python package only (the torch backend works).
  MOE_KERNELS_SANITIZE     "1": compile and link with -fsanitize=address,undefined (make test-asan).

Users: ``pip install --no-build-isolation .`` (the build needs the installed torch's headers).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _locate_cuda_home() -> None:
    """Set CUDA_HOME from nvcc's own idea of its toolkit root when unset.

    torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script there (e.g. /usr/local/bin/nvcc)
    makes it guess /usr/local and the link then misses libcudart. ``nvcc --dryrun`` prints TOP.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or not shutil.which("nvcc"):
        return
    try:
        out = subprocess.run(
            [shutil.which("nvcc"), "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        ).stderr
    except (OSError, subprocess.SubprocessError):
        return
    m = re.search(r"^#\$ TOP=(.+)$", out, re.M)
    if m:
        os.environ["CUDA_HOME"] = os.path.realpath(m.group(1).strip())


_locate_cuda_home()


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def _want_cuda() -> bool:
    mode = _env("MOE_KERNELS_BUILD_CUDA", "auto").lower()
    if mode in ("0", "false", "no"):
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    problems = []
    if torch.version.cuda is None:
        problems.append("the installed torch has no CUDA support")
    if not nvcc:
        problems.append("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    if not glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")):
        problems.append("there are no CUDA sources in csrc/cuda")
    if problems:
        msg = "moe_kernels: building without CUDA kernels: " + "; ".join(problems)
        if mode in ("1", "true", "yes"):
            raise RuntimeError(msg + " (MOE_KERNELS_BUILD_CUDA=1 asked for them)")
        warnings.warn(msg, stacklevel=1)
        return False
    return True


def _extensions():
    if _env("MOE_KERNELS_SKIP_BUILD") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cuda = _want_cuda()
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))  # noqa: E731
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fvisibility=hidden"]
    ldflags = ["-fopenmp"]
    if _env("MOE_KERNELS_SANITIZE") == "1":
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
        cxx = ["-O1", "-g", "-std=c++20", "-fopenmp"] + san
        ldflags += san
    arch_list = _env("TORCH_CUDA_ARCH_LIST") or "8.0;9.0a"
    define = [("MOEK_BUILD_ARCHS", f'"{arch_list if cuda else ""}"')]
    include = [os.path.join(ROOT, "csrc", "include")]
    if cuda:
        # torch reads the arch list from the environment when it builds the nvcc command line.
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", f"--threads={_env('NVCC_THREADS', '2')}", "-lineinfo"]
        ext = CUDAExtension(
            "moe_kernels._C",
            sources + rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu"),
            include_dirs=include,
            define_macros=define + [("MOEK_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=ldflags,
        )
    else:
        ext = CppExtension(
            "moe_kernels._C",
            sources,
            include_dirs=include,
            define_macros=define,
            extra_compile_args={"cxx": cxx},
            extra_link_args=ldflags,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

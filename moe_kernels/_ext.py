"""Loads the compiled extension ``moe_kernels._C`` once and remembers why it failed, if it did.

The package works without it (the ``torch`` reference backend); ``python -m moe_kernels.info``
reports the recorded error.
"""

from __future__ import annotations

import glob
import importlib
import os
import warnings

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

LOAD_ERROR: str | None = None
# MOE_KERNELS_LIBRARY=path/to/_C.so loads another build of the extension (make test-asan uses it
# for the sanitizer build, which lives outside the package).
LIBRARY = os.environ.get("MOE_KERNELS_LIBRARY")
try:
    if LIBRARY:
        torch.ops.load_library(LIBRARY)
    else:
        importlib.import_module("moe_kernels._C")  # importing registers the moe_kernels_C ops

    LOADED = True
except Exception as exc:  # ImportError, or an OSError from a broken/ABI-mismatched build
    LOADED = False
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    _here = os.path.dirname(__file__)
    if glob.glob(os.path.join(_here, "_C*.so")) or glob.glob(os.path.join(_here, "_C*.pyd")):
        # A library is there but does not load: worth one warning. A missing build is normal
        # (pure-Python install) and is only reported by moe_kernels.info.
        warnings.warn(f"moe_kernels._C failed to load, using the torch reference: {LOAD_ERROR}", stacklevel=2)


def cuda_kernels_built() -> bool:
    """Whether ``_C`` was compiled with its CUDA sources."""
    if not LOADED:
        return False
    import torch

    return bool(torch.ops.moe_kernels_C.cuda_built())


def build_info() -> str:
    """The flags ``_C`` was compiled with (empty when it did not load)."""
    if not LOADED:
        return ""
    import torch

    return str(torch.ops.moe_kernels_C.build_info())

"""``python -m moe_kernels.info``: versions, where the package was imported from, whether ``_C``
loaded (and why not), backends."""

from __future__ import annotations

import os
import platform
import sys


def report() -> str:
    import torch

    import moe_kernels
    from moe_kernels import _ext, backends

    lines = [
        f"moe_kernels        {moe_kernels.__version__}",
        f"imported from      {_ext.PACKAGE_DIR}"
        + (" (a source checkout)" if _ext.SOURCE_CHECKOUT else " (an installed package)"),
        f"python             {platform.python_version()} ({sys.executable})",
        f"torch              {torch.__version__} (CUDA {torch.version.cuda},"
        f" cuda available: {torch.cuda.is_available()})",
    ]
    try:
        import triton

        lines.append(f"triton             {triton.__version__}")
    except Exception as exc:
        lines.append(f"triton             not importable ({type(exc).__name__}: {exc})")
    lines.append(f"_C loaded          {_ext.LOADED}" + ("" if _ext.LOADED else f" ({_ext.LOAD_ERROR})"))
    if not _ext.LOADED and (msg := _ext.shadowing_warning()):
        lines.append(f"warning            {msg}")
    if _ext.LIBRARY:
        lines.append(f"_C library         {_ext.LIBRARY} (MOE_KERNELS_LIBRARY)")
    if _ext.LOADED:
        lines.append(f"_C build           {_ext.build_info()}")
        lines.append(f"_C CUDA kernels    {'built' if _ext.cuda_kernels_built() else 'not built'}")
        limit = moe_kernels.cpu_cache_info()["limit_bytes"] // 2**20
        lines.append(f"CPU block cache    up to {limit} MiB of freed blocks kept (MOE_KERNELS_CPU_CACHE_MB)")
    lines.append(f"{backends.ENV_VAR}: {os.environ.get(backends.ENV_VAR, 'auto (unset)')}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        lines.append(f"backends on {dev}:")
        for name, reasons in backends.available(dev).items():
            state = "available" if not reasons else "unavailable: " + "; ".join(reasons)
            lines.append(f"  {name:<8}{state}")
    if not torch.cuda.is_available():
        lines.append("backends on cuda: none (no CUDA device visible to torch)")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())

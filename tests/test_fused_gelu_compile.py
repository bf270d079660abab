"""The fused grouped-GEMM variants (``bench.kernels.FUSED``: GELU in fc1's epilogue, GELU' in
fc2's dX epilogue, GELU on the weight gradient's operand load, bias gradients) compile ahead of
time for sm_80 and sm_90 without a GPU, fit the target's shared memory, use its tensor-core
instruction (fp16/bf16) and spill no registers.

The machinery is tests/test_triton_compile.py's (``bench.kernels``: the launcher's signatures,
specialisations and shared-memory pruned candidates). Compiling is 2-5 s a kernel on 2 cores,
so by default each variant is compiled, for each architecture, with the first candidate of its
tensor-core list (fp16) and of its IEEE-fp32 list: the largest tiles, where registers run out
first. ``MOE_KERNELS_COMPILE_ALL=1`` compiles every candidate of every list, bf16 too (about 180
kernels: ``python -m bench.kernels --arch sm_80|sm_90`` reports the same set).
"""

from __future__ import annotations

import os
import tempfile

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip(
        "TRITON_INTERPRET=1 replaces @triton.jit by the interpreter: nothing to compile", allow_module_level=True
    )
triton = pytest.importorskip("triton", reason="triton is not installed")

from bench.kernels import (  # noqa: E402
    FUSED,
    SHARED_LIMIT,
    compile_kernel,
    config_id,
    find_cuobjdump,
    gemm_configs,
    gemm_signature,
)

MMA = {80: "mma.sync", 90: "wgmma"}
CCS = [80, 90]
ALL = os.environ.get("MOE_KERNELS_COMPILE_ALL") == "1"


def _configs(kind: str, cc: int, dt: str) -> list:
    return gemm_configs(kind, cc, 4 if dt == "fp32" else 2, ieee_fp32=dt == "fp32")


CASES = [
    pytest.param(kind, cc, dt, i, id=f"{kind}-sm{cc}-{dt}-{config_id(c)}")
    for kind in FUSED
    for cc in CCS
    for dt in (("fp16", "bf16", "fp32") if ALL else ("fp16", "fp32"))
    for i, c in enumerate(_configs(kind, cc, dt))
    if ALL or i == 0
]


def _local_words(kernel) -> int:
    """Per-thread local memory (stack frame and spill slots) in 4-byte words, from the cubin's
    resource usage (spill stores and loads need local memory: none means no spills)."""
    import re
    import subprocess

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([find_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True,
                             timeout=60).stdout  # fmt: skip
    usage = dict(re.findall(r"\b(STACK|LOCAL):(\d+)", out))
    return (int(usage.get("STACK", 0)) + int(usage.get("LOCAL", 0))) // 4


@pytest.mark.parametrize("kind,cc,dt,index", CASES)
def test_fused_variant_compiles_without_spills(kind, cc, dt, index):
    cfg = _configs(kind, cc, dt)[index]
    fn, sig, const, div = gemm_signature(kind, dt)
    const.update(INPUT_PRECISION="ieee" if dt == "fp32" else "tf32", DOT_FP32=False, **cfg.kwargs)
    try:
        kernel = compile_kernel(fn, cc, sig, const, div, cfg.num_warps, cfg.num_stages)
    except Exception as exc:  # a wheel without its ptxas cannot check anything
        if "ptxas" in str(exc) and ("not found" in str(exc) or "No such file" in str(exc)):
            pytest.skip(f"triton's ptxas is unavailable: {exc}")
        raise
    assert kernel.metadata.shared <= SHARED_LIMIT[cc], f"{kernel.metadata.shared} B shared on sm_{cc}"
    if dt != "fp32":
        assert MMA[cc] in kernel.asm["ptx"], f"no {MMA[cc]} in {kind} on sm_{cc} with {config_id(cfg)}"
    if find_cuobjdump() is not None:
        words = _local_words(kernel)
        assert words == 0, f"{kind} on sm_{cc} with {config_id(cfg)} ({dt}) spills: {words} words of local memory"


def test_every_fused_variant_is_listed():
    """bench.kernels lists (and so ``python -m bench.kernels`` compiles) each fused variant,
    and each one sets a fused constexpr."""
    from bench import kernels

    assert set(FUSED) <= set(kernels.KINDS)
    for kind, (base, extra) in FUSED.items():
        assert base in kernels.KINDS
        assert extra.get("EPILOGUE", 0) or extra.get("ACT", 0) or extra.get("HAS_DB"), kind

"""The GPU test modules contain no parametrisation that cannot pass on a GPU, checked on the CPU
by reading them against the backends' own capability reports (tests/gpu_params.py)."""

from __future__ import annotations

import ast
import os

import pytest
import torch

from moe_kernels import _ext, backends
from tests.gpu_params import CUDA, backends_for

HERE = os.path.dirname(os.path.abspath(__file__))
# The backend ops each public op runs, forward and backward.
PUBLIC_OPS = {
    "topk_softmax": ("topk_softmax", "topk_softmax_backward"),
    "make_routing": ("make_routing",),
    "dispatch": ("dispatch", "combine"),
    "combine": ("combine", "dispatch", "combine_weights_grad"),
    "grouped_mm": ("grouped_mm", "grouped_mm_weight_grad"),
}


def _supported(backend: str) -> tuple[str, ...]:
    return backends.support(backend).ops()


def _tree(name: str) -> ast.Module:
    with open(os.path.join(HERE, name)) as f:
        return ast.parse(f.read())


def test_backends_for_follows_the_capability_reports():
    for op in backends.OPS:
        for b in backends_for(op):
            assert b != "torch"
            assert not backends.not_supported_reasons(b, op, CUDA), (b, op)
    if _ext.LOADED and _ext.cuda_kernels_built():
        # The CUDA library registers no grouped GEMM: its tests must not be parametrised there.
        assert not torch._C._dispatch_has_kernel_for_dispatch_key("moe_kernels_C::grouped_mm", "CUDA")
        assert "cuda" not in backends_for("grouped_mm") and "cuda" in backends_for("dispatch")
    with pytest.raises(ValueError, match="unknown op"):
        backends_for("gemm")


def test_every_backend_parametrised_gpu_test_names_its_ops():
    """tests/test_gpu.py: each test taking ``backend`` is parametrised by ``gpu_backends(ops)``
    over real op names, covering every op it calls."""
    checked = 0
    for fn in ast.walk(_tree("test_gpu.py")):
        if not isinstance(fn, ast.FunctionDef) or not fn.name.startswith("test_"):
            continue
        if "backend" not in [a.arg for a in fn.args.args]:
            continue
        decos = [
            d for d in fn.decorator_list if isinstance(d, ast.Call) and getattr(d.func, "id", "") == "gpu_backends"
        ]
        assert len(decos) == 1, f"{fn.name} takes a backend but is not parametrised by gpu_backends(...)"
        declared = {a.value for a in decos[0].args}
        assert declared <= set(backends.OPS), (fn.name, declared)
        called = {
            node.func.attr
            for node in ast.walk(fn)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in PUBLIC_OPS
            and any(k.arg == "backend" and isinstance(k.value, ast.Name) for k in node.keywords)
        }  # fmt: skip
        assert called, f"{fn.name} calls no op with its backend"
        needed = {op for name in called for op in PUBLIC_OPS[name]}
        assert needed <= declared, f"{fn.name} runs {sorted(needed - declared)} but declares {sorted(declared)}"
        checked += 1
    assert checked >= 4


@pytest.mark.skipif(not (_ext.LOADED and _ext.cuda_kernels_built()), reason="moe_kernels._C has no CUDA kernels")
def test_cuda_library_tests_call_only_registered_kernels():
    """tests/test_gpu_cuda.py runs backend "cuda" only through ops the library registers."""
    supported = set(_supported("cuda"))
    called = set()
    for node in ast.walk(_tree("test_gpu_cuda.py")):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if any(k.arg == "backend" and isinstance(k.value, ast.Name) and k.value.id == "B" for k in node.keywords):
                called.add(node.func.attr)
            if isinstance(node.func.value, ast.Name) and node.func.value.id == "ops":  # torch.ops.moe_kernels_C
                called.add(node.func.attr)
    assert called, "found no calls of the cuda backend"
    for name in called:
        for op in PUBLIC_OPS.get(name, (name,)):
            assert op in supported, f"tests/test_gpu_cuda.py calls {name} on the cuda backend, which has no {op}"

"""``moe_kernels.backends``, the one decider: the auto order, the declared rules (devices, ops,
dtypes, fp64, fused bias), an explicit backend that cannot run raising with its reasons, and a
missing ``_C``. Needs no GPU: CUDA devices are only named, never touched."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import pytest
import torch

import moe_kernels as mk
from moe_kernels import _ext, backends, reference
from moe_kernels.ops.topk_softmax import MAX_EXPERTS, MAX_K

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_c = pytest.mark.skipif(not _ext.LOADED, reason=f"moe_kernels._C did not load ({_ext.LOAD_ERROR})")
needs_cuda_build = pytest.mark.skipif(
    not (_ext.LOADED and _ext.cuda_kernels_built()), reason="moe_kernels._C has no CUDA kernels"
)
has_triton = not isinstance(backends.support("triton"), str)


@pytest.fixture(autouse=True)
def _fresh_choices():
    backends._choose.cache_clear()
    yield
    backends._choose.cache_clear()


@needs_c
def test_auto_on_cpu_picks_the_cpp_kernels():
    for op in backends.OPS:
        assert backends.choose(op, "auto", CPU)[0] == "cpu", op


@needs_cuda_build
@pytest.mark.skipif(not has_triton, reason="triton is not installed")
def test_auto_on_cuda_picks_triton_gemms_and_cuda_routing():
    for op in backends.OPS:
        want = "triton" if op.startswith("grouped_mm") else "cuda"
        assert backends.choose(op, "auto", CUDA)[0] == want, op


def test_auto_falls_back_to_the_reference(monkeypatch):
    # Every compiled/Triton backend unavailable: auto quietly runs the reference.
    monkeypatch.setattr(backends, "support", lambda b: "ImportError: gone" if b != "torch" else reference.SUPPORTS[b])
    assert backends.choose("dispatch", "auto", CPU) == ("torch", reference.dispatch)


@pytest.mark.parametrize(
    "op,backend,device,match",
    [
        ("dispatch", "cuda", CPU, "the cuda backend needs CUDA tensors, got cpu"),
        ("dispatch", "cpu", CUDA, "the cpu backend needs CPU tensors, got cuda"),
        ("grouped_mm", "triton", CPU, r"triton needs CUDA tensors \(or CPU tensors with TRITON_INTERPRET=1\)"),
    ],
)
def test_explicit_backend_that_cannot_run_raises_with_reasons(op, backend, device, match, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if isinstance(backends.support(backend), str):
        pytest.skip(f"{backend} is not importable here: {backends.support(backend)}")
    with pytest.raises(RuntimeError, match=f"backend '{backend}' cannot run {op} on {device.type} tensors: .*{match}"):
        backends.choose(op, backend, device)


@needs_cuda_build
def test_cuda_has_no_grouped_gemm_and_says_so():
    reasons = backends.not_supported_reasons("cuda", "grouped_mm", CUDA)
    assert "cuda has no grouped_mm kernel for cuda tensors" in reasons
    with pytest.raises(RuntimeError, match="cuda has no grouped_mm kernel"):
        backends.choose("grouped_mm", "cuda", CUDA)


@needs_c
def test_public_op_with_an_impossible_backend_names_it():
    x, w = torch.randn(4, 3), torch.randn(2, 5, 3)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run grouped_mm on cpu tensors"):
        mk.grouped_mm(x, w, torch.tensor([0, 2, 4]), backend="cuda")


@pytest.mark.skipif(not has_triton, reason="triton is not installed")
def test_fp64_rule_is_declared_and_applied():
    sup = backends.support("triton")
    assert sup.fp64 == "reference" and torch.float64 not in sup.dtypes
    assert backends.choose("grouped_mm", "triton", CUDA, torch.float64) == ("torch", reference.grouped_mm)
    name, impl = backends.choose("grouped_mm", "triton", CUDA, torch.bfloat16)
    assert name == "triton" and impl.__module__ == "moe_kernels.ops._triton"
    # a dtype the kernels do not compute in is a reason, not a silent fallback
    reasons = backends.not_supported_reasons("triton", "dispatch", CUDA, torch.float8_e4m3fn)
    assert reasons == ["triton does not compute in float8_e4m3fn"]


@needs_c
def test_cpp_backends_run_fp64_natively():
    for b in ("cpu", "cuda"):
        assert backends.support(b).fp64 == "native"
    assert backends.choose("combine", "cpu", CPU, torch.float64)[0] == "cpu"


def test_fused_bias_is_declared_and_the_unfused_path_agrees(monkeypatch):
    for b in backends.BACKENDS:
        sup = backends.support(b)
        assert isinstance(sup, str) or isinstance(sup.fused_bias, bool)
    torch.manual_seed(0)
    x, w, b = torch.randn(9, 4), torch.randn(3, 5, 4), torch.randn(3, 5)
    offsets = torch.tensor([0, 2, 2, 7])
    fused = mk.grouped_mm(x, w, offsets, bias=b, backend="torch")
    monkeypatch.setitem(reference.SUPPORTS, "torch", dataclasses.replace(reference.SUPPORTS["torch"], fused_bias=False))
    assert not backends.fuses_bias("torch")
    unfused = mk.grouped_mm(x, w, offsets, bias=b, backend="torch")
    torch.testing.assert_close(unfused, fused)
    assert unfused[7:].abs().sum() == 0  # padding rows past offsets[E] stay zero


def test_one_op_list():
    assert list(reference.__all__) == list(backends.OPS)
    for b in backends.BACKENDS:
        sup = backends.support(b)
        if isinstance(sup, str):
            continue
        mod = backends._module(b)
        for op in sup.ops():
            assert op in backends.OPS and callable(getattr(mod, op)), (b, op)


@needs_c
def test_cpp_registers_exactly_the_op_list():
    for key in ("CPU",) + (("CUDA",) if _ext.cuda_kernels_built() else ()):
        registered = {n.split("::")[1] for n in torch._C._dispatch_get_registrations_for_dispatch_key(key)
                      if n.startswith("moe_kernels_C::")}  # fmt: skip
        assert registered <= set(backends.OPS + backends.FUSED_OPS), registered - set(backends.OPS)
        if key == "CPU":  # the CPU kernels fuse the expert MLP's epilogues too
            assert registered == set(backends.OPS + backends.FUSED_OPS)


@needs_c
def test_python_and_cpp_gating_limits_agree():
    """E <= 256 and K <= 8 in ops/topk_softmax.py and in csrc (routing_logic.h via checks.h)."""
    ops = torch.ops.moe_kernels_C
    ops.topk_softmax(torch.randn(2, MAX_EXPERTS), MAX_K, False)  # at the limits: both accept
    mk.topk_softmax(torch.randn(2, MAX_EXPERTS), MAX_K, backend="torch")
    with pytest.raises(RuntimeError) as cpp:
        ops.topk_softmax(torch.randn(2, MAX_EXPERTS + 1), 2, False)
    with pytest.raises(ValueError) as py:
        mk.topk_softmax(torch.randn(2, MAX_EXPERTS + 1), 2, backend="torch")
    bound = r"\[1, (\d+)\]"
    cpp_bound, py_bound = (int(re.search(bound, str(e.value)).group(1)) for e in (cpp, py))
    assert cpp_bound == py_bound == MAX_EXPERTS
    with pytest.raises(RuntimeError, match=rf"k must be in \[1, min\(E={MAX_EXPERTS}, {MAX_K}\)\], got {MAX_K + 1}"):
        ops.topk_softmax(torch.randn(2, MAX_EXPERTS), MAX_K + 1, False)
    with pytest.raises(ValueError, match=rf"k must be in \[1, {MAX_K}\], got {MAX_K + 1}"):
        mk.topk_softmax(torch.randn(2, MAX_EXPERTS), MAX_K + 1, backend="torch")


def test_missing_extension_is_reported_and_the_reference_runs():
    """A _C that fails to load (here: a library path that does not exist): the cpu backend
    reports why, auto runs the reference, and the ops still work."""
    code = (
        "import torch, moe_kernels as mk\n"
        "from moe_kernels import backends\n"
        "r = backends.available('cpu')\n"
        "print('CPU:', r['cpu'])\n"
        "print('AUTO:', backends.choose('dispatch', 'auto', torch.device('cpu'))[0])\n"
        "x = torch.randn(6, 4); idx = torch.randint(0, 3, (6, 2))\n"
        "rt = mk.make_routing(idx, 3, None)\n"
        "print('OK:', torch.equal(mk.combine(mk.dispatch(x, rt), rt), 2 * x))\n"
    )
    env = {**os.environ, "MOE_KERNELS_LIBRARY": "/nonexistent/_C.so"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cannot import moe_kernels.ops._cpp" in proc.stdout and "nonexistent" in proc.stdout, proc.stdout
    assert "AUTO: torch" in proc.stdout and "OK: True" in proc.stdout, proc.stdout

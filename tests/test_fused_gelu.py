"""The expert MLP's fused epilogues (``ops.gelu_mlp``; docs/triton.md, "Fused epilogues").

This module runs twice, as tests/test_triton_interpret.py does. In the normal suite the CPU
cases run: backends without fused epilogues run exactly the unfused ops as before (the C++ CPU
kernels' fused ops have their own tests, tests/test_fused_cpu.py); the fused
op's own composition (and its backward) against the unfused pair; the wiring of ``MoEMlp`` and
``grouped_mm``'s bias gradient through a stand-in fused backend made of reference code
(tests/fused_standin.py); opcheck of the new ops. ``test_interpreter_cases`` then runs this
file in a child with ``TRITON_INTERPRET=1``, where the Triton launchers and the public ops on
``backend="triton"`` are compared with the reference: fp32 (and fp16 where it adds a rounding),
both GELU approximations, an empty expert, expert boundaries inside a BLOCK_M=32 tile and
padding rows past offsets[E]. Grids are a few dozen programs (the interpreter costs ~1 ms per
program instance).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import moe_kernels as mk
from moe_kernels import backends
from moe_kernels import reference as ref
from moe_kernels.ops.grouped_mm import gelu_mlp
from tests.conftest import backends_under_test
from tests.fused_standin import fused_torch
from tests.sync_spy import HostSyncSpy

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
in_child = pytest.mark.skipif(not INTERPRET, reason="runs in the TRITON_INTERPRET=1 child (test_interpreter_cases)")
in_parent = pytest.mark.skipif(INTERPRET, reason="a CPU case: runs in the normal suite")
approximations = pytest.mark.parametrize("approximate", ["none", "tanh"])

# (rows per expert, padding rows, D, H, Dout). BLOCK_M is 32 under the interpreter: expert
# boundaries at rows 10 and 45 fall inside tiles, expert 1 is empty, 5 padding rows follow.
CASES = [
    ([10, 0, 35, 15], 5, 24, 40, 12),
    ([7], 0, 9, 17, 5),  # one expert, odd widths, fewer rows than a tile
]
CASE_IDS = [f"E{len(c[0])}-P{c[1]}-D{c[2]}-H{c[3]}" for c in CASES]


def _operands(sizes, pad, D, H, Dout, dtype=torch.float32, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    offsets = torch.tensor([0] + sizes).cumsum(0)
    M, E = int(offsets[-1]) + pad, len(sizes)
    x = torch.randn(M, D, generator=g).to(dtype)
    w1 = (torch.randn(E, H, D, generator=g) / D**0.5).to(dtype)
    b1 = torch.randn(E, H, generator=g).to(dtype)
    w2 = (torch.randn(E, Dout, H, generator=g) / H**0.5).to(dtype)
    b2 = torch.randn(E, Dout, generator=g).to(dtype)
    gy = torch.randn(M, Dout, generator=g).to(dtype)
    return offsets, (x, w1, b1, w2, b2), gy


def _mlp(backend, offsets, params, gy, approximate, wants=(True,) * 5, public=True):
    """y and the gradients of (x, w1, b1, w2, b2) (None where not wanted)."""
    leaves = [p.clone().requires_grad_(want) for p, want in zip(params, wants, strict=True)]
    x, w1, b1, w2, b2 = leaves
    if public:
        y = gelu_mlp(x, w1, w2, offsets, bias1=b1, bias2=b2, approximate=approximate, backend=backend)
    else:  # the fused op itself, whatever the backend
        y = torch.ops.moe_kernels.gelu_mlp(x, w1, b1, w2, b2, offsets, approximate, True, backend)[0]
    needed = [t for t in leaves if t.requires_grad]
    grads = iter(torch.autograd.grad(y, needed, gy))
    return y.detach(), [next(grads) if t.requires_grad else None for t in leaves]


def _unfused(backend, offsets, params, gy, approximate):
    """The pair the layer ran before: grouped_mm, then gelu_grouped_mm."""
    x, w1, b1, w2, b2 = (p.clone().requires_grad_() for p in params)
    h = mk.grouped_mm(x, w1, offsets, bias=b1, backend=backend)
    y = mk.ops.gelu_grouped_mm(h, w2, offsets, bias=b2, approximate=approximate, backend=backend)
    return y.detach(), list(torch.autograd.grad(y, (x, w1, b1, w2, b2), gy))


def _assert_close(got, want, atol=1e-5, rtol=1e-5):
    y, grads = got
    torch.testing.assert_close(y, want[0], atol=atol, rtol=rtol)
    for name, a, b in zip(("x", "w1", "b1", "w2", "b2"), grads, want[1], strict=True):
        if a is not None:
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, n=name: f"grad of {n}: {m}")


# ---------------------------------------------------------------------------------------------
# CPU: the op layer


def _unfused_backends(device_type: str) -> list[str]:
    """The backends under test on ``device_type`` whose grouped GEMM declares no fused epilogues."""
    dev = torch.device(device_type)
    return [b for b in backends_under_test(device_type)
            if backends.fused("grouped_mm_act", b, dev, torch.float32) is None]  # fmt: skip


@in_parent
@pytest.mark.parametrize("backend", _unfused_backends("cpu"))
@approximations
def test_backends_without_fused_epilogues_run_the_unfused_pair(backend, approximate):
    offsets, params, gy = _operands(*CASES[0])
    with HostSyncSpy(device_type="cpu") as spy:
        got = _mlp(backend, offsets, params, gy, approximate)
    assert "moe_kernels.gelu_mlp" not in spy.ops and "moe_kernels.grouped_mm_weight_grad_fused" not in spy.ops
    want = _unfused(backend, offsets, params, gy, approximate)
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1], want[1], strict=True):
        assert torch.equal(a, b)  # the same kernels on the same operands: bitwise


@in_parent
@approximations
@pytest.mark.parametrize(
    "wants",
    [
        (True,) * 5,
        (True, False, False, True, False),
        (False, True, True, False, True),
        (False, False, True, False, False),
    ],
    ids=["all", "x-w2", "w1-b1-b2", "b1"],
)
def test_fused_op_and_its_backward_match_the_unfused_pair(approximate, wants):
    """The fused op called directly on the reference backend (its unfused composition) and its
    backward formula, for any subset of inputs that need a gradient."""
    offsets, params, gy = _operands(*CASES[0])
    got = _mlp("torch", offsets, params, gy, approximate, wants=wants, public=False)
    _assert_close(got, _unfused("torch", offsets, params, gy, approximate))


@in_parent
@approximations
def test_moe_mlp_takes_the_fused_path_where_declared(approximate, monkeypatch):
    torch.manual_seed(0)
    layer = mk.MoEMlp(12, 20, num_experts=4, k=2, group_size=16, capacity_factor=1.0, noise_std=0.0, backend="torch",
                      act_layer=lambda: torch.nn.GELU(approximate=approximate))  # fmt: skip
    x0 = torch.randn(32, 12)

    def run():
        x = x0.clone().requires_grad_()
        with HostSyncSpy(device_type="cpu") as spy:
            y = layer(x)
            y.backward(torch.ones_like(y))
        grads = [x.grad] + [p.grad.clone() for p in layer.parameters()]
        layer.zero_grad()
        return y.detach(), grads, spy.ops

    want_y, want_g, ops = run()
    assert "moe_kernels.gelu_mlp" not in ops
    calls = fused_torch(monkeypatch)
    y, grads, ops = run()
    assert "moe_kernels.gelu_mlp" in ops and "moe_kernels.gelu_grouped_mm" not in ops
    torch.testing.assert_close(y, want_y)
    for a, b in zip(grads, want_g, strict=True):
        torch.testing.assert_close(a, b)
    # fc1 keeps GELU's input for the backward; fc2's dW applies GELU to it and sums b2's
    # gradient, fc1's dW sums b1's; GELU' in fc2's dX.
    assert ("grouped_mm_act", (approximate, True)) in calls
    assert ("grouped_mm_weight_grad_fused", (approximate, True, True)) in calls
    assert ("grouped_mm_weight_grad_fused", (None, True, True)) in calls
    assert ("grouped_mm_act_grad", (approximate,)) in calls
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(layer(x0), want_y)
    assert calls == [("grouped_mm_act", (approximate, False))]  # no autograd: h is not written


@in_parent
def test_grouped_mm_bias_gradient_through_the_fused_pass(monkeypatch):
    offsets = torch.tensor([0, 4, 4, 9])  # an empty expert and 2 padding rows
    x0, w0, b0, gy = torch.randn(11, 6), torch.randn(3, 5, 6), torch.randn(3, 5), torch.randn(11, 5)

    def grads(wants):
        x, w, b = (t.clone().requires_grad_(want) for t, want in zip((x0, w0, b0), wants, strict=True))
        y = mk.grouped_mm(x, w, offsets, bias=b, backend="torch")
        return torch.autograd.grad(y, [t for t in (x, w, b) if t.requires_grad], gy)

    want = grads((True, True, True))
    calls = fused_torch(monkeypatch)
    for wants in ((True, True, True), (False, False, True), (True, False, False)):
        got = grads(wants)
        for a, b in zip(got, [g for g, want in zip(want, wants, strict=True) if want], strict=True):
            torch.testing.assert_close(a, b)
    assert calls == [("grouped_mm_weight_grad_fused", (None, True, True)),
                     ("grouped_mm_weight_grad_fused", (None, False, True))]  # fmt: skip


@in_parent
def test_a_differentiable_backward_runs_the_unfused_ops(monkeypatch):
    """create_graph=True (e.g. a gradient penalty): the fused op's backward falls back to ops
    with autograd, so second derivatives are the unfused pair's."""
    offsets, params, gy = _operands(*CASES[1])

    def penalty():
        x, w1, b1, w2, b2 = (p.clone().requires_grad_() for p in params)
        y = gelu_mlp(x, w1, w2, offsets, bias1=b1, bias2=b2, approximate="tanh", backend="torch")
        (gx,) = torch.autograd.grad(y, x, gy, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (x, w1, w2))

    want = penalty()
    calls = fused_torch(monkeypatch)
    got = penalty()
    assert calls[0] == ("grouped_mm_act", ("tanh", True))  # the fused forward
    assert all(op != "grouped_mm_act_grad" for op, _ in calls)  # GELU' from gelu_backward
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@in_parent
def test_fused_epilogues_are_declared():
    cuda = torch.device("cuda", 0)
    for name in backends.BACKENDS:
        sup = backends.support(name)
        if not isinstance(sup, str):
            assert sup.fused_epilogues == (name in ("triton", "cpu")), name
            assert sup.fused_mlp == (name == "triton"), name
    assert backends.fused("grouped_mm_act", "torch", torch.device("cpu"), torch.float32) is None
    if not isinstance(backends.support("cpu"), str):
        from moe_kernels.ops import _cpp

        for op in backends.FUSED_OPS:
            assert backends.fused(op, "cpu", torch.device("cpu"), torch.float32) is getattr(_cpp, op)
    if not isinstance(backends.support("triton"), str):
        from moe_kernels.ops import _triton

        for op in backends.FUSED_OPS:
            assert backends.fused(op, "triton", cuda, torch.bfloat16) is getattr(_triton, op)
        assert backends.fused("grouped_mm_act", "triton", cuda, torch.float64) is None  # fp64: the reference


@in_parent
def test_opcheck_the_fused_ops():
    offsets, (x, w1, b1, w2, b2), gy = _operands([3, 0, 4], 1, 5, 6, 4)
    h = ref.grouped_mm(x, w1, offsets, b1)
    ops = torch.ops.moe_kernels
    samples = [
        (ops.gelu_mlp.default, (x.requires_grad_(), w1.requires_grad_(), b1, w2.requires_grad_(), b2, offsets,
                                "tanh", True, "torch")),
        (ops.grouped_mm_act_grad.default, (gy, w2.detach().transpose(1, 2), offsets, h, "none", "torch")),
        (ops.grouped_mm_weight_grad_fused.default, (h, gy, offsets, "tanh", True, True, "torch")),
    ]  # fmt: skip
    for op, args in samples:
        torch.library.opcheck(op, args)


@in_parent
def test_errors_name_the_argument(monkeypatch):
    fused_torch(monkeypatch)  # the fused path's own checks
    offsets, (x, w1, b1, w2, b2), _ = _operands(*CASES[0])
    with pytest.raises(ValueError, match=r"gelu_mlp: approximate must be 'none' or 'tanh', got 'erf'"):
        gelu_mlp(x, w1, w2, offsets, approximate="erf", backend="torch")
    with pytest.raises(ValueError, match=r"gelu_mlp: w2 must have shape \[E=4, Dout, H=40\]"):
        gelu_mlp(x, w1, w2[:, :, :7], offsets, backend="torch")
    with pytest.raises(ValueError, match=r"gelu_mlp: bias2 must have shape \[E, Dout\]=\[4, 12\]"):
        gelu_mlp(x, w1, w2, offsets, bias2=b1, backend="torch")
    with pytest.raises(TypeError, match=r"gelu_mlp: w2 must have dtype in \(float32\)"):
        gelu_mlp(x, w1, w2.double(), offsets, backend="torch")


# ---------------------------------------------------------------------------------------------
# Triton under the interpreter (the child)


def test_interpreter_cases():
    """This module's interpreter cases, in a child process with ``TRITON_INTERPRET=1``."""
    if INTERPRET:
        pytest.skip("this process is the interpreter child; the cases run here")
    pytest.importorskip("triton", reason="triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", MOE_KERNELS_BACKEND="triton")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout[-6000:] + "\n" + proc.stderr[-3000:]).strip()
    assert proc.returncode == 0 and " passed" in proc.stdout, tail


@in_child
@pytest.mark.parametrize("dt,approximate", [("f32", "none"), ("f32", "tanh"), ("f16", "tanh")])
def test_launchers_against_the_reference(approximate, dt):
    from moe_kernels.ops import _triton

    dtype, tol = (torch.float32, 1e-5) if dt == "f32" else (torch.float16, 2e-3)
    offsets, (x, w1, b1, w2, _), gy = _operands(*CASES[0], dtype=dtype)
    pad_from = int(offsets[-1])
    gelu = lambda t: F.gelu(t.float(), approximate=approximate).to(dtype)  # noqa: E731
    # fc1 with GELU in its epilogue: GELU of the rounded pre-activation, as F.gelu(h) sees it.
    a, h = _triton.grouped_mm_act(x, w1, offsets, b1, approximate, True)
    h_ref = ref.grouped_mm(x, w1, offsets, b1)
    torch.testing.assert_close(h, h_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(a, gelu(h), atol=tol, rtol=tol)
    assert not h[pad_from:].any() and not a[pad_from:].any()
    a_eval, none = _triton.grouped_mm_act(x, w1, offsets, b1, approximate, False)
    assert none.shape == (0, h.shape[1]) and torch.equal(a_eval, a)
    # fc2's dX with GELU' in its epilogue (w2 transposed, as the backward passes it).
    gh = _triton.grouped_mm_act_grad(gy, w2.transpose(1, 2), offsets, h, approximate)
    ga = ref.grouped_mm(gy.float(), w2.float().transpose(1, 2), offsets)  # fp32: one rounding, as the epilogue
    want = torch.ops.aten.gelu_backward(ga, h.float(), approximate=approximate).to(dtype)
    torch.testing.assert_close(gh, want, atol=tol, rtol=tol)
    assert not gh[pad_from:].any()
    # fc2's dW with GELU applied to h on load, and the column sums (bias gradient); split over
    # rows too (the split kernel's partial sums); either output alone.
    dw_ref = ref.grouped_mm_weight_grad(gelu(h), gy, offsets)
    db_ref = ref.grouped_mm_weight_grad(torch.ones(gy.shape[0], 1, dtype=dtype), gy, offsets).squeeze(2)
    for split in (1, 3):
        dw, db = _triton.grouped_mm_weight_grad_fused(h, gy, offsets, approximate, True, True, split=split)
        torch.testing.assert_close(dw, dw_ref, atol=tol, rtol=tol)
        torch.testing.assert_close(db, db_ref, atol=tol, rtol=tol)
        assert not dw[1].any() and not db[1].any()  # the empty expert
        again = _triton.grouped_mm_weight_grad_fused(h, gy, offsets, approximate, True, True, split=split)
        assert torch.equal(dw, again[0]) and torch.equal(db, again[1])  # run to run
        none, db_only = _triton.grouped_mm_weight_grad_fused(h, gy, offsets, None, False, True, split=split)
        assert none.numel() == 0 and torch.equal(db_only, db)
        dw_plain, none = _triton.grouped_mm_weight_grad_fused(h, gy, offsets, None, True, False, split=split)
        assert none.numel() == 0
        torch.testing.assert_close(dw_plain, ref.grouped_mm_weight_grad(h, gy, offsets), atol=tol, rtol=tol)


@in_child
@pytest.mark.parametrize(
    "case,approximate", [(CASES[0], "none"), (CASES[0], "tanh"), (CASES[1], "tanh")], ids=[f"{CASE_IDS[0]}-none",
    f"{CASE_IDS[0]}-tanh", f"{CASE_IDS[1]}-tanh"]
)  # fmt: skip
def test_gelu_mlp_on_triton_matches_the_reference(case, approximate):
    offsets, params, gy = _operands(*case)
    with HostSyncSpy(device_type="cpu") as spy:
        got = _mlp("triton", offsets, params, gy, approximate)
    assert "moe_kernels.gelu_mlp" in spy.ops and "moe_kernels.grouped_mm_act_grad" in spy.ops
    _assert_close(got, _unfused("torch", offsets, params, gy, approximate))
    assert not got[0][int(offsets[-1]) :].any() and not got[1][0][int(offsets[-1]) :].any()  # padding rows
    with torch.no_grad():  # h is not written: the eval epilogue
        y = gelu_mlp(*params[:2], params[3], offsets, bias1=params[2], bias2=params[4], approximate=approximate,
                         backend="triton")  # fmt: skip
    assert torch.equal(y, got[0])


@in_child
def test_gelu_grouped_mm_and_bias_gradients_on_triton(approximate="none"):
    """gelu_grouped_mm's backward and grouped_mm's bias gradient through the fused passes."""
    offsets, (_, _, b1, w2, b2), gy = _operands(*CASES[0])
    h0 = torch.randn(gy.shape[0], w2.shape[2])
    res = {}
    for backend in ("triton", "torch"):
        h, w, b = (t.clone().requires_grad_() for t in (h0, w2, b2))
        y = mk.ops.gelu_grouped_mm(h, w, offsets, bias=b, approximate=approximate, backend=backend)
        res[backend] = (y, *torch.autograd.grad(y, (h, w, b), gy))
        w, b = w2.transpose(1, 2).contiguous(), b1.clone().requires_grad_()  # grouped_mm: bias alone
        y = mk.grouped_mm(gy, w, offsets, bias=b, backend=backend)
        res[backend] += torch.autograd.grad(y, (b,), torch.ones_like(y))
    for a, b in zip(res["triton"], res["torch"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@in_child
def test_moe_mlp_on_triton_matches_the_reference(approximate="tanh"):
    torch.manual_seed(0)
    layer = mk.MoEMlp(12, 20, num_experts=4, k=2, group_size=16, capacity_factor=1.0, noise_std=0.0,
                      act_layer=lambda: torch.nn.GELU(approximate=approximate))  # fmt: skip
    x0 = torch.randn(32, 12)
    res = {}
    for backend in ("triton", "torch"):
        layer.backend = backend
        x = x0.clone().requires_grad_()
        with HostSyncSpy(device_type="cpu") as spy:
            y = layer(x)
            y.backward(torch.ones_like(y))
        assert ("moe_kernels.gelu_mlp" in spy.ops) == (backend == "triton")
        res[backend] = [y.detach(), x.grad] + [p.grad.clone() for p in layer.parameters()]
        layer.zero_grad()
    for a, b in zip(res["triton"], res["torch"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

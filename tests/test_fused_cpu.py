"""The C++ CPU kernels of the fused expert-MLP ops (``backends.FUSED_OPS``; csrc/cpu/grouped_mm.cpp).

``grouped_mm_act`` (GELU on each forward tile), ``grouped_mm_act_grad`` (GELU' on each dX tile)
and ``grouped_mm_weight_grad_fused`` (GELU on the loaded rows, bias gradients as column sums in
the same tiles) against the unfused ops they replace: the GEMMs are the same tile calls, so the
pre-activation and the plain weight gradient are bitwise those of ``grouped_mm`` and
``grouped_mm_weight_grad``; GELU's bits can differ in the last place (ATen's vectorised GELU
takes a scalar path for the tail of each tile), and the bias gradients sum rows in order
instead of a GEMM against ones. Cases: an empty expert, padding rows past offsets[E], an expert
of 700 rows (two row chunks of the weight gradient's fixed 512-row reduction), both GELU
approximations, fp32, fp64 and both low-precision paths, 1 vs 2 threads.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moe_kernels as mk
from moe_kernels import backends
from tests.conftest import backends_under_test
from tests.sync_spy import HostSyncSpy

pytestmark = pytest.mark.skipif("cpu" not in backends_under_test("cpu"), reason="the C++ CPU backend is not under test")

ops = torch.ops.moe_kernels_C
LOWP_ENV = "MOE_KERNELS_CPU_LOWP_GEMM"
approximations = pytest.mark.parametrize("approximate", ["none", "tanh"])
# (dtype, atol, rtol) for what may differ from the unfused ops: GELU's last bit, the bias sums.
DTYPES = {
    "fp32": (torch.float32, 1e-5, 1e-5),
    "fp64": (torch.float64, 1e-12, 1e-12),
    "bf16-fp32": (torch.bfloat16, 2e-2, 2e-2),  # tiles converted to fp32
    "bf16-native": (torch.bfloat16, 2e-2, 2e-2),
}


def _operands(dtype, sizes=(700, 0, 13, 5), pad=3, D=24, H=40, Dout=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    M, E = int(offsets[-1]) + pad, len(sizes)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    return offsets, r(M, D), r(E, H, D, scale=D**-0.5), r(E, H), r(E, Dout, H, scale=H**-0.5), r(M, Dout)


def _sums(g, offsets):
    """Per-expert column sums in fp64, [E, N]."""
    return torch.stack([g[offsets[e] : offsets[e + 1]].double().sum(0) for e in range(len(offsets) - 1)])


@pytest.fixture
def dtype_case(request, monkeypatch):
    dtype, atol, rtol = DTYPES[request.param]
    if request.param.startswith("bf16"):
        monkeypatch.setenv(LOWP_ENV, request.param.split("-")[1])
    return dtype, atol, rtol


by_dtype = pytest.mark.parametrize("dtype_case", list(DTYPES), indirect=True)


@by_dtype
@approximations
def test_forward_with_gelu_epilogue(dtype_case, approximate):
    dtype, atol, rtol = dtype_case
    offsets, x, w1, b1, _, _ = _operands(dtype)
    y, pre = ops.grouped_mm_act(x, w1, offsets, b1, approximate, True)
    h = ops.grouped_mm(x, w1, offsets, b1)
    assert torch.equal(pre, h)  # the same tile GEMMs
    torch.testing.assert_close(y, F.gelu(h, approximate=approximate), atol=atol, rtol=rtol)
    end = int(offsets[-1])
    assert not y[end:].any() and not pre[end:].any()  # padding rows
    y2, none = ops.grouped_mm_act(x, w1, offsets, b1, approximate, False)
    assert torch.equal(y2, y) and none.shape == (0, w1.shape[1])  # GELU in place: same bits


@by_dtype
@approximations
def test_dx_with_gelu_derivative_epilogue(dtype_case, approximate):
    dtype, atol, rtol = dtype_case
    offsets, x, w1, b1, w2, gy = _operands(dtype)
    h = ops.grouped_mm(x, w1, offsets, b1)
    w2t = w2.transpose(1, 2)  # [E, H, Dout], strided as the backward passes it
    gh = ops.grouped_mm_act_grad(gy, w2t, offsets, h, approximate)
    want = torch.ops.aten.gelu_backward(ops.grouped_mm(gy, w2t, offsets, None), h, approximate=approximate)
    torch.testing.assert_close(gh, want, atol=atol, rtol=rtol)
    assert not gh[int(offsets[-1]) :].any()


@by_dtype
@approximations
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)], ids=["dw-db", "dw", "db"])
def test_weight_gradient_with_gelu_and_bias_sums(dtype_case, approximate, need):
    dtype, atol, rtol = dtype_case
    offsets, x, w1, b1, _, gy = _operands(dtype)
    h = ops.grouped_mm(x, w1, offsets, b1)  # fc2's input: GELU applied as it is loaded
    for act, rows, g in ((approximate, h, gy), (None, x, ops.grouped_mm(gy, w1[:, :12].transpose(1, 2), offsets))):
        dw, db = ops.grouped_mm_weight_grad_fused(rows, g, offsets, act, *need)
        a = rows if act is None else F.gelu(rows, approximate=act)
        if need[0]:
            want = ops.grouped_mm_weight_grad(a, g, offsets)
            if act is None:
                assert torch.equal(dw, want)  # the same tiles and row chunks
            else:
                torch.testing.assert_close(dw, want, atol=atol, rtol=rtol)
            assert not dw[1].any()  # the empty expert
        else:
            assert dw.numel() == 0
        if need[1]:
            torch.testing.assert_close(db.double(), _sums(g, offsets), atol=atol * 10, rtol=rtol)
            assert not db[1].any()
        else:
            assert db.numel() == 0


@pytest.mark.parametrize("dtype_id", ["fp32", "bf16-fp32"])
def test_fused_ops_are_thread_count_invariant(monkeypatch, dtype_id):
    dtype = DTYPES[dtype_id][0]
    if dtype_id == "bf16-fp32":
        monkeypatch.setenv(LOWP_ENV, "fp32")
    offsets, x, w1, b1, w2, gy = _operands(dtype, sizes=(1100, 0, 700, 9), D=48, H=200, Dout=40, seed=1)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            y, h = ops.grouped_mm_act(x, w1, offsets, b1, "tanh", True)
            gh = ops.grouped_mm_act_grad(gy, w2.transpose(1, 2), offsets, h, "tanh")
            results.append([y, h, gh, *ops.grouped_mm_weight_grad_fused(h, gy, offsets, "tanh", True, True),
                            *ops.grouped_mm_weight_grad_fused(x, gh, offsets, None, True, True)])  # fmt: skip
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@approximations
def test_layer_on_cpu_takes_the_fused_backward_and_matches_the_reference(approximate):
    assert backends.fused("grouped_mm_act", "cpu", torch.device("cpu"), torch.float32) is not None
    torch.manual_seed(0)
    layers = {
        b: mk.MoEMlp(24, 40, num_experts=4, k=2, group_size=32, capacity_factor=1.0, noise_std=0.0, backend=b,
                     act_layer=lambda: torch.nn.GELU(approximate=approximate))  # fmt: skip
        for b in ("cpu", "torch")
    }
    layers["torch"].load_state_dict(layers["cpu"].state_dict())
    x0 = torch.randn(64, 24)
    out = {}
    for b, layer in layers.items():
        x = x0.clone().requires_grad_()
        with HostSyncSpy(device_type="cpu") as spy:
            y = layer(x)
            y.backward(torch.cos(y.detach()))
        out[b] = [y.detach(), x.grad] + [p.grad for p in layer.parameters()]
        if b == "cpu":  # the pair (two autograd nodes), its backward through the fused pieces
            assert "moe_kernels.gelu_mlp" not in spy.ops and "moe_kernels.gelu_grouped_mm" in spy.ops
            assert {"moe_kernels.grouped_mm_act_grad", "moe_kernels.grouped_mm_weight_grad_fused"} <= spy.ops
    for a, b in zip(out["cpu"], out["torch"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_opcheck_the_fused_ops_on_cpu():
    offsets, x, w1, b1, w2, gy = _operands(torch.float32, sizes=(3, 0, 4), pad=1, D=5, H=6, Dout=4)
    h = ops.grouped_mm(x, w1, offsets, b1)
    mko = torch.ops.moe_kernels
    samples = [
        (mko.gelu_mlp.default, (x.requires_grad_(), w1.requires_grad_(), b1, w2.requires_grad_(), None, offsets,
                                "tanh", True, "cpu")),
        (mko.grouped_mm_act_grad.default, (gy, w2.detach().transpose(1, 2), offsets, h, "none", "cpu")),
        (mko.grouped_mm_weight_grad_fused.default, (h, gy, offsets, "tanh", True, True, "cpu")),
        (mko.grouped_mm_weight_grad_fused.default, (x.detach(), h, offsets, None, False, True, "cpu")),
    ]  # fmt: skip
    for op, args in samples:
        torch.library.opcheck(op, args)


def test_errors_name_the_argument():
    offsets, x, w1, b1, w2, gy = _operands(torch.float32)
    h = ops.grouped_mm(x, w1, offsets, b1)
    with pytest.raises(RuntimeError, match=r"grouped_mm_act: approximate must be 'none' or 'tanh', got 'erf'"):
        ops.grouped_mm_act(x, w1, offsets, b1, "erf", True)
    with pytest.raises(RuntimeError, match=r"grouped_mm_act: bias must have shape \[E=4, N=40\], got \[4, 12\]"):
        ops.grouped_mm_act(x, w1, offsets, b1[:, :12], "none", True)
    with pytest.raises(RuntimeError, match=r"grouped_mm_act_grad: pre must have shape \[M=\d+, N=40\]"):
        ops.grouped_mm_act_grad(gy, w2.transpose(1, 2), offsets, h[:, :7], "none")
    with pytest.raises(RuntimeError, match=r"grouped_mm_act_grad: w must have shape \[E, N, Din=12\]"):
        ops.grouped_mm_act_grad(gy, w2, offsets, h, "none")
    with pytest.raises(RuntimeError, match=r"grouped_mm_weight_grad_fused: approximate must be 'none' or 'tanh'"):
        ops.grouped_mm_weight_grad_fused(h, gy, offsets, "exact", True, True)
    with pytest.raises(RuntimeError, match=r"grouped_mm_weight_grad_fused: grad_out must have \d+ rows like x"):
        ops.grouped_mm_weight_grad_fused(h, gy[:5], offsets, None, True, True)
    with pytest.raises(RuntimeError, match=r"grouped_mm_weight_grad_fused: offsets must be non-decreasing"):
        ops.grouped_mm_weight_grad_fused(h, gy, torch.tensor([0, 9, 4, 12, 13]), None, True, True)
    with pytest.raises(RuntimeError, match=r"grouped_mm_act: w must have the dtype of x"):
        ops.grouped_mm_act(x, w1.double(), offsets, None, "none", True)


def test_backward_fills_no_zero_gradient_for_the_saved_activation():
    """gelu_mlp's second output (h, kept for the backward) gets no gradient: the engine must not
    materialise a zero [M, H] for it every step (it did: 36 MB at V-MoE-B/16)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    offsets, x, w1, b1, w2, gy = _operands(torch.float32)
    H = w1.shape[1]
    made = []

    class Fills(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if "zero" in str(func) and isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] == H:
                made.append((str(func), tuple(out.shape)))
            return out

    leaves = [t.clone().requires_grad_() for t in (x, w1, b1, w2)]
    # The one-op MLP (the CPU's ops.gelu_mlp runs the pair; Triton's runs this op).
    y = torch.ops.moe_kernels.gelu_mlp(leaves[0], leaves[1], leaves[2], leaves[3], None, offsets, "none", True,
                                       "cpu")[0]  # fmt: skip
    with Fills():
        y.backward(gy)
    assert made == []
    assert all(t.grad is not None for t in leaves)

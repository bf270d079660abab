"""Every GPU backend against the reference on CUDA tensors (skipped where there is no GPU).

Backends: those ``moe_kernels.backends.available("cuda")`` reports usable, except ``torch``
(the reference itself, run on the same CUDA tensors as the oracle). fp32, fp16 and bf16 —
bf16 is checked only here, since Triton's interpreter computes it wrongly. Integers must match
exactly; floats within the per-dtype tolerances; matmuls by the low-precision rule (error at
most 2x the reference's own error against an fp64 result). TF32 is off (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

import moe_kernels as mk
from moe_kernels import backends
from tests.gpu_params import backends_for, gpu_backends

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the GPU tests need torch.cuda.is_available()", allow_module_level=True)

pytestmark = pytest.mark.gpu

DEV = "cuda"
# Each test runs the backends that can run every op it calls (tests/gpu_params.py): the cuda
# library has no grouped GEMM, so it is not parametrised there.
DTYPES = {
    "f32": (torch.float32, 1e-5, 1e-5),
    "f16": (torch.float16, 2e-3, 2e-3),
    "bf16": (torch.bfloat16, 1.6e-2, 1.6e-2),
}
dtypes = pytest.mark.parametrize("dt", list(DTYPES))


def _close(a, b, dt):
    _, atol, rtol = DTYPES[dt]
    assert a.dtype == b.dtype
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def _close_lowp(a, b, exact, dt):
    if dt == "f32":
        return torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    ours = (a.double() - exact).abs().max().item()
    theirs = (b.double() - exact).abs().max().item()
    assert ours <= 2 * theirs + 1e-6, f"error {ours:.3g} vs reference {theirs:.3g}"


def _indices(T, E, K):
    return torch.rand(T, E, device=DEV).topk(K, dim=1).indices


GATING = [(1, 4, 1), (1000, 8, 2), (777, 7, 7), (513, 256, 8), (4096, 32, 2)]


@gpu_backends("topk_softmax", "topk_softmax_backward")
@dtypes
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("T,E,K", GATING)
def test_topk_softmax(backend, T, E, K, renormalize, dt):
    logits = (torch.randn(T, E, device=DEV) * 3).to(DTYPES[dt][0]).requires_grad_()
    w, i = mk.topk_softmax(logits, K, renormalize=renormalize, backend=backend)
    w_ref, i_ref = mk.topk_softmax(logits, K, renormalize=renormalize, backend="torch")
    assert torch.equal(i, i_ref)
    _close(w, w_ref, "f32")
    g = torch.randn_like(w)
    _close(torch.autograd.grad(w, logits, g)[0], torch.autograd.grad(w_ref, logits, g)[0], dt)


ROUTING = [
    (3152, 8, 2, 108, 1576, False),  # V-MoE B/16 at 224: groups of 8 images, C from S=1576
    (3152, 32, 2, 104, 1576, True),  # BPR
    (4096, 10, 2, None, 4096, False),  # dropless, one group
    (4096, 7, 1, None, 512, True),  # dropless across groups, prime E
    (1, 3, 1, 4, 1, False),
]


@gpu_backends("make_routing")
@pytest.mark.parametrize("T,E,K,C,S,bpr", ROUTING)
def test_make_routing(backend, T, E, K, C, S, bpr):
    indices = _indices(T, E, K)
    priority = torch.randint(0, 8, (T,), device=DEV).float() if bpr else None
    got = mk.make_routing(indices, E, C, priority=priority, group_size=S, backend=backend)
    want = mk.make_routing(indices, E, C, priority=priority, group_size=S, backend="torch")
    for name in ("slot", "rows", "row_src", "counts", "offsets"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


@gpu_backends("dispatch", "combine", "combine_weights_grad")
@dtypes
@pytest.mark.parametrize("C", [32, None], ids=["capacity", "dropless"])
def test_dispatch_combine(backend, C, dt):
    T, E, K, D = 1000, 8, 2, 390
    routing = mk.make_routing(_indices(T, E, K), E, C, group_size=500, backend="torch")
    dtype = DTYPES[dt][0]
    x0 = torch.randn(T, D, device=DEV, dtype=dtype)
    scale = torch.randn(routing.buffer_shape(D), device=DEV, dtype=dtype)
    w0 = torch.rand(T, K, device=DEV)
    g = torch.randn(T, D, device=DEV, dtype=dtype)
    res = {}
    for b in (backend, "torch"):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        buf = mk.dispatch(x, routing, backend=b)
        y = mk.combine(buf * scale, routing, w, backend=b)
        res[b] = (buf, y, *torch.autograd.grad(y, (x, w), g))
    got, want = res[backend], res["torch"]
    assert torch.equal(got[0], want[0])
    _close(got[1], want[1], dt)
    _close(got[2], want[2], dt)
    torch.testing.assert_close(got[3], want[3], atol=DTYPES[dt][1] * 10, rtol=DTYPES[dt][2] * 10)


@gpu_backends("grouped_mm", "grouped_mm_weight_grad")
@dtypes
@pytest.mark.parametrize("sizes", [[300, 0, 1200, 7, 541], [2048], [0, 0, 0]], ids=["mixed", "one", "empty"])
def test_grouped_mm(backend, sizes, dt):
    M, Din, N = 2100, 384, 520
    dtype = DTYPES[dt][0]
    offsets = torch.tensor([0] + sizes, device=DEV).cumsum(0)
    x0 = torch.randn(M, Din, device=DEV, dtype=dtype)
    w0 = (torch.randn(len(sizes), N, Din, device=DEV) / Din**0.5).to(dtype)
    gy = torch.randn(M, N, device=DEV, dtype=dtype)
    res = {}
    for b in (backend, "torch"):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = mk.grouped_mm(x, w, offsets, backend=b)
        res[b] = (y, *torch.autograd.grad(y, (x, w), gy))
    x, w = x0.double().requires_grad_(), w0.double().requires_grad_()
    y = mk.grouped_mm(x, w, offsets, backend="torch")
    exact = (y, *torch.autograd.grad(y, (x, w), gy.double()))
    for a, b, e in zip(res[backend], res["torch"], exact, strict=True):
        _close_lowp(a, b, e, dt)


@pytest.mark.skipif("triton" not in backends_for(*backends.OPS), reason="the triton backend is not available on CUDA")
def test_triton_makes_no_host_sync():
    """After a warm-up (autotuning syncs once), a full MoE step's ops never wait for the GPU."""
    T, E, K, D, H = 512, 8, 2, 64, 128
    x = torch.randn(T, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    logits = torch.randn(T, E, device=DEV, requires_grad=True)
    w1 = torch.randn(E, H, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)

    def step():
        gates, idx = mk.topk_softmax(logits, K, backend="triton")
        r = mk.make_routing(idx, E, None, priority=gates[:, 0], backend="triton")
        h = mk.grouped_mm(mk.dispatch(x, r, backend="triton"), w1, r.offsets, backend="triton")
        out = mk.combine(h @ w1[0], r, gates, backend="triton")
        out.float().sum().backward()

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.skipif("triton" not in backends_for(*backends.OPS), reason="the triton backend is not available on CUDA")
def test_triton_int64_addressing():
    """T*D past 2**31 elements: offsets must not wrap (needs ~13 GB of GPU memory)."""
    T, D, E, K = (1 << 21) + 3, 1024, 4, 1
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a GPU with >= 24 GiB")
    x = torch.zeros(T, D, device=DEV, dtype=torch.float16)
    x[-1] = 1.0
    idx = torch.zeros(T, K, dtype=torch.int64, device=DEV)
    idx[-1] = E - 1
    r = mk.make_routing(idx, E, None, backend="triton")
    buf = mk.dispatch(x, r, backend="triton")
    assert buf[-1].eq(1).all() and buf[-2].eq(0).all()
    out = mk.combine(buf, r, backend="triton")
    assert out[-1].eq(1).all()


# ---------------------------------------------------------------- the whole layer
LAYER_CASES = {
    # id: (MoEMlp kwargs, per-image routing handed in) -- the routers of tests/test_host_sync.py
    "vmoe-capacity-groups": (dict(router="vmoe", capacity_factor=1.05, group_size=2 * 50), False),
    "vmoe-bpr": (dict(router="vmoe", capacity_factor=1.0, batch_priority=True, group_size=2 * 50), False),
    "vmoe-dropless": (dict(router="vmoe", capacity_factor=None, renormalize=True), False),
    "expert-choice": (dict(router="expert_choice", capacity_factor=1.0, group_size=2 * 50), False),
    "per-image": (dict(router="external"), True),
}


def _layer(case, backend="auto"):
    kwargs, per_image = LAYER_CASES[case]
    torch.manual_seed(0)
    layer = mk.MoEMlp(64, 96, num_experts=8, backend=backend, device=DEV, **kwargs)
    router = mk.routers.PerImageRouter(64, 8, k=2, backend=backend, device=DEV) if per_image else None
    return layer, router


def _layer_step(layer, router, x, amp: bool):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        y = layer(x, routing=router(x) if router is not None else None)
        loss = y.float().square().mean() + layer.aux_loss
    loss.backward()
    return y


@pytest.mark.parametrize("amp", [False, True], ids=["f32", "bf16-autocast"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_moe_mlp_step_never_syncs(case, training, amp):
    """A whole MoEMlp training/eval step, forward and backward, on the default backends: after
    a warm-up (Triton compiles and, unless pinned, autotunes), no op waits for the GPU."""
    layer, router = _layer(case)
    layer.train(training)
    x = torch.randn(4, 50, 64, device=DEV, requires_grad=True)
    _layer_step(layer, router, x, amp)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = _layer_step(layer, router, x, amp)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(layer.fc1_weight.grad).all() and torch.isfinite(layer.fc2_weight.grad).all()


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_moe_mlp_matches_the_reference_backend(case):
    """fp32, eval (no noise): the default GPU backends give the reference's output and
    gradients (TF32 off)."""
    res = {}
    x0 = torch.randn(4, 50, 64, device=DEV)
    for backend in ("auto", "torch"):
        layer, router = _layer(case, backend)
        layer.eval()
        x = x0.clone().requires_grad_()
        y = _layer_step(layer, router, x, amp=False)
        res[backend] = (y, x.grad, layer.fc1_weight.grad, layer.fc2_weight.grad)
    for got, want in zip(res["auto"], res["torch"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

"""No host round trips in ``MoEMlp`` on CUDA tensors, shown without a GPU.

The layer runs on fake CUDA tensors (``FakeTensorMode``) under ``HostSyncSpy``
(tests/sync_spy.py), forward and backward, for every router: V-MoE top-K with a capacity (with
groups, with Batch Prioritized Routing), dropless, expert choice, and a per-image router
handed in from outside; in training and in evaluation, in fp32 and under bf16 autocast. A
host-made tensor copied to the device, an ``.item()``, a ``nonzero`` or a data-dependent shape
fails the test.

Reach: the Python of the layer, the routers, the ops' wrappers and every backward formula
(ours and torch's, run by ``run_backward``); the custom ops are seen at their boundary, their
kernels' launchers are checked on a real GPU (tests/test_gpu.py, ``make gpu-check``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
)

import moe_kernels as mk
from moe_kernels.routers import PerImageRouter
from tests.sync_spy import HostSyncSpy, run_backward

B, N, D, H, E = 4, 10, 32, 48, 8  # 40 tokens, groups of 2 images
CASES = {
    # id: (MoEMlp kwargs, external per-image routing)
    "vmoe-capacity-groups": (dict(router="vmoe", capacity_factor=1.05, group_size=2 * N), False),
    "vmoe-bpr": (dict(router="vmoe", capacity_factor=1.0, batch_priority=True, group_size=2 * N), False),
    "vmoe-dropless": (dict(router="vmoe", capacity_factor=None, renormalize=True), False),
    "vmoe-gshard-k1": (dict(router="vmoe", k=1, capacity_factor=2.0, gshard_weight=0.01), False),
    "expert-choice": (dict(router="expert_choice", capacity_factor=1.0, group_size=2 * N), False),
    "per-image": (dict(router="external"), True),
    "gelu-tanh-norm": (
        dict(
            router="vmoe", capacity_factor=1.05, act_layer=lambda: nn.GELU(approximate="tanh"), norm_layer=nn.LayerNorm
        ),
        False,
    ),
}


def _step(case: str, training: bool, autocast: bool, monkeypatch) -> HostSyncSpy:
    kwargs, per_image = CASES[case]
    # torch.autocast("cuda") turns itself off when made where no CUDA driver answers; its
    # dispatch needs none (fake tensors), so it is made with the check answered yes.
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast)
    with FakeTensorMode():
        layer = mk.MoEMlp(D, H, num_experts=E, device="cuda", **kwargs).train(training)
        router = PerImageRouter(D, E, k=2, device="cuda") if per_image else None
        x = torch.randn(B, N, D, device="cuda", requires_grad=True)
        with HostSyncSpy() as spy:
            with amp:
                routing = router(x) if per_image else None
                y = layer(x, routing=routing)
                loss = y.float().square().mean() + (layer.aux_loss if layer.aux_loss is not None else 0)
            run_backward(loss, torch.ones_like(loss))
        assert y.shape == (B, N, D) and y.device.type == "cuda"
        assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
        assert x.grad is not None and x.grad.shape == x.shape
        assert layer.fc1_weight.grad is not None and layer.fc2_weight.grad is not None
        if layer.router is not None:
            assert layer.router.weight.grad is not None
        if router is not None:
            assert router.proj.weight.grad is not None
    return spy


@pytest.mark.parametrize("autocast", [False, True], ids=["f32", "bf16-autocast"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(CASES))
def test_moe_mlp_makes_no_host_round_trip(case, training, autocast, monkeypatch):
    spy = _step(case, training, autocast, monkeypatch)
    assert "moe_kernels.grouped_mm" in spy.ops  # the spy saw the layer's ops
    assert not spy.violations, "\n".join(sorted(set(spy.violations)))


def test_spy_catches_a_host_literal_and_an_item():
    """The spy is not blind: the pattern the router had (a host literal copied to the device),
    an ``.item()`` and a boolean index are each reported."""
    with FakeTensorMode():
        x = torch.randn(6, 4, device="cuda")
        with HostSyncSpy() as spy:
            torch.tensor([0, x.shape[0]], device=x.device)
        assert any("touches a cpu tensor" in v for v in spy.violations), spy.violations
        with HostSyncSpy() as spy, pytest.raises(DataDependentOutputException):
            x.sum().item()  # a fake tensor has no value: the op is recorded, then raises
        assert any("_local_scalar_dense" in v for v in spy.violations), spy.violations
        with HostSyncSpy() as spy, pytest.raises(DynamicOutputShapeException):
            x[x > 0]  # data-dependent shape
        assert spy.violations, spy.ops


def test_run_backward_matches_the_engine():
    """The Python walk gives the engine's gradients (real CPU tensors, a shared input used
    twice, a multi-output node)."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, requires_grad=True)
    w = torch.randn(4, 3, requires_grad=True)

    s = torch.tensor(1.5, requires_grad=True)  # 0-dim, broadcast: its gradient is summed back

    def f():
        a, b = (x @ w.T).split(2, dim=1)
        return (a.tanh() * b).sum() + (x * x).sum() + (s * x).sum()

    f().backward()
    want = (x.grad.clone(), w.grad.clone(), s.grad.clone())
    x.grad = w.grad = s.grad = None
    out = f()
    run_backward(out, torch.ones_like(out))
    torch.testing.assert_close((x.grad, w.grad, s.grad), want)

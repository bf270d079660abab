"""torch.compile(fullgraph=True) of MoEMlp and of a moeified timm ViT: no graph break, and the
compiled module matches eager (forward, aux loss, gradients).

Compiling is slow on 2 CPU cores, so the models are tiny and Inductor runs the main cases;
the other router variants go through ``aot_eager`` (Dynamo + AOTAutograd with the ops' fake
implementations: the same tracing, without Inductor's code generation).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._inductor.config

import moe_kernels as mk

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _grads(module, x, out):
    g = torch.ones_like(out) / out.numel() ** 0.5
    loss = (out * g).sum() + (module.aux_loss if isinstance(module, mk.MoEMlp) else mk.aux_loss(module))
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, [x] + params)


def _compare(module, x, *, backend, training, seed=0, atol=1e-5, **call):
    module.train(training)
    compiled = torch.compile(module, fullgraph=True, backend=backend, dynamic=False)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(seed)
    want = module(x1, **call)
    want_aux = mk.aux_loss(module)
    want_g = _grads(module, x1, want)
    torch.manual_seed(seed)
    got = compiled(x2, **call)
    got_aux = mk.aux_loss(module)
    got_g = _grads(module, x2, got)
    torch.testing.assert_close(got, want, atol=atol, rtol=atol)
    torch.testing.assert_close(got_aux, want_aux, atol=1e-6, rtol=1e-5)
    for a, b in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol)


def test_moe_mlp_inductor_training_with_noise_bpr_and_drops():
    torch.manual_seed(0)
    m = mk.MoEMlp(16, 24, num_experts=4, k=2, group_size=8, capacity_factor=0.5, batch_priority=True)
    x = torch.randn(2, 8, 16)
    # Inductor draws its own random numbers unless told to call torch's; the noise must match.
    with torch._inductor.config.patch(fallback_random=True):
        _compare(m, x, backend="inductor", training=True)


def test_moe_mlp_eval_capacity_change_recompiles_without_break():
    torch.manual_seed(0)
    m = mk.MoEMlp(16, 24, num_experts=4, k=2, group_size=8, capacity_factor=0.5)
    x = torch.randn(16, 16)
    _compare(m, x, backend="aot_eager", training=False)
    m.eval_capacity_factor = 4.0  # a new capacity: a recompile, still without graph breaks
    _compare(m, x, backend="aot_eager", training=False)


@pytest.mark.parametrize(
    "kw",
    [
        dict(capacity_factor=None, renormalize=True),
        dict(router="expert_choice", capacity_factor=1.0, group_size=8),
        dict(k=1, group_size=4, capacity_factor=1.0, bias=False),
    ],
    ids=["dropless", "expert-choice", "k1-nobias"],
)
def test_moe_mlp_router_variants_trace(kw):
    torch.manual_seed(0)
    m = mk.MoEMlp(16, 24, num_experts=3, **kw)
    _compare(m, torch.randn(16, 16), backend="aot_eager", training=True)


def test_per_image_router_drives_layers_under_compile():
    torch.manual_seed(0)

    class TwoLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.router = mk.PerImageRouter(16, 4, 2)
            self.a = mk.MoEMlp(16, 24, num_experts=4, router="external")
            self.b = mk.MoEMlp(16, 24, num_experts=4, router="external")

        def forward(self, x):
            r = self.router(x)
            x = x + self.a(x, routing=r)
            return x + self.b(x, routing=r), r.logits

    model = TwoLayers()
    x = torch.randn(3, 5, 16)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
    want, want_logits = model(x)
    got, got_logits = compiled(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_logits, want_logits)


def test_moeified_timm_vit_inductor():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, depth=2, embed_dim=32, num_heads=2,
        img_size=32, patch_size=8, num_classes=10,
    )  # fmt: skip
    mk.moeify(model, "every-2", num_experts=4, k=2, group_size=17).eval()
    x = torch.randn(2, 3, 32, 32)
    # Forward only: the MoE backward already went through Inductor above, and compiling this
    # model's backward doubles the test's time.
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    with torch.no_grad():
        want = model(x)
        want_aux = mk.aux_loss(model)
        got = compiled(x)
        got_aux = mk.aux_loss(model)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_aux, want_aux, atol=1e-6, rtol=1e-5)


def test_moeified_timm_vit_backward_traces():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, depth=2, embed_dim=32, num_heads=2,
        img_size=32, patch_size=8, num_classes=10,
    )  # fmt: skip
    mk.moeify(model, "last-1", num_experts=3, k=2, group_size=17, batch_priority=True)
    _compare(model, torch.randn(2, 3, 32, 32), backend="aot_eager", training=True, atol=1e-4)


def test_moe_mlp_fused_gelu_path_traces(monkeypatch, approximate="tanh"):
    """The expert MLP as one fused op (``ops.gelu_mlp``) where the backend declares fused
    epilogues (a stand-in made of reference code, tests/fused_standin.py): no graph break, the
    compiled forward and backward run the fused op and its backward pieces, and match eager."""
    from tests.fused_standin import fused_torch

    calls = fused_torch(monkeypatch)
    torch.manual_seed(0)
    m = mk.MoEMlp(16, 24, num_experts=3, k=2, group_size=8, capacity_factor=1.0, backend="torch",
                  act_layer=lambda: torch.nn.GELU(approximate=approximate))  # fmt: skip
    x = torch.randn(16, 16)
    _compare(m, x, backend="aot_eager", training=True)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager", dynamic=False)
    calls.clear()
    compiled(x.requires_grad_()).sum().backward()
    assert calls == [
        ("grouped_mm_act", (approximate, True)),  # fc1 with GELU in its epilogue, keeping h
        ("grouped_mm_weight_grad_fused", (approximate, True, True)),  # fc2's dW (GELU on load) and db
        ("grouped_mm_act_grad", (approximate,)),  # GELU' in fc2's dX epilogue
        ("grouped_mm_weight_grad_fused", (None, True, True)),  # fc1's dW and db
    ]

"""``SoftMoEMlp`` against an independent transcription of vmoe's Soft MoE.

The oracle (``_vmoe_soft_moe``) follows ``vmoe/projects/soft_moe/router.py`` and vmoe's einsum
dispatcher line by line with plain einsums: normalise the tokens and ``mu``, scale the smaller
operand, logits ``gmd,dnp->gmnp``, softmax over tokens (dispatch) and over all slots (combine),
flax ``Dense`` experts (kernels ``[in, out]``). The layer uses none of that code: it runs the
router matmul and the experts through ``moe_kernels``' grouped GEMM on each backend.

Besides: token-permutation equivariance within a group, no mixing across images or groups,
finite gradients for every parameter, every backend of the grouped GEMM (the Triton one under
``TRITON_INTERPRET=1`` in a child process), argument errors, ``moeify(router="soft")``,
``torch.compile(fullgraph=True)`` and no host round trip on fake CUDA tensors.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_kernels as mk
from moe_kernels.soft_moe import num_slots_for
from tests.conftest import backends_under_test

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL, ATOL = 2e-4, 1e-5


class GELUTanh(nn.GELU):
    def __init__(self) -> None:
        super().__init__(approximate="tanh")


def _randomise(layer: mk.SoftMoEMlp, scale: float = 3.0) -> mk.SoftMoEMlp:
    """Weights far from their initialisation, so every term of the math matters (a scale of 1
    and near-uniform softmaxes would hide a wrong normalisation axis)."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if "fc" in name else 1.0))
        layer.router.scale.fill_(scale)
    return layer


def _vmoe_soft_moe(layer: mk.SoftMoEMlp, x: torch.Tensor, act) -> torch.Tensor:
    """vmoe's Soft MoE on ``x [G, S, D]`` with the layer's weights, fp32 einsums."""
    mu, scale = layer.router.mu.float(), layer.router.scale.float()
    inputs = x * torch.rsqrt(x.square().sum(-1, keepdim=True) + 1e-6)  # normalize(x, axis=-1)
    mu = mu * torch.rsqrt(mu.square().sum(0, keepdim=True) + 1e-6)  # normalize(mu, axis=0)
    if inputs.numel() < mu.numel():
        inputs = inputs * scale
    else:
        mu = mu * scale
    logits = torch.einsum("gmd,dnp->gmnp", inputs, mu)
    g, m, n, p = logits.shape
    dispatch_weights = torch.softmax(logits, dim=1)
    combine_weights = torch.softmax(logits.reshape(g, m, n * p), dim=-1).reshape(g, m, n, p)
    slots = torch.einsum("gmnp,gmd->gnpd", dispatch_weights, x)
    # flax Dense: y = x @ kernel + bias, kernel [in, out] = our weight transposed.
    k1, k2 = layer.fc1_weight.transpose(1, 2), layer.fc2_weight.transpose(1, 2)
    h = act(torch.einsum("gnpd,ndh->gnph", slots, k1) + layer.fc1_bias[None, :, None])
    out = torch.einsum("gnph,nho->gnpo", h, k2) + layer.fc2_bias[None, :, None]
    return torch.einsum("gmnp,gnpo->gmo", combine_weights, out)


# id: (x shape, layer kwargs, groups the oracle sees as (G, S)); each covers one grouping rule.
CASES = {
    "per-image": ((3, 7, 12), dict(num_slots=2), (3, 7)),
    "flat-one-group": ((9, 12), dict(num_slots=3), (1, 9)),
    "group-size": ((2, 8, 12), dict(group_size=4, capacity_factor=2.0), (4, 4)),
    "prime-E-P1-odd": ((2, 5, 12), dict(num_experts=5, num_slots=1, hidden_features=7, out_features=11), (2, 5)),
    "mu-larger-than-x": ((1, 3, 12), dict(num_experts=4, num_slots=4), (1, 3)),
}


def _make(case: str, backend: str = "auto", act_layer=nn.GELU) -> tuple[mk.SoftMoEMlp, torch.Tensor, tuple]:
    shape, kw, groups = CASES[case]
    kw = dict(kw)
    E = kw.pop("num_experts", 3)
    H = kw.pop("hidden_features", 20)
    layer = mk.SoftMoEMlp(12, H, num_experts=E, act_layer=act_layer, backend=backend, **kw)
    return _randomise(layer), torch.randn(*shape), groups


@pytest.mark.parametrize("backend", backends_under_test())
@pytest.mark.parametrize("case", list(CASES))
def test_matches_vmoe_transcription(case, backend):
    layer, x, (G, S) = _make(case, backend)
    got = layer(x)
    want = _vmoe_soft_moe(layer, x.reshape(G, S, -1), lambda h: F.gelu(h)).reshape(*x.shape[:-1], -1)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", backends_under_test())
def test_gradients_match_the_transcription_and_are_finite(backend):
    layer, x, (G, S) = _make("per-image", backend, act_layer=GELUTanh)
    x.requires_grad_()
    params = dict(layer.named_parameters())
    assert set(params) == {"router.mu", "router.scale", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"}
    gy = torch.randn(*x.shape[:-1], layer.out_features)
    got = torch.autograd.grad((layer(x) * gy).sum(), [x, *params.values()])
    ref = _vmoe_soft_moe(layer, x.reshape(G, S, -1), lambda h: F.gelu(h, approximate="tanh"))
    want = torch.autograd.grad((ref.reshape_as(gy) * gy).sum(), [x, *params.values()])
    for name, a, b in zip(["x", *params], got, want, strict=True):
        assert torch.isfinite(a).all(), name
        assert a.abs().sum() > 0, f"{name}: zero gradient"
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_token_permutation_equivariance_within_an_image():
    layer, x, _ = _make("per-image")
    perm = torch.randperm(x.shape[1])
    torch.testing.assert_close(layer(x[:, perm]), layer(x)[:, perm], rtol=RTOL, atol=ATOL)


def test_never_mixes_images():
    layer, x, _ = _make("per-image")
    y = layer(x)
    x2 = x.clone()
    x2[1] = torch.randn_like(x2[1]) * 5
    y2 = layer(x2)
    torch.testing.assert_close(y2[0], y[0], rtol=0, atol=0)
    torch.testing.assert_close(y2[2], y[2], rtol=0, atol=0)
    assert not torch.allclose(y2[1], y[1])  # the changed image did change


def test_group_size_keeps_groups_apart_and_mixes_within():
    layer, x, _ = _make("group-size")  # [2, 8, 12], groups of 4 consecutive tokens
    y = layer(x)
    x2 = x.clone()
    x2[0, 4:] += 3.0  # the second group of image 0
    y2 = layer(x2)
    torch.testing.assert_close(y2[0, :4], y[0, :4], rtol=0, atol=0)
    torch.testing.assert_close(y2[1], y[1], rtol=0, atol=0)
    # Within a group every token sees every other (through the slots).
    x3 = x.clone()
    x3[0, 5] += 3.0
    assert not torch.allclose(layer(x3)[0, 4], y[0, 4])


def test_noise_in_training_only():
    layer, x, _ = _make("per-image")
    layer.router.noise_std = 0.5
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))
    layer.router.noise_std = 0.0
    torch.testing.assert_close(layer(x), layer.eval()(x), rtol=0, atol=0)


def test_num_slots_from_group_size_uses_pythons_round():
    # 10 * 1.0 / 4 = 2.5 rounds to 2 (half to even), 10 * 1.5 / 4 = 3.75 to 4.
    assert mk.SoftMoEMlp(8, num_experts=4, group_size=10).num_slots == 2
    assert mk.SoftMoEMlp(8, num_experts=4, group_size=10, capacity_factor=1.5).num_slots == 4
    layer = mk.SoftMoEMlp(8, num_experts=4, group_size=10, num_slots=7)  # num_slots wins
    assert layer.num_slots == 7 and layer.router.mu.shape == (8, 4, 7)
    assert num_slots_for(3, 4, 1.0) == 1


def test_parameters_and_init():
    layer = mk.SoftMoEMlp(64, 96, 40, num_experts=8, num_slots=4)
    assert layer.router.mu.shape == (64, 8, 4) and layer.router.scale.shape == ()
    assert layer.router.scale.item() == 1.0
    assert layer.fc1_weight.shape == (8, 96, 64) and layer.fc1_bias.shape == (8, 96)
    assert layer.fc2_weight.shape == (8, 40, 96) and layer.fc2_bias.shape == (8, 40)
    # LeCun normal as jax's: fan_in = D*E for a [D, E, P] tensor, std sqrt(1/fan_in).
    std = layer.router.mu.std().item()
    assert 0.8 * (1 / (64 * 8)) ** 0.5 < std < 1.2 * (1 / (64 * 8)) ** 0.5
    nobias = mk.SoftMoEMlp(8, num_experts=2, num_slots=1, bias=False)
    assert nobias.fc1_bias is None and nobias.fc2_bias is None
    assert nobias(torch.randn(2, 3, 8)).shape == (2, 3, 8)


def test_timm_mlp_arguments():
    layer = mk.SoftMoEMlp(
        12, 16, 10, act_layer=GELUTanh, norm_layer=nn.LayerNorm, bias=(True, False), drop=(0.1, 0.2),
        num_experts=3, num_slots=2,
    )  # fmt: skip
    assert isinstance(layer.norm, nn.LayerNorm) and layer.norm.normalized_shape == (16,)
    assert layer.fc2_bias is None and layer.drop1.p == 0.1 and layer.drop2.p == 0.2
    x = torch.randn(2, 4, 12)
    y = layer.eval()(x)
    assert y.shape == (2, 4, 10)
    with torch.no_grad():
        slots = torch.einsum("gsm,gsd->gmd", layer.router(x)[0], x)  # [G, M, D]
        h = layer.norm(F.gelu(torch.einsum("gepd,ehd->geph", slots.view(2, 3, 2, 12), layer.fc1_weight)
                              + layer.fc1_bias[None, :, None], approximate="tanh"))  # fmt: skip
        out = torch.einsum("geph,eoh->gepo", h, layer.fc2_weight).reshape(2, 6, 10)
        want = torch.einsum("gsm,gmo->gso", layer.router(x)[1], out)
    torch.testing.assert_close(y, want, rtol=RTOL, atol=ATOL)


def test_aux_loss_is_a_zero_fp32_scalar_found_by_mk_aux_loss():
    layer, x, _ = _make("per-image")
    assert layer.aux_loss is None
    layer(x)
    assert layer.aux_loss.dtype == torch.float32 and layer.aux_loss.shape == () and layer.aux_loss.item() == 0
    model = nn.Sequential(layer)
    total = mk.aux_loss(model)
    assert total is layer.aux_loss


def test_autocast_bf16_runs_the_experts_in_bf16_and_routes_in_fp32():
    layer, x, _ = _make("per-image")
    want = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
        dispatch, combine = layer.router(x)
    assert got.dtype == torch.bfloat16 and dispatch.dtype == torch.float32 and combine.dtype == torch.float32
    torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-2)


def test_empty_input():
    layer = mk.SoftMoEMlp(8, num_experts=2, num_slots=2)
    x = torch.randn(0, 5, 8, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 5, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_experts=0, num_slots=1), "num_experts"),
        (dict(num_experts=2, num_slots=0), "num_slots"),
        (dict(num_experts=2, num_slots=1.5), "num_slots"),
        (dict(num_experts=2), "num_slots cannot be computed"),
        (dict(num_experts=8, group_size=3, capacity_factor=1.0), "num_slots.*below 1"),
        (dict(num_experts=2, group_size=0), "group_size"),
        (dict(num_experts=2, num_slots=1, capacity_factor=0), "capacity_factor"),
        (dict(num_experts=2, num_slots=1, noise_std=-1.0), "noise_std"),
        (dict(num_experts=2, num_slots=1, hidden_features=-3), "hidden_features"),
    ],
    ids=["E0", "P0", "P-float", "P-unknown", "P-below-1", "S0", "c0", "noise", "H"],
)
def test_bad_arguments_name_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        mk.SoftMoEMlp(8, **kw)


def test_bad_inputs_name_the_problem():
    layer = mk.SoftMoEMlp(8, num_experts=2, num_slots=1, group_size=4)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., in_features=8\]"):
        layer(torch.randn(4, 7))
    with pytest.raises(ValueError, match="group_size=4 must divide"):
        layer(torch.randn(6, 8))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="backend"):
        mk.SoftMoEMlp(8, num_experts=2, num_slots=1, backend="nope")(torch.randn(4, 8))


def _vit():
    from models.vmoe import create_model

    return create_model("Mu/4", moe_layers=None, num_classes=5, image_size=8, in_chans=1)


def test_moeify_soft_upcycles_the_dense_mlps():
    torch.manual_seed(0)
    model = _vit()
    dense = model.blocks[5].mlp
    mk.moeify(model, "last-2", num_experts=4, router="soft", num_slots=2)
    for i in (3, 5):
        layer = model.blocks[i].mlp
        assert isinstance(layer, mk.SoftMoEMlp) and layer.num_slots == 2
        assert type(layer.act).__name__ == "GELUTanh"  # the dense MLP's activation is kept
    torch.testing.assert_close(model.blocks[5].mlp.fc1_weight, dense.fc1.weight.expand(4, -1, -1))
    torch.testing.assert_close(model.blocks[5].mlp.fc2_bias, dense.fc2.bias.expand(4, -1))
    x = torch.randn(3, 1, 8, 8)
    logits = model(x)
    assert logits.shape == (3, 5) and torch.isfinite(logits).all()
    assert mk.aux_loss(model).item() == 0.0
    with pytest.raises(ValueError, match="already has an SoftMoEMlp"):
        mk.moeify(model, [3], num_experts=4, router="soft", num_slots=2)


def test_moeify_soft_rejects_top_k_keywords():
    with pytest.raises(ValueError, match=r"router='soft' takes .* not \['batch_priority', 'k'\]"):
        mk.moeify(_vit(), "last-1", num_experts=4, router="soft", num_slots=2, k=2, batch_priority=True)


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    import torch._dynamo

    torch._dynamo.reset()
    try:
        layer, x, _ = _make("per-image")
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=False)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        want = layer(x1)
        got = compiled(x2)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        params = list(layer.parameters())
        g_want = torch.autograd.grad(want.square().sum(), [x1, *params])
        g_got = torch.autograd.grad(got.square().sum(), [x2, *params])
        for a, b in zip(g_got, g_want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("autocast", [False, True], ids=["f32", "bf16-autocast"])
@pytest.mark.parametrize("training", [True, False], ids=["train-noise", "eval"])
def test_no_host_round_trip_on_fake_cuda(training, autocast, monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tests.sync_spy import HostSyncSpy, run_backward

    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast)
    with FakeTensorMode():
        layer = mk.SoftMoEMlp(32, 48, num_experts=4, num_slots=3, noise_std=0.5, device="cuda").train(training)
        x = torch.randn(4, 10, 32, device="cuda", requires_grad=True)
        with HostSyncSpy() as spy:
            with amp:
                y = layer(x)
                loss = y.float().square().mean() + mk.aux_loss(layer)
            run_backward(loss, torch.ones_like(loss))
        assert y.shape == (4, 10, 32) and y.device.type == "cuda"
        assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
        assert x.grad is not None and x.grad.shape == x.shape
        for name, p in layer.named_parameters():
            assert p.grad is not None and p.grad.shape == p.shape, name
    assert "moe_kernels.grouped_mm" in spy.ops  # the spy saw the experts' and router's GEMMs
    assert not spy.violations, "\n".join(sorted(set(spy.violations)))


def test_triton_backend_under_the_interpreter():
    """The oracle and gradient tests above on the ``triton`` backend, in a child process with
    ``TRITON_INTERPRET=1`` (set before triton is imported) and ``MOE_KERNELS_BACKEND=triton``."""
    if INTERPRET:
        pytest.skip("this process is the interpreter child; the cases run here")
    pytest.importorskip("triton", reason="triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", MOE_KERNELS_BACKEND="triton")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__),
           "-k", "matches_vmoe_transcription or gradients_match"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout[-6000:] + "\n" + proc.stderr[-3000:]).strip()
    assert proc.returncode == 0, tail
    # Every case ran on triton (the parametrize id), none was skipped.
    assert "6 passed" in proc.stdout and "skipped" not in proc.stdout, tail

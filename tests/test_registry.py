"""models.registry: one registry serves V-MoE, Soft MoE and Mobile V-MoE; the families' ``create_model``
calls keep their arguments and parameter counts; timm-style names reach the same factories."""

from __future__ import annotations

import pytest
import torch

from models import mobile_vmoe, registry, vmoe


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_one_registry_serves_every_family():
    names = registry.list_models()
    assert names == [registry.timm_name("mobile_vmoe", s) for s in mobile_vmoe.list_models()] + [
        registry.timm_name("soft_moe", v) for v in vmoe.list_soft_moe_models()
    ] + [registry.timm_name("vmoe", v) for v in vmoe.list_models()]
    assert "vmoe_b16" in names and "mobile_vmoe_tiny" in names and len(set(names)) == len(names)
    assert vmoe.list_models()[:5] == ["Nano/4", "Mu/4", "Ti/4", "Ti/16", "S/32"]
    assert mobile_vmoe.list_models()[0] == "tiny"


@pytest.mark.parametrize(
    "name,family_call",
    [
        ("vmoe_s32", lambda: vmoe.create_model("S/32", num_experts=8, num_classes=10)),
        ("vmoe_b16", lambda: vmoe.create_model("B/16", num_experts=8, num_classes=10)),
        ("mobile_vmoe_tiny", lambda: mobile_vmoe.create_model("tiny", num_experts=10, num_classes=10)),
    ],
)
def test_timm_names_build_what_the_family_builds(name, family_call):
    with torch.device("meta"):
        a = family_call()
        kw = {"num_experts": 8} if name.startswith("vmoe") else {"num_experts": 10}
        b = registry.create_model(name, num_classes=10, **kw)
    assert type(a) is type(b) and _params(a) == _params(b)
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]


def test_known_parameter_counts_unchanged():
    # V-MoE-S/32, every-2 MoE blocks of 8 experts, 1000 classes: the count before the registry
    # moved (8 blocks: 4 dense MLPs of 2*512*2048 + biases, 4 MoE layers of 8 experts + router).
    with torch.device("meta"):
        m = vmoe.create_model("S/32")
    D, H, E, L = 512, 2048, 8, 8
    mlp = 2 * D * H + H + D
    attn = 4 * D * D + 4 * D
    ln = 2 * D
    blocks = L * (attn + 2 * ln) + (L // 2) * mlp + (L // 2) * (E * mlp + E * D)
    embed = 3 * 32 * 32 * D + D + D + 50 * D  # patch conv, its bias, cls, positions (7x7+1)
    head = ln + D * 1000 + 1000
    assert _params(m) == blocks + embed + head


def test_errors_list_what_is_registered():
    with pytest.raises(ValueError, match=r"unknown model 'vmoe_x99'; registered: \['mobile_vmoe_tiny'"):
        registry.create_model("vmoe_x99")
    with pytest.raises(ValueError, match=r"unknown vmoe variant 'X/9'; registered: \['Nano/4', 'Mu/4'"):
        registry.get_factory("vmoe", "X/9")
    with pytest.raises(ValueError, match="unknown model family 'resnet'"):
        registry.list_models("resnet")
    with pytest.raises(ValueError, match=r"model vmoe/B/16 is already registered"):
        registry.register_model("vmoe", "B/16")(lambda **kw: None)

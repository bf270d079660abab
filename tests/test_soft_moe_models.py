"""models.vmoe's Soft MoE family: the paper's layout (second-half Soft MoE layers, one slot per
expert, no class token, global-average-pooled head), registered beside V-MoE."""

from __future__ import annotations

import pytest
import torch

from models import registry, vmoe
from models.vit import Mlp
from moe_kernels import SoftMoEMlp


def _small(**kw):
    torch.manual_seed(0)
    return vmoe.create_soft_moe("Mu/4", num_classes=10, image_size=16, in_chans=1, **kw)


def test_registered_as_its_own_family():
    assert vmoe.list_soft_moe_models() == ["Mu/4", "S/16", "B/16", "L/16", "H/14"]
    names = registry.list_models()
    assert [n for n in names if n.startswith("soft_moe_")] == [
        "soft_moe_mu4", "soft_moe_s16", "soft_moe_b16", "soft_moe_l16", "soft_moe_h14"
    ]  # fmt: skip
    with torch.device("meta"):
        a = registry.create_model("soft_moe_s16", num_classes=10)
        b = vmoe.create_soft_moe("S/16", num_classes=10)
    assert [(n, p.shape) for n, p in a.named_parameters()] == [(n, p.shape) for n, p in b.named_parameters()]


def test_paper_layout_s16():
    with torch.device("meta"):
        m = vmoe.create_soft_moe("S/16")
    kinds = [type(b.mlp) for b in m.blocks]
    assert kinds == [Mlp] * 6 + [SoftMoEMlp] * 6  # ViT-S: 12 x 384, second half Soft MoE
    layer = m.blocks[6].mlp
    assert (layer.num_experts, layer.num_slots, layer.in_features, layer.hidden_features) == (128, 1, 384, 1536)
    assert m.cls_token is None and m.num_tokens == 196 and m.pos_embed.shape == (1, 196, 384)
    with torch.device("meta"):
        h = vmoe.create_soft_moe("H/14")
    assert h.blocks[-1].mlp.num_experts == 256


def test_gap_head_reads_the_mean_of_normed_tokens():
    m = _small().eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        t = m.embed(x)
        for blk in m.blocks:
            t = blk(t)
        want = m.head(m.norm(t).mean(dim=1))
        torch.testing.assert_close(m(x), want)
        assert t.shape == (3, 16, 64)  # 4 x 4 patches, no class token


def test_trains_and_never_mixes_images():
    m = _small()
    m.head.weight.data.normal_()  # the zero-initialised head would hide the backbone's gradients
    x = torch.randn(4, 1, 16, 16)
    out = m(x)
    out.square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert m.blocks[5].mlp.router.mu.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        y = m(x)
        x2 = x.clone()
        x2[1:] = torch.randn(3, 1, 16, 16)  # other images change; image 0 must not notice
        torch.testing.assert_close(m(x2)[0], y[0])


def test_dense_twin_and_options():
    dense = _small(moe_layers=None)
    assert all(type(b.mlp) is Mlp for b in dense.blocks)
    tok = _small(classifier="token", moe_layers="every-2", num_slots=2)
    assert tok.cls_token is not None and tok.num_tokens == 17
    assert [i for i, b in enumerate(tok.blocks) if isinstance(b.mlp, SoftMoEMlp)] == [1, 3, 5]
    assert tok.blocks[1].mlp.num_slots == 2
    assert tok(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_errors_name_what_is_allowed():
    with pytest.raises(ValueError, match=r"unknown Soft MoE variant 'S/32'; registered: \['Mu/4'"):
        vmoe.create_soft_moe("S/32")
    with pytest.raises(ValueError, match=r"classifier must be 'token' or 'gap', got 'cls'"):
        _small(classifier="cls")
    with pytest.raises(ValueError, match="num_slots"):
        _small(num_slots=0)

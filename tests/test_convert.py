"""moeify on timm ViTs and on other block-structured models; aux_loss over a model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moe_kernels as mk
from moe_kernels.convert import find_blocks, moe_layer_indices

timm = pytest.importorskip("timm")


@pytest.mark.parametrize(
    "spec,L,want",
    [
        ("every-2", 12, [1, 3, 5, 7, 9, 11]),
        ("every-1", 3, [0, 1, 2]),
        ("every-3", 8, [2, 5]),
        ("last-2", 12, [9, 11]),
        ("last-2", 8, [5, 7]),
        ("last-5", 24, [15, 17, 19, 21, 23]),
        ([0, -1], 12, [0, 11]),
        ((3,), 12, [3]),
    ],
)
def test_layer_specs(spec, L, want):
    assert moe_layer_indices(spec, L) == want


@pytest.mark.parametrize("spec", ["every-0", "first-2", "all", "last-7", [12], [1, 1], 3, ["1"]])
def test_bad_layer_specs(spec):
    with pytest.raises(ValueError, match="layers"):
        moe_layer_indices(spec, 12)


def test_vit_tiny_k1_reproduces_dense_logits():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        dense = model(x)
        # k=1, renormalised weight 1, ample capacity (c = E: C >= S, no drops): every token
        # goes through one copy of the dense MLP.
        mk.moeify(model, "every-2", num_experts=4, k=1, renormalize=True, capacity_factor=4.0)
        moe = model(x)
    assert [i for i, b in enumerate(model.blocks) if isinstance(b.mlp, mk.MoEMlp)] == [1, 3, 5, 7, 9, 11]
    torch.testing.assert_close(moe, dense, atol=1e-4, rtol=1e-4)
    assert mk.aux_loss(model).shape == ()


def _small_vit(depth=4):
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, depth=depth, embed_dim=32, num_heads=2,
        img_size=32, patch_size=8, num_classes=10,
    )  # fmt: skip


def test_upcycled_experts_copy_dense_mlp():
    torch.manual_seed(0)
    model = _small_vit()
    dense = [b.mlp for b in model.blocks]
    mk.moeify(model, "last-2", num_experts=3, k=2, group_size=17)
    for i, b in enumerate(model.blocks):
        if i not in (1, 3):
            assert b.mlp is dense[i]
            continue
        m = b.mlp
        assert isinstance(m, mk.MoEMlp) and m.num_experts == 3 and m.k == 2 and m.group_size == 17
        for e in range(3):
            assert torch.equal(m.fc1_weight[e], dense[i].fc1.weight)
            assert torch.equal(m.fc1_bias[e], dense[i].fc1.bias)
            assert torch.equal(m.fc2_weight[e], dense[i].fc2.weight)
            assert torch.equal(m.fc2_bias[e], dense[i].fc2.bias)
        assert type(m.act) is type(dense[i].act)


def test_k2_renormalized_dropless_also_reproduces_dense():
    torch.manual_seed(0)
    model = _small_vit().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        dense = model(x)
        mk.moeify(model, [0, 2], num_experts=5, k=2, renormalize=True, capacity_factor=None)
        torch.testing.assert_close(model(x), dense, atol=1e-5, rtol=1e-5)


def test_aux_loss_sums_layers_and_trains():
    torch.manual_seed(0)
    model = mk.moeify(_small_vit(), "every-2", num_experts=4, k=2, group_size=17)
    assert float(mk.aux_loss(model)) == 0.0  # no forward yet
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    layers = [b.mlp for b in model.blocks if isinstance(b.mlp, mk.MoEMlp)]
    assert len(layers) == 2
    total = mk.aux_loss(model)
    torch.testing.assert_close(total, layers[0].aux_loss + layers[1].aux_loss)
    loss = nn.functional.cross_entropy(logits, torch.tensor([1, 2])) + total
    loss.backward()
    assert all(m.router.weight.grad is not None for m in layers)
    assert float(mk.aux_loss(nn.Linear(2, 2))) == 0.0


class _Mlp(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.mlp = _Mlp(d)

    def forward(self, x):
        return x + self.mlp(x)


def test_any_model_with_mlp_blocks():
    torch.manual_seed(0)
    stages = nn.Sequential(nn.Sequential(_Block(6), _Block(6)), nn.Sequential(_Block(6)))
    assert len(find_blocks(stages)) == 3
    x = torch.randn(4, 5, 6)
    dense = stages(x)
    mk.moeify(stages, [0, 2], num_experts=2, k=1, renormalize=True, capacity_factor=2.0)
    assert isinstance(stages[0][0].mlp, mk.MoEMlp) and isinstance(stages[1][0].mlp, mk.MoEMlp)
    assert isinstance(stages[0][0].mlp.act, nn.ReLU)
    torch.testing.assert_close(stages(x), dense, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="already"):
        mk.moeify(stages, [0], num_experts=2)
    with pytest.raises(ValueError, match="no blocks"):
        mk.moeify(nn.Linear(3, 3), num_experts=2)


def test_moeify_bad_kwargs_name_the_argument():
    with pytest.raises(ValueError, match="k must"):
        mk.moeify(_small_vit(2), num_experts=2, k=3)
    with pytest.raises(ValueError, match="layers"):
        mk.moeify(_small_vit(2), "middle-1", num_experts=2)


def test_readme_vit_trains_through_a_batch_of_4_and_a_last_partial_batch():
    # The README's quick-start settings: a timm ViT-Ti/16 (no download), V-MoE layers in every
    # other block, 8 experts, top-2, groups of up to 8 images. 10 images in batches of 4 give
    # 4, 4 and a last partial batch of 2: each routes as one group of its own images (the
    # largest divisor up to 8), where a fixed group_size=8*197 could not route any of them.
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    mk.moeify(model, "every-2", num_experts=8, k=2, group_images=8)
    layers = [m for m in model.modules() if isinstance(m, mk.MoEMlp)]
    assert len(layers) == 6
    groups = []
    layers[0].router.register_forward_hook(lambda mod, inp, out: groups.append(out.plan))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, labels = torch.randn(10, 3, 224, 224), torch.randint(0, 10, (10,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=4)
    model.train()
    before = layers[0].fc1_weight.detach().clone()
    for x, y in loader:
        loss = nn.functional.cross_entropy(model(x), y) + mk.aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert [(r.num_tokens, r.num_groups) for r in groups] == [(4 * 197, 1), (4 * 197, 1), (2 * 197, 1)]
    assert not torch.equal(layers[0].fc1_weight, before)
    model.eval()
    for m in layers:
        m.eval_capacity_factor = 4.0
    with torch.no_grad():
        assert model(images[:3]).shape == (3, 10)
    assert groups[-1].capacity == mk.compute_capacity(3 * 197, 8, 2, 4.0)

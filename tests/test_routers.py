"""Routers: auxiliary losses against their formulas (DESIGN.md 3.10), expert choice and the
per-image router against per-token loops, and the errors they raise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moe_kernels as mk
from moe_kernels.routers import expert_choice_routing, superclass_loss


def cv2(v: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation with the population std, over the last dim."""
    mean = v.mean(-1)
    return ((v - mean[..., None]) ** 2).mean(-1) / mean**2


def formula_losses(logits, noisy, k, sigma, G):
    """Importance on the clean softmax, load with Phi, GShard on the routing softmax, per group."""
    T, E = logits.shape
    lg, nz = logits.view(G, -1, E), noisy.view(G, -1, E)
    p_clean = torch.softmax(lg, -1)
    p_route = torch.softmax(nz, -1)
    importance = cv2(p_clean.sum(1)).mean()
    thr = nz.sort(-1, descending=True).values[..., k - 1 : k]  # k-th largest noisy logit
    P = 1 - 0.5 * (1 + torch.erf((thr - lg) / sigma / 2**0.5))
    load = cv2(P.mean(1)).mean()
    top1 = F.one_hot(p_route.argmax(-1), E).float()
    gshard = (E * E * (p_route.mean(1) * top1.mean(1)).mean(-1)).mean()
    return importance, load, gshard


@pytest.mark.parametrize("gshard_weight", [0.0, 0.5], ids=["vmoe", "with-gshard"])
def test_noisy_topk_aux_loss_matches_formulas(gshard_weight):
    torch.manual_seed(0)
    E, K, D, T, S = 6, 2, 8, 24, 8
    r = mk.NoisyTopKRouter(D, E, K, gshard_weight=gshard_weight)
    x = torch.randn(T, D)
    logits = x @ r.weight.T

    r.train()
    torch.manual_seed(7)
    out = r(x, capacity_factor=1.0, group_size=S)
    torch.manual_seed(7)
    noisy = logits + (1.0 / E) * torch.randn(T, E)
    imp, load, gs = formula_losses(logits, noisy, K, 1.0 / E, T // S)
    want = 0.005 * imp + 0.005 * load + gshard_weight * gs
    torch.testing.assert_close(out.aux_loss, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.logits, logits, atol=1e-6, rtol=1e-5)

    r.eval()  # no noise: no load loss, GShard on the clean probabilities
    out = r(x, capacity_factor=1.0, group_size=S)
    imp, _, gs = formula_losses(logits, logits, K, 1.0 / E, T // S)
    torch.testing.assert_close(out.aux_loss, 0.005 * imp + gshard_weight * gs, atol=1e-6, rtol=1e-5)


def test_layer_aux_loss_is_router_loss_and_has_gradient():
    torch.manual_seed(0)
    m = mk.MoEMlp(8, 16, num_experts=4, k=2, group_size=6, importance_weight=1.0, load_weight=0.0)
    x = torch.randn(12, 8)
    m.eval()
    m(x)
    imp, _, _ = formula_losses(x @ m.router.weight.T, x @ m.router.weight.T, 2, 0.25, 2)
    torch.testing.assert_close(m.aux_loss, imp, atol=1e-6, rtol=1e-5)
    m.aux_loss.backward()
    assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0


def test_batch_priority_uses_top1_weight():
    # One expert, capacity 4 of 8 tokens, K=1: BPR keeps the 4 tokens with the largest
    # top-1 weight; vanilla keeps the first 4.
    torch.manual_seed(0)
    E, T = 4, 8
    r = mk.NoisyTopKRouter(3, E, 1, batch_priority=True).eval()
    with torch.no_grad():
        r.weight.zero_()
        r.weight[0] = torch.tensor([1.0, 0.0, 0.0])
    x = torch.zeros(T, 3)
    x[:, 0] = torch.tensor([0.1, 0.2, 3.0, 0.4, 2.0, 0.05, 1.0, 4.0])
    out = r(x, capacity_factor=0.5, group_size=None)  # C = ceil(8*1*0.5/4)=1 -> 4
    kept = (out.plan.slot[:, 0] >= 0).tolist()
    assert kept == [False, False, True, False, True, False, True, True]
    r.batch_priority = False
    kept = (r(x, capacity_factor=0.5).plan.slot[:, 0] >= 0).tolist()
    assert kept == [True] * 4 + [False] * 4


def spec_expert_choice(m: mk.MoEMlp, x: torch.Tensor, S: int, C: int) -> torch.Tensor:
    T, E = x.shape[0], m.num_experts
    probs = torch.softmax(F.linear(x, m.router.weight), -1)
    vals = probs.detach().tolist()
    rows = [[] for _ in range(T)]
    for g in range(T // S):
        for e in range(E):
            toks = sorted(range(g * S, (g + 1) * S), key=lambda t, e=e: (-vals[t][e], t))[:C]
            for t in toks:
                h = m.act(m.fc1_weight[e] @ x[t] + m.fc1_bias[e])
                rows[t].append(probs[t, e] * (m.fc2_weight[e] @ h + m.fc2_bias[e]))
    return torch.stack([torch.stack(r).sum(0) if r else torch.zeros(m.out_features) for r in rows])


@pytest.mark.parametrize("S,c", [(6, 1.0), (12, 0.5), (4, 8.0)], ids=["S6-c1", "S12-c0.5", "C-clamped-to-S"])
def test_expert_choice_matches_spec(S, c):
    torch.manual_seed(0)
    E = 3
    m = mk.MoEMlp(5, 7, num_experts=E, router="expert_choice", capacity_factor=c, group_size=S).eval()
    with torch.no_grad():
        m.fc2_bias.normal_()
    x = torch.randn(24, 5)
    C = min(mk.compute_capacity(S, E, 1, c), S)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = m(x1), spec_expert_choice(m, x2, S, C)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    params = list(m.parameters())
    got = torch.autograd.grad((out * g).sum(), [x1] + params)
    want = torch.autograd.grad((ref * g).sum(), [x2] + params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert float(m.aux_loss) == 0.0


def test_expert_choice_routing_plan():
    # G=1, S=4, E=2, C=2: expert 0 takes tokens 3, 0; expert 1 takes 1, 2 (tie 1 vs 2: lower first).
    probs = torch.tensor([[[0.6, 0.4], [0.3, 0.7], [0.3, 0.7], [0.9, 0.1]]])
    r = expert_choice_routing(probs, 2)
    assert r.slot.tolist() == [[1, -1], [-1, 0], [-1, 1], [0, -1]]
    assert r.row_src.tolist() == [3 * 2 + 0, 0 * 2 + 0, 1 * 2 + 1, 2 * 2 + 1]
    assert r.rows.tolist() == [[1, -1], [-1, 2], [-1, 3], [0, -1]]
    assert r.offsets.tolist() == [0, 2, 4] and r.counts.tolist() == [2, 2]


@pytest.mark.parametrize("router_input", ["cls", "mean"])
@pytest.mark.parametrize("k", [1, 2])
def test_per_image_router_drives_several_layers(router_input, k):
    torch.manual_seed(0)
    B, N, D, E = 3, 5, 8, 4
    router = mk.PerImageRouter(D, E, k, router_input=router_input)
    layers = [mk.MoEMlp(D, 12, num_experts=E, router="external") for _ in range(2)]
    x = torch.randn(B, N, D)
    out = router(x)
    assert out.logits.shape == (B, E) and out.plan.dropless
    assert out.routing is out.plan  # the plan's earlier name still reads it
    feats = x[:, 0] if router_input == "cls" else x.mean(1)
    logits = router.proj(F.layer_norm(feats, (D,), eps=1e-6))
    torch.testing.assert_close(out.logits, logits)
    probs = torch.softmax(logits, -1)
    top = probs.sort(dim=-1, descending=True, stable=True)
    h = x
    for layer in layers:
        y = layer(h, routing=out)
        ref = torch.zeros_like(h)
        for b in range(B):
            for j in range(k):
                e = top.indices[b, j]
                z = layer.act(h[b] @ layer.fc1_weight[e].T + layer.fc1_bias[e])
                ref[b] += top.values[b, j] * (z @ layer.fc2_weight[e].T + layer.fc2_bias[e])
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        h = h + y
    labels = torch.tensor([0, 3, 1])
    torch.testing.assert_close(superclass_loss(out.logits, labels), 0.3 * F.cross_entropy(logits, labels))
    superclass_loss(out.logits, labels).backward()
    assert router.proj.weight.grad is not None


def test_router_errors():
    with pytest.raises(ValueError, match="k must"):
        mk.NoisyTopKRouter(8, 4, 5)
    with pytest.raises(ValueError, match="router_input"):
        mk.PerImageRouter(8, 4, router_input="avg")
    r = mk.NoisyTopKRouter(8, 4, 2)
    with pytest.raises(ValueError, match="capacity_factor"):
        r(torch.randn(4, 8), capacity_factor=-1.0)
    with pytest.raises(ValueError, match="group_size=3"):
        r(torch.randn(4, 8), capacity_factor=1.0, group_size=3)
    with pytest.raises(ValueError, match="capacity_factor"):
        mk.ExpertChoiceRouter(8, 4)(torch.randn(4, 8), capacity_factor=None)
    with pytest.raises(ValueError, match="in_features=8"):
        mk.PerImageRouter(8, 4)(torch.randn(2, 3, 7))

"""``mk.routing_stats`` against an independent V-MoE routing written here with Python loops.

The oracle (``_vmoe_route``) takes the softmax of the clean router logits (eval mode: no
noise), each token's top-K, and fills each (group, expert) buffer K-major (every first choice
before any second choice), tokens in order or, with Batch Prioritized Routing, by descending
top-1 probability; an assignment past the capacity ``ceil(S*K*c/E)`` rounded up to a multiple
of 4 is dropped. Expert choice: each expert of each group takes its C most probable tokens.
Cases: capacity with several groups, BPR, K=1, dropless, expert choice, a per-image router
handed in from outside, and a whole ``models.vmoe`` model (keys are module names).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import moe_kernels as mk
from moe_kernels.routers import PerImageRouter


def _capacity(S: int, K: int, c: float, E: int) -> int:
    return int(math.ceil(math.ceil(S * K * c / E) / 4) * 4)


def _probs(layer: mk.MoEMlp, x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, layer.in_features).double()
    return torch.softmax(x2 @ layer.router.weight.detach().double().T, dim=-1)  # [T, E]


def _vmoe_route(probs: torch.Tensor, K: int, S: int, C: int | None, bpr: bool):
    """(tokens per expert, dropped, unrouted tokens, kept [T, K] bool, top-K probs [T, K])."""
    T, E = probs.shape
    top_p, top_e = torch.topk(probs, K, dim=-1)
    kept = torch.zeros(T, K, dtype=torch.bool)
    counts = [0] * E
    dropped = 0
    for g in range(T // S):
        toks = list(range(g * S, (g + 1) * S))
        if bpr:
            toks.sort(key=lambda t: -float(top_p[t, 0]))  # stable: ties keep token order
        fill = [0] * E
        for k in range(K):
            for t in toks:
                e = int(top_e[t, k])
                if C is None or fill[e] < C:
                    fill[e] += 1
                    kept[t, k] = True
                else:
                    dropped += 1
        counts = [a + b for a, b in zip(counts, fill, strict=True)]
    unrouted = int((~kept.any(1)).sum())
    return counts, dropped, unrouted, kept, top_p


def _entropy(probs: torch.Tensor) -> float:
    return float(-(probs * probs.log()).sum(-1).mean())


# id: (MoEMlp kwargs, x shape, S for the oracle); eval mode, so no noise.
CASES = {
    "capacity-groups": (dict(k=2, capacity_factor=1.0, group_size=16), (4, 16, 12), 16),
    "capacity-tight-bpr": (dict(k=2, capacity_factor=0.5, group_size=32, batch_priority=True), (4, 16, 12), 32),
    "capacity-tight-no-bpr": (dict(k=2, capacity_factor=0.5, group_size=32), (4, 16, 12), 32),
    "k1-one-group": (dict(k=1, capacity_factor=1.0), (40, 12), 40),
    "dropless": (dict(k=2, capacity_factor=None), (3, 10, 12), 30),
}


@pytest.mark.parametrize("case", list(CASES))
def test_counts_equal_an_independent_vmoe_routing(case):
    kw, shape, S = CASES[case]
    E = 5
    layer = mk.MoEMlp(12, 16, num_experts=E, **kw).eval()
    with torch.no_grad():
        layer.router.weight.mul_(4)  # confident router: uneven loads, so drops happen
    x = torch.randn(*shape)
    layer(x)
    stats = mk.routing_stats(layer)
    assert list(stats) == [""]
    st = stats[""]
    K, T = kw["k"], x[..., 0].numel()
    cf = kw["capacity_factor"]
    C = None if cf is None else _capacity(S, K, cf, E)
    probs = _probs(layer, x)
    counts, dropped, unrouted, kept, top_p = _vmoe_route(probs, K, S, C, kw.get("batch_priority", False))
    assert st.tokens_per_expert.dtype == torch.int64 and st.tokens_per_expert.shape == (E,)
    assert st.tokens_per_expert.tolist() == counts
    assert (st.assignments, st.dropped, st.unrouted_tokens) == (T * K, dropped, unrouted)
    assert (st.capacity, st.num_groups, st.num_tokens, st.k) == (C, T // S, T, K)
    assert st.dead_experts == [e for e in range(E) if counts[e] == 0]
    if C is None:
        assert st.capacity_use is None and st.dropped == 0
    else:
        torch.testing.assert_close(st.capacity_use, torch.tensor(counts, dtype=torch.float64) / (T // S * C))
    assert st.drop_fraction == pytest.approx(dropped / (T * K))
    assert st.router_entropy == pytest.approx(_entropy(probs), rel=1e-4)
    assert 0 < st.router_entropy_normalized < 1
    kept_w = top_p[kept]
    assert st.combine_weight_mean == pytest.approx(float(kept_w.mean()), rel=1e-4)
    assert st.combine_weight_min == pytest.approx(float(kept_w.min()), rel=1e-4)
    assert st.combine_weight_max == pytest.approx(float(kept_w.max()), rel=1e-4)
    assert st.combine_weight_sum_mean == pytest.approx(float((top_p * kept).sum(1).mean()), rel=1e-4)
    if case.startswith("capacity-tight"):
        assert dropped > 0  # the case exercises dropping
    d = st.as_dict()
    json.dumps(d)  # plain values only
    assert d["tokens_per_expert"] == counts and d["dropped"] == dropped and d["drop_fraction"] == st.drop_fraction


def test_bpr_changes_which_assignments_drop():
    """Per-expert totals are min(C, demand) whatever the priority; BPR changes which
    assignments are kept, which shows in the unrouted tokens and the kept combine weights. The
    oracle's two routings differ there (the case is sensitive) and the layer follows each."""
    x = torch.randn(4, 16, 12)
    want, got = {}, {}
    for bpr in (False, True):
        torch.manual_seed(1)
        layer = mk.MoEMlp(12, 16, num_experts=5, k=2, capacity_factor=0.5, group_size=32, batch_priority=bpr).eval()
        with torch.no_grad():
            layer.router.weight.mul_(4)
        layer(x)
        got[bpr] = mk.routing_stats(layer)[""]
        counts, _, unrouted, kept, top_p = _vmoe_route(_probs(layer, x), 2, 32, _capacity(32, 2, 0.5, 5), bpr)
        want[bpr] = (unrouted, float((top_p * kept).sum(1).mean()))
        assert got[bpr].tokens_per_expert.tolist() == counts
        assert got[bpr].unrouted_tokens == want[bpr][0]
        assert got[bpr].combine_weight_sum_mean == pytest.approx(want[bpr][1], rel=1e-4)
    assert want[True][1] != pytest.approx(want[False][1], rel=1e-3)


def test_expert_choice():
    E, S = 4, 12
    layer = mk.MoEMlp(12, 16, num_experts=E, router="expert_choice", capacity_factor=1.0, group_size=S).eval()
    x = torch.randn(3, 12, 12)
    layer(x)
    st = mk.routing_stats(layer)[""]
    C = min(_capacity(S, 1, 1.0, E), S)
    probs = _probs(layer, x)
    taken = torch.zeros(36, dtype=torch.bool)
    for g in range(3):
        p = probs[g * S : (g + 1) * S]
        for e in range(E):
            taken[g * S + torch.topk(p[:, e], C).indices] = True
    assert st.router == "expert_choice" and st.k == E
    assert st.tokens_per_expert.tolist() == [3 * C] * E
    assert (st.assignments, st.dropped) == (3 * E * C, 0)
    assert st.unrouted_tokens == int((~taken).sum())
    torch.testing.assert_close(st.capacity_use, torch.ones(E, dtype=torch.float64))


def test_per_image_router_handed_in():
    B, N, E = 5, 6, 4
    router = PerImageRouter(12, E, k=2)
    layer = mk.MoEMlp(12, 16, num_experts=E, router="external")
    x = torch.randn(B, N, 12)
    out = router(x)
    layer(x, routing=out)
    st = mk.routing_stats(layer)[""]
    chosen = torch.topk(torch.softmax(out.logits.detach().double(), -1), 2).indices  # [B, 2]
    want = [N * int((chosen == e).sum()) for e in range(E)]
    assert st.tokens_per_expert.tolist() == want
    assert (st.assignments, st.dropped, st.unrouted_tokens, st.capacity) == (B * N * 2, 0, 0, None)
    assert st.router_entropy == pytest.approx(_entropy(torch.softmax(out.logits.detach().double(), -1)), rel=1e-4)


def test_whole_model_keys_and_layers_without_forward():
    from models.vmoe import create_model

    model = create_model("Mu/4", num_experts=4, moe_layers="last-2", num_classes=3, image_size=8, in_chans=1)
    assert mk.routing_stats(model) == {}  # nothing ran yet
    model.eval()(torch.randn(8, 1, 8, 8))
    stats = mk.routing_stats(model)
    assert list(stats) == ["blocks.3.mlp", "blocks.5.mlp"]
    for st in stats.values():
        assert st.num_tokens == 8 * 5 and st.assignments == 8 * 5 * 2
        assert int(st.tokens_per_expert.sum()) + st.dropped == st.assignments
    # Soft MoE layers have no discrete assignments and are not reported.
    soft = mk.SoftMoEMlp(12, num_experts=2, num_slots=1)
    soft(torch.randn(2, 3, 12))
    assert mk.routing_stats(torch.nn.Sequential(soft)) == {}
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        mk.routing_stats([model])


def test_stats_follow_the_last_forward_and_hold_no_graph():
    layer = mk.MoEMlp(12, 16, num_experts=3, k=1, capacity_factor=None)
    x = torch.randn(10, 12, requires_grad=True)
    layer(x).sum().backward()
    assert all(not t.requires_grad for t in layer._last_routing[:4])
    layer(torch.randn(4, 12))
    assert mk.routing_stats(layer)[""].num_tokens == 4


def test_forward_keeps_device_tensors_without_a_host_round_trip(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tests.sync_spy import HostSyncSpy

    with FakeTensorMode():
        layer = mk.MoEMlp(16, 24, num_experts=4, k=2, capacity_factor=1.0, group_size=10, device="cuda")
        x = torch.randn(4, 10, 16, device="cuda")
        with HostSyncSpy() as spy:
            layer(x)
        assert all(t.device.type == "cuda" for t in layer._last_routing[:4])
    assert not spy.violations, "\n".join(sorted(set(spy.violations)))


@pytest.mark.slow
def test_stats_under_torch_compile_fullgraph():
    import torch._dynamo

    torch._dynamo.reset()
    try:
        layer = mk.MoEMlp(16, 24, num_experts=4, k=2, capacity_factor=0.5, group_size=8).eval()
        x = torch.randn(2, 8, 16)
        layer(x)
        want = mk.routing_stats(layer)[""]
        layer._last_routing = None
        torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=False)(x)
        got = mk.routing_stats(layer)[""]
        assert got.tokens_per_expert.tolist() == want.tokens_per_expert.tolist()
        assert (got.dropped, got.unrouted_tokens) == (want.dropped, want.unrouted_tokens)
    finally:
        torch._dynamo.reset()

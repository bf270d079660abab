"""MoEMlp against a per-token loop written from DESIGN.md section 3 (the spec, not the ops).

The oracle routes token by token with Python lists: top-K by (noisy) logit with ties to the
lower expert, K-major placement per group, optional Batch Prioritized order, a drop once an
expert's (group) fill reaches C; then sums each kept expert's MLP output times its weight.
Forward and the gradients of x, the router and every expert parameter must agree within 1e-5.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import moe_kernels as mk
from tests.conftest import backends_under_test

ATOL = RTOL = 1e-5


def spec_moe(m: mk.MoEMlp, x: torch.Tensor, capacity: int | None, noise: torch.Tensor | None = None):
    """Per-token MoE forward from the spec. Returns (out [T, Dout], dropped assignments)."""
    T, _ = x.shape
    E, K = m.num_experts, m.k
    logits = F.linear(x.float(), m.router.weight.float())  # [T, E], as the layer computes them
    noisy = logits if noise is None else logits + (m.router.noise_std / E) * noise
    probs = torch.softmax(noisy, dim=-1)  # [T, E]
    S = m.group_size or T
    b1 = m.fc1_bias if m.fc1_bias is not None else torch.zeros(m.fc1_weight.shape[:2])
    b2 = m.fc2_bias if m.fc2_bias is not None else torch.zeros(m.fc2_weight.shape[:2])

    def expert(e: int, v: torch.Tensor) -> torch.Tensor:
        h = m.norm(m.act(m.fc1_weight[e] @ v + b1[e]))
        return m.fc2_weight[e] @ h + b2[e]

    rows: list[list[torch.Tensor]] = [[] for _ in range(T)]
    dropped = 0
    vals = noisy.detach().tolist()
    for g in range(T // S):
        toks = list(range(g * S, (g + 1) * S))
        choice = {t: sorted(range(E), key=lambda e, t=t: (-vals[t][e], e))[:K] for t in toks}
        if m.batch_priority:
            toks = sorted(toks, key=lambda t: -probs[t, choice[t][0]].item())  # stable
        fill = [0] * E
        for k in range(K):  # K-major: all first choices before any second choice
            for t in toks:
                e = choice[t][k]
                fill[e] += 1
                if capacity is not None and fill[e] > capacity:
                    dropped += 1
                    continue
                w = probs[t, e]
                if m.renormalize:
                    w = w / probs[t, choice[t]].sum()
                rows[t].append(w * expert(e, x[t]))
    out = torch.stack([torch.stack(r).sum(0) if r else torch.zeros(m.out_features) for r in rows])
    return out, dropped


def _layer(D=7, H=11, E=5, K=2, **kw) -> mk.MoEMlp:
    torch.manual_seed(0)
    m = mk.MoEMlp(D, H, num_experts=E, k=K, **kw)
    with torch.no_grad():  # varied biases so a mixed-up expert shows
        m.fc1_bias.normal_()
        m.fc2_bias.normal_()
    return m


def _check_against_spec(m: mk.MoEMlp, x: torch.Tensor, capacity: int | None, noise=None, seed=None):
    x1 = x.clone().requires_grad_()
    if seed is not None:
        torch.manual_seed(seed)
    out = m(x1)
    x2 = x.clone().requires_grad_()
    ref, dropped = spec_moe(m, x2, capacity, noise)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    g = torch.randn_like(out)
    params = [p for p in m.parameters()]
    got = torch.autograd.grad((out * g).sum(), [x1] + params, allow_unused=True)
    want = torch.autograd.grad((ref * g).sum(), [x2] + params, allow_unused=True)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, got, want, strict=True):
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda s, n=name: f"grad of {n}: {s}")
    return dropped


# (E, K, group_size, capacity_factor, batch_priority, renormalize): the edge each covers.
CASES = [
    pytest.param(5, 2, None, 1.05, False, False, id="E5-K2-onegroup"),
    pytest.param(5, 2, 6, 0.5, False, False, id="E5-K2-groups-drops"),
    pytest.param(5, 2, 6, 0.5, True, False, id="E5-K2-groups-drops-bpr"),
    pytest.param(5, 2, 6, 0.5, True, True, id="E5-K2-drops-bpr-renorm"),
    pytest.param(2, 1, 12, 0.3, True, False, id="E2-K1-drops-bpr"),
    pytest.param(4, 1, 4, None, False, True, id="E4-K1-dropless-renorm"),
    pytest.param(3, 3, 8, 0.4, False, False, id="K=E-drops"),
    pytest.param(3, 3, None, None, False, True, id="K=E-dropless-renorm"),
    pytest.param(7, 3, 12, 2.0, True, True, id="E7-K3-ample"),
    pytest.param(2, 2, None, None, False, False, id="E2-K2-dropless"),
]


@pytest.mark.parametrize("E,K,S,c,bpr,renorm", CASES)
def test_matches_spec_eval(E, K, S, c, bpr, renorm):
    m = _layer(E=E, K=K, group_size=S, capacity_factor=c, batch_priority=bpr, renormalize=renorm).eval()
    x = torch.randn(24, 7)
    T = x.shape[0]
    C = None if c is None else mk.compute_capacity(S or T, E, K, c)
    dropped = _check_against_spec(m, x, C)
    if c is not None and c < 1:
        assert dropped > 0, "the case was meant to drop assignments"


@pytest.mark.parametrize("E,K,S,c,bpr,renorm", CASES[1:4])
def test_matches_spec_training_noise(E, K, S, c, bpr, renorm):
    # Training: noise from torch's RNG, (noise_std / E) * N(0, 1) on the logits.
    m = _layer(E=E, K=K, group_size=S, capacity_factor=c, batch_priority=bpr, renormalize=renorm).train()
    x = torch.randn(24, 7)
    torch.manual_seed(123)
    noise = torch.randn(24, E)
    _check_against_spec(m, x, mk.compute_capacity(S, E, K, c), noise=noise, seed=123)


def test_single_token_and_no_bias_and_odd_shapes():
    m = _layer(D=3, H=5, E=7, K=3, bias=(True, True)).eval()
    _check_against_spec(m, torch.randn(1, 3), mk.compute_capacity(1, 7, 3, 1.05))
    torch.manual_seed(0)
    m = mk.MoEMlp(5, 9, 4, num_experts=3, k=2, bias=False).eval()
    assert m.fc1_bias is None and m.fc2_bias is None
    _check_against_spec(m, torch.randn(10, 5), mk.compute_capacity(10, 3, 2, 1.05))


def test_all_tokens_on_one_expert():
    # Router rows 1.. are -inf-like: every token's 1st choice is expert 0, so it overflows.
    m = _layer(E=4, K=2, capacity_factor=1.0).eval()
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0] = 1.0
    x = torch.randn(16, 7).abs()  # positive: expert 0 always wins
    dropped = _check_against_spec(m, x, mk.compute_capacity(16, 4, 2, 1.0))
    assert dropped > 0


def test_parameter_shapes_and_names():
    m = mk.MoEMlp(8, 16, 6, num_experts=4)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes == {
        "router.weight": (4, 8),
        "fc1_weight": (4, 16, 8),
        "fc1_bias": (4, 16),
        "fc2_weight": (4, 6, 16),
        "fc2_bias": (4, 6),
    }
    assert "num_experts=4" in repr(m) and "capacity_factor=1.05" in repr(m)


def test_timm_mlp_signature_and_dtype_device():
    m = mk.MoEMlp(
        8,
        16,
        None,
        torch.nn.ReLU,
        torch.nn.LayerNorm,
        (True, False),
        (0.0, 0.0),
        num_experts=2,
        dtype=torch.float64,
        device="cpu",
    )
    assert isinstance(m.act, torch.nn.ReLU) and isinstance(m.norm, torch.nn.LayerNorm)
    assert m.fc2_bias is None and m.fc1_weight.dtype == torch.float64 and m.out_features == 8
    assert m(torch.randn(3, 8, dtype=torch.float64)).dtype == torch.float64


def test_reset_parameters_bounds():
    m = mk.MoEMlp(16, 64, num_experts=3)
    m.reset_parameters()
    assert m.fc1_weight.abs().max() <= 1 / math.sqrt(16)
    assert m.fc2_weight.abs().max() <= 1 / math.sqrt(64)
    assert not torch.equal(m.fc1_weight[0], m.fc1_weight[1])


def test_leading_dims_and_empty_batch():
    m = _layer(group_size=None).eval()
    x = torch.randn(2, 3, 4, 7)
    out = m(x)
    assert out.shape == (2, 3, 4, 7)
    torch.testing.assert_close(out.reshape(-1, 7), m(x.reshape(-1, 7)))
    empty = torch.randn(0, 5, 7, requires_grad=True)
    y = m(empty)
    assert y.shape == (0, 5, 7)
    y.sum().backward()
    assert float(m.aux_loss) == 0.0


def test_eval_capacity_factor_changes_between_calls():
    m = _layer(E=4, K=2, group_size=8, capacity_factor=0.25).eval()
    x = torch.randn(16, 7)
    assert _check_against_spec(m, x, mk.compute_capacity(8, 4, 2, 0.25)) > 0
    m.eval_capacity_factor = 4.0
    assert _check_against_spec(m, x, mk.compute_capacity(8, 4, 2, 4.0)) == 0
    m.train()  # training uses capacity_factor again
    assert m.current_capacity_factor() == 0.25
    m.eval_capacity_factor = None
    m.eval()
    assert m.current_capacity_factor() == 0.25


def test_eval_is_deterministic_and_training_follows_seed():
    m = _layer(E=8, K=2, group_size=8, capacity_factor=1.0)
    with torch.no_grad():
        m.router.weight.mul_(0.02)  # near-ties, so the noise changes decisions
    x = torch.randn(32, 7)
    m.eval()
    a, b = m(x), m(x)
    assert torch.equal(a, b)
    m.train()
    torch.manual_seed(1)
    t1 = m(x)
    torch.manual_seed(1)
    t2 = m(x)
    torch.manual_seed(2)
    t3 = m(x)
    assert torch.equal(t1, t2)
    assert not torch.equal(t1, t3)
    m.router.noise_std = 0.0  # no noise: training routes as eval
    torch.testing.assert_close(m(x), a)


def test_bf16_close_to_fp32():
    m = _layer(E=4, K=2, capacity_factor=None).eval()
    x = torch.randn(32, 7)
    ref = m(x)
    out = m.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


def test_autocast_fp32_weights_bf16_compute_fp32_routing():
    m = _layer(E=4, K=2, capacity_factor=1.0, group_size=8).eval()
    x = torch.randn(16, 7, requires_grad=True)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
        routed = m.router(x, capacity_factor=1.0, group_size=8)
    assert out.dtype == torch.bfloat16 and routed.logits.dtype == torch.float32
    # The router ran in fp32 under autocast: the same decisions as without it.
    assert torch.equal(routed.plan.slot, m.router(x, capacity_factor=1.0, group_size=8).plan.slot)
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)
    out.float().sum().backward()
    assert x.grad is not None and m.fc1_weight.grad.dtype == torch.float32


def test_external_routing_and_errors():
    x = torch.randn(2, 3, 7)
    r = mk.PerImageRouter(7, 4, 2)
    m = mk.MoEMlp(7, 9, num_experts=4, router="external")
    assert m.router is None and "router.weight" not in dict(m.named_parameters())
    assert m(x, routing=r(x)).shape == (2, 3, 7)
    with pytest.raises(ValueError, match="routing"):
        m(x)
    with pytest.raises(ValueError, match="tokens"):
        m(x[:1], routing=r(x))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=0), "k must"),
        (dict(k=5), "k must"),
        (dict(capacity_factor=-1.0), "capacity_factor"),
        (dict(capacity_factor=0), "capacity_factor"),
        (dict(eval_capacity_factor=-2.0), "eval_capacity_factor"),
        (dict(router="switch"), "router must"),
        (dict(group_size=0), "group_size"),
        (dict(num_experts=0), "num_experts"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_arguments(kwargs, match):
    args = dict(num_experts=4) | kwargs
    with pytest.raises(ValueError, match=match):
        mk.MoEMlp(8, 16, **args)


def test_bad_calls():
    m = mk.MoEMlp(8, 16, num_experts=4, group_size=5)
    with pytest.raises(ValueError, match="in_features=8"):
        m(torch.randn(10, 9))
    with pytest.raises(ValueError, match="group_size=5"):
        m(torch.randn(12, 8))
    with pytest.raises(ValueError, match="capacity_factor"):
        m.capacity_factor = -0.5


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("capacity_factor", [1.0, None])
@pytest.mark.parametrize("backend", [b for b in ("torch", "cpu") if b in backends_under_test("cpu")])
def test_gelu_recomputation_is_exact(approximate, capacity_factor, backend, monkeypatch):
    # With a plain GELU the layer keeps GELU's input, not its output, and recomputes gelu in the
    # backward (gelu_grouped_mm, or gelu_mlp's fused ops); without fused epilogues output and
    # every gradient are bitwise the unfused layer's. The CPU kernels' fused ops apply GELU per
    # tile (ATen's scalar tail path can differ in the last bit for tanh) and sum bias gradients
    # in row order: the same values within fp32 rounding (tests/test_fused_cpu.py).
    torch.manual_seed(0)
    m = mk.MoEMlp(12, 20, num_experts=4, k=2, capacity_factor=capacity_factor, group_size=16, noise_std=0.0,
                  act_layer=lambda: torch.nn.GELU(approximate=approximate), backend=backend)  # fmt: skip
    fused = mk.backends.fused("grouped_mm_act", backend, torch.device("cpu"), torch.float32) is not None
    same = functools.partial(torch.testing.assert_close, atol=1e-6, rtol=1e-6) if fused else _assert_equal
    x = torch.randn(32, 12)
    assert m._plain_gelu()

    def run():
        xx = x.clone().requires_grad_(True)
        y = m(xx)
        y.backward(torch.ones_like(y))
        grads = [xx.grad] + [p.grad.clone() for p in m.parameters()]
        m.zero_grad()
        return y.detach(), grads

    y_fused, g_fused = run()
    monkeypatch.setattr(mk.MoEMlp, "_plain_gelu", lambda self: False)
    y_plain, g_plain = run()
    same(y_fused, y_plain)
    for a, b in zip(g_fused, g_plain, strict=True):
        same(a, b)


def _assert_equal(a, b):
    assert torch.equal(a, b)


def test_gelu_recomputation_only_for_a_plain_gelu():
    assert not mk.MoEMlp(8, 16, num_experts=2, act_layer=torch.nn.ReLU)._plain_gelu()
    assert not mk.MoEMlp(8, 16, num_experts=2, norm_layer=torch.nn.LayerNorm)._plain_gelu()
    m = mk.MoEMlp(8, 16, num_experts=2, drop=0.1)
    assert not m._plain_gelu()  # dropout between GELU and fc2 while training
    assert m.eval()._plain_gelu()


def test_skipping_empty_slots_changes_nothing_but_the_work(monkeypatch):
    # CPU eager: the capacity buffer is packed (Routing.packed) so the expert GEMMs skip empty
    # slots; the padded buffer gives the same output and gradients (up to GEMM tiling).
    torch.manual_seed(0)
    m = mk.MoEMlp(16, 32, num_experts=8, k=2, capacity_factor=1.5, group_size=24, noise_std=0.0)
    x = torch.randn(48, 16)
    packed_rows = []
    real = mk.ops.Routing.packed
    monkeypatch.setattr(mk.ops.Routing, "packed", lambda r: packed_rows.append(1) or real(r))

    def run():
        xx = x.clone().requires_grad_(True)
        y = m(xx)
        y.square().sum().backward()
        out = [y.detach(), xx.grad] + [p.grad.clone() for p in m.parameters()]
        m.zero_grad()
        return out

    a = run()
    assert packed_rows, "the CPU eager forward should pack the plan"
    m.skip_empty_slots = False
    packed_rows.clear()
    b = run()
    assert not packed_rows
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5)


# --- routing groups that follow the batch (module docstring of moe_kernels.layers) ----------


@pytest.mark.parametrize(
    "batch,group_images,want",
    [(16, 8, 8), (4, 8, 4), (12, 8, 6), (10, 8, 5), (7, 8, 7), (13, 8, 1), (9, 4, 3), (1, 8, 1), (0, 8, 1)],
)
def test_images_per_group_is_the_largest_divisor_up_to_n(batch, group_images, want):
    assert mk.layers.images_per_group(batch, group_images) == want


def _groups_of(m: mk.MoEMlp) -> list[int]:
    seen: list[int] = []
    m.router.register_forward_hook(lambda mod, inp, out: seen.append(out.plan.num_groups))
    return seen


def test_group_images_follows_the_batch():
    # 5 tokens per image; groups of up to 8 images: 16 -> 2 groups of 8, 4 -> 1 of 4,
    # 12 (a last partial batch) -> 2 of 6, 13 -> 13 of 1.
    torch.manual_seed(0)
    m = mk.MoEMlp(6, 10, num_experts=4, k=2, group_images=8)
    seen = _groups_of(m)
    for B in (16, 4, 12, 13):
        x = torch.randn(B, 5, 6, requires_grad=True)
        m(x).sum().backward()
        assert x.grad.shape == x.shape
    assert seen == [2, 1, 2, 13]
    assert "group_images=8" in repr(m)


def test_group_images_equals_the_token_group_size_it_implies():
    torch.manual_seed(0)
    a = mk.MoEMlp(6, 10, num_experts=4, k=2, capacity_factor=1.0, group_images=2).eval()
    b = mk.MoEMlp(6, 10, num_experts=4, k=2, capacity_factor=1.0, group_size=2 * 5).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(6, 5, 6)
    torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)
    # [2, 3, N, D]: the leading sizes are all images.
    torch.testing.assert_close(a(x.view(2, 3, 5, 6)), b(x).view(2, 3, 5, 6), atol=0, rtol=0)


def test_per_call_group_size_wins():
    torch.manual_seed(0)
    m = mk.MoEMlp(6, 10, num_experts=4, k=2, group_images=8)
    seen = _groups_of(m)
    x = torch.randn(8, 5, 6)
    m(x)
    m(x, group_size=10)  # 2 images per group for this call only
    m(x)
    assert seen == [1, 4, 1]
    with pytest.raises(ValueError, match="group_size must be an int >= 1 or None, got 0"):
        m(x, group_size=0)


def test_group_images_errors():
    with pytest.raises(ValueError, match="group_size .* or group_images .*not both"):
        mk.MoEMlp(6, num_experts=4, group_size=10, group_images=2)
    with pytest.raises(ValueError, match="group_images must be an int >= 1 or None, got 0"):
        mk.MoEMlp(6, num_experts=4, group_images=0)
    m = mk.MoEMlp(6, num_experts=4, group_images=2)
    with pytest.raises(ValueError, match=r"group_images=2 needs x of shape \[B, N, in_features\], got \(10, 6\)"):
        m(torch.randn(10, 6))


# --- dtypes: as nn.Linear, except under autocast ----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=["f16", "bf16", "f64"])
def test_input_dtype_must_match_the_parameters(dtype):
    m = mk.MoEMlp(8, 16, num_experts=4, k=2)
    x = torch.randn(6, 8, dtype=dtype)
    with pytest.raises(TypeError, match=f"x has dtype {dtype} but the layer's parameters have dtype torch.float32"):
        m(x)
    with pytest.raises(TypeError, match="autocast"):
        mk.MoEMlp(8, 16, num_experts=4, router="external")(x, routing=mk.PerImageRouter(8, 4, 2)(x.float()[None]))
    with pytest.raises(TypeError, match="torch.int64"):
        m(torch.ones(6, 8, dtype=torch.int64))
    # The documented ways: cast one side, or autocast.
    assert m.to(dtype)(x).dtype == dtype
    m.float()
    if dtype != torch.float64:
        with torch.autocast("cpu", dtype=dtype):
            assert m(x).dtype == dtype

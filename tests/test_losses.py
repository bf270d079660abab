"""``moe_kernels.losses`` against independent plain-Python/NumPy transcriptions of DESIGN.md
section 3.10 (population std; per group, then the mean over groups), hand-computed golden
values, and errors that name the argument."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moe_kernels import losses


def _cv2(v: np.ndarray) -> float:
    return float(np.var(v) / np.mean(v) ** 2)


def test_cv_squared_golden():
    # [1, 2, 3]: population variance 2/3, mean 2 -> (2/3) / 4
    assert losses.cv_squared(torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx(1 / 6)
    assert losses.cv_squared(torch.full((5,), 0.2)).item() == 0.0


def test_importance_loss_matches_formula():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(3, 10, 4), -1)  # G=3 groups of S=10 tokens, E=4
    want = np.mean([_cv2(p[g].sum(0).numpy()) for g in range(3)])
    assert losses.importance_loss(p).item() == pytest.approx(want, rel=1e-5)
    # one group: a [S, E] input
    assert losses.importance_loss(p[0]).item() == pytest.approx(_cv2(p[0].sum(0).numpy()), rel=1e-5)


def test_load_loss_matches_formula():
    torch.manual_seed(1)
    G, S, E, K, sigma = 2, 6, 5, 2, 0.3
    logits = torch.randn(G, S, E)
    noisy = logits + sigma * torch.randn(G, S, E)
    per_group = []
    for g in range(G):
        P = np.zeros((S, E))
        for s in range(S):
            kth = sorted(noisy[g, s].tolist(), reverse=True)[K - 1]  # k-th largest noisy logit
            for e in range(E):
                z = (kth - logits[g, s, e].item()) / sigma
                P[s, e] = 1 - 0.5 * (1 + math.erf(z / math.sqrt(2)))  # 1 - Phi(z)
        per_group.append(_cv2(P.mean(0)))
    got = losses.load_loss(logits, noisy, sigma, K).item()
    assert got == pytest.approx(float(np.mean(per_group)), rel=1e-4)


def test_gshard_loss_golden_and_formula():
    # perfectly balanced top-1 and uniform probabilities: exactly 1
    E = 4
    p = torch.full((E, E), 0.1)
    p[range(E), range(E)] = 0.7
    assert losses.gshard_loss(p).item() == pytest.approx(1.0)
    # all tokens to expert 0 with p=1: E^2 * (1 * 1) / E = E
    q = torch.zeros(8, E)
    q[:, 0] = 1.0
    assert losses.gshard_loss(q).item() == pytest.approx(E)
    torch.manual_seed(2)
    r = torch.softmax(torch.randn(2, 9, 3), -1)
    want = []
    for g in range(2):
        a = r[g].numpy()
        top1 = np.eye(3)[a.argmax(1)]
        want.append(9 * np.mean(a.mean(0) * top1.mean(0)))
    assert losses.gshard_loss(r).item() == pytest.approx(float(np.mean(want)), rel=1e-5)


def test_superclass_loss():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    ce = -(math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(math.e / (math.e + 1))) / 2
    assert losses.superclass_loss(logits, labels).item() == pytest.approx(0.3 * ce, rel=1e-6)
    assert losses.superclass_loss(logits, labels, weight=1.0).item() == pytest.approx(ce, rel=1e-6)
    from moe_kernels import routers

    assert routers.superclass_loss is losses.superclass_loss  # its former home re-exports it


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: losses.importance_loss(torch.ones(4)), r"importance_loss: probs must be a floating tensor of shape"),
        (lambda: losses.gshard_loss(torch.ones(3, 4, dtype=torch.int64)), r"gshard_loss: probs must be a floating"),
        (lambda: losses.load_loss(torch.ones(2, 3), torch.ones(2, 4), 0.1, 1), r"load_loss: logits \(2, 3\) and"),
        (lambda: losses.load_loss(torch.ones(2, 3), torch.ones(2, 3), 0.1, 4), r"k must be in \[1, E=3\], got 4"),
        (lambda: losses.load_loss(torch.ones(2, 3), torch.ones(2, 3), 0.0, 1), r"sigma must be > 0, got 0.0"),
    ],
)
def test_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()

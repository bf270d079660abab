"""V-MoE auxiliary losses (DESIGN.md section 3.10).

Each is computed per routing group (the second-to-last dimension is the group's S tokens, any
leading dimensions index groups) and averaged over groups. Standard deviations are population
ones (``correction=0``), as in V-MoE's JAX code.

Shape letters: S tokens of a group, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cv_squared", "gshard_loss", "importance_loss", "load_loss", "superclass_loss"]


def _check(name: str, t: Tensor, fn: str) -> None:
    if not isinstance(t, Tensor) or t.dim() < 2 or not t.is_floating_point():
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{fn}: {name} must be a floating tensor of shape [..., S, E], got {shape}")


def cv_squared(v: Tensor) -> Tensor:
    """Squared coefficient of variation over the last dimension, ``var / mean**2``: ``[..., E] -> [...]``."""
    return v.var(dim=-1, correction=0) / v.mean(dim=-1).pow(2)


def importance_loss(probs: Tensor) -> Tensor:
    """``CV^2(sum_s p[s, :])`` per group, mean over groups.

    Args:
        probs: ``[..., S, E]`` softmax probabilities before top-K (of the noisy logits in training).
    """
    _check("probs", probs, "importance_loss")
    importance = probs.float().sum(dim=-2)  # [..., E]
    return cv_squared(importance).mean()


def load_loss(logits: Tensor, noisy_logits: Tensor, sigma: float, k: int) -> Tensor:
    """``CV^2(mean_s P[s, :])`` per group, mean over groups, where ``P[s, e]`` is the probability
    that expert e is still among the top-K of token s under a fresh draw of the noise:
    ``P = 1 - Phi((kth_largest(noisy[s]) - logits[s, e]) / sigma)``.

    Args:
        logits: ``[..., S, E]`` clean router logits.
        noisy_logits: ``[..., S, E]`` the same plus the training noise.
        sigma: the noise's standard deviation (``noise_std / E`` in V-MoE).
        k: experts chosen per token.
    """
    _check("logits", logits, "load_loss")
    _check("noisy_logits", noisy_logits, "load_loss")
    if logits.shape != noisy_logits.shape:
        raise ValueError(f"load_loss: logits {tuple(logits.shape)} and noisy_logits {tuple(noisy_logits.shape)} differ")
    E = logits.shape[-1]
    if not 1 <= k <= E:
        raise ValueError(f"load_loss: k must be in [1, E={E}], got {k}")
    if not sigma > 0:
        raise ValueError(f"load_loss: sigma must be > 0, got {sigma}")
    threshold = noisy_logits.float().topk(k, dim=-1).values[..., -1:]  # [..., S, 1]
    p = 1.0 - torch.special.ndtr((threshold - logits.float()) / sigma)  # [..., S, E]
    return cv_squared(p.mean(dim=-2)).mean()


def gshard_loss(probs: Tensor) -> Tensor:
    """GShard's balance loss, ``E^2 * mean_e(mean_s p[s, e] * mean_s onehot(argmax p[s])[e])``,
    per group, mean over groups (1 when perfectly balanced).

    Args:
        probs: ``[..., S, E]`` softmax probabilities.
    """
    _check("probs", probs, "gshard_loss")
    E = probs.shape[-1]
    p = probs.float()
    top1 = torch.nn.functional.one_hot(p.argmax(dim=-1), E).float()  # [..., S, E]
    per_group = (p.mean(dim=-2) * top1.mean(dim=-2)).mean(dim=-1) * E * E  # [...]
    return per_group.mean()


def superclass_loss(logits: Tensor, superclass: Tensor, weight: float = 0.3) -> Tensor:
    """Mobile V-MoE's super-class guidance: ``weight * cross_entropy(logits, superclass)``.

    Args:
        logits: ``[B, E]`` per-image router logits (``RouterOutput.logits``).
        superclass: ``[B]`` int64 super-class of each image; super-class c is expert c.
        weight: the loss weight (0.3 in the paper).
    """
    return weight * F.cross_entropy(logits.float(), superclass)

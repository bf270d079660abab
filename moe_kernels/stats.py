"""Routing statistics of a model's MoE layers: how many tokens each expert took, how many
assignments were dropped, how full the capacity buffers were, which experts are dead, how
sure the router is, and how large the combine weights are.

Cheap enough to leave on: every ``MoEMlp`` keeps device tensors of its last routing (the plan's
``indices``/``slot``, the combine weights and the router logits, detached) and nothing is
computed or copied to the host until ``routing_stats`` reads them.

Shape letters: T tokens, K choices per token, E experts, G groups, C capacity per (group,
expert), R rows of router logits (T for token routers, B images for a per-image router).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from moe_kernels.layers import MoEMlp

__all__ = ["RoutingStats", "routing_stats", "compute_stats"]


@dataclasses.dataclass(frozen=True)
class RoutingStats:
    """What one MoE layer's last forward did with its tokens (host values).

    Attributes:
        router: the layer's ``router`` (``"vmoe"``, ``"expert_choice"`` or ``"external"``).
        num_tokens: T.
        num_experts: E.
        k: K, choices per token in the plan (E for expert choice, where expert e's column says
            whether e took the token).
        num_groups: G.
        capacity: C per (group, expert), ``None`` when dropless.
        tokens_per_expert: ``[E]`` int64, kept assignments per expert over all groups.
        assignments: T*K token choices (expert choice: the E*G*C picks the experts made).
        dropped: assignments past their expert's capacity (0 for dropless and expert choice).
        unrouted_tokens: tokens with no kept assignment (only their residual goes on).
        capacity_use: ``[E]`` float, ``tokens_per_expert / (G*C)``; ``None`` when dropless.
        dead_experts: experts that took no token.
        router_entropy: mean over the R logit rows of the entropy (nats) of softmax(logits)
            over the E experts (clean logits: no training noise).
        combine_weight_mean, combine_weight_min, combine_weight_max: over kept assignments
            (NaN when none was kept).
        combine_weight_sum_mean: mean over tokens of the sum of their kept combine weights.
    """

    router: str
    num_tokens: int
    num_experts: int
    k: int
    num_groups: int
    capacity: int | None
    tokens_per_expert: Tensor
    assignments: int
    dropped: int
    unrouted_tokens: int
    capacity_use: Tensor | None
    dead_experts: list[int]
    router_entropy: float
    combine_weight_mean: float
    combine_weight_min: float
    combine_weight_max: float
    combine_weight_sum_mean: float

    @property
    def drop_fraction(self) -> float:
        """``dropped / assignments`` (0 with no assignment)."""
        return self.dropped / self.assignments if self.assignments else 0.0

    @property
    def router_entropy_normalized(self) -> float:
        """``router_entropy / log(E)``: 1 for a uniform router, 0 for a one-hot one."""
        return self.router_entropy / math.log(self.num_experts) if self.num_experts > 1 else 0.0

    def as_dict(self) -> dict:
        """Plain Python values (lists for the ``[E]`` tensors, the two properties included), for
        JSON logs."""
        out = dataclasses.asdict(self)
        for key in ("tokens_per_expert", "capacity_use"):
            if out[key] is not None:
                out[key] = out[key].tolist()
        out["drop_fraction"] = self.drop_fraction
        out["router_entropy_normalized"] = self.router_entropy_normalized
        return out


def compute_stats(
    indices: Tensor,
    slot: Tensor,
    weights: Tensor,
    logits: Tensor,
    *,
    num_experts: int,
    capacity: int | None,
    num_groups: int,
    router: str = "vmoe",
) -> RoutingStats:
    """Statistics of one routing (one host copy at the end).

    Args:
        indices: ``[T, K]`` int64 expert of each assignment.
        slot: ``[T, K]`` int64 position in the expert, ``-1`` if dropped.
        weights: ``[T, K]`` combine weights.
        logits: ``[R, E]`` clean router logits.
        num_experts: E.
        capacity: C, or ``None`` when dropless.
        num_groups: G.
        router: the layer's router name (expert choice counts its picks as the assignments).
    """
    T, K = indices.shape
    E = num_experts
    kept = slot >= 0  # [T, K]
    tpe = torch.zeros(E, dtype=torch.int64, device=indices.device)
    tpe = tpe.scatter_add(0, indices.reshape(-1), kept.reshape(-1).long())  # [E]
    n_kept = kept.sum()
    unrouted = (~kept.any(dim=1)).sum() if K > 0 else torch.zeros((), dtype=torch.int64, device=indices.device)
    logp = torch.log_softmax(logits.float(), dim=-1)  # [R, E]
    entropy = -(logp.exp() * logp).sum(-1).mean() if logits.shape[0] else logits.new_zeros(())  # []
    w = weights.float()
    wk = torch.where(kept, w, torch.zeros_like(w))  # [T, K]
    inf = torch.tensor(math.inf, device=w.device)  # read-time only: never in a forward
    floats = torch.stack(
        [
            entropy.float(),
            wk.sum() / n_kept.clamp(min=1),
            torch.where(kept, w, inf).amin() if w.numel() else inf,
            torch.where(kept, w, -inf).amax() if w.numel() else -inf,
            wk.sum(1).mean() if T else w.new_zeros(()),
        ]
    ).cpu()
    ints = torch.stack([n_kept, unrouted.to(n_kept.dtype)]).cpu()
    tpe = tpe.cpu()
    n_kept, n_unrouted = int(ints[0]), int(ints[1])
    ent, w_mean, w_min, w_max, w_sum = (float(v) for v in floats)
    if n_kept == 0:
        w_mean = w_min = w_max = math.nan
    if router == "expert_choice":
        assignments, dropped = n_kept, 0
    else:
        assignments = T * K
        dropped = assignments - n_kept
    use = None if capacity is None else tpe.double() / (num_groups * capacity)
    return RoutingStats(
        router=router,
        num_tokens=T,
        num_experts=E,
        k=K,
        num_groups=num_groups,
        capacity=capacity,
        tokens_per_expert=tpe,
        assignments=assignments,
        dropped=dropped,
        unrouted_tokens=n_unrouted,
        capacity_use=use,
        dead_experts=[e for e in range(E) if int(tpe[e]) == 0],
        router_entropy=ent,
        combine_weight_mean=w_mean,
        combine_weight_min=w_min,
        combine_weight_max=w_max,
        combine_weight_sum_mean=w_sum,
    )


def routing_stats(model: nn.Module) -> dict[str, RoutingStats]:
    """``RoutingStats`` of every ``MoEMlp`` of ``model`` that ran a forward, keyed by module
    name (``""`` when ``model`` is the layer itself), in module order.

    ``SoftMoEMlp`` layers are not reported: Soft MoE has no discrete assignments (every token
    reaches every slot), so counts, drops and dead experts do not apply.

    Reading copies a few numbers per layer to the host (a device sync); the forward does not.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"routing_stats: model must be an nn.Module, got {type(model).__name__}")
    out: dict[str, RoutingStats] = {}
    for name, m in model.named_modules():
        last = getattr(m, "_last_routing", None) if isinstance(m, MoEMlp) else None
        if last is None:
            continue
        indices, slot, weights, logits, capacity, num_groups = last
        out[name] = compute_stats(
            indices,
            slot,
            weights,
            logits,
            num_experts=m.num_experts,
            capacity=capacity,
            num_groups=num_groups,
            router=m.router_type,
        )
    return out

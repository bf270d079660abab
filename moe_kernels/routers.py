"""Routers: which experts each token goes to, with what weight, and at what auxiliary cost.

A router turns activations into a ``RouterOutput``: a routing plan (``moe_kernels.Routing``)
plus the combine weights for it. ``MoEMlp`` owns a token router (V-MoE's noisy top-k, or
expert choice); a per-image router (Mobile V-MoE) is called once by the model and its output
handed to several ``MoEMlp`` layers (``layer(x, routing=out)``).

Shape letters: T tokens, D model width, E experts, K choices per token, G groups of S tokens
(T = G*S), C capacity per (group, expert), B images, N tokens per image (T = B*N).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import Tensor, nn

from moe_kernels import losses
from moe_kernels.losses import superclass_loss  # noqa: F401  (its old home; losses.py owns it)
from moe_kernels.ops import Routing, compute_capacity, grouped_mm, make_routing, topk_softmax
from moe_kernels.validation import check_int_in, check_non_negative, check_positive_int, check_positive_number

__all__ = [
    "ExpertChoiceRouter",
    "NoisyTopKRouter",
    "PerImageRouter",
    "RouterOutput",
    "superclass_loss",
]


@dataclasses.dataclass(frozen=True)
class RouterOutput:
    """What a router decided for one call.

    Attributes:
        plan: the routing plan (a ``moe_kernels.Routing``) for the T tokens
            (``plan.num_tokens == T``).
        weights: ``[T, K]`` combine weights (fp32), aligned with ``plan.indices``.
        logits: clean router logits, fp32: ``[T, E]`` for token routers, ``[B, E]`` for the
            per-image router (the input of Mobile V-MoE's super-class cross-entropy).
        aux_loss: scalar fp32, the weighted sum of the router's auxiliary losses (0 if none).
    """

    plan: Routing
    weights: Tensor
    logits: Tensor
    aux_loss: Tensor

    @property
    def routing(self) -> Routing:
        """The plan under its earlier name (``out.routing`` is ``out.plan``)."""
        return self.plan


def _groups(num_tokens: int, group_size: int | None) -> int:
    """S, checked: group_size must divide the tokens of the call."""
    if group_size is None:
        return num_tokens
    check_positive_int("group_size", group_size, allow_none=True)
    if num_tokens % group_size != 0:
        raise ValueError(
            f"group_size={group_size} must divide the number of tokens of the call, got {num_tokens} tokens"
        )
    return group_size


def _router_weight(num_experts: int, in_features: int, device, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(num_experts, in_features, device=device, dtype=dtype))


def _logits(x: Tensor, weight: Tensor, bias: Tensor | None = None, backend: str = "auto") -> Tensor:
    """``x @ weight.T (+ bias)`` in fp32: ``[T, D] -> [T, E]``.

    Routing decisions are made in fp32 whatever the activations' dtype (autocast included): a
    bf16 matmul would flip near-ties from one backend to another. The product is a one-expert
    ``grouped_mm``, whose kernels reduce in a fixed order: the router's weight gradient (a
    reduction over all tokens) is then bitwise the same for any thread count, which a threaded
    BLAS call does not promise.
    """
    dev = x.device.type
    ctx = torch.autocast(dev, enabled=False) if torch.amp.is_autocast_available(dev) else contextlib.nullcontext()
    with ctx:
        # [2] = [0, T]: one group of all tokens. Made on the device (arange, a factory op): a
        # torch.tensor literal would be a host-to-device copy, a sync, on every forward.
        offsets = torch.arange(2, device=x.device) * x.shape[0]
        b = None if bias is None else bias.float()[None]  # [1, E]
        return grouped_mm(x.float(), weight.float()[None], offsets, bias=b, backend=backend)  # [T, E]


class NoisyTopKRouter(nn.Module):
    """V-MoE's router (Riquelme et al. 2021): noisy softmax top-K with capacity per group.

    ``logits = x @ weight.T``; in training ``noisy = logits + (noise_std / E) * N(0, 1)``
    (torch's RNG); softmax over all E, top-K (ties to the lower index), K-major placement per
    group of ``group_size`` tokens, optionally Batch Prioritized (by top-1 weight).

    Auxiliary loss (per group, mean over groups), as V-MoE computes it:
    ``importance_weight * importance(softmax(logits))`` always, ``load_weight * load`` in
    training when there is noise, ``gshard_weight * gshard(p)`` with ``p`` the probabilities
    that route (noisy in training). Losses whose weight is 0 are not computed.

    Parameters: ``weight [E, D]`` (an ``nn.Linear(D, E, bias=False)``'s layout).
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        k: int = 2,
        *,
        noise_std: float = 1.0,
        renormalize: bool = False,
        batch_priority: bool = False,
        importance_weight: float = 0.005,
        load_weight: float = 0.005,
        gshard_weight: float = 0.0,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_sizes(in_features, num_experts)
        check_int_in("k", k, 1, num_experts, f"num_experts={num_experts}")
        check_non_negative("noise_std", noise_std)
        for name, w in (
            ("importance_weight", importance_weight),
            ("load_weight", load_weight),
            ("gshard_weight", gshard_weight),
        ):
            check_non_negative(name, w)
        self.in_features = in_features
        self.num_experts = num_experts
        self.k = k
        self.noise_std = float(noise_std)
        self.renormalize = bool(renormalize)
        self.batch_priority = bool(batch_priority)
        self.importance_weight = float(importance_weight)
        self.load_weight = float(load_weight)
        self.gshard_weight = float(gshard_weight)
        self.backend = backend
        self.weight = _router_weight(num_experts, in_features, device, dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's default

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_experts={self.num_experts}, k={self.k}, "
            f"noise_std={self.noise_std}, renormalize={self.renormalize}, batch_priority={self.batch_priority}"
        )

    def forward(self, x: Tensor, *, capacity_factor: float | None, group_size: int | None = None) -> RouterOutput:
        """Route T tokens.

        Args:
            x: ``[T, D]`` activations.
            capacity_factor: c > 0 (capacity ``compute_capacity(S, E, K, c)`` per group and
                expert), or ``None`` for dropless routing.
            group_size: S, tokens per routing group; must divide T. ``None``: one group.
        """
        T, E, K = x.shape[0], self.num_experts, self.k
        S = _groups(T, group_size)
        capacity_factor = check_positive_number("capacity_factor", capacity_factor, allow_none=True)
        logits = _logits(x, self.weight, backend=getattr(self, "backend", "auto"))  # [T, E]
        noisy = logits
        sigma = self.noise_std / E
        noised = self.training and sigma > 0
        if noised:
            noisy = logits + sigma * torch.randn_like(logits)  # [T, E]
        # Fused gating without renormalisation: BPR ranks tokens by the raw top-1 probability.
        raw, indices = topk_softmax(noisy, K, backend=self.backend)  # [T, K], [T, K]
        weights = raw / raw.sum(dim=-1, keepdim=True) if self.renormalize else raw  # [T, K]
        priority = raw[:, 0].detach() if self.batch_priority else None  # [T]
        C = None if capacity_factor is None else compute_capacity(S, E, K, capacity_factor)
        routing = make_routing(indices, E, C, priority=priority, group_size=S, backend=self.backend)

        G = T // S
        aux = logits.new_zeros(())
        if self.importance_weight > 0:
            aux = aux + self.importance_weight * losses.importance_loss(torch.softmax(logits, -1).view(G, S, E))
        if self.load_weight > 0 and noised:
            aux = aux + self.load_weight * losses.load_loss(logits.view(G, S, E), noisy.view(G, S, E), sigma, K)
        if self.gshard_weight > 0:
            aux = aux + self.gshard_weight * losses.gshard_loss(torch.softmax(noisy, -1).view(G, S, E))
        return RouterOutput(routing, weights, logits, aux)


class ExpertChoiceRouter(nn.Module):
    """Expert-choice routing (Zhou et al. 2022; V-MoE's ``NoisyTopItemsPerExpertRouter``).

    Per group of S tokens, each expert takes its C most probable tokens, C =
    ``min(compute_capacity(S, E, 1, c), S)``; ties go to the lower token index. A token may be
    taken by any number of experts (none included: it keeps only its residual). Training noise
    as in ``NoisyTopKRouter``; no auxiliary loss (the load is balanced by construction).

    The plan has K = E: ``indices[t, e] = e``, ``slot[t, e] = -1`` where expert e did not take
    token t, and ``weights[t, e] = p[t, e]`` (softmax over experts).
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        *,
        noise_std: float = 1.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_sizes(in_features, num_experts)
        check_non_negative("noise_std", noise_std)
        self.in_features = in_features
        self.num_experts = num_experts
        self.noise_std = float(noise_std)
        self.weight = _router_weight(num_experts, in_features, device, dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_experts={self.num_experts}, noise_std={self.noise_std}"

    def forward(self, x: Tensor, *, capacity_factor: float | None, group_size: int | None = None) -> RouterOutput:
        """Route T tokens (see ``NoisyTopKRouter.forward``; ``capacity_factor`` is required)."""
        if capacity_factor is None:
            raise ValueError(
                "capacity_factor must be a number > 0 for the expert_choice router (it has no dropless mode)"
            )
        capacity_factor = check_positive_number("capacity_factor", capacity_factor)
        T, E = x.shape[0], self.num_experts
        S = _groups(T, group_size)
        G = T // S
        C = min(compute_capacity(S, E, 1, capacity_factor), S)
        logits = _logits(x, self.weight, backend=getattr(self, "backend", "auto"))  # [T, E]
        noisy = logits
        if self.training and self.noise_std > 0:
            noisy = logits + (self.noise_std / E) * torch.randn_like(logits)  # [T, E]
        probs = torch.softmax(noisy, dim=-1)  # [T, E]
        routing = expert_choice_routing(probs.detach().view(G, S, E), C)
        return RouterOutput(routing, probs, logits, logits.new_zeros(()))


def expert_choice_routing(probs: Tensor, capacity: int) -> Routing:
    """The plan in which each expert of each group takes its ``capacity`` most probable tokens.

    Built from static-shape gathers and scatters (no host sync), in the padded layout
    ``[E, G*C, D]``: row ``e*G*C + g*C + c`` holds the c-th pick of expert e in group g.

    Args:
        probs: ``[G, S, E]`` routing probabilities.
        capacity: C, 1 <= C <= S.
    """
    G, S, E = probs.shape
    C = capacity
    dev = probs.device
    T = G * S
    order = torch.sort(probs.transpose(1, 2), dim=-1, descending=True, stable=True).indices[..., :C]  # [G, E, C]
    g_idx = torch.arange(G, device=dev).view(G, 1, 1)  # [G, 1, 1]
    pos = g_idx * C + torch.arange(C, device=dev).view(1, 1, C)  # [G, 1, C] slot in the expert
    slot = torch.full((G, E, S), -1, dtype=torch.int64, device=dev)  # [G, E, S]
    slot = slot.scatter(2, order, pos.expand(G, E, C))  # [G, E, S]
    slot = slot.transpose(1, 2).reshape(T, E)  # [T, E]
    indices = torch.arange(E, device=dev).expand(T, E).contiguous()  # [T, E]
    offsets = torch.arange(E + 1, device=dev) * (G * C)  # [E+1]
    return Routing.build(
        indices=indices, slot=slot, offsets=offsets, num_experts=E, capacity=C, num_groups=G, group_size=S,
        num_rows=E * G * C,
    )


class PerImageRouter(nn.Module):
    """Mobile V-MoE's per-image router (Daxberger et al. 2023): one decision per image.

    ``LayerNorm`` of the class token (``router_input="cls"``) or of the mean of the tokens
    (``"mean"``), ``Linear(D, E)``, softmax over E, top-K. Every token of image b then goes to
    image b's K experts, dropless. No noise, no load-balancing loss; the super-class
    cross-entropy (``superclass_loss``) is computed by the model from ``RouterOutput.logits``.

    Call it once on the output of the last dense block and hand the result to every MoE layer:
    ``out = router(x); y = moe_layer(h, routing=out)``.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        k: int = 2,
        *,
        router_input: str = "cls",
        renormalize: bool = False,
        norm_eps: float = 1e-6,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_sizes(in_features, num_experts)
        check_int_in("k", k, 1, num_experts, f"num_experts={num_experts}")
        if router_input not in ("cls", "mean"):
            raise ValueError(f"router_input must be 'cls' or 'mean', got {router_input!r}")
        self.in_features = in_features
        self.num_experts = num_experts
        self.k = k
        self.router_input = router_input
        self.renormalize = bool(renormalize)
        self.backend = backend
        self.norm = nn.LayerNorm(in_features, eps=norm_eps, device=device, dtype=dtype)
        self.proj = nn.Linear(in_features, num_experts, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        self.norm.reset_parameters()
        self.proj.reset_parameters()

    def extra_repr(self) -> str:
        return f"k={self.k}, router_input={self.router_input!r}, renormalize={self.renormalize}"

    def forward(self, x: Tensor) -> RouterOutput:
        """Route every token of each image to the image's K experts.

        Args:
            x: ``[B, N, D]`` tokens, image-major (class token first when ``router_input="cls"``).

        Returns:
            a ``RouterOutput`` for the T = B*N tokens of ``x.reshape(B*N, D)`` (and of every
            later activation of the same shape); ``logits`` is ``[B, E]``.
        """
        if x.dim() != 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape [B, N, in_features={self.in_features}], got {tuple(x.shape)}")
        B, N, _ = x.shape
        feats = x[:, 0] if self.router_input == "cls" else x.mean(dim=1)  # [B, D]
        z = self.norm(feats)  # [B, D]
        logits = _logits(z, self.proj.weight, self.proj.bias, backend=self.backend)  # [B, E]
        weights, indices = topk_softmax(logits, self.k, renormalize=self.renormalize, backend=self.backend)  # [B, K]
        K = self.k
        tok_indices = indices[:, None, :].expand(B, N, K).reshape(B * N, K)  # [T, K]
        tok_weights = weights[:, None, :].expand(B, N, K).reshape(B * N, K)  # [T, K]
        routing = make_routing(tok_indices, self.num_experts, None, backend=self.backend)
        return RouterOutput(routing, tok_weights, logits, logits.new_zeros(()))


def _check_sizes(in_features: int, num_experts: int) -> None:
    check_positive_int("in_features", in_features)
    check_positive_int("num_experts", num_experts)

"""``MoEMlp``: a drop-in Mixture-of-Experts replacement for timm's ``Mlp``.

Shape letters: T tokens, D input width, H expert hidden width, Dout output width, E experts,
K choices per token, G groups of S tokens, C capacity per (group, expert), R buffer rows
(E*G*C with a capacity, T*K dropless), B images, N tokens per image.

Routing groups (capacity holds per group and expert), the first that applies:

1. ``forward(x, group_size=S)``: S tokens per group for this call;
2. ``group_images=n``: for ``x`` of shape ``[B, N, D]`` (``[..., N, D]``: B is the product of
   the leading sizes), groups of ``g`` whole images, ``S = g * N``, where ``g`` is the largest
   divisor of B that is at most n (``images_per_group(B, n)``). A full batch routes in groups
   of n images (V-MoE's 8); a batch of 4, or an epoch's last partial batch of 12 images with
   n=8, routes in groups of 4 or 6 images, so every group has the same size and any batch size
   works. ``models.vmoe`` follows the same rule;
3. ``group_size=S`` (constructor, or assigned later): S tokens, which must divide every call's
   token count;
4. neither: all tokens of the call form one group.

Dtypes: ``x`` must have the parameters' dtype, as for ``nn.Linear`` (a ``TypeError`` names both
otherwise); under ``torch.autocast`` any float ``x`` runs in autocast's dtype with fp32 routing,
which is the supported way to mix fp32 weights with bf16/fp16 activations.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moe_kernels import expert_parallel
from moe_kernels.experts import ExpertMLPs, expert_sizes
from moe_kernels.ops import Routing, combine, dispatch
from moe_kernels.routers import ExpertChoiceRouter, NoisyTopKRouter, RouterOutput
from moe_kernels.validation import check_int_in, check_positive_int, check_positive_number

__all__ = ["MoEMlp", "ROUTERS", "images_per_group"]

#: ``router=`` choices: V-MoE's noisy top-K, expert choice, or none (routing passed to forward).
ROUTERS = ("vmoe", "expert_choice", "external")


def images_per_group(batch: int, group_images: int) -> int:
    """The largest divisor of ``batch`` that is at most ``group_images`` (1 for an empty batch):
    the images per routing group of a ``batch``-image call (module docstring, rule 2)."""
    n = min(group_images, batch)
    return next((d for d in range(n, 0, -1) if batch % d == 0), 1)


def _check_group_size(name: str, v) -> None:
    check_positive_int(f"MoEMlp: {name}", v, allow_none=True)


class MoEMlp(ExpertMLPs):
    """E expert MLPs (``fc1 -> act -> drop -> norm -> fc2 -> drop``) behind a router.

    Accepts timm's ``Mlp`` arguments (``norm_layer`` acts on the hidden width and is shared by
    the experts) plus the MoE keywords of DESIGN.md section 4. Each token goes to its K experts
    (capacity-bounded per group of ``group_size`` tokens, or dropless), and their outputs are
    summed with the router's weights; a dropped assignment contributes nothing.

    Parameters: ``router.weight [E, D]`` (absent with ``router="external"``),
    ``fc1_weight [E, H, D]``, ``fc1_bias [E, H]``, ``fc2_weight [E, Dout, H]``,
    ``fc2_bias [E, Dout]`` (biases absent with ``bias=False``).

    Args:
        in_features: D.
        hidden_features: H (default D).
        out_features: Dout (default D).
        act_layer: activation class (instantiated without arguments), as in timm.
        norm_layer: optional norm class over H, as in timm.
        bias: bool or a pair (fc1, fc2).
        drop: dropout probability or a pair (after the activation, after fc2).
        num_experts: E.
        k: K, experts per token, 1 <= k <= E (ignored by ``router="expert_choice"``).
        capacity_factor: c > 0 in training (capacity ``compute_capacity(S, E, K, c)``), or
            ``None`` for dropless routing.
        eval_capacity_factor: the factor in eval mode (``None``: ``capacity_factor``). Both can
            be reassigned between calls (V-MoE's test-time compute/accuracy trade-off).
        router: ``"vmoe"`` (noisy top-K), ``"expert_choice"``, or ``"external"`` (no own router:
            every call passes ``routing=``, e.g. from a ``PerImageRouter``).
        batch_priority: Batch Prioritized Routing (by each token's top-1 weight).
        noise_std: router noise in training, ``noise_std / E`` standard deviation.
        renormalize: divide each token's K weights by their sum.
        group_size: S, tokens per routing group (image-major, consecutive); must divide the
            tokens of each call. ``None``: all tokens of the call form one group.
        group_images: routing groups of this many whole images, for ``[B, N, D]`` inputs: each
            call routes in groups of ``images_per_group(B, group_images)`` images (the largest
            divisor of B up to it), so any batch size works (V-MoE: 8). Excludes ``group_size``.
        importance_weight, load_weight, gshard_weight: the router's auxiliary loss weights.
        backend: ``auto`` or a name of ``moe_kernels.backends.BACKENDS``, for every op.
        process_group: a ``torch.distributed`` group of W ranks to shard the experts over
            (expert parallelism, ``moe_kernels.distributed``): rank r holds experts
            ``[r*E/W, (r+1)*E/W)``, so the expert parameters are ``[E/W, ...]``; the router is
            replicated. Every rank routes its own tokens as the single-process layer would and
            every rank must call forward (collectives). ``None``: all experts here.
        device, dtype: of the parameters.

    Attributes:
        aux_loss: scalar auxiliary loss of the last forward (already weighted), or ``None``
            before the first one. ``moe_kernels.aux_loss(model)`` sums them over a model.
        skip_empty_slots: with a capacity, on the CPU in eager mode, run the expert GEMMs on
            the kept assignments only (``Routing.packed()``) instead of the ``E*G*C`` rows of
            the padded buffer. Default True (class attribute); the results are the same.
            GPUs and ``torch.compile`` always keep the static padded buffer.
    """

    skip_empty_slots: bool = True
    #: The parameters with one row per expert (sharded under expert parallelism).
    EXPERT_PARAMETERS = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] | None = None,
        bias: bool | tuple[bool, bool] = True,
        drop: float | tuple[float, float] = 0.0,
        *,
        num_experts: int,
        k: int = 2,
        capacity_factor: float | None = 1.05,
        eval_capacity_factor: float | None = None,
        router: str = "vmoe",
        batch_priority: bool = False,
        noise_std: float = 1.0,
        renormalize: bool = False,
        group_size: int | None = None,
        group_images: int | None = None,
        importance_weight: float = 0.005,
        load_weight: float = 0.005,
        gshard_weight: float = 0.0,
        backend: str = "auto",
        process_group=None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        hidden_features, out_features = expert_sizes("MoEMlp", in_features, hidden_features, out_features, num_experts)
        if router not in ROUTERS:
            raise ValueError(f"MoEMlp: router must be one of {ROUTERS}, got {router!r}")
        check_int_in("MoEMlp: k", k, 1, num_experts, f"num_experts={num_experts}")
        _check_group_size("group_size", group_size)
        _check_group_size("group_images", group_images)
        if group_size is not None and group_images is not None:
            raise ValueError(
                f"MoEMlp: give group_size (tokens) or group_images (images), not both; got group_size={group_size},"
                f" group_images={group_images}"
            )
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.out_features = out_features
        self.num_experts = num_experts
        self.k = k
        self.router_type = router
        self.group_size = group_size
        self.group_images = group_images
        self.renormalize = bool(renormalize)
        self.batch_priority = bool(batch_priority)
        self.backend = backend
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.aux_loss: Tensor | None = None
        self._last_routing: tuple | None = None  # see forward; moe_kernels.stats reads it
        self.process_group = process_group
        self.first_expert, self.num_local_experts = (
            (0, num_experts) if process_group is None else expert_parallel.local_experts(num_experts, process_group)
        )

        if router == "vmoe":
            self.router = NoisyTopKRouter(
                in_features,
                num_experts,
                k,
                noise_std=noise_std,
                renormalize=renormalize,
                batch_priority=batch_priority,
                importance_weight=importance_weight,
                load_weight=load_weight,
                gshard_weight=gshard_weight,
                backend=backend,
                **dd,
            )
        elif router == "expert_choice":
            if capacity_factor is None:
                raise ValueError("MoEMlp: capacity_factor must be a number > 0 for router='expert_choice'")
            self.router = ExpertChoiceRouter(in_features, num_experts, noise_std=noise_std, **dd)
        else:
            self.router = None

        self._init_experts(
            self.num_local_experts, in_features, hidden_features, out_features, act_layer, norm_layer, bias, drop, **dd
        )
        self.reset_parameters()

    # Validated on assignment so a bad value fails where it is set, not deep in a forward.
    @property
    def capacity_factor(self) -> float | None:
        return self._capacity_factor

    @capacity_factor.setter
    def capacity_factor(self, value: float | None) -> None:
        self._capacity_factor = check_positive_number("MoEMlp: capacity_factor", value, allow_none=True)

    @property
    def eval_capacity_factor(self) -> float | None:
        return self._eval_capacity_factor

    @eval_capacity_factor.setter
    def eval_capacity_factor(self, value: float | None) -> None:
        self._eval_capacity_factor = check_positive_number("MoEMlp: eval_capacity_factor", value, allow_none=True)

    def current_capacity_factor(self) -> float | None:
        """The factor this mode routes with: ``eval_capacity_factor`` in eval when set."""
        if not self.training and self._eval_capacity_factor is not None:
            return self._eval_capacity_factor
        return self._capacity_factor

    def reset_parameters(self) -> None:
        """Each expert as ``nn.Linear`` initialises itself; the router likewise."""
        if self.router is not None:
            self.router.reset_parameters()
        self.reset_experts()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, hidden_features={self.hidden_features}, "
            f"out_features={self.out_features}, num_experts={self.num_experts}, k={self.k}, "
            f"router={self.router_type!r}, capacity_factor={self.capacity_factor}, "
            f"eval_capacity_factor={self.eval_capacity_factor}, group_size={self.group_size}, "
            + ("" if self.group_images is None else f"group_images={self.group_images}, ")
            + f"batch_priority={self.batch_priority}, renormalize={self.renormalize}, backend={self.backend!r}"
            + (
                ""
                if self.process_group is None
                else f", local_experts=[{self.first_expert}, {self.first_expert + self.num_local_experts})"
            )
        )

    def group_size_for(self, x: Tensor) -> int | None:
        """S for a call on ``x`` (module docstring, rules 2-4; ``None``: one group)."""
        if self.group_images is None:
            return self.group_size
        if x.dim() < 3:
            raise ValueError(
                f"MoEMlp: group_images={self.group_images} needs x of shape [B, N, in_features], got"
                f" {tuple(x.shape)}; pass group_size= (tokens) for flat inputs"
            )
        N = x.shape[-2]
        B = math.prod(x.shape[:-2])
        return images_per_group(B, self.group_images) * N

    def forward(self, x: Tensor, routing: RouterOutput | None = None, *, group_size: int | None = None) -> Tensor:
        """Args:
            x: ``[..., D]`` activations, tokens image-major (``[B, N, D]`` with ``group_images``).
            routing: a plan computed outside (e.g. ``PerImageRouter``) for the ``T = x[..., 0].numel()``
                tokens; required with ``router="external"``, overrides the own router otherwise.
            group_size: S for this call only (tokens per routing group; must divide T), ahead of
                ``group_images`` and the layer's ``group_size``.

        Returns:
            ``[..., Dout]``, dtype of ``x`` (autocast's dtype under autocast).
        """
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"MoEMlp: x must have shape [..., in_features={self.in_features}], got {shape}")
        self._check_dtype(x)
        _check_group_size("group_size", group_size)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [T, D]
        T = x2.shape[0]
        if routing is None:
            if self.router is None:
                raise ValueError("MoEMlp: routing must be given when router='external'")
            if T == 0:
                self.aux_loss = x.new_zeros((), dtype=torch.float32)
                return self._empty(x2, lead)
            S = group_size if group_size is not None else self.group_size_for(x)
            routing = self.router(x2, capacity_factor=self.current_capacity_factor(), group_size=S)
            self.aux_loss = routing.aux_loss
        else:
            if not isinstance(routing, RouterOutput):
                raise TypeError(
                    f"MoEMlp: routing must be a moe_kernels.routers.RouterOutput, got {type(routing).__name__}"
                )
            if routing.plan.num_tokens != T or routing.plan.num_experts != self.num_experts:
                raise ValueError(
                    f"MoEMlp: routing is for {routing.plan.num_tokens} tokens and {routing.plan.num_experts}"
                    f" experts, the call has {T} tokens and the layer {self.num_experts} experts"
                )
            self.aux_loss = x.new_zeros((), dtype=torch.float32)
            if T == 0:
                return self._empty(x2, lead)
        # For moe_kernels.routing_stats: device tensors of this routing, read only on demand.
        p, w = routing.plan, routing.weights
        self._last_routing = (p.indices, p.slot, w.detach(), routing.logits.detach(), p.capacity, p.num_groups)
        out = self.experts(x2, routing.plan, routing.weights)  # [T, Dout]
        return out.reshape(*lead, self.out_features)

    def _empty(self, x2: Tensor, lead: torch.Size) -> Tensor:
        # No tokens: nothing to route (a capacity for 0-token groups is undefined). The output
        # stays attached to x so a backward through an empty batch still runs.
        if self.process_group is not None:
            # The other ranks still exchange rows with this one: join their collectives.
            x2 = self._expert_parallel(x2, None, None)
        return x2.new_zeros(*lead, self.out_features) + x2.sum() * 0

    def experts(self, x: Tensor, routing: Routing, weights: Tensor) -> Tensor:
        """The expert MLPs on a routed batch: dispatch, two grouped matmuls, combine.

        Args:
            x: ``[T, D]``.
            routing: the plan for the T tokens.
            weights: ``[T, K]`` combine weights.

        Returns:
            ``[T, Dout]``, dtype of ``x`` (autocast's dtype under autocast).
        """
        if self.process_group is not None:
            return self._expert_parallel(x, routing, weights)
        if (
            self.skip_empty_slots
            and routing.capacity is not None
            and x.device.type == "cpu"
            and not torch.compiler.is_compiling()
        ):
            # Eager on the CPU a data-dependent size costs nothing: the expert GEMMs skip the
            # empty slots of the capacity buffer (5-10% of its rows at c=1.05).
            routing = routing.packed()
        buf = dispatch(x.to(self._compute_dtype(x)), routing, backend=self.backend)  # [E, G*C, D] or [N, D]
        y = self._expert_mlp(buf.reshape(routing.num_rows, self.in_features), routing.offsets)  # [R, Dout]
        # Empty rows of a padded buffer now hold act(b1) @ W2.T + b2, not zeros; combine reads
        # only the rows of kept assignments, so they never reach the output (nor any gradient).
        return combine(y, routing, weights, backend=self.backend)  # [T, Dout]

    def _expert_parallel(self, x: Tensor, routing: Routing | None, weights: Tensor | None) -> Tensor:
        return expert_parallel.expert_parallel(
            x.to(self._compute_dtype(x)),
            routing,
            weights,
            self._expert_mlp,
            num_experts=self.num_experts,
            out_features=self.out_features,
            process_group=self.process_group,
            backend=self.backend,
        )

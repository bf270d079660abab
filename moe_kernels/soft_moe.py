"""``SoftMoEMlp``: Soft Mixture of Experts (Puigcerver et al., "From Sparse to Soft Mixtures of
Experts", ICLR 2024), vmoe's ``vmoe/projects/soft_moe/router.py`` in PyTorch.

Every slot takes a convex combination of the tokens of its group, each expert's MLP runs on its
P slots, and every token takes a convex combination of all E*P slot outputs. Nothing is dropped
and nothing is sparse, so there is no capacity, no routing plan and no auxiliary loss.

Shape letters: T tokens, D input width, H expert hidden width, Dout output width, E experts,
P slots per expert, M = E*P slots, G groups of S tokens (T = G*S), B images, N tokens per image.

Groups (the softmax over tokens runs within one group, so groups never mix):

1. ``group_size=S``: consecutive runs of S tokens of the flattened input (S must divide T);
2. otherwise ``x`` of shape ``[B, N, D]`` (``[..., N, D]``: B is the product of the leading
   sizes): one group per image, S = N;
3. otherwise ``x`` of shape ``[T, D]``: one group of all T tokens.

Math (DESIGN.md section 8), in fp32 whatever the activations' dtype (autocast included)::

    logits[g, s, m]  = scale * <x[g, s] / sqrt(sum x^2 + 1e-6), mu[:, m] / sqrt(sum_D mu^2 + 1e-6)>
    logits          += noise_std * N(0, 1)                      (training only, noise_std > 0)
    dispatch[g, :, m] = softmax over the S tokens of group g
    combine[g, s, :]  = softmax over the M slots
    slots[g, m]  = sum_s dispatch[g, s, m] * x[g, s]            (un-normalised x)
    out[g, m]    = expert_{m // P}(slots[g, m])                 (the grouped GEMM)
    y[g, s]      = sum_m combine[g, s, m] * out[g, m]

In models: ``mk.moeify(model, layers, num_experts=E, router="soft", num_slots=P)`` swaps the
MLPs of a timm ViT (or of ``models.vit.VisionTransformer``, e.g. a dense
``models.vmoe.create_model(variant, moe_layers=None)``) for Soft MoE layers. Those models keep
their class token and class-token head; ``models.vmoe.create_soft_moe`` builds vmoe's own
Soft MoE layout (no class token, global average pooling; docs/soft_moe.md).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from moe_kernels.experts import ExpertMLPs, expert_sizes
from moe_kernels.routers import _logits
from moe_kernels.validation import check_positive_int

__all__ = ["SoftMoEMlp", "SoftRouter", "num_slots_for"]

_EPS = 1e-6  # vmoe's normalize(): x * rsqrt(sum(x^2) + eps)


def _check_int(name: str, v, *, allow_none: bool = False) -> None:
    check_positive_int(f"SoftMoEMlp: {name}", v, allow_none=allow_none)


def num_slots_for(group_size: int, num_experts: int, capacity_factor: float) -> int:
    """P = ``int(round(S * c / E))`` (Python's round, as vmoe); a ``ValueError`` below 1.

    Args:
        group_size: S, tokens per group.
        num_experts: E.
        capacity_factor: c > 0 (total slots E*P are about c*S).
    """
    p = int(round(group_size * capacity_factor / num_experts))
    if p < 1:
        raise ValueError(
            f"SoftMoEMlp: num_slots = round(group_size * capacity_factor / num_experts) = round({group_size} *"
            f" {capacity_factor} / {num_experts}) = {p} is below 1; raise capacity_factor or give num_slots"
        )
    return p


def _no_autocast(device_type: str):
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class SoftRouter(nn.Module):
    """Soft MoE's router: the dispatch and combine weights of each group.

    Parameters: ``mu [D, E, P]`` (LeCun-normal, as vmoe's ``mu_init``) and ``scale`` (0-dim,
    initialised to 1).

    Args:
        in_features: D.
        num_experts: E.
        num_slots: P, slots per expert.
        noise_std: standard deviation of the Gaussian noise added to the logits in training.
        backend: backend of the logits' matmul (a one-expert ``grouped_mm``).
        device, dtype: of the parameters.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        num_slots: int,
        *,
        noise_std: float = 0.0,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.num_experts = num_experts
        self.num_slots = num_slots
        self.noise_std = float(noise_std)
        self.backend = backend
        self.mu = nn.Parameter(torch.empty(in_features, num_experts, num_slots, device=device, dtype=dtype))
        self.scale = nn.Parameter(torch.empty((), device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # jax's lecun_normal on (D, E, P): fan_in = D*E (in_axis=-2, receptive field D), a normal
        # truncated at 2 std, rescaled so the truncated distribution keeps std sqrt(1/fan_in).
        # Sampled as jax does, by the inverse CDF of a uniform: no rejection loop, so no
        # data-dependent host check (nn.init.trunc_normal_ has one) on fake or meta tensors.
        std = math.sqrt(1.0 / (self.in_features * self.num_experts)) / 0.87962566103423978
        lo = math.erf(-2.0 / math.sqrt(2.0))  # 2*Phi(-2) - 1
        with torch.no_grad():
            self.mu.uniform_(lo, -lo).erfinv_().mul_(std * math.sqrt(2.0)).clamp_(-2 * std, 2 * std)
        nn.init.ones_(self.scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_experts={self.num_experts}, num_slots={self.num_slots}"

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Args:
            x: ``[G, S, D]`` tokens by group, any float dtype.

        Returns:
            ``(dispatch, combine)``, both ``[G, S, M]`` fp32: ``dispatch`` sums to 1 over S,
            ``combine`` over M.
        """
        G, S, D = x.shape
        M = self.num_experts * self.num_slots
        with _no_autocast(x.device.type):
            xf = x.float()  # [G, S, D]
            xn = xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + _EPS)  # [G, S, D]
            mu = self.mu.float()  # [D, E, P]
            mun = mu * torch.rsqrt(mu.square().sum(0, keepdim=True) + _EPS)  # [D, E, P]
            # Scale the logits rather than pick the smaller operand as vmoe does: the same
            # value in exact arithmetic, one multiply on [T, M] more.
            logits = _logits(xn.reshape(G * S, D), mun.reshape(D, M).T, backend=self.backend)  # [T, M]
            logits = (logits * self.scale.float()).view(G, S, M)  # [G, S, M]
            if self.training and self.noise_std > 0:
                logits = logits + self.noise_std * torch.randn_like(logits)  # [G, S, M]
            dispatch = torch.softmax(logits, dim=1)  # [G, S, M] over tokens
            combine = torch.softmax(logits, dim=2)  # [G, S, M] over slots
        return dispatch, combine


class SoftMoEMlp(ExpertMLPs):
    """Soft MoE in place of timm's ``Mlp`` (module docstring for groups and math).

    Experts are ``fc1 -> act -> drop -> norm -> fc2 -> drop`` as in ``MoEMlp``; ``norm_layer``
    acts on the hidden width and is shared by the experts.

    Parameters: ``router.mu [D, E, P]``, ``router.scale`` (0-dim), ``fc1_weight [E, H, D]``,
    ``fc1_bias [E, H]``, ``fc2_weight [E, Dout, H]``, ``fc2_bias [E, Dout]`` (biases absent
    with ``bias=False``).

    Args:
        in_features: D.
        hidden_features: H (default D).
        out_features: Dout (default D).
        act_layer: activation class (instantiated without arguments), as in timm.
        norm_layer: optional norm class over H, as in timm.
        bias: bool or a pair (fc1, fc2).
        drop: dropout probability or a pair (after the activation, after fc2).
        num_experts: E.
        num_slots: P, slots per expert. ``None``: ``int(round(group_size * capacity_factor /
            num_experts))``, which needs ``group_size``.
        capacity_factor: c > 0, used only to derive P from ``group_size``.
        group_size: S, consecutive tokens per group (must divide every call's tokens).
            ``None``: one group per image of a ``[B, N, D]`` input, one group for ``[T, D]``.
        noise_std: standard deviation of the logits' Gaussian noise in training (vmoe: not
            divided by E, unlike the top-K router's).
        backend: ``auto`` or a name of ``moe_kernels.backends.BACKENDS``, for every op.
        device, dtype: of the parameters.

    Attributes:
        aux_loss: a zero fp32 scalar after each forward (``None`` before), so
            ``moe_kernels.aux_loss(model)`` counts the layer.
        num_slots: P.
    """

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
        num_slots: int | None = None,
        capacity_factor: float = 1.0,
        group_size: int | None = None,
        noise_std: float = 0.0,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        hidden_features, out_features = expert_sizes(
            "SoftMoEMlp", in_features, hidden_features, out_features, num_experts
        )
        _check_int("num_slots", num_slots, allow_none=True)
        _check_int("group_size", group_size, allow_none=True)
        c_ok = isinstance(capacity_factor, (int, float)) and not isinstance(capacity_factor, bool)
        if not (c_ok and capacity_factor > 0):  # NaN fails too
            raise ValueError(f"SoftMoEMlp: capacity_factor must be a number > 0, got {capacity_factor!r}")
        if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)) or not noise_std >= 0:
            raise ValueError(f"SoftMoEMlp: noise_std must be a number >= 0, got {noise_std!r}")
        if num_slots is None:
            if group_size is None:
                raise ValueError(
                    "SoftMoEMlp: num_slots cannot be computed: give num_slots (slots per expert), or group_size"
                    " (tokens per group) to derive it as round(group_size * capacity_factor / num_experts)"
                )
            num_slots = num_slots_for(group_size, num_experts, capacity_factor)
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.out_features = out_features
        self.num_experts = num_experts
        self.num_slots = num_slots
        self.capacity_factor = float(capacity_factor)
        self.group_size = group_size
        self.backend = backend
        self.aux_loss: Tensor | None = None

        self.router = SoftRouter(in_features, num_experts, num_slots, noise_std=noise_std, backend=backend, **dd)
        self._init_experts(num_experts, in_features, hidden_features, out_features, act_layer, norm_layer, bias, drop,
                           **dd)  # fmt: skip
        self.reset_parameters()

    @property
    def noise_std(self) -> float:
        return self.router.noise_std

    def reset_parameters(self) -> None:
        """Each expert as ``nn.Linear`` initialises itself; the router as vmoe's."""
        self.router.reset_parameters()
        self.reset_experts()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, hidden_features={self.hidden_features}, "
            f"out_features={self.out_features}, num_experts={self.num_experts}, num_slots={self.num_slots}, "
            f"group_size={self.group_size}, noise_std={self.noise_std}, backend={self.backend!r}"
        )

    def _groups(self, x: Tensor) -> int:
        """S for a call on ``x`` (module docstring)."""
        T = x[..., 0].numel()
        if self.group_size is not None:
            if T % self.group_size != 0:
                raise ValueError(
                    f"SoftMoEMlp: group_size={self.group_size} must divide the number of tokens of the call,"
                    f" got {T} tokens (x of shape {tuple(x.shape)})"
                )
            return self.group_size
        return x.shape[-2] if x.dim() >= 3 else T

    def forward(self, x: Tensor) -> Tensor:
        """Args:
            x: ``[B, N, D]`` (one group per image), ``[T, D]`` (one group), or any ``[..., D]``
                with ``group_size``.

        Returns:
            ``[..., Dout]``, dtype of ``x`` (autocast's dtype under autocast).
        """
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"SoftMoEMlp: x must have shape [..., in_features={self.in_features}], got {shape}")
        self._check_dtype(x)
        lead = x.shape[:-1]
        T = x[..., 0].numel()
        self.aux_loss = x.new_zeros((), dtype=torch.float32)
        if T == 0:
            # Nothing to mix; the output stays attached to x so a backward still runs.
            x2 = x.reshape(0, self.in_features)
            return x2.new_zeros(*lead, self.out_features) + x2.sum() * 0
        S = self._groups(x)
        G = T // S
        E, P, D = self.num_experts, self.num_slots, self.in_features
        M = E * P
        dt = self._compute_dtype(x)
        xg = x.reshape(G, S, D)  # [G, S, D]
        dispatch, combine = self.router(xg)  # [G, S, M] fp32 each
        # Slot inputs from the un-normalised tokens, in the matmuls' dtype (as vmoe's bf16
        # dispatcher; fp32 stays fp32).
        slots = torch.bmm(dispatch.transpose(1, 2).to(dt), xg.to(dt))  # [G, M, D]
        # Expert-major rows: expert e owns the contiguous rows [e*G*P, (e+1)*G*P).
        rows = slots.view(G, E, P, D).transpose(0, 1).reshape(E * G * P, D)  # [E*G*P, D]
        # Made on the device (arange, a factory op): a host literal would be a copy, a sync.
        offsets = torch.arange(E + 1, device=x.device) * (G * P)  # [E+1]
        out = self._expert_mlp(rows, offsets)  # [E*G*P, Dout]
        out = out.view(E, G, P, self.out_features).transpose(0, 1).reshape(G, M, self.out_features)  # [G, M, Dout]
        y = torch.bmm(combine.to(out.dtype), out)  # [G, S, Dout]
        return y.reshape(*lead, self.out_features)

"""The expert MLPs that ``MoEMlp`` and ``SoftMoEMlp`` share: E copies of timm's ``Mlp``
(``fc1 -> act -> drop -> norm -> fc2 -> drop``) held as stacked parameters and run on rows
grouped by expert with the grouped GEMM (``ops.gelu_mlp`` when the activation is a plain GELU).

Parameters: ``fc1_weight [E, H, D]``, ``fc1_bias [E, H]``, ``fc2_weight [E, Dout, H]``,
``fc2_bias [E, Dout]`` (biases absent with ``bias=False``); ``norm`` acts on H and is shared by
the experts.

Shape letters: R rows, D input width, H hidden width, Dout output width, E experts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moe_kernels.ops import gelu_mlp, grouped_mm
from moe_kernels.validation import check_positive_int

__all__ = ["ExpertMLPs", "expert_sizes", "pair"]


def pair(v):
    """timm's ``to_2tuple`` for ``bias``/``drop``: a pair stays, a scalar is doubled."""
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def expert_sizes(
    owner: str, in_features: int, hidden_features: int | None, out_features: int | None, num_experts: int
) -> tuple[int, int]:
    """``(hidden_features, out_features)`` with timm's defaults (D), every size checked to be an
    int >= 1 (errors name ``owner`` and the argument)."""
    out_features = out_features or in_features
    hidden_features = hidden_features or in_features
    for name, v in (
        ("in_features", in_features),
        ("hidden_features", hidden_features),
        ("out_features", out_features),
        ("num_experts", num_experts),
    ):
        check_positive_int(f"{owner}: {name}", v)
    return hidden_features, out_features


class ExpertMLPs(nn.Module):
    """Base of the MoE layers: owns the experts' parameters and runs them (``_expert_mlp``).

    A subclass calls ``_init_experts`` in its ``__init__`` and sets ``self.backend``.
    """

    backend: str = "auto"

    def _init_experts(
        self,
        num_experts: int,
        in_features: int,
        hidden_features: int,
        out_features: int,
        act_layer: type[nn.Module],
        norm_layer: type[nn.Module] | None,
        bias,
        drop,
        device=None,
        dtype=None,
    ) -> None:
        dd = {"device": device, "dtype": dtype}
        E, H, D, Dout = num_experts, hidden_features, in_features, out_features
        bias1, bias2 = pair(bias)
        drop1, drop2 = pair(drop)
        self.fc1_weight = nn.Parameter(torch.empty(E, H, D, **dd))
        self.fc1_bias = nn.Parameter(torch.empty(E, H, **dd)) if bias1 else None
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop1)
        self.norm = norm_layer(H, **dd) if norm_layer is not None else nn.Identity()
        self.fc2_weight = nn.Parameter(torch.empty(E, Dout, H, **dd))
        self.fc2_bias = nn.Parameter(torch.empty(E, Dout, **dd)) if bias2 else None
        self.drop2 = nn.Dropout(drop2)

    def reset_experts(self) -> None:
        """Each expert as ``nn.Linear`` initialises itself: uniform(+-1/sqrt(fan_in))."""
        for w, b in ((self.fc1_weight, self.fc1_bias), (self.fc2_weight, self.fc2_bias)):
            bound = 1.0 / math.sqrt(w.shape[2])
            nn.init.uniform_(w, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)
        if hasattr(self.norm, "reset_parameters"):
            self.norm.reset_parameters()

    def _check_dtype(self, x: Tensor) -> None:
        # As nn.Linear: an fp16/bf16/fp64 x meeting fp32 weights is an error, not a silent cast;
        # autocast is the supported way to mix (x and weights then run in autocast's dtype).
        w = self.fc1_weight
        dev = x.device.type
        if x.dtype == w.dtype or (torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)):
            return
        raise TypeError(
            f"{type(self).__name__}: x has dtype {x.dtype} but the layer's parameters have dtype {w.dtype}; convert"
            f" one (x.to({w.dtype}) or layer.to({x.dtype})), or run under torch.autocast to mix them"
        )

    @staticmethod
    def _compute_dtype(x: Tensor) -> torch.dtype:
        # Custom ops are not autocast-aware: do autocast's job (matmuls in its dtype) by hand,
        # so fp32 master weights meet bf16/fp16 activations in one dtype.
        dev = x.device.type
        if not torch.amp.is_autocast_available(dev):
            return x.dtype  # e.g. meta tensors
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype

    def _expert_mlp(self, rows: Tensor, offsets: Tensor) -> Tensor:
        """The experts on ``rows [R, D]`` grouped by expert (``offsets [E+1]``; local experts
        under expert parallelism) -> ``[R, Dout]``."""
        be, dt = self.backend, rows.dtype
        w1, w2 = self.fc1_weight.to(dt), self.fc2_weight.to(dt)
        b1 = None if self.fc1_bias is None else self.fc1_bias.to(dt)
        b2 = None if self.fc2_bias is None else self.fc2_bias.to(dt)
        # Biases ride in the grouped GEMM (fused into each expert's GEMM where the backend can).
        if self._plain_gelu():
            # Only GELU's input is kept for the backward (one [R, H] activation less); on Triton
            # GELU, its derivative and the bias gradients run inside the GEMMs (ops.gelu_mlp).
            y = gelu_mlp(rows, w1, w2, offsets, bias1=b1, bias2=b2, approximate=self.act.approximate, backend=be)
            return self.drop2(y)  # [R, Dout]
        h = grouped_mm(rows, w1, offsets, bias=b1, backend=be)  # [R, H]
        h = self.norm(self.drop1(self.act(h))).to(dt)  # [R, H]
        return self.drop2(grouped_mm(h, w2, offsets, bias=b2, backend=be))  # [R, Dout]

    def _plain_gelu(self) -> bool:
        """Whether ``norm(drop1(act(h)))`` is just ``gelu(h)``."""
        drop_off = not self.training or self.drop1.p == 0
        return type(self.act) is nn.GELU and drop_off and type(self.norm) is nn.Identity

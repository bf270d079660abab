"""Parameters (total and active) and FLOPs per image, with FLOP formulas for our custom ops.

``torch.utils.flop_counter.FlopCounterMode`` counts matmuls and convolutions (2 FLOPs per
multiply-add) and ignores element-wise work. Importing this module registers formulas for the
``moe_kernels`` ops so MoE layers are counted the same way:

- ``grouped_mm`` and ``gelu_grouped_mm`` ``x [M, Din] @ w[e].T -> [M, N]``: ``2*M*N*Din``. M is
  every row of the buffer, so a capacity-bounded layer is charged for its padded ``E*G*C``
  slots, as V-MoE counts them and as GPUs compute them (``count_flops`` turns the CPU's
  ``MoEMlp.skip_empty_slots`` off, so the count does not depend on the device).
- ``grouped_mm_weight_grad`` (backward): ``2*M*N*Din`` likewise.
- ``gelu_mlp`` (the fused expert MLP of backends with fused epilogues): both GEMMs,
  ``2*M*H*D + 2*M*Dout*H``; its backward ops ``grouped_mm_act_grad`` and
  ``grouped_mm_weight_grad_fused`` as the GEMMs they replace (bias sums: 0).
- ``dispatch``, ``combine``, ``combine_weights_grad``, ``topk_softmax``, ``make_routing``: 0
  (gathers, scatters and weighted sums: element-wise work, like GELU or LayerNorm).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

import moe_kernels  # noqa: F401  (registers the torch.ops.moe_kernels ops)
from moe_kernels import MoEMlp

__all__ = ["count_flops", "param_counts"]


def _register(target, formula) -> None:
    # The registry is global and rejects duplicates; a re-import (e.g. importlib.reload) is fine.
    if target not in flop_registry:
        register_flop_formula(target)(formula)


def _grouped_mm_flop(x_shape, w_shape, offsets_shape, *args, out_shape=None, **kwargs) -> int:
    M, Din = x_shape
    return 2 * M * w_shape[1] * Din


def _grouped_mm_weight_grad_flop(x_shape, grad_shape, offsets_shape, *args, out_shape=None, **kwargs) -> int:
    M, Din = x_shape
    return 2 * M * grad_shape[1] * Din


def _gelu_mlp_flop(x_shape, w1_shape, b1_shape, w2_shape, *args, out_shape=None, **kwargs) -> int:
    # The fused expert MLP (backends with fused epilogues): fc1 [M, D] -> [M, H], fc2 -> [M, Dout].
    M, D = x_shape
    return 2 * M * w1_shape[1] * D + 2 * M * w2_shape[1] * w2_shape[2]


def _act_grad_flop(grad_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    # grad [M, N] times each expert's w [H, N] (passed as [E, H, N]) -> [M, H]: 2*M*N*H.
    return 2 * grad_shape[0] * grad_shape[1] * w_shape[1]


def _weight_grad_fused_flop(x_shape, grad_shape, offsets_shape, approximate, need_dw, *args, **kwargs) -> int:
    return 2 * x_shape[0] * grad_shape[1] * x_shape[1] if need_dw else 0


def _zero_flop(*args, **kwargs) -> int:
    return 0


_ops = torch.ops.moe_kernels
_register(_ops.grouped_mm, _grouped_mm_flop)
_register(_ops.gelu_grouped_mm, _grouped_mm_flop)
_register(_ops.grouped_mm_weight_grad, _grouped_mm_weight_grad_flop)
for _name, _formula in (
    ("gelu_mlp", _gelu_mlp_flop),
    ("grouped_mm_act_grad", _act_grad_flop),
    ("grouped_mm_weight_grad_fused", _weight_grad_fused_flop),
):
    if hasattr(_ops, _name):
        _register(getattr(_ops, _name), _formula)
for _name in ("dispatch", "combine", "combine_weights_grad", "topk_softmax", "topk_softmax_backward", "make_routing"):
    if hasattr(_ops, _name):
        _register(getattr(_ops, _name), _zero_flop)


def param_counts(model: nn.Module) -> tuple[int, int]:
    """``(total, active)`` parameters. Active counts, in every ``MoEMlp``, K of its E experts
    (the parameters one token, or one image for Mobile V-MoE, goes through), and everything
    else in full."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for m in model.modules():
        if isinstance(m, MoEMlp):
            expert = sum(p.numel() for p in (m.fc1_weight, m.fc1_bias, m.fc2_weight, m.fc2_bias) if p is not None)
            inactive += expert * (m.num_experts - m.k) // m.num_experts
    return total, total - inactive


@torch.no_grad()
def count_flops(model: nn.Module, images: torch.Tensor) -> float:
    """Forward FLOPs per image, in eval mode, for the batch ``images [B, C, I, I]``.

    With capacity-bounded routing the count depends on the group size: pass a batch of
    ``group_images`` images to charge what a full routing group costs.
    """
    was_training = model.training
    # The padded count, on every device: packing off for the call, each layer's setting restored.
    saved = {m: m.__dict__.get("skip_empty_slots") for m in model.modules() if isinstance(m, MoEMlp)}
    model.eval()
    try:
        for m in saved:
            m.skip_empty_slots = False
        counter = FlopCounterMode(display=False)
        with counter:
            model(images)
    finally:
        model.train(was_training)
        for m, value in saved.items():
            if value is None:
                del m.skip_empty_slots  # back to the class default
            else:
                m.skip_empty_slots = value
    return counter.get_total_flops() / images.shape[0]

"""``moeify``: turn the MLPs of chosen transformer blocks into ``MoEMlp`` layers, and
``aux_loss``: the sum of the auxiliary losses of a model's MoE layers."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moe_kernels.layers import MoEMlp
from moe_kernels.soft_moe import SoftMoEMlp

__all__ = ["aux_loss", "find_blocks", "moe_layer_indices", "moeify"]

_SPEC = re.compile(r"^(every|last)-([1-9][0-9]*)$")
# The moeify keywords SoftMoEMlp takes (besides router="soft").
_SOFT_KWARGS = {"num_slots", "capacity_factor", "group_size", "noise_std", "backend"}


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks, in order: every submodule with an ``.mlp`` that has
    ``fc1`` and ``fc2`` (or is already an ``MoEMlp`` or ``SoftMoEMlp``). For a timm
    ``VisionTransformer`` this is ``model.blocks``."""
    blocks = []
    for module in model.modules():
        mlp = getattr(module, "mlp", None)
        if isinstance(mlp, (MoEMlp, SoftMoEMlp)) or (
            isinstance(mlp, nn.Module)
            and isinstance(getattr(mlp, "fc1", None), nn.Module)
            and isinstance(getattr(mlp, "fc2", None), nn.Module)
        ):
            blocks.append(module)
    return blocks


def moe_layer_indices(layers: str | Sequence[int], num_blocks: int) -> list[int]:
    """Block indices of a layer spec, V-MoE's rules (DESIGN.md section 6).

    ``"every-n"``: ``range(n-1, L, n)``; ``"last-n"``: ``range(1, L, 2)[-n:]`` (the last n
    odd blocks); a sequence of indices (negative ones count from the end).
    """
    L = num_blocks
    if isinstance(layers, str):
        m = _SPEC.match(layers.strip())
        if m is None:
            raise ValueError(
                f"layers must be 'every-n', 'last-n' (n >= 1) or a sequence of block indices, got {layers!r}"
            )
        kind, n = m.group(1), int(m.group(2))
        out = list(range(n - 1, L, n)) if kind == "every" else list(range(1, L, 2))[-n:]
        if kind == "last" and n > len(range(1, L, 2)):
            raise ValueError(
                f"layers={layers!r} asks for {n} odd blocks, the model has {len(range(1, L, 2))} ({L} blocks)"
            )
        return out
    if isinstance(layers, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        out = []
        for i in layers:
            if not -L <= i < L:
                raise ValueError(f"layers: block index {i} is out of range for a model with {L} blocks")
            out.append(i % L)
        if len(set(out)) != len(out):
            raise ValueError(f"layers: repeated block index in {list(layers)}")
        return sorted(out)
    raise ValueError(f"layers must be 'every-n', 'last-n' or a sequence of block indices, got {layers!r}")


@torch.no_grad()
def _upcycle(mlp: nn.Module, num_experts: int, kw: dict) -> MoEMlp | SoftMoEMlp:
    fc1, fc2 = mlp.fc1, mlp.fc2
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)):
        raise TypeError(
            f"moeify: the MLP's fc1 and fc2 must be nn.Linear, got {type(fc1).__name__}, {type(fc2).__name__}"
        )
    if fc2.in_features != fc1.out_features or type(mlp).__name__ in ("GluMlp", "SwiGLU"):
        raise TypeError(
            f"moeify: {type(mlp).__name__} is not a plain fc1 -> act -> fc2 MLP (gated MLPs are not supported)"
        )
    w = fc1.weight
    kw = dict(kw)
    cls = SoftMoEMlp if kw.get("router") == "soft" else MoEMlp
    if cls is SoftMoEMlp:
        kw.pop("router")
        unknown = sorted(set(kw) - _SOFT_KWARGS)
        if unknown:
            raise ValueError(f"moeify: router='soft' takes {sorted(_SOFT_KWARGS)}, not {unknown}")
    layer = cls(
        fc1.in_features,
        fc1.out_features,
        fc2.out_features,
        bias=(fc1.bias is not None, fc2.bias is not None),
        num_experts=num_experts,
        device=w.device,
        dtype=w.dtype,
        **kw,
    )
    # The dense MLP's own modules (activation with its arguments, dropouts, hidden norm).
    for name in ("act", "drop1", "norm", "drop2"):
        if isinstance(getattr(mlp, name, None), nn.Module):
            setattr(layer, name, copy.deepcopy(getattr(mlp, name)))
    layer.fc1_weight.copy_(fc1.weight.expand_as(layer.fc1_weight))
    layer.fc2_weight.copy_(fc2.weight.expand_as(layer.fc2_weight))
    if fc1.bias is not None:
        layer.fc1_bias.copy_(fc1.bias.expand_as(layer.fc1_bias))
    if fc2.bias is not None:
        layer.fc2_bias.copy_(fc2.bias.expand_as(layer.fc2_bias))
    layer.train(mlp.training)
    return layer


def moeify(model: nn.Module, layers: str | Sequence[int] = "every-2", *, num_experts: int, **kwargs) -> nn.Module:
    """Replace the MLP of the chosen blocks with an ``MoEMlp`` whose experts are copies of it.

    Works on a timm ``VisionTransformer`` and on any model whose blocks have an ``.mlp`` with
    ``fc1``/``fc2`` ``nn.Linear`` layers (see ``find_blocks``). The activation, dropouts and
    hidden norm of the dense MLP are kept; every expert starts as the dense MLP (sparse
    upcycling), the router from its default initialisation.

    Args:
        model: the model, changed in place.
        layers: ``"every-n"`` (blocks ``n-1, 2n-1, ...``), ``"last-n"`` (the last n odd blocks,
            V-MoE's rule) or a sequence of block indices.
        num_experts: E.
        **kwargs: ``MoEMlp`` keywords (``k``, ``capacity_factor``, ``group_images`` for routing
            groups of whole images that follow the batch size, ``group_size``, ...);
            ``process_group=`` shards the experts over its ranks (each layer keeps its rank's
            copies; load a single-process checkpoint with ``distributed.load_sharded``).
            ``router="soft"`` builds ``SoftMoEMlp`` layers instead, which take only
            ``num_slots``, ``capacity_factor``, ``group_size``, ``noise_std`` and ``backend``
            (one group per image of a ``[B, N, D]`` input unless ``group_size`` is given).

    Returns:
        ``model``.
    """
    blocks = find_blocks(model)
    if not blocks:
        raise ValueError(f"moeify: {type(model).__name__} has no blocks with an .mlp that has fc1 and fc2")
    for i in moe_layer_indices(layers, len(blocks)):
        block = blocks[i]
        if isinstance(block.mlp, (MoEMlp, SoftMoEMlp)):
            raise ValueError(f"moeify: block {i} already has an {type(block.mlp).__name__}")
        block.mlp = _upcycle(block.mlp, num_experts, kwargs)
    return model


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of the auxiliary losses of every ``MoEMlp``'s (and ``SoftMoEMlp``'s: zero) last
    forward (a 0-dim fp32 tensor; 0 when there is none). Add it to the task loss:
    ``loss = ce + mk.aux_loss(model)``."""
    total: Tensor | None = None
    for m in model.modules():
        if isinstance(m, (MoEMlp, SoftMoEMlp)) and m.aux_loss is not None:
            total = m.aux_loss if total is None else total + m.aux_loss
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=None if p is None else p.device)
    return total

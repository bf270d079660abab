"""Expert parallelism over ``torch.distributed``, above the layer: checkpoints and gradients of
models whose ``MoEMlp`` layers shard their experts (``MoEMlp(process_group=...)``).

The exchange itself (``expert_parallel``, ``all_to_all``, ``local_experts``) lives below the
layer in ``moe_kernels.expert_parallel`` and is re-exported here, so ``mk.distributed.*`` names
everything expert parallelism offers.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe_kernels.expert_parallel import all_to_all, expert_parallel, local_experts  # noqa: F401
from moe_kernels.layers import MoEMlp

__all__ = [
    "all_to_all",
    "average_gradients",
    "expert_parallel",
    "gather_state_dict",
    "load_sharded",
    "local_experts",
    "shard_state_dict",
]

# --- checkpoints and gradients of sharded models --------------------------------------------


def _sharded_layers(model: nn.Module):
    for name, m in model.named_modules():
        if isinstance(m, MoEMlp) and m.process_group is not None:
            yield (name + "." if name else ""), m


def shard_state_dict(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """A single-process checkpoint cut to this rank's share of ``model``'s sharded layers.

    The expert parameters (``fc1_weight``, ``fc1_bias``, ``fc2_weight``, ``fc2_bias``) of every
    ``MoEMlp`` of ``model`` built with ``process_group=`` keep the rows of the rank's experts;
    everything else is returned as is. ``model.load_state_dict(shard_state_dict(sd, model))``
    is ``load_sharded(model, sd)``.
    """
    out = dict(state_dict)
    for prefix, m in _sharded_layers(model):
        for pname in MoEMlp.EXPERT_PARAMETERS:
            key = prefix + pname
            if key not in out or getattr(m, pname) is None:
                continue
            full = out[key]
            if full.shape[0] != m.num_experts:
                raise ValueError(
                    f"shard_state_dict: {key} has {full.shape[0]} experts, the layer has num_experts={m.num_experts}"
                    " (is the checkpoint already sharded?)"
                )
            out[key] = full[m.first_expert : m.first_expert + m.num_local_experts]
    return out


def load_sharded(model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True):
    """Load a single-process checkpoint (all experts) into a model with sharded ``MoEMlp`` layers.

    Returns what ``model.load_state_dict`` returns.
    """
    return model.load_state_dict(shard_state_dict(state_dict, model), strict=strict)


@torch.no_grad()
def gather_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The single-process checkpoint of a sharded model: every rank's experts concatenated.

    A collective (every rank of every sharded layer's group calls it); each rank gets the full
    state dict, so rank 0 can save it for a single-process model.
    """
    sd = dict(model.state_dict())
    for prefix, m in _sharded_layers(model):
        W = dist.get_world_size(m.process_group)
        for pname in MoEMlp.EXPERT_PARAMETERS:
            p = getattr(m, pname)
            if p is None:
                continue
            parts = [torch.empty_like(p) for _ in range(W)]
            dist.all_gather(parts, p.detach().contiguous(), group=m.process_group)
            sd[prefix + pname] = torch.cat(parts, 0)
    return sd


@torch.no_grad()
def average_gradients(model: nn.Module, process_group=None) -> None:
    """Make the gradients of a data- and expert-parallel model those of the global mean loss.

    Each rank backpropagates the mean loss of its own batch. A replicated parameter's gradient
    is then that of its rank's batch only: it is all-reduced and divided by W. An expert
    parameter's gradient already sums every rank's tokens (the exchanges carry them back), i.e.
    W times the gradient of the mean over ranks: it is divided by W. (DDP would all-reduce the
    expert parameters too, which is wrong: they differ from rank to rank.) It assumes the
    experts are sharded over the same group the batch is split over.

    Args:
        model: the model, after ``loss.backward()``.
        process_group: the data-parallel group of the replicated parameters (``None``: default).
    """
    W = dist.get_world_size(process_group)
    experts = {
        id(p)
        for _, m in _sharded_layers(model)
        for p in (getattr(m, n) for n in MoEMlp.EXPERT_PARAMETERS)
        if p is not None
    }
    replicated = [p.grad for p in model.parameters() if p.grad is not None and id(p) not in experts]
    if replicated:
        flat = torch.cat([g.reshape(-1) for g in replicated])  # one collective for all of them
        dist.all_reduce(flat, group=process_group)
        flat /= W
        i = 0
        for g in replicated:
            g.copy_(flat[i : i + g.numel()].view_as(g))
            i += g.numel()
    for p in model.parameters():
        if p.grad is not None and id(p) in experts:
            p.grad /= W

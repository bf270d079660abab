"""moe_kernels: fast Mixture-of-Experts layers for vision transformers.

Functional API: ``compute_capacity``, ``topk_softmax``, ``make_routing``,
``dispatch``, ``combine``, ``grouped_mm`` and ``losses``. Modules: ``MoEMlp``, ``SoftMoEMlp``, the routers of
``routers``; ``moeify``, ``aux_loss`` and ``routing_stats`` for whole models; ``distributed`` for expert
parallelism. Every tensor op is a ``torch.library`` custom op in the ``moe_kernels`` namespace,
runnable by several backends (``backends``).
"""

from moe_kernels import _ext, backends, distributed, losses, reference, routers  # noqa: F401  (_ext loads _C)
from moe_kernels.convert import aux_loss, moeify
from moe_kernels.layers import MoEMlp
from moe_kernels.memory import cpu_cache_info, empty_cpu_cache, set_cpu_cache_limit
from moe_kernels.ops import Routing, combine, compute_capacity, dispatch, grouped_mm, make_routing, topk_softmax
from moe_kernels.routers import ExpertChoiceRouter, NoisyTopKRouter, PerImageRouter, RouterOutput
from moe_kernels.soft_moe import SoftMoEMlp
from moe_kernels.stats import RoutingStats, routing_stats

__version__ = "0.1.0"

__all__ = [
    "ExpertChoiceRouter",
    "MoEMlp",
    "NoisyTopKRouter",
    "PerImageRouter",
    "RouterOutput",
    "Routing",
    "RoutingStats",
    "SoftMoEMlp",
    "aux_loss",
    "backends",
    "combine",
    "compute_capacity",
    "cpu_cache_info",
    "dispatch",
    "distributed",
    "empty_cpu_cache",
    "grouped_mm",
    "losses",
    "make_routing",
    "moeify",
    "reference",
    "routers",
    "routing_stats",
    "set_cpu_cache_limit",
    "topk_softmax",
]

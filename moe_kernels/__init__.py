"""moe_kernels: fast Mixture-of-Experts layers for vision transformers.

Functional API (DESIGN.md section 4): ``compute_capacity``, ``topk_softmax``, ``make_routing``,
``dispatch``, ``combine``, ``grouped_mm`` and ``losses``. Every tensor op is a ``torch.library``
custom op in the ``moe_kernels`` namespace, runnable by several backends (``backends``).
"""

from moe_kernels import _ext, backends, losses, reference
from moe_kernels.ops import Routing, combine, compute_capacity, dispatch, grouped_mm, make_routing, topk_softmax

__version__ = "0.1.0"

__all__ = [
    "Routing",
    "backends",
    "combine",
    "compute_capacity",
    "dispatch",
    "grouped_mm",
    "losses",
    "make_routing",
    "reference",
    "topk_softmax",
]

"""Public ops: ``torch.library`` custom ops in the ``moe_kernels`` namespace, each with a fake
implementation (for ``torch.compile``) and autograd, running the backend ``backends`` picks."""

from moe_kernels.ops.dispatch_combine import combine, dispatch
from moe_kernels.ops.grouped_mm import gelu_grouped_mm, gelu_mlp, grouped_mm
from moe_kernels.ops.make_routing import Routing, compute_capacity, make_routing
from moe_kernels.ops.topk_softmax import topk_softmax

__all__ = [
    "Routing",
    "combine",
    "compute_capacity",
    "dispatch",
    "gelu_grouped_mm",
    "gelu_mlp",
    "grouped_mm",
    "make_routing",
    "topk_softmax",
]

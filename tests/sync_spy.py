"""Host round trips on the GPU path, found without a GPU.

``HostSyncSpy`` is a ``TorchDispatchMode`` that records every op which would make the CPU
wait for a CUDA device or copy host data to it: an op with any tensor argument that is not on
CUDA (``torch.tensor([...], device="cuda")`` shows up as ``aten.lift_fresh`` of a CPU tensor,
then ``aten._to_copy``), and the ops that read device values on the host (``.item()`` is
``aten._local_scalar_dense``; ``nonzero``, ``masked_select``, boolean indexing, ``equal`` ...).
Used on top of a ``FakeTensorMode``, the layer's Python runs on fake CUDA tensors, so no
device is needed; custom ops are seen at their boundary (their fake implementations run).

The autograd engine cannot run a backward on fake CUDA tensors without a CUDA driver (it asks
the driver for the device's context). ``run_backward`` walks the graph in Python instead,
calling each node as the engine would (topological order, gradients summed per input), so
every backward formula, ours (``register_autograd``) and torch's, runs under the spy too.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops that read device values on the host or whose output shape depends on them.
SYNC_OPS = {
    aten._local_scalar_dense,
    aten.nonzero,
    aten.nonzero_static,
    aten.masked_select,
    aten.is_nonzero,
    aten.equal,
    aten.unique_consecutive,
    aten._unique2,
    aten.repeat_interleave,
    aten._assert_async,
    aten.allclose,
}
# Indexing ops whose output shape depends on the values of a boolean mask.
MASK_INDEXING = {aten.index, aten._unsafe_index, aten.index_put, aten._index_put_impl_}


class HostSyncSpy(TorchDispatchMode):
    """Records ``(op, reason)`` for each host round trip; ``violations`` lists them."""

    def __init__(self, device_type: str = "cuda") -> None:
        super().__init__()
        self.device_type = device_type
        self.violations: list[str] = []
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        self.ops.add(name)
        if func.overloadpacket in SYNC_OPS:
            self.violations.append(f"{name}: reads device values on the host")
        for leaf in pytree.tree_leaves((args, kwargs)):
            if not isinstance(leaf, torch.Tensor):
                continue
            if leaf.device.type != self.device_type:
                self.violations.append(f"{name}: touches a {leaf.device.type} tensor of shape {tuple(leaf.shape)}")
            elif leaf.dtype == torch.bool and func.overloadpacket in MASK_INDEXING:
                self.violations.append(f"{name}: boolean-mask indexing (a data-dependent shape)")
        try:
            return func(*args, **kwargs)
        except (DynamicOutputShapeException, DataDependentOutputException) as exc:
            self.violations.append(f"{name}: output depends on device values ({type(exc).__name__})")
            raise


def run_backward(root: torch.Tensor, grad: torch.Tensor) -> None:
    """``root.backward(grad)`` by a walk of the autograd graph in Python (see the module doc).

    Leaves' ``.grad`` are set (summed over their uses) as the engine would.
    """
    order: list = []
    seen: set = set()

    def visit(node) -> None:
        stack = [(node, False)]
        while stack:
            n, done = stack.pop()
            if n is None:
                continue
            if done:
                order.append(n)
                continue
            if n in seen:
                continue
            seen.add(n)
            stack.append((n, True))
            for nxt, _ in n.next_functions:
                if nxt is not None and nxt not in seen:
                    stack.append((nxt, False))

    visit(root.grad_fn)
    pending: dict = {root.grad_fn: {0: grad}}
    for node in reversed(order):  # reverse post-order: every consumer before its producers
        grads = pending.pop(node, None)
        if grads is None:
            continue
        if type(node).__name__ == "AccumulateGrad":
            var = node.variable
            var.grad = grads[0] if var.grad is None else var.grad + grads[0]
            continue
        meta = node._input_metadata  # one entry per gradient the node takes
        # A gradient that nothing produced is zeros, as the engine materialises it.
        args = [grads[i] if i in grads else torch.zeros(m.shape, dtype=m.dtype, device=m.device)
                for i, m in enumerate(meta)]  # fmt: skip
        fn = node.apply if hasattr(node, "apply") else node  # Python autograd.Function: .apply
        with torch.no_grad():  # the engine runs backward formulas with grad mode off
            outs = fn(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        for (nxt, idx), g in zip(node.next_functions, outs, strict=False):
            if nxt is None or g is None:
                continue
            # As the engine's validate_outputs: a broadcast gradient is summed back to the
            # input's shape, and cast to its dtype.
            want = nxt._input_metadata[idx]
            if tuple(g.shape) != tuple(want.shape):
                g = g.sum_to_size(tuple(want.shape))
            if g.dtype != want.dtype:
                g = g.to(want.dtype)
            slot = pending.setdefault(nxt, {})
            slot[idx] = g if idx not in slot else slot[idx] + g

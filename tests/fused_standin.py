"""A stand-in for a backend with fused epilogues, made of reference code, so that the op layer's
fused path (``ops.gelu_mlp`` -> ``moe_kernels::gelu_mlp``, the fused backward pieces, the bias
gradient of ``grouped_mm``) runs on the CPU without Triton: ``fused_torch(monkeypatch)`` makes
``backends.fused`` answer for the ``torch`` backend with the functions below (the signatures of
``backends.FUSED_OPS``) and records each call's arguments that steer the kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_kernels import backends
from moe_kernels import reference as ref


def grouped_mm_act(x, w, offsets, bias, approximate, keep_pre):
    pre = ref.grouped_mm(x, w, offsets, bias)  # [M, N]
    return F.gelu(pre, approximate=approximate), pre if keep_pre else pre.new_empty(0, pre.shape[1])


def grouped_mm_act_grad(grad, w, offsets, pre, approximate):
    return torch.ops.aten.gelu_backward(ref.grouped_mm(grad, w, offsets), pre, approximate=approximate)


def grouped_mm_weight_grad_fused(x, grad_out, offsets, approximate, need_dw, need_db):
    a = x if approximate is None else F.gelu(x, approximate=approximate)
    dw = ref.grouped_mm_weight_grad(a, grad_out, offsets) if need_dw else x.new_empty(0)
    ones = grad_out.new_ones(grad_out.shape[0], 1)
    db = ref.grouped_mm_weight_grad(ones, grad_out, offsets).squeeze(2) if need_db else x.new_empty(0)
    return dw, db


IMPLS = {f.__name__: f for f in (grouped_mm_act, grouped_mm_act_grad, grouped_mm_weight_grad_fused)}
# How many trailing arguments of each op steer it (approximate, keep_pre, need_dw, need_db).
STEERING = {"grouped_mm_act": 2, "grouped_mm_act_grad": 1, "grouped_mm_weight_grad_fused": 3}


def fused_torch(monkeypatch) -> list[tuple]:
    """Declare the ``torch`` backend fused, its expert MLP one op (its fp64 too); returns the list of recorded calls
    ``(op, steering arguments)``."""
    assert set(IMPLS) == set(backends.FUSED_OPS)
    calls: list[tuple] = []
    real = backends.fused

    def fused(op, backend, device, dtype):
        name, _ = backends.choose("grouped_mm", backend, device, dtype)
        if name != "torch":
            return real(op, backend, device, dtype)
        impl = IMPLS[op]

        def recorded(*args):
            calls.append((op, args[-STEERING[op] :]))
            return impl(*args)

        return recorded

    real_mlp = backends.fuses_mlp

    def fuses_mlp(backend, device, dtype):  # and its expert MLP one op (Support.fused_mlp)
        name, _ = backends.choose("grouped_mm", backend, device, dtype)
        return True if name == "torch" else real_mlp(backend, device, dtype)

    monkeypatch.setattr(backends, "fused", fused)
    monkeypatch.setattr(backends, "fuses_mlp", fuses_mlp)
    return calls

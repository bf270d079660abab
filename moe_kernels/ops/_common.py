"""Argument checks shared by the public ops: each error names the argument, the value given and
what is allowed."""

from __future__ import annotations

import torch
from torch import Tensor

from moe_kernels.validation import is_int

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, t: object, *, ndim: int | None = None, dtypes=None, op: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    return t


def check_int(name: str, v: object, *, low: int | None = None, high: int | None = None, op: str) -> int:
    if not is_int(v):
        raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__} {v!r}")
    if (low is not None and v < low) or (high is not None and v > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{op}: {name} must be in [{lo}, {hi}], got {v}")
    return v


def check_same_device(op: str, **tensors: Tensor | None) -> None:
    devs = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devs.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listed}")

"""Which backends the GPU tests run for each op: those whose own capability report
(``backends.not_supported_reasons``, i.e. the registered CUDA kernels of ``moe_kernels._C``
and the Triton module's op list) says can run every op the test calls on CUDA tensors.

Importable without a GPU, so tests/test_backends_gpu_params.py checks on the CPU that no GPU
test is parametrised with a backend that cannot run it.
"""

from __future__ import annotations

import pytest
import torch

from moe_kernels import backends

CUDA = torch.device("cuda", 0)


def backends_for(*ops: str, device: torch.device = CUDA) -> list[str]:
    """The non-reference backends that can run all of ``ops`` on ``device``."""
    for op in ops:
        if op not in backends.OPS:
            raise ValueError(f"unknown op {op!r}; ops are {backends.OPS}")
    return [
        b
        for b in backends.BACKENDS
        if b != "torch" and not any(backends.not_supported_reasons(b, op, device) for op in ops)
    ]


def gpu_backends(*ops: str):
    """``@pytest.mark.parametrize("backend", ...)`` over ``backends_for(*ops)`` (a skipped
    case when none can)."""
    names = backends_for(*ops)
    return pytest.mark.parametrize(
        "backend", names or [pytest.param("none", marks=pytest.mark.skip(reason=f"no GPU backend runs {ops}"))]
    )

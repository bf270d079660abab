"""Shared test settings: TF32 off, backends under test, tolerances per dtype."""

from __future__ import annotations

import os

import pytest
import torch

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

from moe_kernels import backends  # noqa: E402

# (dtype, atol, rtol) of a kernel's float outputs against the reference computed from the same
# inputs. Both accumulate in fp32; fp16/bf16 differ by the final rounding (and summation order).
DTYPES = {
    "f32": (torch.float32, 1e-5, 1e-5),
    "f16": (torch.float16, 2e-3, 2e-3),
    "bf16": (torch.bfloat16, 1.6e-2, 1.6e-2),
}


def backends_under_test(device: str = "cpu") -> list[str]:
    """The backends the op tests compare against the reference.

    ``MOE_KERNELS_BACKEND=<name>`` narrows them to that one (e.g. ``triton`` with
    ``TRITON_INTERPRET=1``); otherwise every backend available on ``device``.
    """
    env = os.environ.get(backends.ENV_VAR, "auto")
    if env != "auto":
        return [env]
    avail = backends.available(device)
    return [b for b in backends.BACKENDS if not avail[b]]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

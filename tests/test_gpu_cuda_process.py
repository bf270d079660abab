"""Runs tests/test_gpu_cuda.py in a child process of its own, and shows why it must: a failed
device-side check traps, and the trap poisons every later CUDA call of its process.

Skipped without a GPU or without the CUDA part of ``moe_kernels._C``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from moe_kernels import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch"),
    pytest.mark.skipif(not _ext.cuda_kernels_built(), reason="moe_kernels._C was built without CUDA kernels"),
]


def _child(args: list[str], timeout: float, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout
    )


def test_cuda_suite_in_its_own_process():
    proc = _child(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu_cuda.py"], 900,
                  MOE_KERNELS_CUDA_CHILD="1")  # fmt: skip
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout, tail


def test_device_check_traps_in_a_child_and_names_the_value():
    """An expert index out of range, seen only on the device: the kernel prints what and where
    and traps; the error surfaces at the next sync, in that process alone."""
    code = textwrap.dedent(
        """
        import torch, moe_kernels
        ops = torch.ops.moe_kernels_C
        logits = torch.randn(4, 8, device="cuda")
        bad = torch.tensor([[0, 9]] * 4, device="cuda")
        ops.topk_softmax_backward(torch.ones(4, 2, device="cuda"), logits, bad, False)
        torch.cuda.synchronize()
        print("NO ERROR")
        """
    )
    proc = _child(["-c", code], 300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "NO ERROR" not in out, out[-2000:]
    assert "indices must be in [0, 8), got 9" in out, out[-2000:]
    # This process's CUDA context is untouched.
    assert torch.ones(3, device="cuda").sum().item() == 3

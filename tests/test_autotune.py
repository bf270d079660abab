"""Autotune hygiene of the grouped GEMMs, without a GPU: the key buckets M, and
``MOE_KERNELS_TRITON_CONFIG`` pins the config that is launched (moe_kernels/kernels/_config.py).

The launchers are called on CPU tensors with recorders in place of the kernels: what the
launcher would hand Triton (kernel, grid, arguments, config) is checked, nothing runs.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from moe_kernels.kernels import _config  # noqa: E402
from moe_kernels.kernels import grouped_mm as gm  # noqa: E402
from moe_kernels.ops import _triton  # noqa: E402

H100_SHARED = 232448
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class Recorder:
    """Stands for a kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((grid, args, kwargs))

        return launch


@pytest.fixture
def recorders(monkeypatch):
    rec = {name: (Recorder(), Recorder()) for name in _triton.GEMM_KERNELS}
    patched = {name: (rec[name][0], rec[name][1], cands) for name, (_, _, cands) in _triton.GEMM_KERNELS.items()}
    monkeypatch.setattr(_triton, "GEMM_KERNELS", patched)
    monkeypatch.setattr(gm, "_device_max_shared", lambda: H100_SHARED)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return rec


def _call_both(M=300, KD=64, N=96, E=3):
    x = torch.randn(M, KD)
    w = torch.randn(E, N, KD)
    offsets = torch.tensor([0, 100, 100, M])
    _triton.grouped_mm(x, w, offsets)
    _triton.grouped_mm_weight_grad(x, torch.randn(M, N), offsets)


def test_m_bucket():
    assert [_config.m_bucket(m) for m in (0, 1, 16, 17, 1000, 1024, 1025, 3152)] == [
        16, 16, 16, 32, 1024, 1024, 2048, 4096,
    ]  # fmt: skip


@pytest.mark.skipif(INTERPRET, reason="the interpreter has one config and no key to check")
def test_autotune_keys_bucket_m_not_m():
    for kernel in (gm.grouped_mm_kernel, gm.grouped_mm_weight_grad_kernel):
        assert "M_BUCKET" in kernel.keys and "M" not in kernel.keys, kernel.keys


def test_autotuned_launch_passes_the_bucket(recorders, monkeypatch):
    monkeypatch.delenv(_config.PIN_ENV, raising=False)
    _call_both(M=300)
    for name, (tuned, plain) in recorders.items():
        assert len(tuned.calls) == 1 and not plain.calls, name
        _, args, _ = tuned.calls[0]
        names = (gm._grouped_mm_kernel if name == "grouped_mm" else gm._grouped_mm_weight_grad_kernel).arg_names
        assert args[names.index("M_BUCKET")] == 512 and args[names.index("M")] == 300


def _launched(plain: Recorder):
    (grid, args, kwargs), = plain.calls
    cfg = {k: kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
    return grid, cfg, kwargs["num_warps"], kwargs["num_stages"]


def test_pin_first_launches_the_first_fitting_config(recorders, monkeypatch):
    monkeypatch.setenv(_config.PIN_ENV, "first")
    _call_both(M=300, KD=64, N=96)
    for name, (tuned, plain) in recorders.items():
        assert not tuned.calls, name
        want = gm.prune_configs(_triton.GEMM_KERNELS[name][2], 4, H100_SHARED, wgrad=name != "grouped_mm")[0]
        grid, cfg, warps, stages = _launched(plain)
        assert cfg == want.kwargs and (warps, stages) == (want.num_warps, want.num_stages), name
        if name == "grouped_mm":  # the grid follows the pinned tile
            assert grid == (triton.cdiv(300, cfg["BLOCK_M"]) * triton.cdiv(96, cfg["BLOCK_N"]),)
        else:
            assert grid == (triton.cdiv(96, cfg["BLOCK_N"]) * triton.cdiv(64, cfg["BLOCK_K"]), 3)


def test_pin_explicit_config(recorders, monkeypatch):
    monkeypatch.setenv(_config.PIN_ENV, "grouped_mm=64x32x32:4:2")
    _call_both()
    _, cfg, warps, stages = _launched(recorders["grouped_mm"][1])
    assert cfg == {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8} and (warps, stages) == (4, 2)
    # the kernel not named gets its first fitting candidate
    _, cfg, _, _ = _launched(recorders["grouped_mm_weight_grad"][1])
    assert cfg == gm.prune_configs(gm.GROUPED_MM_WGRAD_CONFIGS, 4, H100_SHARED, wgrad=True)[0].kwargs


@pytest.mark.parametrize(
    "value,match",
    [
        ("grouped_mm=128x128", "BLOCK_MxBLOCK_NxBLOCK_K:warps:stages"),
        ("grouped_mm=100x128x64:4:3", "BLOCK_M must be a power of two"),
        ("grouped_mm=128x128x64:3:3", "warps must be one of"),
        ("fastest", "must be 'autotune', 'first' or"),
    ],
)
def test_bad_pin_names_the_variable(recorders, monkeypatch, value, match):
    monkeypatch.setenv(_config.PIN_ENV, value)
    with pytest.raises(ValueError, match=match) as info:
        _call_both()
    assert _config.PIN_ENV in str(info.value)


def test_pin_modes():
    cfg = _config.parse_config("128x256x64:8:3")
    assert cfg.kwargs == {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}
    env = os.environ.get(_config.PIN_ENV)
    try:
        os.environ[_config.PIN_ENV] = "autotune"
        assert _config.pin_mode("grouped_mm") == "autotune"
        os.environ[_config.PIN_ENV] = "grouped_mm_weight_grad=32x64x64:4:4"
        assert _config.pin_mode("grouped_mm") == "first"
        assert _config.pin_mode("grouped_mm_weight_grad").num_stages == 4
    finally:
        if env is None:
            os.environ.pop(_config.PIN_ENV, None)
        else:
            os.environ[_config.PIN_ENV] = env

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
    rec["split_sum"] = Recorder()
    monkeypatch.setattr(_triton, "SPLIT_SUM_KERNEL", rec["split_sum"])
    monkeypatch.setattr(gm, "_device_max_shared", lambda: H100_SHARED)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return rec


# The plain kernels, by GEMM_KERNELS name (the recorders stand in for GEMM_KERNELS' entries).
_PLAIN = {
    "grouped_mm": gm._grouped_mm_kernel,
    "grouped_mm_weight_grad": gm._grouped_mm_weight_grad_kernel,
    "grouped_mm_weight_grad_split": gm._grouped_mm_weight_grad_split_kernel,
}


def _gemm_recorders(rec):
    # The persistent TMA kernel never runs on CPU tensors outside the interpreter (the
    # launcher's tma_reasons), and _call_both's shapes are too small for row chunks:
    # test_tma_launch and tests/test_wgrad_chunked.py check those launches.
    skip = ("split_sum", "grouped_mm_tma", "grouped_mm_weight_grad_chunked")
    return {name: pair for name, pair in rec.items() if name not in skip}


def _call_both(M=300, KD=64, N=96, E=3, split=1):
    x = torch.randn(M, KD)
    w = torch.randn(E, N, KD)
    offsets = torch.tensor([0, 100, 100, M])
    _triton.grouped_mm(x, w, offsets)
    _triton.grouped_mm_weight_grad(x, torch.randn(M, N), offsets, split=split)


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
    _triton.grouped_mm_weight_grad(torch.randn(300, 64), torch.randn(300, 96), torch.tensor([0, 100, 100, 300]),
                                   split=2)  # fmt: skip
    for name, (tuned, plain) in _gemm_recorders(recorders).items():
        assert len(tuned.calls) == 1 and not plain.calls, name
        _, args, _ = tuned.calls[0]
        names = _PLAIN[name].arg_names
        assert args[names.index("M_BUCKET")] == 512 and args[names.index("M")] == 300


def _launched(plain: Recorder):
    (grid, args, kwargs), = plain.calls
    cfg = {k: kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
    return grid, cfg, kwargs["num_warps"], kwargs["num_stages"]


def test_pin_first_launches_the_first_fitting_config(recorders, monkeypatch):
    monkeypatch.setenv(_config.PIN_ENV, "first")
    _call_both(M=300, KD=64, N=96)
    for name, (tuned, plain) in _gemm_recorders(recorders).items():
        if name == "grouped_mm_weight_grad_split":
            assert not tuned.calls and not plain.calls
            continue
        assert not tuned.calls, name
        # fp32 without TF32: the IEEE candidates
        cands = gm.fwd_configs(True) if name == "grouped_mm" else gm.wgrad_configs(True)
        want = gm.prune_configs(cands, 4, H100_SHARED, wgrad=name != "grouped_mm")[0]
        grid, cfg, warps, stages = _launched(plain)
        assert cfg == want.kwargs and (warps, stages) == (want.num_warps, want.num_stages), name
        if name == "grouped_mm":  # the grid follows the pinned tile
            # the tile schedule's worst case: cdiv(M, BLOCK_M) + E row tiles per column block
            assert grid == ((triton.cdiv(300, cfg["BLOCK_M"]) + 3) * triton.cdiv(96, cfg["BLOCK_N"]),)
        else:
            assert grid == (triton.cdiv(96, cfg["BLOCK_N"]) * triton.cdiv(64, cfg["BLOCK_K"]), 3)


def test_pin_explicit_config(recorders, monkeypatch):
    monkeypatch.setenv(_config.PIN_ENV, "grouped_mm=64x32x32:4:2")
    _call_both()
    _, cfg, warps, stages = _launched(recorders["grouped_mm"][1])
    assert cfg == {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8} and (warps, stages) == (4, 2)
    # the kernel not named gets its first fitting candidate
    _, cfg, _, _ = _launched(recorders["grouped_mm_weight_grad"][1])
    assert cfg == gm.prune_configs(gm.wgrad_configs(True), 4, H100_SHARED, wgrad=True)[0].kwargs


def test_tma_launch(recorders, monkeypatch):
    """Where the layout allows TMA (``tma_reasons`` empty, as on sm_90): the persistent kernel,
    at most one program per SM (132 without a GPU), the forward reading w as stored and dX
    its untransposed storage (W_T); pinned, the first TMA candidate that fits."""
    from moe_kernels.kernels import grouped_mm_tma as gmt

    monkeypatch.setattr(_triton, "tma_reasons", lambda *a, **k: [])
    M, KD, N, E = 3000, 64, 512, 3
    x, w = torch.randn(M, KD, dtype=torch.float16), torch.randn(E, N, KD, dtype=torch.float16)
    offsets = torch.tensor([0, 100, 100, M])
    names = gmt._grouped_mm_tma_kernel.arg_names
    monkeypatch.setenv(_config.PIN_ENV, "autotune")
    _triton.grouped_mm(x, w, offsets)
    tuned, plain = recorders["grouped_mm_tma"]
    ((grid_fn, args, kwargs),) = tuned.calls
    assert not plain.calls and not recorders["grouped_mm"][0].calls and kwargs["W_T"] is False
    assert args[names.index("stride_w1")] == KD and args[names.index("M_BUCKET")] == 4096
    for c in gmt.GROUPED_MM_TMA_CONFIGS:
        tiles = (triton.cdiv(M, c.kwargs["BLOCK_M"]) + E) * triton.cdiv(N, c.kwargs["BLOCK_N"])
        assert grid_fn(c.kwargs) == (min(132, tiles),)
    monkeypatch.setenv(_config.PIN_ENV, "first")
    _triton.grouped_mm(torch.randn(M, N, dtype=torch.float16), w.transpose(1, 2), offsets)  # dX
    grid, cfg, warps, stages = _launched(plain)
    want = gm.prune_configs(gmt.GROUPED_MM_TMA_CONFIGS, 2, H100_SHARED)[0]
    assert cfg == want.kwargs and (warps, stages) == (want.num_warps, want.num_stages) == (8, 4)
    assert cfg["BLOCK_N"] == 256 and plain.calls[0][2]["W_T"] is True
    assert grid == (triton.cdiv(M, 128) + E,)  # dX writes [M, KD]: one column block, fewer than 132
    assert plain.calls[0][1][names.index("stride_w1")] == KD  # w's storage [E, N, KD] read as [E, KD, N]


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


# ---------------------------------------------------------------- the weight gradient's row split


def test_router_weight_grad_grid_fills_two_waves(recorders, monkeypatch):
    """The issue's launcher check: the router's weight gradient (a one-expert GEMM, T=12608,
    D=768, E=32) launches at least 2 x 132 programs, for the pinned config and autotuned."""
    T, D, E = 12608, 768, 32
    x, g, offsets = torch.randn(T, D), torch.randn(T, E), torch.tensor([0, T])
    for pin in ("first", "autotune"):
        monkeypatch.setenv(_config.PIN_ENV, pin)
        rec = {name: (Recorder(), Recorder()) for name in _PLAIN}
        patched = {name: (rec[name][0], rec[name][1], _triton.GEMM_KERNELS[name][2]) for name in _PLAIN}
        monkeypatch.setattr(_triton, "GEMM_KERNELS", patched)
        sums = Recorder()
        monkeypatch.setattr(_triton, "SPLIT_SUM_KERNEL", sums)
        dw = _triton.grouped_mm_weight_grad(x, g, offsets)
        assert dw.shape == (1, E, D)
        tuned, plain = rec["grouped_mm_weight_grad_split"]
        assert not rec["grouped_mm_weight_grad"][0].calls and not rec["grouped_mm_weight_grad"][1].calls
        if pin == "first":
            ((grid, args, kwargs),) = plain.calls
            grids = [grid]
        else:
            ((grid_fn, args, kwargs),) = tuned.calls
            # every candidate the autotuner may time or keep
            fitting = gm.prune_configs(gm.wgrad_configs(True), 4, H100_SHARED, wgrad=True)
            grids = [grid_fn(c.kwargs) for c in fitting]
        split = args[_PLAIN["grouped_mm_weight_grad_split"].arg_names.index("SPLIT")]
        for grid in grids:
            assert len(grid) == 3 and grid[1:] == (1, split)
            assert grid[0] * grid[1] * grid[2] >= 2 * 132, grid
        ws = args[2]
        assert ws.dtype == torch.float32 and tuple(ws.shape) == (split, 1, E, D)
        ((sum_grid, sum_args, _),) = sums.calls
        assert sum_args[0] is ws and sum_args[1] is dw and sum_args[3] == split


@pytest.mark.parametrize(
    "M,N,KD,E,ieee,want",
    [
        (12608, 32, 768, 1, True, 22),  # the router (fp32): 12 tiles of 32x64 at most -> 264 / 12
        (12608, 32, 768, 1, False, 44),  # the same in bf16: 6 tiles of 32x128 -> 264 / 6
        (300, 96, 64, 3, False, 1),  # under SPLIT_MIN_ROWS rows per split: not split
        (100_000, 3072, 768, 8, False, 1),  # ViT-B experts: 1152 tiles already
        (4096, 768, 192, 10, False, 3),  # Mobile V-MoE-sized experts: 120 tiles -> 3 splits
    ],
)
def test_wgrad_split_choice(M, N, KD, E, ieee, want):
    configs = gm.prune_configs(gm.wgrad_configs(ieee), 4 if ieee else 2, H100_SHARED, wgrad=True)
    split = _triton.wgrad_split(M, N, KD, E, configs, 132)
    assert split == want
    tiles = min(triton.cdiv(N, c.kwargs["BLOCK_N"]) * triton.cdiv(KD, c.kwargs["BLOCK_K"]) for c in configs) * E
    assert split == 1 or tiles * split >= 264 or split == M // _triton.SPLIT_MIN_ROWS


def test_wgrad_split_caps_the_workspace():
    configs = gm.prune_configs(gm.GROUPED_MM_WGRAD_CONFIGS, 2, H100_SHARED, wgrad=True)
    split = _triton.wgrad_split(1 << 20, 4096, 4096, 1, configs, 132)
    assert split * 4096 * 4096 * 4 <= _triton.SPLIT_WORKSPACE_BYTES


def test_autotuner_prunes_to_the_precision_family(monkeypatch):
    """fp32 with IEEE products tunes over its own (spill-free) candidates, everything else over
    the tensor-core list; the precision is in the key, so the two never share a winner."""
    monkeypatch.setattr(gm, "_device_max_shared", lambda: H100_SHARED)
    x32, x16 = torch.empty(4, 4), torch.empty(4, 4, dtype=torch.float16)
    for kernel, prune, family in ((gm.grouped_mm_kernel, gm._prune_fwd, gm.fwd_configs),
                                  (gm.grouped_mm_weight_grad_kernel, gm._prune_wgrad, gm.wgrad_configs)):  # fmt: skip
        assert "INPUT_PRECISION" in kernel.keys
        ieee = prune(kernel.configs, {"X_ptr": x32}, INPUT_PRECISION="ieee")
        tf32 = prune(kernel.configs, {"X_ptr": x32}, INPUT_PRECISION="tf32")
        half = prune(kernel.configs, {"X_ptr": x16}, INPUT_PRECISION="ieee")
        assert ieee and all(c in family(True) for c in ieee)
        assert tf32 and half and all(c in family(False) for c in tf32 + half)

"""The C++ CPU kernels' cache of large output blocks (moe_kernels.memory, csrc/cpu/buffer_cache.cpp):
blocks are reused after a tensor is freed (no fresh pages), within the limit, counted by the
profiler's memory events (and so by the benchmark's peak memory), released on request; results
do not depend on it."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest
import torch

import moe_kernels as mk
from tests.conftest import backends_under_test

pytestmark = pytest.mark.skipif("cpu" not in backends_under_test("cpu"), reason="the C++ CPU backend is not under test")

ops = torch.ops.moe_kernels_C
MiB = 2**20


def _operands(rows=1000, D=64, H=512, E=4):
    g = torch.Generator().manual_seed(0)
    offsets = torch.linspace(0, rows, E + 1).long()
    return torch.randn(rows, D, generator=g), torch.randn(E, H, D, generator=g), offsets


@pytest.fixture
def fresh_cache():
    before = mk.cpu_cache_info()["limit_bytes"] // MiB
    mk.empty_cpu_cache()
    yield
    mk.set_cpu_cache_limit(before)
    mk.empty_cpu_cache()


def test_blocks_are_reused_and_released(fresh_cache):
    x, w, offsets = _operands()  # output [1000, 512] fp32: 2 MB, cached
    y = ops.grouped_mm(x, w, offsets, None)
    info = mk.cpu_cache_info()
    assert info["in_use_bytes"] >= y.numel() * 4 and info["cached_bytes"] == 0
    ptr = y.data_ptr()
    want = y.clone()
    del y
    info = mk.cpu_cache_info()
    assert info["in_use_bytes"] == 0 and info["cached_blocks"] == 1 and info["cached_bytes"] >= 2_000_000
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = ops.grouped_mm(x, w, offsets, None)
    assert y.data_ptr() == ptr  # the same block, its pages already mapped
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults < 100  # not 500 fresh pages
    assert torch.equal(y, want)
    del y
    mk.empty_cpu_cache()
    assert mk.cpu_cache_info()["cached_bytes"] == 0


def test_a_slightly_smaller_request_reuses_a_block_a_much_smaller_one_does_not(fresh_cache):
    x, w, offsets = _operands(rows=1000)
    ptr = ops.grouped_mm(x, w, offsets, None).data_ptr()  # freed at once
    x2, _, offsets2 = _operands(rows=900)
    y2 = ops.grouped_mm(x2, w, offsets2, None)  # 1.84 MB from a 2 MB block (within 1.25x)
    assert y2.data_ptr() == ptr
    del y2
    x3, _, offsets3 = _operands(rows=600)
    y3 = ops.grouped_mm(x3, w, offsets3, None)  # 1.2 MB: a block of its own
    assert y3.data_ptr() != ptr


def test_limit_zero_frees_blocks_at_once(fresh_cache):
    mk.set_cpu_cache_limit(0)
    x, w, offsets = _operands()
    y = ops.grouped_mm(x, w, offsets, None)
    want = y.clone()
    del y
    assert mk.cpu_cache_info() == {"in_use_bytes": 0, "cached_bytes": 0, "cached_blocks": 0, "limit_bytes": 0}
    assert torch.equal(ops.grouped_mm(x, w, offsets, None), want)


def test_small_outputs_do_not_use_the_cache(fresh_cache):
    x, w, offsets = _operands(rows=100, H=64)  # 25 KB
    ops.grouped_mm(x, w, offsets, None)
    assert mk.cpu_cache_info()["cached_blocks"] == 0


def test_profiler_counts_the_blocks(fresh_cache):
    from bench.measure import peak_memory_mb

    x, w, offsets = _operands(rows=2000, H=1024)  # 8 MB out
    peak = peak_memory_mb(lambda: ops.grouped_mm(x, w, offsets, None), torch.device("cpu"))
    assert 7.5 <= peak <= 8.5, peak


def test_layer_steps_leave_only_free_blocks_and_results_do_not_change(fresh_cache):
    torch.manual_seed(0)
    layer = mk.MoEMlp(64, 512, num_experts=4, k=2, capacity_factor=None, noise_std=0.0, backend="cpu")
    x = torch.randn(1200, 64)
    grads = []
    for _ in range(3):
        y = layer(x)
        y.square().sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
        layer.zero_grad()
        del y
    for g in grads[1:]:
        for a, b in zip(g, grads[0], strict=True):
            assert torch.equal(a, b)
    info = mk.cpu_cache_info()
    assert info["in_use_bytes"] == 0 and info["cached_blocks"] > 0


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"set_cpu_cache_limit: mb must be an int >= 0, got -1"):
        mk.set_cpu_cache_limit(-1)
    env = dict(os.environ, MOE_KERNELS_CPU_CACHE_MB="lots")
    code = "import moe_kernels as mk; print(mk.cpu_cache_info())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "MOE_KERNELS_CPU_CACHE_MB must be a whole number of MiB >= 0, got 'lots'" in out.stderr


def test_environment_sets_the_limit():
    env = dict(os.environ, MOE_KERNELS_CPU_CACHE_MB="7")
    code = "import moe_kernels as mk; print(mk.cpu_cache_info()['limit_bytes'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == 7 * 2**20

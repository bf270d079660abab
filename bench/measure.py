"""Timing and peak memory: median and interquartile range over repeats after warm-up.

CPU (see ``bench._malloc`` for the allocator settings):

- a training step, ``out = fn(x); out.backward(grad)``, is timed with ``time.perf_counter``
  around the forward and around the backward, so ``fwd``, ``bwd`` and ``fwd_bwd`` all come from
  the same steps (``torch.utils.benchmark.Timer`` times one statement and cannot split it);
  gradients are set to ``None`` between steps, as ``optimizer.zero_grad()`` does. Warm-up runs
  until a step faults no new pages (at most ``max_warmup`` steps).
- single ops: ``torch.utils.benchmark.Timer.blocked_autorange``.
- peak memory: the most tensor memory live at once, above what was live before the forward
  (``fwd``, ``fwd_bwd``) or before the backward (``bwd``), from the allocation and free events
  ``torch.profiler`` records (``profile_memory=True``) for one step. Every tensor counts, ATen's
  and the C++ kernels' alike, and nothing else does: the resident size of the process would
  also count what glibc keeps for reuse, which depends on the steps before.

CUDA: ``triton.testing.do_bench`` quantiles per mode (``bwd`` with a retained graph) and
``torch.cuda.max_memory_allocated`` above the allocation before the call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.utils.benchmark as tb

import moe_kernels as mk
from bench import _malloc

MODES = ("fwd", "bwd", "fwd_bwd")


@dataclasses.dataclass
class Timing:
    median_ms: float
    iqr_ms: float
    runs: int

    @staticmethod
    def of(times_ms: list[float]) -> Timing:
        if len(times_ms) >= 4:
            q = statistics.quantiles(times_ms, n=4)
            iqr = q[2] - q[0]
        else:
            iqr = max(times_ms) - min(times_ms)
        return Timing(statistics.median(times_ms), iqr, len(times_ms))


@contextlib.contextmanager
def _quiet_stderr():
    """Silences file descriptor 2 (kineto logs every profiler start and stop there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _profiled(fn: Callable[[], object]) -> tuple[object, float, float]:
    """Runs ``fn`` under the memory profiler: ``(result, peak MB, net MB)`` of CPU tensor memory
    allocated minus freed during the call (frees of older tensors count, negatively)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return out, peak / 2**20, live / 2**20


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory one call of ``fn`` adds above what was in use before it (MB)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    out, peak, _ = _profiled(fn)
    del out
    return peak


def time_fn(fn: Callable[[], object], device: torch.device, min_run_time: float) -> Timing:
    """Median and IQR of ``fn``'s run time after warm-up (one op, forward only)."""
    if device.type == "cuda":
        import triton.testing

        q25, q50, q75 = triton.testing.do_bench(fn, quantiles=[0.25, 0.5, 0.75], rep=int(min_run_time * 1000))
        return Timing(q50, q75 - q25, 0)
    fn()  # warm-up (allocator, lazy inits)
    timer = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return Timing.of([t * 1e3 for t in m.times])


def backward(out: torch.Tensor | tuple[torch.Tensor, torch.Tensor], grad: torch.Tensor, **kw) -> None:
    """``out.backward(grad)``; for ``(out, loss)``, the backward of both in one graph traversal."""
    if isinstance(out, tuple) and out[1].requires_grad:
        y, loss = out
        torch.autograd.backward((y, loss), (grad, torch.ones_like(loss)), **kw)
    else:
        # A layer without auxiliary losses (e.g. routed from outside) returns a constant one.
        (out[0] if isinstance(out, tuple) else out).backward(grad, **kw)


@dataclasses.dataclass
class Step:
    """One implementation's training step: ``fn(inp).backward(grad)``, then ``params``' (and
    ``inp``'s) gradients set to ``None``. Where ``fn`` returns ``(out, loss)`` (the layer in
    train mode: ``loss`` is its auxiliary loss), the backward runs from both, as a training loss
    ``task(out) + loss`` would."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    inp: torch.Tensor
    grad: torch.Tensor
    params: list[torch.Tensor]

    def clear(self) -> None:
        for t in (*self.params, self.inp):
            t.grad = None

    def __call__(self) -> tuple[float, float]:
        """Runs one step; returns (forward ms, backward ms)."""
        t0 = time.perf_counter()
        out = self.fn(self.inp)
        t1 = time.perf_counter()
        backward(out, self.grad)
        t2 = time.perf_counter()
        del out
        self.clear()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3


def train_step_modes(
    steps: list[Step],
    device: torch.device,
    *,
    min_run_time: float,
    min_runs: int = 5,
    max_runs: int = 50,
    max_warmup: int = 4,
    modes: tuple[str, ...] = MODES,
) -> list[dict[str, tuple[Timing, float]]]:
    """``{mode: (timing, peak_mb)}`` for each step, in order.

    CPU: the steps run interleaved, round by round (each round starting one step later), so a
    slow spell of the machine lands on every implementation alike and the ratios between them
    hold even where the absolute times wander. ``max(min_runs, len(steps) * min_run_time /
    round)`` rounds, at most ``max_runs``.
    """
    if device.type == "cuda":
        return [_cuda_modes(s, min_run_time, modes) for s in steps]
    _malloc.steady()
    round_ms = 0.0
    for s in steps:
        s.clear()
        for _ in range(max(max_warmup, 1)):
            f0 = _minor_faults()
            ms = sum(s())
            if _minor_faults() == f0:
                break
        round_ms += ms
    runs = min(max(min_runs, math.ceil(len(steps) * min_run_time * 1e3 / max(round_ms, 1e-3))), max_runs)
    fwd = [[] for _ in steps]
    bwd = [[] for _ in steps]
    for r in range(runs):
        for j in range(len(steps)):
            i = (r + j) % len(steps)
            a, b = steps[i]()
            fwd[i].append(a)
            bwd[i].append(b)
    out = []
    for i, s in enumerate(steps):
        times = {"fwd": fwd[i], "bwd": bwd[i], "fwd_bwd": [a + b for a, b in zip(fwd[i], bwd[i], strict=True)]}
        peaks = _cpu_step_peaks(s)
        out.append({m: (Timing.of(times[m]), peaks[m]) for m in modes})
    return out


def _cpu_step_peaks(s: Step) -> dict[str, float]:
    """Peak tensor memory of one step: above the forward's start, and above the backward's."""
    gc.collect()
    out, fwd_peak, fwd_net = _profiled(lambda: s.fn(s.inp))
    _, bwd_peak, _ = _profiled(functools.partial(backward, out, s.grad))
    del out
    s.clear()
    return {"fwd": fwd_peak, "bwd": bwd_peak, "fwd_bwd": max(fwd_peak, fwd_net + bwd_peak)}


def _cuda_modes(s: Step, min_run_time, modes):
    fn, inp, grad, clear = s.fn, s.inp, s.grad, s.clear
    res = {}
    for mode in modes:
        if mode == "fwd":
            run = lambda: fn(inp)  # noqa: E731  (autograd records, as in training)
        elif mode == "bwd":
            out = fn(inp)
            run = lambda out=out: backward(out, grad, retain_graph=True)  # noqa: E731
        else:

            def run():
                backward(fn(inp), grad)
                clear()

        res[mode] = (time_fn(run, inp.device, min_run_time), peak_memory_mb(run, inp.device))
        clear()
    return res


def sgemm(device: torch.device, n: int = 1536, runs: int = 9) -> tuple[float, Timing]:
    """The machine's fp32 matmul rate: ``(GFLOP/s, timing)`` of a square ``[n, n] @ [n, n]`` (2*n**3
    FLOPs) into a preallocated output, median over ``runs`` calls after one warm-up. n=1536 is
    the size of the layers' GEMMs (V-MoE-S/32: 800 x 512 x 2048; B/16: 3152 x 768 x 3072)."""
    g = torch.Generator().manual_seed(5)
    a, b = (torch.randn(n, n, generator=g).to(device) for _ in range(2))
    out = torch.empty(n, n, device=device)
    timing = _median_calls(functools.partial(torch.mm, a, b, out=out), device, runs)
    return 2.0 * n**3 / timing.median_ms / 1e6, timing


def copy_rate(device: torch.device, mib: int = 256, runs: int = 7) -> tuple[float, Timing]:
    """The machine's memory bandwidth: ``(GB/s, timing)`` of ``dst.copy_(src)`` on ``mib`` MiB of
    fp32 (bytes read plus bytes written over the median time), after one warm-up. An MoE layer
    reads E experts' weights where a dense MLP reads one, so its time over `dense`'s rises when the
    bandwidth falls: this VM's bandwidth wanders between runs as its step times do."""
    n = mib * 2**20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty(n, device=device)
    timing = _median_calls(functools.partial(dst.copy_, src), device, runs)
    return 2.0 * n * 4 / timing.median_ms / 1e6, timing


def _median_calls(run: Callable[[], object], device: torch.device, runs: int) -> Timing:
    """``run``'s timing for the machine-rate probes: one warm-up, then ``runs`` timed calls (CPU);
    ``time_fn`` on a GPU."""
    if device.type == "cuda":
        return time_fn(run, device, 0.2)
    run()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing.of(times)


def run_meta(device, sgemm_gflops: float, sgemm_t, sgemm_n: int, *, quick: bool, elapsed: float, **extra) -> dict:
    """The top-level JSON fields every benchmark command writes: device, versions, threads, the
    machine's sgemm rate measured in the same run, ``quick``, ``elapsed_s``, then ``extra``."""
    return {
        "device": device_name(device),
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "malloc": _malloc.MODE,
        "cpu_wgrad_avx512": cpu_wgrad_avx512(),
        "sgemm_gflops": round(sgemm_gflops, 2),
        "sgemm": {
            "n": sgemm_n,
            "median_ms": round(sgemm_t.median_ms, 4),
            "iqr_ms": round(sgemm_t.iqr_ms, 4),
            "runs": sgemm_t.runs,
        },
        "quick": quick,
        "elapsed_s": round(elapsed, 1),
        **extra,
    }


def cpu_wgrad_avx512() -> bool | None:
    """Whether the CPU weight gradient's AVX-512 kernel is on (csrc/cpu/wgrad_avx512.h; off with
    ``MOE_KERNELS_CPU_WGRAD=aten`` or without AVX-512F); ``None`` without the C++ extension."""
    try:
        return bool(torch.ops.moe_kernels_C.cpu_wgrad_avx512())
    except (AttributeError, RuntimeError):
        return None


def versions() -> dict[str, str | None]:
    """The versions a run's JSON records: moe_kernels, torch, python and triton (None if absent)."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {
        "moe_kernels": mk.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "triton": triton_version,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = cpuinfo("model name") or "cpu"
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def cpuinfo(field: str) -> str | None:
    """The first ``field`` of ``/proc/cpuinfo`` (``None`` where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":")[0].strip() == field), None)
    except OSError:
        return None

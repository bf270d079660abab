"""``make gpu-check``: a prepared GPU check that turns a few minutes on a GPU machine into evidence.

Run from the repository root on a machine with a CUDA GPU, with that machine's own ``python3``
(no installs; torch, triton, pytest and nvcc as found there)::

    GPU_CHECK_OUT=out/gpu make gpu-check        # python3 -m bench.gpu_check --out out/gpu

Each stage runs in a child process under a timeout (the stage's cap, shortened so the whole
check ends within ``--budget`` seconds, 540 by default) and writes its JSON before the next
starts; ``summary.md`` is rewritten after every stage, so a check cut short still reports what
it measured. At most 8 files land in the output folder (what a GPU machine of this workplace
returns): ``summary.md``, ``log.txt``, ``facts.json``, ``build.json``, ``tests.json`` (both test
stages), ``introspect.json``, ``microbench.json`` and ``layer.json``.

Stages (in order):
  facts        versions, device facts, the machine's copy bandwidth and bf16 matmul rate
  build        moe_kernels._C in place for sm_90a only, 16 jobs, in the background while the
               Triton tests run (skipped, with the reason, when nvcc's CUDA major differs
               from torch's)
  triton_tests tests/test_gpu.py (every op and backend against the reference, the whole
               layer under sync debug mode "error"), pinned configs to bound compile time
  microbench   triton.testing.do_bench, autotuned: grouped GEMM forward, dX and weight
               gradient vs torch._grouped_mm, a padded torch.bmm and a dense torch.mm of the
               same FLOPs, forward and dX also without the sm_90 TMA kernel
               (MOE_KERNELS_TRITON_TMA=0); a skewed weight gradient with and without row
               chunks; dispatch/combine GB/s vs a copy of the same bytes
  layer        a MoEMlp training step (fwd+bwd, bf16 autocast) at the V-MoE-S/32 and B/16
               group shapes and an LLM-like shape vs a dense MLP of the same active FLOPs,
               with a profiler top-15 kernel table
  introspect   every kernel compiled so far (tests, autotune candidates): registers, spills,
               shared memory, wgmma and TMA instruction counts (bench/kernels.py, from cubins)
  cuda_tests   tests/test_gpu_cuda.py in a process of its own, the device-trap test, and the
               whole-layer tests again with the CUDA library loaded (needs the build)

Without a GPU (``--dry-run``, what ``make gpu-check`` does on a machine without one, in under
3 minutes): every stage's code path that can run on the CPU runs — versions, the build
decision, test collection, the cubin analysis on a kernel compiled ahead of time for sm_90,
the benchmark code at tiny shapes on the CPU, one layer step with the profiler — and the plan
is printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, cap in seconds, what it does) in run order; "build" runs in the background.
STAGES = [
    ("facts", 45, "versions, device facts, copy bandwidth and bf16 matmul rate"),
    ("build", 300, "moe_kernels._C for sm_90a, 16 jobs (background, during triton_tests)"),
    ("triton_tests", 150, "pytest tests/test_gpu.py, pinned Triton configs"),
    ("microbench", 100, "grouped GEMM fwd/dX/wgrad and dispatch/combine vs torch (do_bench)"),
    ("layer", 140, "MoEMlp training step (bf16 autocast) vs a dense MLP, profiler top-15"),
    ("introspect", 45, "registers, spills, shared memory, wgmma/TMA of every kernel compiled so far"),
    ("cuda_tests", 100, "tests/test_gpu_cuda.py in its own process, trap test, cuda ops and layer on _C"),
]
# Seconds kept back for each later stage, so one slow stage cannot starve the rest.
RESERVE = {"triton_tests": 60, "microbench": 60, "layer": 80, "introspect": 25, "cuda_tests": 70}


# ============================================================================ orchestration


def _now() -> float:
    return time.monotonic()


def _run_child(cmd: list[str], timeout: float, log_path: str, env: dict) -> dict:
    """Run ``cmd`` in its own process group; kill the group at ``timeout``."""
    t0 = _now()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
            timed_out = True
    return {"rc": rc, "seconds": round(_now() - t0, 1), "timed_out": timed_out, "timeout": round(timeout, 1)}


def _tail(path: str, chars: int) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return ""
    return text[-chars:]


class Check:
    def __init__(self, out: str, work: str, budget: float, dry_run: bool) -> None:
        self.out, self.work, self.budget, self.dry_run = out, work, budget, dry_run
        self.t0 = _now()
        self.status: dict[str, dict] = {}
        os.makedirs(out, exist_ok=True)
        os.makedirs(os.path.join(work, "logs"), exist_ok=True)
        self.cache = os.path.join(work, "triton-cache")
        shutil.rmtree(self.cache, ignore_errors=True)  # introspect reads only this run's kernels
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "TRITON_CACHE_DIR": self.cache,
            "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
        self.env.pop("TRITON_INTERPRET", None)
        self.log = os.path.join(out, "log.txt")
        open(self.log, "w").close()

    def remaining(self) -> float:
        return self.budget - (_now() - self.t0)

    def timeout_for(self, name: str) -> float:
        cap = dict((n, c) for n, c, _ in STAGES)[name]
        names = [n for n, _, _ in STAGES if n != "build"]
        later = names[names.index(name) + 1 :] if name in names else []
        reserve = sum(RESERVE.get(n, 0) for n in later)
        return max(5.0, min(cap, self.remaining() - reserve))

    def cmd(self, stage: str, timeout: float) -> list[str]:
        # The stage gets 10 s less than its kill time, to write what it has.
        cmd = [sys.executable, "-m", "bench.gpu_check", "--stage", stage, "--out", self.out, "--work", self.work,
               "--stage-timeout", str(max(5.0, timeout - 10))]  # fmt: skip
        return cmd + (["--dry-run"] if self.dry_run else [])

    def record(self, name: str, res: dict) -> None:
        self.status[name] = res
        tail = _tail(os.path.join(self.work, "logs", f"{name}.log"), 6000)
        with open(self.log, "a") as f:
            f.write(f"\n===== {name}: {json.dumps(res)}\n{tail}\n")
        state = "TIMED OUT" if res.get("timed_out") else ("ok" if res.get("rc") == 0 else f"rc={res.get('rc')}")
        print(f"[{_now() - self.t0:6.1f} s] {name}: {state} in {res.get('seconds')} s", flush=True)
        write_summary(self.out, self.status, self.dry_run)

    def run_stage(self, name: str, env: dict | None = None) -> None:
        timeout = self.timeout_for(name)
        log = os.path.join(self.work, "logs", f"{name}.log")
        self.record(name, _run_child(self.cmd(name, timeout), timeout, log, env or self.env))

    def run(self) -> int:
        mode = "DRY RUN (no GPU: the CPU code path of every stage)" if self.dry_run else "GPU run"
        print(f"moe-kernels gpu-check: {mode}; budget {self.budget:.0f} s; results in {self.out}")
        print("plan:")
        for name, cap, what in STAGES:
            print(f"  {name:<13} <= {cap:>3} s  {what}")
        sys.stdout.flush()
        self.run_stage("facts")
        build = None
        build_log = os.path.join(self.work, "logs", "build.log")
        build_t0 = _now()
        if not self.dry_run:
            build = self._start_build(build_log)
        else:
            self.run_stage("build")
        pinned = {**self.env, "MOE_KERNELS_TRITON_CONFIG": "first"}
        self.run_stage("triton_tests", env=pinned)
        if not self.dry_run:  # timed stages run alone: wait for the build first
            self.record("build", self._finish_build(build, build_t0, build_log))
        self.run_stage("microbench")
        self.run_stage("layer")
        self.run_stage("introspect")
        self.run_stage("cuda_tests", env=pinned)
        total = _now() - self.t0
        print(f"gpu-check finished in {total:.0f} s; summary: {os.path.join(self.out, 'summary.md')}")
        failed = [n for n, r in self.status.items() if r.get("rc") != 0]
        return 1 if failed else 0

    # The build runs in the background (a Popen, not a stage child) so the Triton tests overlap it.
    def _start_build(self, log_path: str):
        decision = build_decision()
        with open(os.path.join(self.work, "build_decision.json"), "w") as f:
            json.dump(decision, f)
        if not decision["build"]:
            return None
        env = {**self.env, **decision["env"]}
        log = open(log_path, "w")
        proc = subprocess.Popen(decision["command"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        return proc, log

    def _finish_build(self, build, t0: float, log_path: str) -> dict:
        with open(os.path.join(self.work, "build_decision.json")) as f:
            decision = json.load(f)
        if build is None:
            _write_json(self.out, "build", {**decision, "rc": None})
            return {"rc": 0, "seconds": 0, "skipped": decision["reason"]}
        proc, log = build
        cap = dict((n, c) for n, c, _ in STAGES)["build"]
        later = sum(RESERVE[n] for n in ("microbench", "layer", "introspect", "cuda_tests"))
        left = max(5.0, min(cap - (_now() - t0), self.remaining() - later))
        try:
            rc = proc.wait(timeout=left)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
            timed_out = True
        log.close()
        res = {"rc": rc, "seconds": round(_now() - t0, 1), "timed_out": timed_out, "timeout": cap}
        _write_json(self.out, "build", {**decision, **res, "log_tail": _tail(log_path, 3000)})
        return res


# ============================================================================ helpers for stages


def _write_json(out: str, name: str, data) -> None:
    path = os.path.join(out, f"{name}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def _update_json(out: str, name: str, key: str, value) -> None:
    """Set ``key`` in the JSON object ``name`` (the test stages share tests.json: 8 files at most
    come back from a GPU machine)."""
    data = _read_json(out, name) or {}
    data[key] = value
    _write_json(out, name, data)


def _read_json(out: str, name: str):
    try:
        with open(os.path.join(out, f"{name}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _cmd_out(cmd: list[str], timeout: float = 30) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return (r.stdout + r.stderr).strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable ({type(exc).__name__}: {exc})"


def nvcc_cuda_version() -> str | None:
    """CUDA version nvcc reports (``release 13.0``), or None without nvcc."""
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return None
    m = re.search(r"release (\d+\.\d+)", _cmd_out([nvcc, "--version"]))
    return m.group(1) if m else None


def build_decision() -> dict:
    """Whether to build ``_C`` here, how, and why not."""
    import torch

    nvcc, tcuda = nvcc_cuda_version(), torch.version.cuda
    command = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
    env = {"TORCH_CUDA_ARCH_LIST": "9.0a", "MAX_JOBS": "16", "NVCC_THREADS": "1", "MOE_KERNELS_BUILD_CUDA": "1"}
    reason = None
    if tcuda is None:
        reason = "torch has no CUDA"
    elif nvcc is None:
        reason = "no nvcc on PATH"
    elif nvcc.split(".")[0] != tcuda.split(".")[0]:
        reason = f"nvcc's CUDA {nvcc} and torch's CUDA {tcuda} differ in their major version"
    return {"build": reason is None, "reason": reason, "nvcc_cuda": nvcc, "torch_cuda": tcuda, "command": command,
            "env": env}  # fmt: skip


def _junit(path: str) -> dict:
    """Counts and failures of a pytest junit XML file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        return {"error": f"no junit report ({exc})"}
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    failures, skips = [], {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name')}"
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        skip = case.find("skipped")
        if bad is not None:
            counts["failed" if bad.tag == "failure" else "errors"] += 1
            failures.append({"test": name, "message": (bad.get("message") or "")[:300],
                             "text": (bad.text or "")[-1500:]})  # fmt: skip
        elif skip is not None:
            counts["skipped"] += 1
            reason = (skip.get("message") or "")[:160]
            skips[reason] = skips.get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures[:40], "skip_reasons": skips}


def _pytest(args: list[str], junit: str, timeout: float, env: dict | None = None) -> dict:
    """pytest in a child; at ``timeout`` it gets SIGINT, so it still writes its junit report."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *args]
    t0 = time.monotonic()
    log_path = junit + ".log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                rc = f"interrupted at {timeout:.0f} s: {proc.wait(timeout=20)}"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = f"killed at {timeout:.0f} s: {proc.wait()}"
    print(_tail(log_path, 3000))
    return {"args": args, "rc": rc, "seconds": round(time.monotonic() - t0, 1), **_junit(junit)}


# ============================================================================ stages


def stage_facts(args) -> None:
    import torch

    facts = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": os.environ.get("GPU_CHECK_COMMIT") or _cmd_out(["git", "-C", ROOT, "rev-parse", "HEAD"]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "nvcc_cuda": nvcc_cuda_version(),
        "cpus": os.cpu_count(),
        "dry_run": args.dry_run,
    }
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError as exc:
        facts["triton"] = f"missing ({exc})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        facts.update(
            device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
            memory_gib=round(p.total_memory / 2**30, 1),
            nvidia_smi=_cmd_out(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,"
                                 "temperature.gpu", "--format=csv,noheader"]),
        )  # fmt: skip
        facts.update(ceilings(torch.device("cuda")))
    else:
        facts["device"] = "none (dry run)" if args.dry_run else "none"
        facts.update(ceilings(torch.device("cpu"), small=True))
    _write_json(args.out, "facts", facts)
    print(json.dumps(facts, indent=1))


def _bench(fn, device, rep_ms: float = 100) -> float:
    """Median milliseconds of ``fn``: ``triton.testing.do_bench`` on a GPU, a wall clock on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[1]


def ceilings(device, small: bool = False) -> dict:
    """The machine's own ceilings: device-to-device copy bandwidth and the bf16 matmul rate."""
    import torch

    n = (1 << 20) if small else (1 << 30)  # bytes copied
    src = torch.randn(n // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src), device)
    s = 256 if small else 8192
    a = torch.randn(s, s, device=device, dtype=torch.bfloat16)
    b = torch.randn(s, s, device=device, dtype=torch.bfloat16)
    mm = _bench(lambda: a @ b, device)
    return {"copy_gb_s": round(2 * n / ms / 1e6, 1), "bf16_mm_tflops": round(2 * s**3 / mm / 1e9, 1),
            "ceiling_shapes": f"copy {n >> 20} MiB, mm {s}^3 bf16"}  # fmt: skip


def stage_build(args) -> None:
    """Dry run only (the real build is started by the orchestrator): the decision and command."""
    d = build_decision()
    d["note"] = "dry run: not built; on a GPU machine this command runs in the background"
    _write_json(args.out, "build", d)
    print(json.dumps(d, indent=1))


def stage_triton_tests(args) -> None:
    junit = os.path.join(args.work, "triton_tests.xml")
    tests = ["tests/test_gpu.py"]
    extra = ["--collect-only"] if args.dry_run else []
    res = _pytest(extra + tests, junit, timeout=args.stage_timeout)
    _update_json(args.out, "tests", "triton_tests", res)


def stage_cuda_tests(args) -> None:
    env = {**os.environ, "MOE_KERNELS_CUDA_CHILD": "1"}
    extra = ["--collect-only"] if args.dry_run else []
    # A trap poisons its process: the CUDA library's tests run alone, in a child of their own.
    _update_json(args.out, "tests", "cuda_tests", {})
    runs = {
        "test_gpu_cuda": _pytest(extra + ["tests/test_gpu_cuda.py"], os.path.join(args.work, "cuda1.xml"),
                                 timeout=args.stage_timeout * 0.6, env=env),  # fmt: skip
        "trap_cuda_ops_and_layer": _pytest(
            extra + ["tests/test_gpu_cuda_process.py::test_device_check_traps_in_a_child_and_names_the_value",
                     "tests/test_gpu.py", "-k", "cuda or moe_mlp or trap"],
            os.path.join(args.work, "cuda2.xml"), timeout=args.stage_timeout * 0.35,
        ),
    }  # fmt: skip
    _update_json(args.out, "tests", "cuda_tests", runs)


def stage_introspect(args) -> None:
    from bench import kernels

    cache = os.environ.get("TRITON_CACHE_DIR", "")
    note = None
    if args.dry_run:
        # No kernel was compiled by a GPU run: compile one ahead of time into the cache so the
        # same scan and cubin analysis run.
        fn, sig, const, div = kernels.gemm_signature("forward", "bf16")
        cfg = kernels.gemm_configs("forward", 90)[1]
        const.update(INPUT_PRECISION="tf32", DOT_FP32=False, **cfg.kwargs)
        kernels.compile_kernel(fn, 90, sig, const, div, cfg.num_warps, cfg.num_stages)
        note = "dry run: one grouped GEMM compiled ahead of time for sm_90"
    records = []
    out = {"cuobjdump": kernels.find_cuobjdump(), "note": note, "kernels": records}
    for rec in kernels.scan_cache(cache):  # the grouped GEMMs first; flushed after each kernel
        records.append(rec)
        _write_json(args.out, "introspect", out)
    _write_json(args.out, "introspect", out)
    print(kernels.table(records))


def _grouped_offsets(sizes, device):
    import torch

    return torch.tensor([0, *sizes], device=device).cumsum(0)


def microbench_cases(dry_run: bool) -> list[dict]:
    """Grouped GEMM shapes: V-MoE-B/16's fc1 (capacity buffer, 32 experts of 104 rows) and an
    LLM-like fc1 (E=8, uneven dropless groups)."""
    if dry_run:
        return [{"name": "tiny", "sizes": [40, 0, 72, 16], "K": 64, "N": 96}]
    llm = [3900, 4400, 4100, 3600, 4300, 4000, 4200, 4268]  # 32768 rows, about T*K/E each
    return [
        {"name": "vmoe_b16_fc1", "sizes": [104] * 32, "K": 768, "N": 3072},
        {"name": "llm_fc1", "sizes": llm, "K": 4096, "N": 14336},
    ]


def _tma_failure() -> str | None:
    """Why the launcher turned the persistent TMA kernel off in this process (None: it did not)."""
    try:
        from moe_kernels.ops import _triton

        return _triton.TMA_FAILURE["error"]
    except Exception:  # no triton (dry run without it)
        return None


def _tma_off(fn):
    """``fn`` run with MOE_KERNELS_TRITON_TMA=0 (read at each launch)."""

    def run():
        old = os.environ.get("MOE_KERNELS_TRITON_TMA")
        os.environ["MOE_KERNELS_TRITON_TMA"] = "0"
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop("MOE_KERNELS_TRITON_TMA")
            else:
                os.environ["MOE_KERNELS_TRITON_TMA"] = old

    return run


def stage_microbench(args) -> None:
    import torch

    import moe_kernels as mk

    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    backend = "torch" if args.dry_run else "triton"
    records = []
    out = {"device": str(device), "dtype": str(dtype), "backend": backend, "records": records}

    def add(case, op, impl, ms, flops=None, nbytes=None, note=None):
        rec = {"case": case, "op": op, "impl": impl, "ms": round(ms, 4) if ms is not None else None, "note": note}
        if flops and ms:
            rec["tflops"] = round(flops / ms / 1e9, 1)
        if nbytes and ms:
            rec["gb_s"] = round(nbytes / ms / 1e6, 1)
        records.append(rec)
        out["tma_failure"] = _tma_failure()  # the launcher's fallback, if the TMA kernel failed
        _write_json(args.out, "microbench", out)  # flushed after every record

    def attempt(case, op, impl, fn, **kw):
        try:
            add(case, op, impl, _bench(fn, device), **kw)
        except Exception as exc:  # a reference this torch lacks is reported, not fatal
            add(case, op, impl, None, note=f"{type(exc).__name__}: {str(exc)[:200]}")

    def gemm_case(c: dict) -> None:
        sizes, K, N = c["sizes"], c["K"], c["N"]
        E, M = len(sizes), sum(sizes)
        flops = 2.0 * M * K * N
        offsets = _grouped_offsets(sizes, device)
        x = torch.randn(M, K, device=device, dtype=dtype)
        w = (torch.randn(E, N, K, device=device, dtype=dtype) / K**0.5).contiguous()
        g = torch.randn(M, N, device=device, dtype=dtype)
        name = c["name"]
        attempt(name, "fwd", "moe_kernels", lambda: mk.grouped_mm(x, w, offsets, backend=backend), flops=flops)
        from moe_kernels.ops.grouped_mm import _grouped_mm, _grouped_mm_weight_grad

        # dX and dW as the backward calls them: the custom ops on the strided expert matrices.
        wT = w.transpose(1, 2)
        attempt(name, "dx", "moe_kernels", lambda: _grouped_mm(g, wT, offsets, None, backend), flops=flops)
        attempt(name, "wgrad", "moe_kernels", lambda: _grouped_mm_weight_grad(x, g, offsets, backend), flops=flops)
        if backend == "triton":  # the non-persistent kernel where sm_90 runs the TMA one
            attempt(name, "fwd", "moe_kernels (no TMA)",
                    _tma_off(lambda: mk.grouped_mm(x, w, offsets, backend=backend)), flops=flops)  # fmt: skip
            attempt(name, "dx", "moe_kernels (no TMA)", _tma_off(lambda: _grouped_mm(g, wT, offsets, None, backend)),
                    flops=flops)  # fmt: skip
        # torch's grouped GEMM (CUTLASS on sm_90): int32 end offsets; the second operand
        # column-major, the 2d-2d (weight gradient) form with a row-major first operand. The
        # layouts are made outside the timed region.
        ends = offsets[1:].to(torch.int32)
        w_cm = w.transpose(1, 2).contiguous().transpose(1, 2)  # [E, N, K], column-major
        g_t = g.t().contiguous()  # [N, M]
        x_cm = x.t().contiguous().t()  # [M, K], column-major
        attempt(name, "fwd", "torch._grouped_mm", lambda: torch._grouped_mm(x, wT, offs=ends), flops=flops)
        attempt(name, "dx", "torch._grouped_mm", lambda: torch._grouped_mm(g, w_cm, offs=ends), flops=flops)
        attempt(name, "wgrad", "torch._grouped_mm", lambda: torch._grouped_mm(g_t, x_cm, offs=ends), flops=flops)
        # Padded batched GEMM (every expert padded to the largest group) and a dense GEMM.
        P = max(sizes)
        xp = torch.randn(E, P, K, device=device, dtype=dtype)
        attempt(name, "fwd", "torch.bmm (padded)", lambda: torch.bmm(xp, wT), flops=2.0 * E * P * K * N,
                note=f"{E}x{P} padded rows: {E * P / M:.2f}x the useful FLOPs")  # fmt: skip
        wd = torch.randn(K, N, device=device, dtype=dtype)
        attempt(name, "fwd", "torch.mm (dense, same FLOPs)", lambda: x @ wd, flops=flops)

    for c in microbench_cases(args.dry_run):
        gemm_case(c)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # The weight gradient with one expert holding 3/4 of the rows (V-MoE-B's fc1 widths): the
    # row chunks (ops/_triton.py: wgrad_chunk) against the unchunked kernel (split=1).
    if backend == "triton":
        from moe_kernels.ops import _triton

        sizes = [24576] + [1170] * 7
        M, K, N = sum(sizes), 768, 3072
        x = torch.randn(M, K, device=device, dtype=dtype)
        g = torch.randn(M, N, device=device, dtype=dtype)
        offsets = _grouped_offsets(sizes, device)
        case = f"skewed E=8 M={M} K={K} N={N}"
        for impl, split in (("moe_kernels (row chunks)", None), ("moe_kernels (unchunked)", 1)):
            attempt(case, "wgrad", impl, lambda s=split: _triton.grouped_mm_weight_grad(x, g, offsets, split=s),
                    flops=2.0 * M * K * N)  # fmt: skip
        torch.cuda.empty_cache()

    # dispatch / combine: bytes moved vs a plain copy of the same bytes.
    T, D, E, K = (64, 32, 4, 2) if args.dry_run else (16384, 4096, 8, 2)
    x = torch.randn(T, D, device=device, dtype=dtype)
    idx = torch.rand(T, E, device=device).topk(K, dim=1).indices
    r = mk.make_routing(idx, E, None, backend="auto")
    wts = torch.rand(T, K, device=device)
    buf = mk.dispatch(x, r)
    esz = x.element_size()
    bd = 2 * r.num_rows * D * esz  # read a token row per assignment, write the buffer row
    bc = r.num_rows * D * esz + T * D * esz  # read K rows per token, write the token
    case = f"T={T} D={D} E={E} K={K}"
    be = "torch" if args.dry_run else "auto"
    from moe_kernels import backends

    for op, fn, nbytes in (
        ("dispatch", lambda: mk.dispatch(x, r, backend=be), bd),
        ("combine", lambda: mk.combine(buf, r, wts, backend=be), bc),
    ):
        chosen = backends.choose(op, backends.requested_backend(be), device)[0]
        attempt(case, op, f"moe_kernels ({chosen})", fn, nbytes=nbytes)
    src = torch.empty_like(buf)
    attempt(case, "copy (same bytes as dispatch)", "torch.Tensor.copy_", lambda: buf.copy_(src), nbytes=bd)
    print(json.dumps(out, indent=1))


def layer_cases(dry_run: bool) -> list[dict]:
    """(name, tokens, D, H, E, K, capacity factor or None, group size)."""
    if dry_run:
        return [{"name": "tiny", "T": 64, "D": 32, "H": 64, "E": 4, "K": 2, "c": 1.05, "S": 32}]
    return [
        # The largest first: if the stage runs out of time, the GEMM-bound case is measured.
        {"name": "llm_like", "T": 16384, "D": 4096, "H": 14336, "E": 8, "K": 2, "c": None, "S": None},
        {"name": "vmoe_b16_group", "T": 1576, "D": 768, "H": 3072, "E": 32, "K": 2, "c": 1.05, "S": 1576},
        {"name": "vmoe_s32_group", "T": 400, "D": 512, "H": 2048, "E": 8, "K": 2, "c": 1.05, "S": 400},
    ]


def _profile_table(step, device, rows: int = 15) -> str:
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    ka = prof.key_averages()
    keys = ("self_device_time_total", "self_cuda_time_total") if device.type == "cuda" else ("self_cpu_time_total",)
    for key in keys:
        try:
            return ka.table(sort_by=key, row_limit=rows, max_name_column_width=60)
        except Exception:  # the key's name changed across torch versions
            continue
    return ka.table(row_limit=rows)


def stage_layer(args) -> None:
    import torch
    from torch import nn

    import moe_kernels as mk

    device = torch.device("cpu" if args.dry_run else "cuda")
    amp_dtype = torch.bfloat16
    out = {"device": str(device), "autocast": str(amp_dtype), "records": [], "profiles": {}}
    def layer_case(c: dict) -> None:
        torch.manual_seed(0)
        T, D, H, E, K = c["T"], c["D"], c["H"], c["E"], c["K"]
        layer = mk.MoEMlp(D, H, num_experts=E, k=K, capacity_factor=c["c"], group_size=c["S"], device=device)
        x = torch.randn(T, D, device=device, requires_grad=True)
        gy = torch.randn(T, D, device=device)
        with torch.no_grad():
            plan = layer.router(x, capacity_factor=layer.current_capacity_factor(), group_size=c["S"]).plan
            kept = int(plan.counts.sum())  # rows the experts really compute (a sync, outside timing)
        dense = nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D)).to(device)
        xd = torch.randn(kept, D, device=device, requires_grad=True)
        gd = torch.randn(kept, D, device=device)

        def moe_step():
            with torch.autocast(device.type, dtype=amp_dtype):
                y = layer(x)
            (y.float() * gy).sum().backward()
            layer.zero_grad(set_to_none=True)
            x.grad = None

        def dense_step():
            with torch.autocast(device.type, dtype=amp_dtype):
                y = dense(xd)
            (y.float() * gd).sum().backward()
            dense.zero_grad(set_to_none=True)
            xd.grad = None

        flops = 3 * 4.0 * kept * D * H  # fwd 2 GEMMs + bwd 4 GEMMs over the kept rows
        row = {"case": c["name"], **{k: v for k, v in c.items() if k != "name"}, "kept_rows": kept,
               "padded_rows": plan.num_rows}  # fmt: skip
        rep = 30 if args.dry_run else (300 if T >= 8192 else 150)
        for impl, step in (("moe_kernels MoEMlp", moe_step), ("dense MLP, same active FLOPs", dense_step)):
            try:
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                ms = _bench(step, device, rep_ms=rep)
                peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
                out["records"].append({**row, "impl": impl, "ms": round(ms, 3),
                                       "tflops": round(flops / ms / 1e9, 1),
                                       "peak_gib": None if peak is None else round(peak, 2)})  # fmt: skip
            except Exception as exc:
                out["records"].append({**row, "impl": impl, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            out["tma_failure"] = _tma_failure()
            _write_json(args.out, "layer", out)
        moe = [r for r in out["records"] if r["case"] == c["name"] and "ms" in r]
        if len(moe) == 2:
            moe[0]["x_dense"] = round(moe[0]["ms"] / moe[1]["ms"], 2)
        if c["name"] in ("vmoe_b16_group", "llm_like", "tiny"):
            try:
                out["profiles"][c["name"]] = _profile_table(moe_step, device)
            except Exception as exc:
                out["profiles"][c["name"]] = f"profiler failed: {type(exc).__name__}: {exc}"
        _write_json(args.out, "layer", out)
    for c in layer_cases(args.dry_run):
        layer_case(c)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(out["records"], indent=1))


STAGE_FNS = {
    "facts": stage_facts,
    "build": stage_build,
    "triton_tests": stage_triton_tests,
    "introspect": stage_introspect,
    "microbench": stage_microbench,
    "layer": stage_layer,
    "cuda_tests": stage_cuda_tests,
}


# ============================================================================ summary


def _md_table(rows: list[dict], cols: list[str]) -> str:
    if not rows:
        return "(none)\n"
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _tests_md(title: str, res: dict | None) -> str:
    if not res:
        return f"**{title}**: no result\n"
    if "error" in res:
        return f"**{title}**: rc={res.get('rc')}, {res['error']}\n"
    s = (
        f"**{title}** ({' '.join(res.get('args', []))}): {res.get('passed')} passed, {res.get('failed')} failed, "
        f"{res.get('errors')} errors, {res.get('skipped')} skipped in {res.get('seconds')} s (rc={res.get('rc')})\n"
    )
    for f in res.get("failures", [])[:15]:
        s += f"- FAILED `{f['test']}`: {f['message'][:200]}\n"
    for reason, n in list(res.get("skip_reasons", {}).items())[:5]:
        s += f"- skipped {n}: {reason}\n"
    return s


def write_summary(out: str, status: dict, dry_run: bool) -> None:
    facts = _read_json(out, "facts") or {}
    parts = [
        "# moe-kernels GPU check" + (" (DRY RUN, no GPU)" if dry_run else ""),
        "",
        f"- date: {facts.get('date')}  commit: {facts.get('commit')}",
        f"- device: {facts.get('device')} (cc {facts.get('capability')}, {facts.get('sms')} SMs, "
        f"{facts.get('memory_gib')} GiB); nvidia-smi: {facts.get('nvidia_smi')}",
        f"- python {facts.get('python')}, torch {facts.get('torch')} (CUDA {facts.get('torch_cuda')}), "
        f"triton {facts.get('triton')}, nvcc CUDA {facts.get('nvcc_cuda')}, {facts.get('cpus')} CPUs",
        f"- ceilings measured here: copy {facts.get('copy_gb_s')} GB/s, bf16 matmul "
        f"{facts.get('bf16_mm_tflops')} TFLOP/s ({facts.get('ceiling_shapes')})",
        "",
        "## Stages",
        "",
        _md_table([{"stage": n, **status[n]} for n in status], ["stage", "rc", "seconds", "timeout", "timed_out"]),
    ]
    build = _read_json(out, "build")
    if build:
        parts += [f"Build: {'built' if build.get('rc') == 0 else 'not built'}"
                  f"{' — ' + build['reason'] if build.get('reason') else ''}"
                  f" (`{' '.join(build.get('command', []))}` with {build.get('env')})", ""]  # fmt: skip
    tests = _read_json(out, "tests") or {}
    parts += ["## Tests", "", _tests_md("Triton and layer tests", tests.get("triton_tests"))]
    cuda = tests.get("cuda_tests") or {}
    for k, v in cuda.items():
        parts.append(_tests_md(f"CUDA library: {k}", v))
    intro = _read_json(out, "introspect")
    if intro:
        recs, seen = [], set()
        kernels = intro.get("kernels", [])
        for r in [r for r in kernels if "grouped_mm" in r.get("kernel", "")] or kernels:
            key = tuple(r.get(k) for k in ("kernel", "dot", "config", "n_regs", "n_spills", "shared_bytes"))
            if key not in seen:  # one row per distinct compiled variant
                seen.add(key)
                recs.append(r)
        parts += ["## Compiled kernels (grouped GEMMs)", "",
                  _md_table(recs, ["kernel", "dot", "config", "arch", "n_regs", "n_spills", "shared_bytes", "wgmma",
                                   "mma", "tma", "ldl", "stl"]),  # fmt: skip
                  f"{len(intro.get('kernels', []))} kernels compiled in all (introspect.json).", ""]
    for stage in ("microbench", "layer"):
        failed = (_read_json(out, stage) or {}).get("tma_failure")
        if failed:
            parts += [f"**The persistent TMA kernel failed in the {stage} stage and was turned off** (the"
                      f" non-persistent kernel ran instead): {failed}", ""]  # fmt: skip
    mb = _read_json(out, "microbench")
    if mb:
        parts += [f"## Microbenchmarks ({mb.get('dtype')}, median of do_bench)", "",
                  _md_table(mb.get("records", []), ["case", "op", "impl", "ms", "tflops", "gb_s", "note"])]  # fmt: skip
    layer = _read_json(out, "layer")
    if layer:
        parts += [f"## MoEMlp training step ({layer.get('autocast')} autocast, fwd+bwd)", "",
                  _md_table(layer.get("records", []), ["case", "impl", "T", "D", "H", "E", "K", "kept_rows",
                                                       "padded_rows", "ms", "tflops", "x_dense", "peak_gib",
                                                       "error"])]  # fmt: skip
        for name, table in layer.get("profiles", {}).items():
            parts += [f"### Profiler top-15 kernels: {name}", "", "```", table.strip(), "```", ""]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(parts) + "\n")


# ============================================================================ entry point


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT") or "out/gpu", help="results folder")
    p.add_argument("--work", default=os.environ.get("GPU_CHECK_WORK") or "/tmp/moe-kernels-gpu-check",
                   help="scratch folder (logs, Triton cache, junit files); not returned")  # fmt: skip
    p.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET", 540)),
                   help="seconds the whole check may take")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="no GPU: run every stage's CPU code path")
    p.add_argument("--stage", choices=list(STAGE_FNS), help=argparse.SUPPRESS)
    p.add_argument("--stage-timeout", type=float, default=120, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out, args.work = os.path.abspath(args.out), os.path.abspath(args.work)
    if args.stage:
        STAGE_FNS[args.stage](args)
        return 0
    if not args.dry_run and not _has_gpu():
        print("gpu-check: no CUDA device visible to torch: doing a dry run (--dry-run)")
        args.dry_run = True
    return Check(args.out, args.work, args.budget, args.dry_run).run()


if __name__ == "__main__":
    sys.exit(main())

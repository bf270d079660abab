"""``python -m bench``: the moe_kernels benchmark on the machine's default device.

  --quick         the main cases (bench.cases.MAIN_CASES), fp32 (a few minutes on 2 CPU cores)
  --json PATH     write {"device", "versions", "sgemm_gflops", "records": [...]} (default out/bench.json)
  --plot PATH     the plot of every implementation's time over the dense MLP's (default out/bench.png)

``BENCH_MALLOC=default`` times with glibc's default allocator settings instead of keeping freed
memory (bench/_malloc.py). The machine's fp32 matmul rate is measured in the same run
(``sgemm_gflops``); every record has ``gflops``, the useful FLOPs (``bench.suite.useful_flops``)
over its median time, and the table reports each implementation as "x dense" and "% of sgemm".
"""

from __future__ import annotations

from bench import _malloc

_malloc.init()  # before torch starts its threads (see bench/_malloc.py)

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from bench import report  # noqa: E402
from bench.cases import MAIN_CASES, SWEEP_CASES  # noqa: E402
from bench.measure import copy_rate, cpuinfo, device_name, run_meta, sgemm  # noqa: E402
from bench.suite import run_layer_case, run_op_cases  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the main cases, fp32 only")
    ap.add_argument("--json", metavar="PATH", default="out/bench.json", help="records as JSON (default out/bench.json)")
    ap.add_argument("--plot", metavar="PATH", default="out/bench.png", help="ratio plot (PNG)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cases", nargs="*", help="only these case names")
    ap.add_argument("--dtypes", nargs="*", choices=("fp32", "bf16"), help="layer dtypes (default: fp32; full: + bf16)")
    ap.add_argument("--min-run-time", type=float, default=None, help="seconds per measurement")
    ap.add_argument("--sgemm-n", type=int, default=1536, help="size of the square fp32 matmul of sgemm_gflops")
    ap.add_argument("--copy-mib", type=int, default=256, help="MiB copied to measure copy_gbps, the memory bandwidth")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    quick = args.quick
    mrt = args.min_run_time or (0.3 if quick else 1.0)
    runs = 5 if quick else 10  # steps per impl at least: this VM's step times wander by +-20%
    dtypes = args.dtypes or (["fp32"] if quick else ["fp32", "bf16"])
    cases = [c for c in MAIN_CASES if not args.cases or c.name in args.cases]
    t0 = time.time()
    print(f"# moe_kernels benchmark on {device_name(device)} (malloc: {_malloc.MODE}, BENCH_MALLOC)", flush=True)
    sgemm_gflops, sgemm_t = sgemm(device, args.sgemm_n)
    print(
        f"# sgemm ({args.sgemm_n}^3, fp32): {sgemm_gflops:.1f} GFLOP/s"
        f" ({sgemm_t.median_ms:.2f} ms ± {sgemm_t.iqr_ms:.2f}, {sgemm_t.runs} runs)",
        flush=True,
    )
    copy_gbps, _ = copy_rate(device, args.copy_mib)
    print(f"# memory copy ({args.copy_mib} MiB, fp32): {copy_gbps:.1f} GB/s read + written", flush=True)
    records, notes = [], []
    for dt in dtypes:
        dt_cases, kw = cases, dict(min_run_time=mrt, min_runs=runs, max_warmup=2 if quick else 4)
        why = _emulated_bf16(device) if dt == "bf16" else None
        if why and not args.dtypes and not args.cases:
            # Emulated bf16 runs a V-MoE-B/16 step in minutes: the smallest case stands for it.
            dt_cases, kw = cases[:1], dict(min_run_time=0.0, min_runs=3, max_warmup=1)
            notes.append(f"bf16: {dt_cases[0].name} only, 3 steps per impl; {why}")
            print(f"# {notes[-1]}", flush=True)
        for case in dt_cases:
            records += run_layer_case(case, dt, device, **kw)
    if not quick:
        for case in SWEEP_CASES:
            if not args.cases or case.name in args.cases:
                records += run_layer_case(
                    case,
                    "fp32",
                    device,
                    impls=("moe_kernels", "dense", "floor", "padded_bmm", "grouped_mm"),
                    modes=("fwd_bwd",),
                    min_run_time=mrt,
                    min_runs=runs,
                )
        for case in cases:
            records += run_op_cases(case, "fp32", device, min_run_time=min(mrt, 0.5))
        if device.type == "cpu" and not args.cases:
            # Expert parallelism: the all_to_all exchange on 2 gloo processes (its own table row).
            from bench.distributed import run_exchange_bench

            records += run_exchange_bench(modes=("fwd", "fwd_bwd"), log=print)
    elapsed = time.time() - t0
    for r in records:
        r.setdefault("gflops", None)  # no matmul FLOPs to count (e.g. the exchange)

    meta = run_meta(
        device,
        sgemm_gflops,
        sgemm_t,
        args.sgemm_n,
        quick=quick,
        elapsed=elapsed,
        copy_gbps=round(copy_gbps, 2),
        notes=notes,
        command="python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    print()
    print(
        f"## Whole layer ({meta['device']}; torch {torch.__version__}; {elapsed:.0f} s;"
        f" sgemm {sgemm_gflops:.1f} GFLOP/s)"
    )
    print()
    print(report.layer_table(records, sgemm_gflops))
    ops = report.op_table(records)
    if ops:
        print("\n## Each op alone (forward)\n")
        print(ops)
    for n in notes:
        print(f"\nNote: {n}")
    print("\n## Targets (forward+backward)\n")
    print(report.targets(records))
    if args.plot:
        os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
        report.plot(records, args.plot, f"moe_kernels vs baselines and the dense MLP, {meta['device']}")
        print(f"\nplot: {args.plot}")
    if args.json:
        report.write_json(args.json, meta, records)
        print(f"json: {args.json}")
    return 0


def _emulated_bf16(device: torch.device) -> str | None:
    """Why bf16 matmuls are emulated on this device (None where they are native)."""
    flags = cpuinfo("flags") if device.type == "cpu" else None
    if flags is None or {"avx512_bf16", "amx_bf16"} & set(flags.split()):
        return None
    return (
        "no bf16 instructions (avx512_bf16, amx_bf16) on this CPU: torch emulates bf16 matmuls (30-50x fp32's"
        " time) in the baselines and the dense MLP; the layer's C++ grouped GEMM runs them in fp32"
    )


if __name__ == "__main__":
    sys.exit(main())

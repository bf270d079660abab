"""``python -m bench.sweep``: the layer's time per token over a token sweep and an expert sweep
(docs/sweep.md), against the dense MLP of the same active FLOPs.

  --json PATH       records as JSON (default out/sweep.json), the schema of ``python -m bench``'s
  --plot PATH       two panels of time per token, against T and against E (default docs/sweep.png)
  --sweeps NAME...  tokens, experts (default both)
  --quick           5 steps per implementation instead of 10 (for a look, not for the docs)

Each sweep point is ``bench.suite.run_layer_case`` with two implementations, ``moe_kernels`` (the
layer in train mode) and ``dense``, timed interleaved, fp32, forward+backward, as ``python -m
bench`` times them. Every record gets ``sweep`` (which sweep), ``group_size``, ``capacity``,
``us_per_token`` (median time over T) and ``x_dense`` (time over dense's of the same point).

Shape letters: T tokens, D width, H hidden, E experts, K choices, S group size, C capacity.
"""

from __future__ import annotations

from bench import _malloc

_malloc.init()  # before torch starts its threads (see bench/_malloc.py)

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import torch  # noqa: E402

from bench import report  # noqa: E402
from bench.cases import EXPERT_SWEEP, TOKEN_SWEEP, LayerCase  # noqa: E402
from bench.measure import copy_rate, device_name, run_meta, sgemm  # noqa: E402
from bench.suite import run_layer_case  # noqa: E402

IMPLS = ("moe_kernels", "dense")


def run_sweep(
    sweep: str,
    cases: Sequence[LayerCase],
    device: torch.device,
    *,
    min_run_time: float,
    min_runs: int,
    max_warmup: int = 4,
    log=print,
) -> list[dict]:
    """The fp32 forward+backward records of ``IMPLS`` at each case of one sweep, with the sweep's
    fields added (``sweep``, ``group_size``, ``capacity``, ``us_per_token``, ``x_dense``)."""
    records = []
    for case in cases:
        recs = run_layer_case(
            case,
            "fp32",
            device,
            impls=IMPLS,
            modes=("fwd_bwd",),
            min_run_time=min_run_time,
            min_runs=min_runs,
            max_warmup=max_warmup,
            log=log,
        )
        dense = next(r for r in recs if r["impl"] == "dense")
        for r in recs:
            r.update(
                sweep=sweep,
                group_size=case.group_size,
                capacity=case.capacity,
                us_per_token=round(report.us_per_token(r), 4),
                x_dense=round(report.x_dense(r, dense), 4),
            )
        records += recs
    return records


def main(
    argv=None, *, token_cases: Sequence[LayerCase] | None = None, expert_cases: Sequence[LayerCase] | None = None
) -> int:
    """The command line; ``token_cases`` and ``expert_cases`` replace the sweeps' cases (tests)."""
    ap = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="PATH", default="out/sweep.json", help="records as JSON (default out/sweep.json)")
    ap.add_argument("--plot", metavar="PATH", default="docs/sweep.png", help="time-per-token plot (PNG)")
    ap.add_argument("--sweeps", nargs="*", choices=tuple(report.SWEEP_AXES), default=list(report.SWEEP_AXES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="5 steps per implementation instead of 10")
    ap.add_argument("--min-run-time", type=float, default=None, help="seconds per measurement")
    ap.add_argument("--sgemm-n", type=int, default=1536, help="size of the square fp32 matmul of sgemm_gflops")
    ap.add_argument("--copy-mib", type=int, default=256, help="MiB copied to measure copy_gbps, the memory bandwidth")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    mrt = args.min_run_time if args.min_run_time is not None else (0.3 if args.quick else 1.0)
    runs = 5 if args.quick else 10  # steps per impl at least, as python -m bench
    cases = {
        "tokens": TOKEN_SWEEP if token_cases is None else token_cases,
        "experts": EXPERT_SWEEP if expert_cases is None else expert_cases,
    }
    t0 = time.time()
    print(f"# moe_kernels sweep on {device_name(device)}", flush=True)
    sgemm_gflops, sgemm_t = sgemm(device, args.sgemm_n)
    print(f"# sgemm ({args.sgemm_n}^3, fp32): {sgemm_gflops:.1f} GFLOP/s", flush=True)
    copy_gbps, _ = copy_rate(device, args.copy_mib)
    print(f"# memory copy ({args.copy_mib} MiB, fp32): {copy_gbps:.1f} GB/s read + written", flush=True)
    records = []
    for sweep in args.sweeps:
        records += run_sweep(
            sweep, cases[sweep], device, min_run_time=mrt, min_runs=runs, max_warmup=2 if args.quick else 4
        )
    elapsed = time.time() - t0
    meta = run_meta(
        device,
        sgemm_gflops,
        sgemm_t,
        args.sgemm_n,
        quick=args.quick,
        elapsed=elapsed,
        copy_gbps=round(copy_gbps, 2),
        sweeps={s: [c.name for c in cases[s]] for s in args.sweeps},
        command="python -m bench.sweep " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    print(
        f"\n## Time per token ({meta['device']}; torch {torch.__version__}; {elapsed:.0f} s;"
        f" sgemm {sgemm_gflops:.1f} GFLOP/s)\n"
    )
    print(report.sweep_table(records))
    print("\n## Forward+backward records\n")
    print(report.layer_table(records, sgemm_gflops))
    checked = [t for t in report.check_targets(records) if t["target"] == "x dense"]
    if checked:
        print("\n## Targets\n")
        for t in checked:
            print(
                f"- {t['case']} fp32: x dense {t['value']:.2f} (target <= {t['limit']:.2f}:"
                f" {'met' if t['met'] else 'MISSED'})"
            )
    if args.plot:
        os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
        report.plot_sweep(records, args.plot, f"moe_kernels (train mode) and the dense MLP, fp32, {meta['device']}")
        print(f"\nplot: {args.plot}")
    if args.json:
        report.write_json(args.json, meta, records)
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

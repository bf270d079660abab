"""Markdown tables, the targets and the ratio plot of a benchmark run."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict

from bench.baselines import BASELINES


def _fmt(v: float) -> str:
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def layer_table(records: list[dict], sgemm_gflops: float | None = None) -> str:
    """One block per (case, dtype, mode): each impl's time, spread, memory, rate and ratios.

    ``x dense``: time over the dense MLP's of the same active FLOPs (``dense``), the reference a
    perfect MoE layer would match. ``% sgemm``: the record's useful GFLOP/s over the machine's
    fp32 matmul rate measured in the same run. ``speed-up``: a baseline's time over the layer's.
    """
    groups = defaultdict(dict)
    for r in records:
        if ":" in r["case"]:
            continue
        groups[(r["case"], r["dtype"], r["mode"])][r["impl"]] = r
    lines = [
        "| case | dtype | mode | impl | median ms | IQR ms | peak MB | GFLOP/s | % sgemm | x dense |"
        " moe_kernels speed-up |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (case, dtype, mode), by_impl in groups.items():
        dense = by_impl.get("dense")
        ours = by_impl.get("moe_kernels")
        for impl, r in by_impl.items():
            xd = f"{x_dense(r, dense):.2f}" if dense else "-"
            sp = f"{r['median_ms'] / ours['median_ms']:.2f}x" if ours and impl in BASELINES else ""
            mem = "-" if r["peak_mem_mb"] is None else _fmt(r["peak_mem_mb"])
            rate = r.get("gflops")
            gf = "-" if rate is None else _fmt(rate)
            pct = "-" if rate is None or not sgemm_gflops else f"{100 * rate / sgemm_gflops:.0f}%"
            name = f"**{impl}**" if impl == "moe_kernels" else impl
            t, iqr = _fmt(r["median_ms"]), _fmt(r["iqr_ms"])
            lines.append(f"| {case} | {dtype} | {mode} | {name} | {t} | {iqr} | {mem} | {gf} | {pct} | {xd} | {sp} |")
    return "\n".join(lines)


def x_dense(r: dict, dense: dict) -> float:
    """``r``'s time over the dense MLP's in the same (case, dtype, mode)."""
    return r["median_ms"] / dense["median_ms"]


def op_table(records: list[dict]) -> str:
    groups = defaultdict(dict)
    for r in records:
        if ":" in r["case"]:
            groups[(r["case"], r["dtype"])][r["impl"]] = r
    if not groups:
        return ""
    lines = [
        "| op | dtype | moe_kernels ms | reference ms | speed-up |",
        "|---|---|---:|---:|---:|",
    ]
    for (case, dtype), by in groups.items():
        a, b = by["moe_kernels"]["median_ms"], by["reference"]["median_ms"]
        lines.append(f"| {case} | {dtype} | {a:.4f} | {b:.4f} | {b / a:.1f}x |")
    return "\n".join(lines)


# The targets (docs/benchmarks.md), forward+backward. "moe_kernels" is the layer in train
# mode (router noise, auxiliary losses), as users train.
DENSE_LIMITS = {"vmoe_s32": 1.15, "vmoe_b16": 1.15}  # fp32, layer time / dense time, by case name
DENSE_LIMITS_BY_SHAPE = {(4096, 32): 1.10}  # fp32, by (T, E): the T=4096, E=32 case
BASELINE_MARGIN = 1.05  # every baseline's time / the layer's, at least
BF16_OVER_FP32 = {"vmoe_s32": 1.5}  # the layer's bf16 time / its fp32 time, at most
PEAK_OVER_DENSE = 1.3  # the layer's peak memory / dense's, at most


def check_targets(records: list[dict]) -> list[dict]:
    """Each target this run's forward+backward records can check: ``{case, dtype, target, value,
    limit, met}``; ``value`` is NaN (and ``met`` False) where a needed number is missing."""
    by = defaultdict(dict)
    for r in records:
        if ":" not in r["case"] and r["mode"] == "fwd_bwd":
            by[(r["case"], r["dtype"])][r["impl"]] = r
    out = []

    def add(case, dtype, target, value, limit, at_most=True):
        met = value <= limit if at_most else value >= limit  # NaN compares False: not met
        out.append(dict(case=case, dtype=dtype, target=target, value=value, limit=limit, met=bool(met)))

    for (case, dtype), d in by.items():
        ours, dense = d.get("moe_kernels"), d.get("dense")
        if ours is None:
            continue
        if dtype == "fp32":
            limit = DENSE_LIMITS.get(case, DENSE_LIMITS_BY_SHAPE.get((ours.get("tokens"), ours.get("experts"))))
            if limit is not None:
                add(case, dtype, "x dense", x_dense(ours, dense) if dense else math.nan, limit)
            base = [d[b]["median_ms"] / ours["median_ms"] for b in BASELINES if b in d]
            if base:
                add(case, dtype, "smallest speed-up over a baseline", min(base), BASELINE_MARGIN, at_most=False)
            if dense:
                mem = (
                    ours["peak_mem_mb"] / dense["peak_mem_mb"]
                    if ours["peak_mem_mb"] and dense["peak_mem_mb"]
                    else math.nan
                )
                add(case, dtype, "peak memory x dense", mem, PEAK_OVER_DENSE)
        elif case in BF16_OVER_FP32 and dtype == "bf16":
            fp32 = by.get((case, "fp32"), {}).get("moe_kernels")
            ratio = ours["median_ms"] / fp32["median_ms"] if fp32 else math.nan
            add(case, dtype, "x the layer's fp32 time", ratio, BF16_OVER_FP32[case])
    return out


def memory_without_grads(records: list[dict]) -> list[str]:
    """Information, not a target: the layer's fp32 forward+backward peak memory less the parameter
    gradients the step leaves (``param_grad_mb``), over dense's less its own. The memory target
    counts the gradients, which for an MoE layer are E experts' weights against dense's one."""
    by = defaultdict(dict)
    for r in records:
        if ":" not in r["case"] and r["mode"] == "fwd_bwd" and r["dtype"] == "fp32":
            by[r["case"]][r["impl"]] = r
    lines = []
    for case, d in by.items():
        ours, dense = d.get("moe_kernels"), d.get("dense")
        if not (ours and dense and ours.get("param_grad_mb") is not None and dense.get("param_grad_mb") is not None):
            continue
        if not (ours["peak_mem_mb"] and dense["peak_mem_mb"]):
            continue
        a = ours["peak_mem_mb"] - ours["param_grad_mb"]
        b = dense["peak_mem_mb"] - dense["param_grad_mb"]
        ratio = f"{a / b:.2f}" if b > 0 else "n/a"
        lines.append(
            f"- {case} fp32: peak memory less the parameter gradients {a:.0f} MB against dense's {b:.0f} MB"
            f" (x{ratio}; information, not a target: the gradients are {ours['param_grad_mb']:.0f} MB"
            f" against {dense['param_grad_mb']:.0f} MB)"
        )
    return lines


def targets(records: list[dict]) -> str:
    """The targets, checked on this run's forward+backward numbers, one line each."""
    lines = []
    for t in check_targets(records):
        op = "<=" if t["target"] != "smallest speed-up over a baseline" else ">="
        lines.append(
            f"- {t['case']} {t['dtype']}: {t['target']} {t['value']:.2f}"
            f" (target {op} {t['limit']:.2f}: {'met' if t['met'] else 'MISSED'})"
        )
    lines += memory_without_grads(records)
    checked = {(t["case"], t["dtype"]) for t in check_targets(records)}
    for case in DENSE_LIMITS:
        if (case, "fp32") not in checked:
            lines.append(f"- {case} fp32: not in this run")
    if not any(DENSE_LIMITS_BY_SHAPE.get((r.get("tokens"), r.get("experts"))) for r in records):
        lines.append("- T=4096, E=32 fp32: no such case in this run")
    return "\n".join(lines)


def plot(records: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [r for r in records if ":" not in r["case"] and r["mode"] == "fwd_bwd"]
    dense = {(r["case"], r["dtype"]): r["median_ms"] for r in rows if r["impl"] == "dense"}
    rows = [r for r in rows if (r["case"], r["dtype"]) in dense]  # ratios need the dense MLP
    keys = list(dict.fromkeys((r["case"], r["dtype"]) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(keys)), 4))
    width = 0.8 / max(len(impls), 1)
    for i, impl in enumerate(impls):
        vals = []
        for k in keys:
            r = next((r for r in rows if (r["case"], r["dtype"]) == k and r["impl"] == impl), None)
            vals.append(r["median_ms"] / dense[k] if r else 0)
        ax.bar([j + i * width for j in range(len(keys))], vals, width, label=impl)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
    ax.set_xticklabels([f"{c}\n{d}" for c, d in keys], fontsize=8)
    ax.set_ylabel("forward+backward time / dense MLP")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
    ax.set_title(title, fontsize=8, wrap=True)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Sweeps (bench.sweep, docs/sweep.md): which shape field each sweep varies.
SWEEP_AXES = {"tokens": ("tokens", "T, tokens"), "experts": ("experts", "E, experts (T, K, D, H fixed)")}


def us_per_token(r: dict) -> float:
    """A record's median time per token (us): flat in T where the cost grows linearly in T."""
    return r["median_ms"] * 1e3 / r["tokens"]


def sweep_table(records: list[dict]) -> str:
    """One row per sweep point: T, E, C, kept assignments, the layer's and dense's time per token
    (forward+backward) and the layer's time over dense's."""
    lines = [
        "| sweep | case | T | E | C | kept | moe_kernels us/token | IQR | dense us/token | IQR | x dense |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups = defaultdict(dict)
    for r in records:
        if r.get("sweep") and r["mode"] == "fwd_bwd":
            groups[(r["sweep"], r["case"])][r["impl"]] = r
    for (sweep, case), by in groups.items():
        ours, dense = by.get("moe_kernels"), by.get("dense")
        any_r = ours or dense
        cells = []
        for r in (ours, dense):
            cells += ["-", "-"] if r is None else [_fmt(us_per_token(r)), _fmt(r["iqr_ms"] * 1e3 / r["tokens"])]
        xd = f"{x_dense(ours, dense):.2f}" if ours and dense else "-"
        cap = any_r.get("capacity")
        lines.append(
            f"| {sweep} | {case} | {any_r['tokens']} | {any_r['experts']} | {'-' if cap is None else cap} |"
            f" {any_r['kept']} | {' | '.join(cells)} | {xd} |"
        )
    return "\n".join(lines)


def plot_sweep(records: list[dict], path: str, title: str) -> None:
    """Two panels, time per token (forward+backward, us) against T (log scale) and against E, for
    each implementation; error bars span one IQR around the median. A flat line: cost linear in T
    (left), independent of E at fixed active FLOPs (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [r for r in records if r.get("sweep") in SWEEP_AXES and r["mode"] == "fwd_bwd"]
    fig, axes = plt.subplots(1, len(SWEEP_AXES), figsize=(11, 4.2))
    for ax, (sweep, (field, label)) in zip(axes, SWEEP_AXES.items(), strict=True):
        mine = [r for r in rows if r["sweep"] == sweep]
        impls = list(dict.fromkeys(r["impl"] for r in mine))
        xs = sorted({r[field] for r in mine})
        for impl in impls:
            pts = sorted((r[field], r) for r in mine if r["impl"] == impl)
            x = [v for v, _ in pts]
            y = [us_per_token(r) for _, r in pts]
            err = [r["iqr_ms"] * 1e3 / r["tokens"] / 2 for _, r in pts]
            ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, lw=1.2, label=impl)
            if impl == "moe_kernels":
                dense = {r[field]: r for r in mine if r["impl"] == "dense"}
                for v, r in pts:
                    if v in dense:
                        ax.annotate(
                            f"{x_dense(r, dense[v]):.2f}x",
                            (v, us_per_token(r)),
                            textcoords="offset points",
                            xytext=(0, 6),
                            ha="center",
                            fontsize=7,
                        )
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(xs or [1]))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FixedFormatter([str(v) for v in xs] or [""]))
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.tick_params(axis="x", labelsize=7, labelrotation=45 if len(xs) > 5 else 0)
        ax.set_ylim(bottom=0)
        ax.set_xlabel(label)
        ax.set_ylabel("forward+backward time per token (µs)")
        ax.set_title(f"{sweep} sweep" if mine else f"{sweep} sweep: not run", fontsize=9)
        ax.grid(alpha=0.3)
        if impls:
            ax.legend(fontsize=8)
    fig.suptitle(title + "\n(labels: moe_kernels time / dense time)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(path: str, meta: dict, records: list[dict]) -> None:
    """``{**meta, "records": records}`` to ``path`` (its folder made if needed)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({**meta, "records": records}, f, indent=1)

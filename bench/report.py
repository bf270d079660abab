"""Markdown tables and the ratio plot of a benchmark run."""

from __future__ import annotations

from collections import defaultdict


def _fmt(v: float) -> str:
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def layer_table(records: list[dict]) -> str:
    """One block per (case, dtype, mode): each impl's time, spread, memory and ratios."""
    groups = defaultdict(dict)
    for r in records:
        if ":" in r["case"]:
            continue
        groups[(r["case"], r["dtype"], r["mode"])][r["impl"]] = r
    lines = [
        "| case | dtype | mode | impl | median ms | IQR ms | peak MB | x floor | moe_kernels speed-up |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for (case, dtype, mode), by_impl in groups.items():
        floor = by_impl.get("floor")
        ours = by_impl.get("moe_kernels")
        for impl, r in by_impl.items():
            xf = f"{r['median_ms'] / floor['median_ms']:.2f}" if floor else "-"
            sp = f"{r['median_ms'] / ours['median_ms']:.2f}x" if ours and impl not in ("moe_kernels", "floor") else ""
            mem = "-" if r["peak_mem_mb"] is None else _fmt(r["peak_mem_mb"])
            name = f"**{impl}**" if impl == "moe_kernels" else impl
            t, iqr = _fmt(r["median_ms"]), _fmt(r["iqr_ms"])
            lines.append(f"| {case} | {dtype} | {mode} | {name} | {t} | {iqr} | {mem} | {xf} | {sp} |")
    return "\n".join(lines)


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


def targets(records: list[dict]) -> str:
    """The issue's targets, checked on this run's fwd_bwd fp32 numbers."""
    by = defaultdict(dict)
    for r in records:
        if ":" not in r["case"] and r["mode"] == "fwd_bwd":
            by[(r["case"], r["dtype"])][r["impl"]] = r
    lines = []
    for (case, dtype), d in by.items():
        if "moe_kernels" not in d or "floor" not in d:
            continue
        ours, floor = d["moe_kernels"], d["floor"]
        ratio = ours["median_ms"] / floor["median_ms"]
        others = {k: v["median_ms"] for k, v in d.items() if k not in ("moe_kernels", "floor")}
        slowest_win = min((v / ours["median_ms"] for v in others.values()), default=float("nan"))
        mem = (
            ours["peak_mem_mb"] / floor["peak_mem_mb"]
            if ours["peak_mem_mb"] and floor["peak_mem_mb"]
            else float("nan")
        )
        lines.append(
            f"- {case} {dtype}: {ratio:.2f}x floor (target <= 1.10: {'met' if ratio <= 1.10 else 'MISSED'}); "
            f"smallest speed-up over a baseline {slowest_win:.2f}x ({'met' if slowest_win > 1 else 'MISSED'}); "
            f"peak memory {mem:.2f}x floor (target <= 1.3: {'met' if mem <= 1.3 else 'MISSED'})"
        )
    return "\n".join(lines)


def plot(records: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [r for r in records if ":" not in r["case"] and r["mode"] == "fwd_bwd"]
    floor = {(r["case"], r["dtype"]): r["median_ms"] for r in rows if r["impl"] == "floor"}
    rows = [r for r in rows if (r["case"], r["dtype"]) in floor]  # ratios need a floor
    keys = list(dict.fromkeys((r["case"], r["dtype"]) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(keys)), 4))
    width = 0.8 / max(len(impls), 1)
    for i, impl in enumerate(impls):
        vals = []
        for k in keys:
            r = next((r for r in rows if (r["case"], r["dtype"]) == k and r["impl"] == impl), None)
            vals.append(r["median_ms"] / floor[k] if r and k in floor else 0)
        ax.bar([j + i * width for j in range(len(keys))], vals, width, label=impl)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
    ax.set_xticklabels([f"{c}\n{d}" for c, d in keys], fontsize=8)
    ax.set_ylabel("forward+backward time / floor")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""PNG plots of a run: accuracy curves, expert use per MoE layer over training, and a
class-by-expert routing heat map (matplotlib, Agg)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

__all__ = ["plot_accuracy", "plot_expert_use", "plot_routing", "plot_seeds"]


def plot_accuracy(histories: dict[str, list[dict]], path: str) -> None:
    """Train (dashed) and validation (solid) accuracy per epoch, one colour per run.

    Readable for any epoch count: whole-number epoch ticks, a marker on every point up to 30
    epochs (so a one-epoch run shows its point), and a figure saved with room for its labels.
    """
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, hist) in enumerate(histories.items()):
        if not hist:
            continue
        ep = [h["epoch"] for h in hist]
        c = f"C{i}"
        marker = "o" if len(ep) <= 30 else None
        ax.plot(ep, [h["train_acc"] for h in hist], "--", color=c, alpha=0.6, marker=marker, markersize=4)
        ax.plot(ep, [h["val_acc"] for h in hist], "-", color=c, marker=marker, markersize=4, label=f"{name} (val)")
    last = max((h["epoch"] for hist in histories.values() for h in hist), default=1)
    if last <= 10:  # one tick per epoch, the points clear of the frame
        ax.set_xticks(range(1, last + 1))
        ax.set_xlim(0.5, last + 0.5)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _save_epochs(fig, ax, "accuracy (dashed: train)", path)


def plot_seeds(histories: dict[str, dict[int, list[dict]]], path: str) -> None:
    """Validation accuracy per epoch of several seeds: one colour per model, one line per seed
    (``histories[model][seed]`` is a run's per-epoch metrics)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, by_seed) in enumerate(histories.items()):
        for j, (_, hist) in enumerate(sorted(by_seed.items())):
            ep = [h["epoch"] for h in hist]
            ax.plot(ep, [h["val_acc"] for h in hist], "-o", color=f"C{i}", markersize=3, alpha=0.8,
                    label=name if j == 0 else None)  # fmt: skip
    _save_epochs(fig, ax, "validation accuracy", path)


def _save_epochs(fig, ax, ylabel: str, path: str) -> None:
    """The accuracy plots' common finish: labels, grid, legend, saved and closed."""
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_routing(matrices: dict[str, np.ndarray], class_names: list[str], path: str) -> None:
    """One heat map per MoE layer: the share of each class's assignments that reach each expert
    (rows sum to 1)."""
    n = len(matrices)
    if n == 0:
        return
    fig, axes = plt.subplots(1, n, figsize=(2.5 + 2.2 * n, 3.6), squeeze=False)
    for ax, (name, m) in zip(axes[0], matrices.items(), strict=True):
        m = np.asarray(m, dtype=np.float64)
        share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
        im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=max(share.max(), 1e-9))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("expert")
        step = 1 if m.shape[1] <= 10 else (m.shape[1] + 7) // 8  # at most about 8 labels: legible
        ax.set_xticks(range(0, m.shape[1], step))
        ax.tick_params(axis="x", labelsize=7)
        ax.set_yticks(range(m.shape[0]))
        ax.set_yticklabels(class_names if len(class_names) <= 30 else [""] * m.shape[0], fontsize=7)
    axes[0][0].set_ylabel("class")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="share of the class's assignments")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_expert_use(history: list[dict], path: str) -> bool:
    """One panel per MoE layer: each expert's share of the layer's kept assignments per epoch
    (``history[i]["routing"][layer]["tokens_per_expert"]``), with the epoch's drop fraction
    dashed. Returns whether there was anything to plot."""
    layers = sorted({name for h in history for name in h.get("routing", {})})
    if not layers:
        return False
    n = len(layers)
    fig, axes = plt.subplots(1, n, figsize=(1.5 + 3.6 * n, 3.4), squeeze=False)
    for ax, name in zip(axes[0], layers, strict=True):
        rows = [(h["epoch"], h["routing"][name]) for h in history if name in h.get("routing", {})]
        ep = [e for e, _ in rows]
        use = np.array([r["tokens_per_expert"] for _, r in rows], dtype=np.float64)  # [epochs, E]
        share = use / np.maximum(use.sum(axis=1, keepdims=True), 1)
        marker = "o" if len(ep) <= 30 else None
        for e in range(share.shape[1]):
            ax.plot(ep, share[:, e], marker=marker, markersize=3, label=f"expert {e}")
        ax.plot(ep, [r["drop_fraction"] for _, r in rows], "k--", marker=marker, markersize=3, label="dropped")
        ax.axhline(1 / share.shape[1], color="grey", lw=0.8, alpha=0.5)  # perfectly balanced
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of kept assignments\n(dashed: dropped fraction)")
    axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True

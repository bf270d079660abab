"""PNG plots of a run: accuracy curves and a class-by-expert routing heat map (matplotlib, Agg)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

__all__ = ["plot_accuracy", "plot_routing"]


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
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (dashed: train)")
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
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(m.shape[0]))
        ax.set_yticklabels(class_names if len(class_names) <= 30 else [""] * m.shape[0], fontsize=7)
    axes[0][0].set_ylabel("class")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="share of the class's assignments")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)

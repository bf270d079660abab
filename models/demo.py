"""Dense ViT vs V-MoE vs Mobile V-MoE on the embedded digits, on a CPU: ``python -m models.demo``.

All three share one backbone, 6 blocks x 64 wide (2 heads, MLP 256, patch 4 on 16 x 16 images:
17 tokens), and the same recipe (AdamW, warm-up + cosine, ``--epochs`` epochs, batch 64):

- dense ViT (``vmoe.create_model("Mu/4", moe_layers=None)``);
- V-MoE: 8 experts in every other block (3 MoE layers), K=2, capacity factor 1.05, groups of
  8 images;
- Mobile V-MoE: 5 experts in the last 2 blocks, K=2, one router per image, super-classes
  clustered from the dense model's validation confusion matrix (the dense run above is the
  recipe's stage 1), guidance weight 0.3.

Their FLOPs per image are within 1.4x of each other (the MoE layers run each token through K=2
experts); the table reports the measured counts. Prints one markdown table; plots, metrics and
checkpoints go to ``--out`` (default ``runs/demo``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from models.data import load_digits
from models.plots import plot_accuracy
from models.train import DEFAULTS, run, superclasses_from

ROWS = [
    ("dense ViT", dict(model="dense", variant="Mu/4")),
    ("V-MoE", dict(model="vmoe", variant="Mu/4", num_experts=8, k=2, moe_layers="every-2", capacity_factor=1.05)),
    ("Mobile V-MoE", dict(model="mobile", variant="6x64", patch_size=4, num_experts=5, k=2, num_moe_layers=2)),
]


def _describe(cfg: dict) -> str:
    if cfg["model"] == "dense":
        return "6x64, dense"
    if cfg["model"] == "vmoe":
        return f"6x64, E={cfg['num_experts']} K={cfg['k']} every-2, c={cfg['capacity_factor']}"
    return f"6x64, E={cfg['num_experts']} K={cfg['k']} last {cfg['num_moe_layers']}, per-image router"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(prog="python -m models.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("runs", "demo"))
    p.add_argument("--threads", type=int, default=1, help="1: see models.train --threads")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    splits = load_digits(16, seed=args.seed)
    results, histories = {}, {}
    superclass = None
    for name, over in ROWS:
        cfg = {**DEFAULTS, "epochs": args.epochs, "seed": args.seed, **over}
        if cfg["model"] == "mobile":
            superclass = superclasses_from(results["dense ViT"], cfg["num_experts"], seed=args.seed)
        res = run(
            cfg,
            splits,
            os.path.join(args.out, cfg["model"]),
            superclass=superclass if cfg["model"] == "mobile" else None,
            progress=not args.no_progress,
            desc=name,
        )
        res.pop("model")
        results[name] = res
        histories[name] = res["epochs"]
    plot_accuracy(histories, os.path.join(args.out, "accuracy.png"))
    total_s = time.perf_counter() - t_start

    dense_flops = results["dense ViT"]["flops_per_image"]
    groups = {c: [str(i) for i in np.flatnonzero(np.array(superclass) == c)] for c in range(int(max(superclass)) + 1)}
    lines = [
        "| model | configuration | test acc | MFLOPs / image | vs dense | params total | params active "
        "| router super-class acc | train time |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        ra = r["test_router_acc"]
        lines.append(
            f"| {name} | {_describe(r['config'])} | {r['test_acc']:.3f} | {r['flops_per_image'] / 1e6:.2f} "
            f"| {r['flops_per_image'] / dense_flops:.2f}x | {r['params_total']:,} | {r['params_active']:,} "
            f"| {'-' if ra is None else f'{ra:.3f}'} | {r['train_seconds']:.0f} s |"
        )
    n_tr, n_va, n_te = len(splits.train), len(splits.val), len(splits.test)
    lines += [
        "",
        f"Digits 16x16 (train/val/test {n_tr}/{n_va}/{n_te}), {args.epochs} epochs each, seed {args.seed}, "
        f"{args.threads} thread(s); total {total_s / 60:.1f} min. "
        "Super-classes (from the dense model's validation confusion): "
        + ", ".join("{" + ",".join(v) + "}" for v in groups.values())
        + ".",
    ]
    table = "\n".join(lines)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({k: {kk: vv for kk, vv in v.items() if kk != "epochs"} for k, v in results.items()}, f, indent=1)
    print(table)
    return table


if __name__ == "__main__":
    main()

"""Where experts pay: V-MoE against its dense twin at equal FLOPs, on a CPU: ``python -m models.demo``.

The default task (``--data digit-pairs``, ``models.data.load_digit_pairs``) is made from
scikit-learn's bundled digits and is built to need knowledge rather than arithmetic: each
16 x 16 image holds two 8 x 8 digits side by side, and its class is a fixed random label for
each of the 100 ordered digit pairs. A model has to read both digits and hold a 100-entry table.
There are 60,000 training pairs (any two of the 1,257 training digits, each at a random
height), so no model memorises its training set; validation and test pairs are made from
digits no training pair contains.

The two models share one backbone, ``vmoe.create_model("Nano/4")`` (4 blocks x 32, 2 heads,
MLP 64, patch 4: 17 tokens), and one recipe (AdamW lr 3e-3, warm-up for a quarter epoch, cosine
decay, batch 128, 5 epochs of 60,000 pairs, 1 thread each):

- dense ViT: ``moe_layers=None``;
- V-MoE: every block's MLP is an ``MoEMlp`` of E=16 experts, top-K=2 per token with the two
  weights renormalised to sum to 1, each expert 28 wide, capacity factor 1.0 in groups of 32
  images. Two experts of 28 plus the router (32 x 16) cost exactly the dense MLP's 64 hidden
  units per token, so both models compute the same FLOPs per image (the table measures them);
  the V-MoE holds 3.9x the parameters.

``--seeds`` (default 0 1 2) repeats both; the table reports each model's mean and standard
deviation over seeds, and every seed's test accuracy. ``--data digits`` runs the original
comparison instead (dense, V-MoE and Mobile V-MoE on the 1,257 plain digits, ``Mu/4``), where
every model memorises its training set and the experts have nothing to add.

Writes to ``--out`` (default ``runs/demo``): ``table.md``, ``summary.json``, ``accuracy.png``
(validation accuracy per epoch, every seed), and each run's folder (``metrics.json``,
``expert_use.png``, ``routing.png``: see ``models.train``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import torch

from models import vmoe
from models.data import load_digit_pairs, load_digits
from models.plots import plot_seeds
from models.train import DEFAULTS, run, superclasses_from

#: The experts-pay comparison (module docstring): name -> run config overrides.
PAIRS_ROWS = {
    "dense ViT": dict(model="dense", variant="Nano/4"),
    "V-MoE": dict(
        model="vmoe",
        variant="Nano/4",
        num_experts=16,
        k=2,
        moe_layers="every-1",
        capacity_factor=1.0,
        group_images=32,
        expert_mlp_dim=28,
        renormalize=True,
    ),
}
#: ``--ablation`` (instead of the main rows): both models trained for 12 epochs instead of 5 (the
#: dense one then takes about the 5-epoch V-MoE's wall clock on this CPU), and the V-MoE with
#: V-MoE's own combine weights (the two chosen experts' softmax probabilities, not renormalised).
ABLATION_ROWS = {
    "dense ViT, 12 epochs": {**PAIRS_ROWS["dense ViT"], "epochs": 12},
    "V-MoE, 12 epochs": {**PAIRS_ROWS["V-MoE"], "epochs": 12},
    "V-MoE, weights not renormalised": {**PAIRS_ROWS["V-MoE"], "renormalize": False},
}
PAIRS_RECIPE = dict(epochs=5, batch_size=128, lr=3e-3, warmup_epochs=0.25)

#: The original comparison on the plain digits (``--data digits``).
DIGITS_ROWS = {
    "dense ViT": dict(model="dense", variant="Mu/4"),
    "V-MoE": dict(model="vmoe", variant="Mu/4", num_experts=8, k=2, moe_layers="every-2", capacity_factor=1.05),
    "Mobile V-MoE": dict(model="mobile", variant="6x64", patch_size=4, num_experts=5, k=2, num_moe_layers=2),
}
DIGITS_RECIPE = dict(epochs=30)


def _describe(cfg: dict) -> str:
    size = cfg["variant"]
    if size in vmoe.list_models():  # "Nano/4" -> "4x32": blocks x width, as the Mobile sizes
        dim, _, _, depth = vmoe.WIDTHS[size.split("/")[0]]
        size = f"{depth}x{dim}"
    if cfg["model"] == "dense":
        return f"{size}, dense"
    if cfg["model"] == "vmoe":
        layers = "every block" if cfg["moe_layers"] == "every-1" else cfg["moe_layers"]
        width = f", experts {cfg['expert_mlp_dim']} wide" if cfg.get("expert_mlp_dim") else ""
        norm = ", renormalised" if cfg.get("renormalize") else ""
        return f"{size}, E={cfg['num_experts']} K={cfg['k']} {layers}{width}{norm}, c={cfg['capacity_factor']}"
    return f"{size}, E={cfg['num_experts']} K={cfg['k']} last {cfg['num_moe_layers']}, per-image router"


def _splits(data: str, seed: int):
    # The pairs are drawn with the run's seed; the digits' split is fixed (seed 0) either way.
    return load_digit_pairs(seed=seed) if data == "digit-pairs" else load_digits(16, seed=seed)


def _one_run(job: dict) -> dict:
    """One (model, seed) training run, in a worker process of its own (1 thread)."""
    torch.set_num_threads(job["threads"])
    splits = _splits(job["data"], job["seed"])
    res = run(
        job["cfg"],
        splits,
        job["out_dir"],
        superclass=job.get("superclass"),
        progress=False,
        desc=f"{job['name']} seed {job['seed']}",
        save=False,
    )
    res.pop("model")
    res["sizes"] = (len(splits.train), len(splits.val), len(splits.test))
    return res


def _jobs(args, rows: dict, recipe: dict, names: list[str]) -> list[dict]:
    jobs = []
    for seed in args.seeds:
        for name in names:
            cfg = {**DEFAULTS, **recipe, "seed": seed, **rows[name]}
            if args.epochs is not None:
                cfg["epochs"] = args.epochs
            slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")  # "dense-vit", "v-moe", ...
            out_dir = os.path.join(args.out, f"{slug}-seed{seed}")
            jobs.append(dict(name=name, seed=seed, cfg=cfg, out_dir=out_dir, data=args.data, threads=args.threads))
    return jobs


def _run_all(jobs: list[dict], workers: int) -> list[dict]:
    if workers <= 1:
        return [_one_run(j) for j in jobs]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        return list(pool.map(_one_run, jobs))


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(prog="python -m models.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=("digit-pairs", "digits"), default="digit-pairs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="None: 5 (digit-pairs), 30 (digits)")
    p.add_argument("--out", default=os.path.join("runs", "demo"))
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (processes); 1: in this process")
    p.add_argument("--ablation", action="store_true", help="digit-pairs: ABLATION_ROWS instead of the main rows")
    p.add_argument("--rows", nargs="+", default=None, help="only these rows of the chosen set (names as in the table)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    pairs = args.data == "digit-pairs"
    rows, recipe = (PAIRS_ROWS, PAIRS_RECIPE) if pairs else (DIGITS_ROWS, DIGITS_RECIPE)
    if args.ablation:
        if not pairs:
            p.error("--ablation is for --data digit-pairs")
        rows = ABLATION_ROWS
    if args.rows:
        unknown = [r for r in args.rows if r not in rows]
        if unknown:
            p.error(f"--rows: unknown {unknown}; this set has {list(rows)}")
        if not pairs and "Mobile V-MoE" in args.rows and "dense ViT" not in args.rows:
            p.error("--rows: Mobile V-MoE needs the dense ViT (its super-classes come from the dense run)")
        rows = {r: rows[r] for r in args.rows}
    results: dict[str, dict[int, dict]] = {name: {} for name in rows}
    if pairs:
        jobs = _jobs(args, rows, recipe, list(rows))
        done = _run_all(jobs, args.jobs)
    else:
        # Mobile V-MoE's super-classes come from its seed's dense run (the recipe's stage 1).
        first = _jobs(args, rows, recipe, [n for n in rows if n != "Mobile V-MoE"])
        done = _run_all(first, args.jobs)
        dense = {j["seed"]: r for j, r in zip(first, done, strict=True) if j["name"] == "dense ViT"}
        second = _jobs(args, rows, recipe, [n for n in rows if n == "Mobile V-MoE"])
        for j in second:
            j["superclass"] = superclasses_from(dense[j["seed"]], j["cfg"]["num_experts"], seed=j["seed"])
        jobs = first + second
        done = done + _run_all(second, args.jobs)
    for j, r in zip(jobs, done, strict=True):
        results[j["name"]][j["seed"]] = r
    plot_seeds({n: {s: r["epochs"] for s, r in by.items()} for n, by in results.items()},
               os.path.join(args.out, "accuracy.png"))  # fmt: skip
    total_s = time.perf_counter() - t_start

    dense_flops = next(iter(results[next(iter(rows))].values()))["flops_per_image"]  # the first row's
    lines = [
        "| model | configuration | test acc (mean ± sd) | test acc per seed | val acc (mean ± sd) "
        "| MFLOPs / image | vs dense | params total | params active | train time / run |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, by_seed in results.items():
        rs = [by_seed[s] for s in sorted(by_seed)]
        r0 = rs[0]
        lines.append(
            f"| {name} | {_describe(r0['config'])} | {_mean_sd([r['test_acc'] for r in rs])} "
            f"| {', '.join(format(r['test_acc'], '.3f') for r in rs)} | {_mean_sd([r['val_acc'] for r in rs])} "
            f"| {r0['flops_per_image'] / 1e6:.2f} | {r0['flops_per_image'] / dense_flops:.2f}x "
            f"| {r0['params_total']:,} | {r0['params_active']:,} "
            f"| {statistics.mean(r['train_seconds'] for r in rs):.0f} s |"
        )
    n_tr, n_va, n_te = r0["sizes"]
    epochs = "/".join(dict.fromkeys(str(next(iter(by.values()))["config"]["epochs"]) for by in results.values()))
    what = "Digit pairs 16x16" if pairs else "Digits 16x16"
    lines += [
        "",
        f"{what} (train/val/test {n_tr}/{n_va}/{n_te}), {epochs} epochs, seeds "
        f"{', '.join(map(str, args.seeds))}, {args.threads} thread(s) per run, {args.jobs} run(s) at once; "
        f"total {total_s / 60:.1f} min.",
    ]
    if "Mobile V-MoE" in results:
        sc = next(iter(results["Mobile V-MoE"].values()))["superclasses"]
        groups = {c: [str(i) for i in np.flatnonzero(np.array(sc) == c)] for c in range(int(max(sc)) + 1)}
        lines[-1] += " Super-classes (first seed, from the dense model's validation confusion): " + ", ".join(
            "{" + ",".join(v) + "}" for v in groups.values()
        )
    table = "\n".join(lines)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    summary = {
        name: {str(s): {k: v for k, v in r.items() if k != "epochs"} for s, r in by.items()}
        for name, by in results.items()
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(table)
    return table


if __name__ == "__main__":
    main()

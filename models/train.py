"""Train and evaluate the dense ViT, V-MoE and Mobile V-MoE: ``python -m models.train``.

Examples (scikit-learn digits, 16 x 16, on a CPU)::

    python -m models.train --model dense  --variant Mu/4 --epochs 30
    python -m models.train --model vmoe   --variant Mu/4 --num-experts 8 --k 2 --epochs 30
    python -m models.train --model mobile --variant 6x64 --num-experts 5 --epochs 30
    python -m models.train --model mobile --variant 6x64 --num-experts 5 --dense-run runs/dense-Mu_4
    python -m models.train --checkpoint runs/vmoe-Mu_4/model.safetensors --epochs 0 \
        --eval-capacity-factor 4.0     # evaluation only, into runs/vmoe-Mu_4/eval-cf4/

Mobile V-MoE follows the paper's two stages: a dense model of the same size is trained first
(or taken from ``--dense-run``), its validation confusion matrix is clustered into E
super-classes, and the MoE model is trained with the router's super-class cross-entropy.

Each run writes to ``--out`` (default ``runs/<model>-<variant>``): ``metrics.json`` (config,
per-epoch metrics with each MoE layer's routing statistics summed over the epoch's training
steps — tokens per expert, drops, dead experts, router entropy —, test metrics, parameters,
FLOPs), ``model.safetensors`` (config in its metadata), ``accuracy.png`` and, for MoE models,
``expert_use.png`` (each expert's share of its layer's assignments per epoch) and
``routing.png`` (class-by-expert heat map on the test split).
Evaluation only (``--checkpoint ... --epochs 0``) writes ``metrics.json`` and ``routing.png`` to
its own folder, ``eval/`` (or ``eval-cf<factor>/``) beside the checkpoint, and never touches the
training run's files. A run never overwrites another run's files without ``--overwrite``.

Every argument is checked (and the model built on the meta device) before any data is read or
any training starts: a bad one is an argparse error naming it.

This module is the command line only: the run config and model building live in
``models.build``, training and evaluation in ``models.engine``, checkpoint I/O in
``models.checkpoint`` (re-exported here, where earlier code imported them from).
"""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
import torch

from models import mobile_vmoe, vmoe
from models.build import DEFAULTS, KINDS, build_model, default_variant
from models.checkpoint import load_checkpoint, save_checkpoint
from models.data import load_dataset
from models.engine import evaluate, fit, run, superclasses_from

__all__ = ["build_model", "evaluate", "fit", "load_checkpoint", "main", "run", "save_checkpoint"]


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {v}")
        return v

    parse.__name__ = f"int >= {lo}"
    return parse


def _float_above(lo: float, *, inclusive: bool = False):
    op = ">=" if inclusive else ">"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number {op} {lo}, got {text!r}") from None
        if not math.isfinite(v) or (v < lo if inclusive else v <= lo):
            raise argparse.ArgumentTypeError(f"must be a finite number {op} {lo}, got {v}")
        return v

    parse.__name__ = f"number {op} {lo}"
    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m models.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = DEFAULTS
    pos, nonneg = _int_at_least(1), _int_at_least(0)
    p.add_argument("--model", choices=KINDS, default=d["model"], help="which model")
    p.add_argument(
        "--variant",
        default=None,
        help=f"V-MoE/dense: {vmoe.list_models()}; Mobile V-MoE/dense: {mobile_vmoe.list_models()}"
        " (None: Mu/4, or 6x64 for mobile)",
    )
    p.add_argument(
        "--data", default="digits", help="'digits' or 'digit-pairs' (both embedded, models.data) or an ImageFolder path"
    )
    p.add_argument("--image-size", type=pos, default=None, help="None: 16 for digits, 224 for folders")
    p.add_argument("--patch-size", type=pos, default=None, help="Mobile V-MoE sizes (None: 4 below 64 px, else 16)")
    p.add_argument("--num-experts", type=pos, default=d["num_experts"], help="experts per MoE layer (E)")
    p.add_argument("--k", type=pos, default=d["k"], help="experts per token or image (K <= E)")
    p.add_argument("--moe-layers", default=d["moe_layers"], help="V-MoE: every-n, last-n, '1,3,5' or none")
    p.add_argument("--capacity-factor", type=_float_above(0), default=d["capacity_factor"], help="V-MoE, training")
    p.add_argument(
        "--eval-capacity-factor", type=_float_above(0), default=None, help="V-MoE, evaluation (None: as training)"
    )
    p.add_argument("--group-images", type=pos, default=d["group_images"], help="V-MoE: images per routing group")
    p.add_argument(
        "--expert-mlp-dim", type=pos, default=d["expert_mlp_dim"], help="V-MoE: expert hidden width (None: MLP's)"
    )
    p.add_argument("--renormalize", action="store_true", help="V-MoE: each token's K weights sum to 1")
    p.add_argument("--num-moe-layers", type=nonneg, default=d["num_moe_layers"], help="Mobile V-MoE: last n blocks")
    p.add_argument("--router-input", choices=("cls", "mean"), default=d["router_input"], help="Mobile V-MoE")
    p.add_argument("--representation-size", type=pos, default=None, help="pre-logits Linear + tanh width")
    p.add_argument(
        "--guidance-weight", type=_float_above(0, inclusive=True), default=d["guidance_weight"], help="Mobile V-MoE"
    )
    p.add_argument("--dense-run", default=None, help="Mobile V-MoE: reuse this dense run folder's confusion matrix")
    p.add_argument("--superclasses", default=None, help="Mobile V-MoE: JSON file, the super-class of each class")
    p.add_argument("--dense-epochs", type=pos, default=None, help="Mobile V-MoE stage 1 (None: --epochs)")
    p.add_argument("--epochs", type=nonneg, default=d["epochs"], help="0 with --checkpoint: evaluate only")
    p.add_argument("--batch-size", type=pos, default=d["batch_size"], help="training batch")
    p.add_argument("--lr", type=_float_above(0), default=d["lr"], help="AdamW peak learning rate")
    p.add_argument("--weight-decay", type=_float_above(0, inclusive=True), default=d["weight_decay"], help="AdamW")
    p.add_argument("--warmup-epochs", type=nonneg, default=d["warmup_epochs"], help="linear warm-up")
    p.add_argument("--seed", type=int, default=d["seed"], help="data split, initialisation and shuffling")
    p.add_argument("--checkpoint", default=None, help="start from (or, with --epochs 0, evaluate) these weights")
    p.add_argument(
        "--out",
        default=None,
        help="run folder (None: runs/<model>-<variant>; evaluation only: eval/ or eval-cf<factor>/ beside the"
        " checkpoint)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the files of a run already in --out")
    # One thread by default: these models' matmuls are small, and on a shared 2-core machine
    # two OpenMP threads measured ~10x slower than one (they spin waiting for each other).
    p.add_argument("--threads", type=pos, default=1, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


#: The files a run writes into its folder (``--overwrite`` guards them).
RUN_FILES = ("metrics.json", "model.safetensors", "accuracy.png", "expert_use.png", "routing.png")
#: Architecture keys a ``--checkpoint`` fixes (its own config wins over the command line).
ARCH_KEYS = (
    "model",
    "variant",
    "patch_size",
    "num_experts",
    "k",
    "moe_layers",
    "group_images",
    "expert_mlp_dim",
    "renormalize",
    "num_moe_layers",
    "router_input",
    "representation_size",
)


def _checkpoint_config(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError("it has no run config in its metadata (not written by models.train)")
    return json.loads(meta["config"])


def _eval_folder(checkpoint: str, eval_capacity_factor: float | None) -> str:
    name = "eval" if eval_capacity_factor is None else f"eval-cf{eval_capacity_factor:g}"
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint)), name)


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[dict, str]:
    """Every check that can fail before the data is read or a step is taken: ``(cfg, out)``,
    or ``p.error`` (exit 2 with the usage) naming the argument."""
    cfg = {k: getattr(args, k) for k in DEFAULTS}
    if args.checkpoint is not None:
        if not os.path.isfile(args.checkpoint):
            p.error(f"--checkpoint: no such file: {args.checkpoint!r}")
        try:
            ck = _checkpoint_config(args.checkpoint)
        except Exception as exc:
            p.error(f"--checkpoint {args.checkpoint!r}: cannot read it as a models.train checkpoint: {exc}")
        cfg.update({k: ck[k] for k in ARCH_KEYS if k in ck})
        arch = {k: ck[k] for k in ("num_classes", "in_chans", "image_size") if k in ck}
    else:
        if args.epochs == 0:
            p.error("--epochs 0 evaluates a --checkpoint; give one, or train for at least 1 epoch")
        arch = {}
    cfg["variant"] = cfg["variant"] or default_variant(cfg["model"])
    embedded = args.data in ("digits", "digit-pairs")
    if not embedded and not os.path.isdir(args.data):
        p.error(f"--data must be 'digits', 'digit-pairs' or an existing image folder, got {args.data!r}")
    if args.dense_run is not None and not os.path.isfile(os.path.join(args.dense_run, "metrics.json")):
        p.error(f"--dense-run: {args.dense_run!r} holds no metrics.json (a run folder of models.train)")
    if args.superclasses is not None and not os.path.isfile(args.superclasses):
        p.error(f"--superclasses: no such file: {args.superclasses!r}")
    # Build the model on the meta device (no memory, no data): variant, layer spec, K vs E, ...
    probe = {"num_classes": 10, "in_chans": 1 if embedded else 3}
    probe["image_size"] = args.image_size or (16 if embedded else 224)
    try:
        with torch.device("meta"):
            build_model({**cfg, **probe, **arch})
    except (ValueError, TypeError) as exc:
        p.error(f"--model {cfg['model']} --variant {cfg['variant']}: {exc}")

    if args.out is not None:
        out = args.out
    elif args.checkpoint is not None and args.epochs == 0:
        out = _eval_folder(args.checkpoint, args.eval_capacity_factor)
    else:
        out = os.path.join("runs", f"{cfg['model']}-{cfg['variant'].replace('/', '_')}")
    if args.checkpoint is not None and os.path.abspath(out) == os.path.dirname(os.path.abspath(args.checkpoint)):
        if not args.overwrite:
            p.error(f"--out {out!r} is the checkpoint's own run folder; pass another --out, or --overwrite")
    # Mobile V-MoE's stage 1 writes a run of its own into out/stage1-dense/.
    existing = [
        os.path.join(sub, f) if sub else f
        for sub in ("", "stage1-dense")
        for f in RUN_FILES
        if os.path.exists(os.path.join(out, sub, f))
    ]
    if existing and not args.overwrite:
        p.error(f"--out {out!r} already holds a run ({', '.join(existing)}); pass another --out, or --overwrite")
    return cfg, out


def main(argv=None) -> dict:
    p = _parser()
    args = p.parse_args(argv)
    cfg, out = _check_args(p, args)
    torch.set_num_threads(args.threads)
    try:
        splits = load_dataset(args.data, args.image_size, seed=args.seed)
    except (ValueError, OSError) as exc:
        p.error(f"--data {args.data!r}: {exc}")
    progress = not args.no_progress
    evaluate_only = args.checkpoint is not None and args.epochs == 0

    model, superclass = None, None
    if args.checkpoint:
        model, _, superclass = load_checkpoint(args.checkpoint)
        if args.eval_capacity_factor is not None and hasattr(model, "set_capacity_factor"):
            model.set_capacity_factor(eval=args.eval_capacity_factor)
    if cfg["model"] == "mobile" and superclass is None:
        if args.superclasses:
            with open(args.superclasses) as f:
                superclass = np.array(json.load(f), dtype=np.int64)
        else:
            if args.dense_run:
                with open(os.path.join(args.dense_run, "metrics.json")) as f:
                    dense = json.load(f)
            else:
                dense_cfg = {**cfg, "model": "dense", "epochs": args.dense_epochs or cfg["epochs"]}
                dense = run(
                    dense_cfg, splits, os.path.join(out, "stage1-dense"), progress=progress, desc="stage 1 dense"
                )
                print(f"stage 1 (dense): test accuracy {dense['test_acc']:.4f}")
            superclass = superclasses_from(dense, cfg["num_experts"], seed=cfg["seed"])
        print(
            "super-classes:",
            {c: [splits.class_names[i] for i in np.flatnonzero(superclass == c)] for c in range(cfg["num_experts"])},
        )
    res = run(
        cfg,
        splits,
        out,
        superclass=superclass,
        model=model,
        progress=progress,
        save=not evaluate_only,
        checkpoint=args.checkpoint,
    )
    line = (
        f"{cfg['model']} {cfg['variant']}: test acc {res['test_acc']:.4f}, "
        f"params {res['params_total']:,} total / {res['params_active']:,} active, "
        f"{res['flops_per_image'] / 1e6:.2f} MFLOPs/image"
    )
    if res["test_router_acc"] is not None:
        line += f", router super-class acc {res['test_router_acc']:.4f}"
    print(line)
    print(f"outputs in {out}/")
    return res


if __name__ == "__main__":
    main()

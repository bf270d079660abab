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
per-epoch metrics, test metrics, parameters, FLOPs), ``model.safetensors`` (config in its
metadata), ``accuracy.png`` and, for MoE models, ``routing.png`` (class-by-expert heat map).
Evaluation only (``--checkpoint ... --epochs 0``) writes ``metrics.json`` and ``routing.png`` to
its own folder, ``eval/`` (or ``eval-cf<factor>/``) beside the checkpoint, and never touches the
training run's files. A run never overwrites another run's files without ``--overwrite``.

Every argument is checked (and the model built on the meta device) before any data is read or
any training starts: a bad one is an argparse error naming it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import moe_kernels as mk
from models import mobile_vmoe, vmoe
from models.data import Splits, load_dataset
from models.flops import count_flops, param_counts
from models.mobile_vmoe import MobileVMoE, derive_superclasses, superclass_loss
from models.plots import plot_accuracy, plot_routing

__all__ = ["build_model", "evaluate", "fit", "load_checkpoint", "main", "run", "save_checkpoint"]

KINDS = ("dense", "vmoe", "mobile")

#: Defaults of a run's config (the CLI flags mirror them).
DEFAULTS = dict(
    model="vmoe",
    variant=None,
    patch_size=None,
    num_experts=8,
    k=2,
    moe_layers="every-2",
    capacity_factor=1.05,
    eval_capacity_factor=None,
    group_images=8,
    num_moe_layers=2,
    router_input="cls",
    representation_size=None,
    guidance_weight=0.3,
    epochs=30,
    batch_size=64,
    lr=1e-3,
    weight_decay=0.05,
    warmup_epochs=2,
    seed=0,
)


def _moe_layers(spec):
    if spec is None or spec in ("none", "None", ""):
        return None
    if isinstance(spec, str) and spec[0].isdigit():
        return tuple(int(i) for i in spec.split(","))
    return spec


def default_variant(kind: str) -> str:
    return "6x64" if kind == "mobile" else "Mu/4"


def build_model(cfg: dict) -> nn.Module:
    """The model a run config describes (``cfg`` holds the data's ``num_classes``,
    ``in_chans`` and ``image_size`` too)."""
    kind = cfg["model"]
    if kind not in KINDS:
        raise ValueError(f"model must be one of {KINDS}, got {kind!r}")
    variant = cfg.get("variant") or default_variant(kind)
    common = dict(
        num_classes=cfg["num_classes"],
        image_size=cfg["image_size"],
        in_chans=cfg["in_chans"],
        representation_size=cfg.get("representation_size"),
    )
    if variant in vmoe.list_models():
        if kind == "mobile":
            raise ValueError(f"{variant!r} is a V-MoE variant; Mobile V-MoE sizes: {mobile_vmoe.list_models()}")
        return vmoe.create_model(
            variant,
            num_experts=cfg["num_experts"],
            k=cfg["k"],
            moe_layers=None if kind == "dense" else _moe_layers(cfg["moe_layers"]),
            capacity_factor=cfg["capacity_factor"],
            eval_capacity_factor=cfg.get("eval_capacity_factor"),
            group_images=cfg["group_images"],
            **common,
        )
    if variant in mobile_vmoe.list_models():
        if kind == "vmoe":
            raise ValueError(f"{variant!r} is a Mobile V-MoE size; V-MoE variants: {vmoe.list_models()}")
        patch = cfg.get("patch_size") or (4 if cfg["image_size"] < 64 else 16)
        return mobile_vmoe.create_model(
            variant,
            num_experts=cfg["num_experts"],
            num_moe_layers=0 if kind == "dense" else cfg["num_moe_layers"],
            k=cfg["k"],
            router_input=cfg["router_input"],
            patch_size=patch,
            **common,
        )
    raise ValueError(f"unknown variant {variant!r}; V-MoE: {vmoe.list_models()}, Mobile: {mobile_vmoe.list_models()}")


def _is_mobile_moe(model: nn.Module) -> bool:
    return isinstance(model, MobileVMoE) and model.router is not None


def _forward_loss(model, x, y, superclass, guidance_weight):
    """Task loss plus the model's routing loss: V-MoE's auxiliary losses, or Mobile V-MoE's
    super-class guidance. Returns (total loss, class logits, router logits or None)."""
    if _is_mobile_moe(model):
        logits, route = model(x, return_router=True)
        loss = F.cross_entropy(logits.float(), y)
        if superclass is not None and guidance_weight > 0:
            loss = loss + superclass_loss(route.logits, superclass[y], guidance_weight)
        return loss, logits, route.logits
    logits = model(x)
    return F.cross_entropy(logits.float(), y) + mk.aux_loss(model), logits, None


@torch.no_grad()
def evaluate(model: nn.Module, ds, *, num_classes: int, batch_size: int = 256, superclass=None) -> dict:
    """Loss, accuracy, confusion matrix (rows: true class) and class-by-expert routing counts.

    Routing counts: for a V-MoE, per MoE layer, the kept token assignments of each class's
    images to each expert (``[C, E]``); for Mobile V-MoE, the images of each class routed to
    each expert (its K choices). ``router_acc``: share of images whose top-1 router expert is
    their super-class (Mobile V-MoE with ``superclass``).
    """
    was = model.training
    model.eval()
    C = num_classes
    conf = torch.zeros(C, C, dtype=torch.int64)
    routing: dict[str, torch.Tensor] = {}
    captured: list = []
    hooks = []
    token_routed = [
        (i, blk.mlp) for i, blk in enumerate(getattr(model, "blocks", [])) if isinstance(blk.mlp, mk.MoEMlp)
    ]
    token_routed = [(i, m) for i, m in token_routed if m.router is not None]
    for i, m in token_routed:
        hooks.append(m.router.register_forward_hook(lambda mod, inp, out, i=i: captured.append((i, out.routing))))
    loss_sum, n, hit, router_hit = 0.0, 0, 0, 0
    try:
        for x, y in DataLoader(ds, batch_size=batch_size):
            captured.clear()
            loss, logits, rlogits = _forward_loss(model, x, y, superclass, 0.0)
            loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            pred = logits.argmax(-1)
            hit += int((pred == y).sum())
            n += len(y)
            conf += torch.bincount(y * C + pred, minlength=C * C).view(C, C)
            if rlogits is not None:
                E, K = rlogits.shape[1], model.k
                top = rlogits.topk(K, dim=-1).indices  # [B, K]
                cls = y[:, None].expand(-1, K)
                key = "per-image router"
                routing[key] = routing.get(key, torch.zeros(C, E, dtype=torch.int64)) + torch.bincount(
                    (cls * E + top).reshape(-1), minlength=C * E
                ).view(C, E)
                if superclass is not None:
                    router_hit += int((rlogits.argmax(-1) == superclass[y]).sum())
            for i, r in captured:
                E = r.num_experts
                N = r.num_tokens // len(y)
                cls = y.repeat_interleave(N)[:, None].expand(-1, r.k)  # [T, K]
                kept = r.slot >= 0
                key = f"block {i}"
                counts = torch.bincount((cls * E + r.indices)[kept], minlength=C * E).view(C, E)
                routing[key] = routing.get(key, torch.zeros(C, E, dtype=torch.int64)) + counts
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    out = {
        "loss": loss_sum / max(n, 1),
        "acc": hit / max(n, 1),
        "confusion": conf.tolist(),
        "routing": {k: v.tolist() for k, v in routing.items()},
    }
    if superclass is not None and _is_mobile_moe(model):
        out["router_acc"] = router_hit / max(n, 1)
    return out


def _param_groups(model: nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Matrices (and expert stacks) decay; biases, norms, class token and positions do not.
        (decay if p.dim() >= 2 and "pos_embed" not in name and "cls_token" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fit(
    model: nn.Module,
    splits: Splits,
    cfg: dict,
    *,
    superclass: torch.Tensor | None = None,
    out_dir: str | None = None,
    desc: str = "",
    progress: bool = True,
) -> list[dict]:
    """Train ``cfg["epochs"]`` epochs of AdamW (linear warm-up, cosine decay, gradient norm
    clipped at 1), evaluating on the validation split after each; returns the per-epoch
    metrics (also written to ``out_dir/metrics.json`` as they come)."""
    torch.manual_seed(cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    loader = DataLoader(splits.train, batch_size=cfg["batch_size"], shuffle=True, drop_last=True, generator=gen)
    steps = max(cfg["epochs"] * len(loader), 1)
    warm = cfg["warmup_epochs"] * len(loader)
    opt = torch.optim.AdamW(_param_groups(model, cfg["weight_decay"]), lr=cfg["lr"], betas=(0.9, 0.999))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(steps - warm, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    history: list[dict] = []
    for epoch in range(1, cfg["epochs"] + 1):
        model.train()
        t0 = time.perf_counter()
        tot, hit, n = 0.0, 0, 0
        bar = tqdm(loader, desc=f"{desc} epoch {epoch}/{cfg['epochs']}", leave=False, disable=not progress)
        for x, y in bar:
            loss, logits, _ = _forward_loss(model, x, y, superclass, cfg["guidance_weight"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(y)
            hit += int((logits.argmax(-1) == y).sum())
            n += len(y)
            bar.set_postfix(loss=f"{tot / n:.3f}")
        train_s = time.perf_counter() - t0
        val = evaluate(model, splits.val, num_classes=splits.num_classes, superclass=superclass)
        rec = {
            "epoch": epoch,
            "train_loss": tot / max(n, 1),
            "train_acc": hit / max(n, 1),
            "val_loss": val["loss"],
            "val_acc": val["acc"],
            "lr": sched.get_last_lr()[0],
            "train_seconds": train_s,
        }
        if "router_acc" in val:
            rec["val_router_acc"] = val["router_acc"]
        history.append(rec)
        if progress:
            tqdm.write(
                f"{desc} epoch {epoch}: train loss {rec['train_loss']:.4f} acc {rec['train_acc']:.4f} | "
                f"val loss {rec['val_loss']:.4f} acc {rec['val_acc']:.4f} ({train_s:.1f}s)"
            )
        if out_dir:
            _write_json(os.path.join(out_dir, "metrics.json"), {"config": cfg, "epochs": history})
    return history


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def save_checkpoint(model: nn.Module, cfg: dict, path: str, superclass=None) -> None:
    """Weights as safetensors, with the run config (and super-classes) in its metadata."""
    from safetensors.torch import save_file

    meta = {"config": json.dumps(cfg)}
    if superclass is not None:
        meta["superclasses"] = json.dumps([int(s) for s in superclass])
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, path, metadata=meta)
    # safetensors creates the file 0600; give it the mode every other file gets (the umask's).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def load_checkpoint(path: str):
    """``(model, cfg, superclass or None)`` from a ``save_checkpoint`` file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    cfg = json.loads(meta["config"])
    model = build_model(cfg)
    model.load_state_dict(load_file(path))
    sc = meta.get("superclasses")
    return model, cfg, (torch.tensor(json.loads(sc)) if sc else None)


def run(
    cfg: dict,
    splits: Splits,
    out_dir: str,
    *,
    superclass=None,
    model: nn.Module | None = None,
    progress: bool = True,
    desc: str | None = None,
    save: bool = True,
    checkpoint: str | None = None,
) -> dict:
    """Build (unless given), train, test, measure and save one model; returns the metrics
    dict that is also written to ``out_dir/metrics.json``. ``save=False`` (evaluation of
    ``checkpoint``) writes no weights; no ``accuracy.png`` without epochs."""
    cfg = {**cfg, "num_classes": splits.num_classes, "in_chans": splits.in_chans, "image_size": splits.image_size}
    cfg["variant"] = cfg.get("variant") or default_variant(cfg["model"])
    torch.manual_seed(cfg["seed"])
    model = model if model is not None else build_model(cfg)
    sc = None if superclass is None else torch.as_tensor(superclass, dtype=torch.int64)
    t0 = time.perf_counter()
    history = fit(model, splits, cfg, superclass=sc, out_dir=out_dir, desc=desc or cfg["model"], progress=progress)
    train_s = time.perf_counter() - t0
    val = evaluate(model, splits.val, num_classes=splits.num_classes, superclass=sc)
    test = evaluate(model, splits.test, num_classes=splits.num_classes, superclass=sc)
    total, active = param_counts(model)
    probe = torch.stack([splits.test[i][0] for i in range(min(cfg["group_images"], len(splits.test)))])
    flops = count_flops(model, probe)
    result = {
        "config": cfg,
        "epochs": history,
        "train_seconds": train_s,
        "test_acc": test["acc"],
        "test_loss": test["loss"],
        "test_router_acc": test.get("router_acc"),
        "test_confusion": test["confusion"],
        "test_routing": test["routing"],
        "val_acc": val["acc"],
        "val_confusion": val["confusion"],
        "params_total": total,
        "params_active": active,
        "flops_per_image": flops,
        "superclasses": None if sc is None else sc.tolist(),
    }
    if not save:
        result["checkpoint"] = checkpoint
    _write_json(os.path.join(out_dir, "metrics.json"), result)
    if save:
        save_checkpoint(model, cfg, os.path.join(out_dir, "model.safetensors"), sc)
    if history:
        plot_accuracy({f"{cfg['model']} {cfg['variant']}": history}, os.path.join(out_dir, "accuracy.png"))
    if test["routing"]:
        plot_routing(
            {k: np.array(v) for k, v in test["routing"].items()},
            splits.class_names,
            os.path.join(out_dir, "routing.png"),
        )
    result["model"] = model
    return result


def superclasses_from(dense_metrics: dict, num_experts: int, seed: int = 0) -> np.ndarray:
    """Stage 2 of Mobile V-MoE's recipe: super-classes from a dense run's validation confusion."""
    return derive_superclasses(np.array(dense_metrics["val_confusion"]), num_experts, seed=seed)


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
    p.add_argument("--data", default="digits", help="'digits' (embedded) or an ImageFolder path")
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
RUN_FILES = ("metrics.json", "model.safetensors", "accuracy.png", "routing.png")
#: Architecture keys a ``--checkpoint`` fixes (its own config wins over the command line).
ARCH_KEYS = (
    "model",
    "variant",
    "patch_size",
    "num_experts",
    "k",
    "moe_layers",
    "group_images",
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
    if args.data != "digits" and not os.path.isdir(args.data):
        p.error(f"--data must be 'digits' or an existing image folder, got {args.data!r}")
    if args.dense_run is not None and not os.path.isfile(os.path.join(args.dense_run, "metrics.json")):
        p.error(f"--dense-run: {args.dense_run!r} holds no metrics.json (a run folder of models.train)")
    if args.superclasses is not None and not os.path.isfile(args.superclasses):
        p.error(f"--superclasses: no such file: {args.superclasses!r}")
    # Build the model on the meta device (no memory, no data): variant, layer spec, K vs E, ...
    probe = {"num_classes": 10, "in_chans": 1 if args.data == "digits" else 3}
    probe["image_size"] = args.image_size or (16 if args.data == "digits" else 224)
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

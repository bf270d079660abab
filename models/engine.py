"""The training engine of the reference models: ``fit`` (AdamW, warm-up and cosine decay,
validation after each epoch), ``evaluate`` (loss, accuracy, confusion matrix, class-by-expert
routing counts) and ``run`` (build, train, test, measure, save one model)."""

from __future__ import annotations

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
from models.build import build_model, default_variant
from models.checkpoint import save_checkpoint, write_json
from models.data import Splits
from models.flops import count_flops, param_counts
from models.mobile_vmoe import MobileVMoE, derive_superclasses
from models.plots import plot_accuracy, plot_expert_use, plot_routing
from moe_kernels.losses import superclass_loss

__all__ = ["evaluate", "fit", "run", "superclasses_from"]


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
        hooks.append(m.router.register_forward_hook(lambda mod, inp, out, i=i: captured.append((i, out.plan))))
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


class _EpochRouting:
    """Routing statistics summed over an epoch's training steps, per MoE layer
    (``moe_kernels.routing_stats`` after each step; on a CPU reading them costs nothing, on a GPU
    it is one small copy per layer and step)."""

    def __init__(self) -> None:
        self.layers: dict[str, dict] = {}

    def add(self, model: nn.Module) -> None:
        for name, st in mk.routing_stats(model).items():
            acc = self.layers.setdefault(
                name, {"tokens_per_expert": torch.zeros(st.num_experts, dtype=torch.int64), "assignments": 0,
                       "dropped": 0, "unrouted_tokens": 0, "tokens": 0, "entropy_sum": 0.0, "steps": 0},
            )  # fmt: skip
            acc["tokens_per_expert"] += st.tokens_per_expert.cpu()
            acc["assignments"] += st.assignments
            acc["dropped"] += st.dropped
            acc["unrouted_tokens"] += st.unrouted_tokens
            acc["tokens"] += st.num_tokens
            acc["entropy_sum"] += st.router_entropy
            acc["steps"] += 1

    def summary(self) -> dict[str, dict]:
        """Per layer: tokens per expert, assignments, dropped and their fraction, tokens with no
        kept assignment, dead experts, and the mean router entropy over the epoch's steps."""
        out = {}
        for name, a in self.layers.items():
            tpe = a["tokens_per_expert"].tolist()
            out[name] = {
                "tokens_per_expert": tpe,
                "assignments": a["assignments"],
                "dropped": a["dropped"],
                "drop_fraction": a["dropped"] / max(a["assignments"], 1),
                "unrouted_tokens": a["unrouted_tokens"],
                "tokens": a["tokens"],
                "dead_experts": [e for e, c in enumerate(tpe) if c == 0],
                "router_entropy": a["entropy_sum"] / max(a["steps"], 1),
            }
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
    metrics (also written to ``out_dir/metrics.json`` as they come), with, for MoE models,
    ``routing``: each MoE layer's routing statistics summed over the epoch's training steps."""
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
        epoch_routing = _EpochRouting()
        bar = tqdm(loader, desc=f"{desc} epoch {epoch}/{cfg['epochs']}", leave=False, disable=not progress)
        for x, y in bar:
            loss, logits, _ = _forward_loss(model, x, y, superclass, cfg["guidance_weight"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            epoch_routing.add(model)
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
        if epoch_routing.layers:
            rec["routing"] = epoch_routing.summary()
        history.append(rec)
        if progress:
            tqdm.write(
                f"{desc} epoch {epoch}: train loss {rec['train_loss']:.4f} acc {rec['train_acc']:.4f} | "
                f"val loss {rec['val_loss']:.4f} acc {rec['val_acc']:.4f} ({train_s:.1f}s)"
            )
        if out_dir:
            write_json(os.path.join(out_dir, "metrics.json"), {"config": cfg, "epochs": history})
    return history


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
    write_json(os.path.join(out_dir, "metrics.json"), result)
    if save:
        save_checkpoint(model, cfg, os.path.join(out_dir, "model.safetensors"), sc)
    if history:
        plot_accuracy({f"{cfg['model']} {cfg['variant']}": history}, os.path.join(out_dir, "accuracy.png"))
        plot_expert_use(history, os.path.join(out_dir, "expert_use.png"))  # MoE models only
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

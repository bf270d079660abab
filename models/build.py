"""A training run's config -> the model it describes: the model kinds, the config defaults the
CLI mirrors, and ``build_model`` (used by training, checkpoints and the CLI alike)."""

from __future__ import annotations

from torch import nn

from models import mobile_vmoe, vmoe

__all__ = ["DEFAULTS", "KINDS", "build_model", "default_variant"]

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
    expert_mlp_dim=None,
    renormalize=False,
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
            expert_mlp_dim=cfg.get("expert_mlp_dim"),
            renormalize=cfg.get("renormalize", False),
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

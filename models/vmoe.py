"""V-MoE (Riquelme et al. 2021): a ViT whose chosen blocks route each token to K of E experts.

``create_model("B/16", num_experts=32, moe_layers="every-2")`` is V-MoE-B/16 (DESIGN.md
section 6); ``moe_layers=None`` is the dense ViT. Variants are registered factory functions
(``vmoe_b16(**kw)``, ...); ``list_models()`` names them. Besides the paper's S/32, B/32, B/16,
L/16 and H/14 there are small ones for CPU runs: Ti (ViT-Tiny), Mu (6 x 64) and Nano (4 x 32)
with 16 or 4 pixel patches.

Soft MoE (Puigcerver et al. 2024, vmoe's ``projects/soft_moe``) is the second family here:
``create_soft_moe("S/16")`` builds the paper's layout — ViT widths (S is ViT-S, 12 x 384),
Soft MoE layers in the second half of the blocks, 128 experts (256 for H/14) of 1 slot each,
no class token and a global-average-pooled head — and ``list_soft_moe_models()`` names its
variants (timm-style ``soft_moe_s16``, ...). What is supported and what not: see
``create_soft_moe``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from models import registry
from models.vit import VisionTransformer
from moe_kernels.convert import moe_layer_indices

__all__ = [
    "SOFT_WIDTHS",
    "WIDTHS",
    "create_model",
    "create_soft_moe",
    "list_models",
    "list_soft_moe_models",
    "register_model",
]

#: name: (D hidden, H MLP, heads, blocks). S is V-MoE's S (8 blocks of 512), not timm's.
WIDTHS: dict[str, tuple[int, int, int, int]] = {
    "Nano": (32, 64, 2, 4),
    "Mu": (64, 256, 2, 6),
    "Ti": (192, 768, 3, 12),
    "S": (512, 2048, 8, 8),
    "B": (768, 3072, 12, 12),
    "L": (1024, 4096, 16, 24),
    "H": (1280, 5120, 16, 32),
}

#: Soft MoE's ViT widths: V-MoE's, except that the paper's S is ViT-S (12 blocks of 384), not
#: V-MoE's S.
SOFT_WIDTHS: dict[str, tuple[int, int, int, int]] = {
    **{w: WIDTHS[w] for w in ("Mu", "B", "L", "H")},
    "S": (384, 1536, 6, 12),
}

FAMILY = "vmoe"
SOFT_FAMILY = "soft_moe"


def register_model(name: str) -> Callable:
    """Register a V-MoE variant's factory in the one registry (``models.registry``)."""
    return registry.register_model(FAMILY, name)


def list_models() -> list[str]:
    """The registered V-MoE variants (``"Mu/4"`` ... ``"H/14"``)."""
    return registry.list_models(FAMILY)


def _vit(
    widths: dict[str, tuple[int, int, int, int]],
    width: str,
    patch_size: int,
    moe_blocks: Callable[[int], Sequence[int]],
    **kwargs,
) -> VisionTransformer:
    """The ``VisionTransformer`` of ``widths[width]`` with ``patch_size``; ``moe_blocks(depth)``
    picks the MoE blocks; ``kwargs`` go to the constructor."""
    dim, mlp_dim, heads, depth = widths[width]
    model = VisionTransformer(
        patch_size=patch_size,
        dim=dim,
        mlp_dim=mlp_dim,
        num_heads=heads,
        depth=depth,
        moe_blocks=moe_blocks(depth),
        **kwargs,
    )
    model.variant = f"{width}/{patch_size}"
    return model


def _build(
    width: str,
    patch_size: int,
    *,
    num_experts: int = 8,
    k: int = 2,
    moe_layers: str | Sequence[int] | None = "every-2",
    num_classes: int = 1000,
    representation_size: int | None = None,
    image_size: int = 224,
    capacity_factor: float | None = 1.05,
    eval_capacity_factor: float | None = None,
    group_images: int = 8,
    in_chans: int = 3,
    router: str = "vmoe",
    batch_priority: bool = False,
    noise_std: float = 1.0,
    share_expert_init: bool = True,
    expert_mlp_dim: int | None = None,
    **moe_kwargs,
) -> VisionTransformer:
    return _vit(
        WIDTHS,
        width,
        patch_size,
        lambda depth: () if moe_layers is None else moe_layer_indices(moe_layers, depth),
        image_size=image_size,
        in_chans=in_chans,
        num_classes=num_classes,
        representation_size=representation_size,
        num_experts=num_experts,
        moe_kwargs=dict(
            k=k,
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            router=router,
            batch_priority=batch_priority,
            noise_std=noise_std,
            **moe_kwargs,
        ),
        group_images=group_images,
        share_expert_init=share_expert_init,
        expert_mlp_dim=expert_mlp_dim,
    )


@register_model("Nano/4")
def vmoe_nano4(**kw) -> VisionTransformer:
    """4 x 32 (MLP 64), patch 4: the size of the experts-pay demo (``models.demo``), small
    enough that its dense twin is capacity-bound on the digit-pair task."""
    return _build("Nano", 4, **kw)


@register_model("Mu/4")
def vmoe_mu4(**kw) -> VisionTransformer:
    """6 x 64, patch 4: the CPU demo size (16 x 16 inputs -> 17 tokens)."""
    return _build("Mu", 4, **kw)


@register_model("Ti/4")
def vmoe_ti4(**kw) -> VisionTransformer:
    return _build("Ti", 4, **kw)


@register_model("Ti/16")
def vmoe_ti16(**kw) -> VisionTransformer:
    return _build("Ti", 16, **kw)


@register_model("S/32")
def vmoe_s32(**kw) -> VisionTransformer:
    return _build("S", 32, **kw)


@register_model("B/32")
def vmoe_b32(**kw) -> VisionTransformer:
    return _build("B", 32, **kw)


@register_model("B/16")
def vmoe_b16(**kw) -> VisionTransformer:
    return _build("B", 16, **kw)


@register_model("L/16")
def vmoe_l16(**kw) -> VisionTransformer:
    return _build("L", 16, **kw)


@register_model("H/14")
def vmoe_h14(**kw) -> VisionTransformer:
    return _build("H", 14, **kw)


def create_model(
    variant: str = "B/16",
    *,
    num_experts: int = 8,
    k: int = 2,
    moe_layers: str | Sequence[int] | None = "every-2",
    num_classes: int = 1000,
    representation_size: int | None = None,
    image_size: int = 224,
    capacity_factor: float | None = 1.05,
    group_images: int = 8,
    **kwargs,
) -> VisionTransformer:
    """A V-MoE (or, with ``moe_layers=None``, dense ViT) of a registered variant.

    Args:
        variant: one of ``list_models()``: ``"S/32"``, ``"B/32"``, ``"B/16"``, ``"L/16"``,
            ``"H/14"``, and the small ``"Ti/16"``, ``"Ti/4"``, ``"Mu/4"``.
        num_experts: E per MoE layer.
        k: K experts per token.
        moe_layers: ``"every-n"`` (blocks ``range(n-1, L, n)``), ``"last-n"`` (the last n odd
            blocks), a tuple of block indices, or ``None`` for the dense ViT.
        num_classes: head outputs.
        representation_size: width of the ``Linear + tanh`` pre-logits layer (None: none).
        image_size: input side in pixels (a multiple of the patch size).
        capacity_factor: in training (``None``: dropless).
        group_images: images per routing group (group size = images x tokens per image).
        **kwargs: ``eval_capacity_factor``, ``in_chans``, ``batch_priority``, ``noise_std``,
            ``router`` ("vmoe" or "expert_choice"), ``share_expert_init``, ``expert_mlp_dim``
            (each expert's hidden width; default the MLP's) and further
            ``MoEMlp`` keywords (``renormalize``, ``backend``, loss weights).
    """
    if variant not in list_models():
        raise ValueError(f"unknown V-MoE variant {variant!r}; registered: {list_models()}")
    return registry.get_factory(FAMILY, variant)(
        num_experts=num_experts,
        k=k,
        moe_layers=moe_layers,
        num_classes=num_classes,
        representation_size=representation_size,
        image_size=image_size,
        capacity_factor=capacity_factor,
        group_images=group_images,
        **kwargs,
    )


# ------------------------------------------------------------------------------- Soft MoE
def list_soft_moe_models() -> list[str]:
    """The registered Soft MoE variants (``"Mu/4"``, ``"S/16"``, ``"B/16"``, ``"L/16"``, ``"H/14"``)."""
    return registry.list_models(SOFT_FAMILY)


def _build_soft(
    width: str,
    patch_size: int,
    *,
    num_experts: int = 128,
    num_slots: int | None = 1,
    moe_layers: str | Sequence[int] | None = "second-half",
    num_classes: int = 1000,
    representation_size: int | None = None,
    image_size: int = 224,
    in_chans: int = 3,
    classifier: str = "gap",
    noise_std: float = 0.0,
    share_expert_init: bool = False,
    **soft_kwargs,
) -> VisionTransformer:
    def blocks(depth: int) -> tuple[int, ...]:
        if moe_layers == "second-half":
            return tuple(range(depth // 2, depth))
        return () if moe_layers is None else moe_layer_indices(moe_layers, depth)

    return _vit(
        SOFT_WIDTHS,
        width,
        patch_size,
        blocks,
        image_size=image_size,
        in_chans=in_chans,
        num_classes=num_classes,
        representation_size=representation_size,
        num_experts=num_experts,
        moe_kwargs=dict(router="soft", num_slots=num_slots, noise_std=noise_std, **soft_kwargs),
        share_expert_init=share_expert_init,
        classifier=classifier,
    )


@registry.register_model(SOFT_FAMILY, "Mu/4")
def soft_moe_mu4(**kw) -> VisionTransformer:
    """6 x 64, patch 4: the CPU size (16 x 16 inputs -> 16 tokens, no class token)."""
    return _build_soft("Mu", 4, **{"num_experts": 8, **kw})


@registry.register_model(SOFT_FAMILY, "S/16")
def soft_moe_s16(**kw) -> VisionTransformer:
    return _build_soft("S", 16, **kw)


@registry.register_model(SOFT_FAMILY, "B/16")
def soft_moe_b16(**kw) -> VisionTransformer:
    return _build_soft("B", 16, **kw)


@registry.register_model(SOFT_FAMILY, "L/16")
def soft_moe_l16(**kw) -> VisionTransformer:
    return _build_soft("L", 16, **kw)


@registry.register_model(SOFT_FAMILY, "H/14")
def soft_moe_h14(**kw) -> VisionTransformer:
    return _build_soft("H", 14, **{"num_experts": 256, **kw})


def create_soft_moe(variant: str = "S/16", **kwargs) -> VisionTransformer:
    """A Soft MoE ViT of a registered variant (``list_soft_moe_models()``).

    Keywords (defaults: the paper's layout):
        num_experts: E per Soft MoE layer (128; 256 for H/14, 8 for Mu/4).
        num_slots: P slots per expert (1). ``None`` with ``group_size`` derives P from
            ``capacity_factor`` as vmoe does.
        moe_layers: ``"second-half"`` (blocks ``depth//2 .. depth-1``), ``"every-n"``,
            ``"last-n"``, a tuple of block indices, or ``None`` (the dense twin).
        classifier: ``"gap"`` (no class token, mean of the final-normed tokens: vmoe's Soft MoE
            configs) or ``"token"`` (a class token, as V-MoE).
        noise_std: Soft MoE router noise in training (0).
        num_classes, representation_size, image_size, in_chans: as ``create_model``.
        share_expert_init: experts start equal (False).
        Further ``SoftMoEMlp`` keywords: ``capacity_factor``, ``group_size``, ``backend``.

    Supported: the layer is ``moe_kernels.SoftMoEMlp`` (vmoe's router math, one group per
    image); tanh GELU and LayerNorm eps 1e-6 as the V-MoE models. Not supported: importing vmoe's
    released Soft MoE checkpoints (``models.vmoe_checkpoint`` reads V-MoE's only).
    """
    if variant not in list_soft_moe_models():
        raise ValueError(f"unknown Soft MoE variant {variant!r}; registered: {list_soft_moe_models()}")
    return registry.get_factory(SOFT_FAMILY, variant)(**kwargs)

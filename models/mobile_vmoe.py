"""Mobile V-MoE (Daxberger et al. 2023): one router per image drives every MoE layer.

The router reads the class token after the last dense block (through a LayerNorm; the mean of
the tokens as an option), picks the image's K experts, and every token of the image goes to
them in each of the last ``num_moe_layers`` blocks (dropless). It is trained with the task loss
plus a super-class guidance loss: cross-entropy between the router logits and the image's
super-class (weight 0.3; super-class c is expert c). Where the data has no super-classes,
``derive_superclasses`` clusters the confusion matrix of a dense model (DESIGN.md section 5).

Shape letters: B images, N tokens per image, D width, E experts (= super-classes), C classes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch import Tensor

from models import registry
from models.vit import VisionTransformer
from moe_kernels.losses import superclass_loss
from moe_kernels.routers import PerImageRouter, RouterOutput

__all__ = [
    "SIZES",
    "MobileVMoE",
    "create_model",
    "derive_superclasses",
    "list_models",
    "router_superclass_accuracy",
    "superclass_loss",
]

#: size: (D, H MLP, heads, blocks). "tiny" is ViT-Tiny; the rest scale depth and width down.
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (192, 768, 3, 12),
    "9x192": (192, 768, 3, 9),
    "6x192": (192, 768, 3, 6),
    "12x96": (96, 384, 3, 12),
    "9x96": (96, 384, 3, 9),
    "6x96": (96, 384, 3, 6),
    "12x64": (64, 256, 2, 12),
    "9x64": (64, 256, 2, 9),
    "6x64": (64, 256, 2, 6),
}



class MobileVMoE(VisionTransformer):
    """A ViT whose last ``num_moe_layers`` blocks are MoE layers routed per image.

    ``forward(x)`` returns the class logits; ``forward(x, return_router=True)`` returns
    ``(logits [B, C], router output)`` whose ``.logits`` ``[B, E]`` feed ``superclass_loss``
    (``None`` for the dense model, ``num_moe_layers=0``).
    """

    def __init__(
        self,
        *,
        num_moe_layers: int = 2,
        num_experts: int = 10,
        k: int = 2,
        router_input: str = "cls",
        depth: int = 12,
        dim: int = 192,
        backend: str = "auto",
        **vit_kwargs,
    ) -> None:
        if not 0 <= num_moe_layers < depth:
            raise ValueError(f"num_moe_layers must be in [0, depth={depth}), got {num_moe_layers}")
        blocks = range(depth - num_moe_layers, depth)
        super().__init__(
            depth=depth,
            dim=dim,
            moe_blocks=blocks,
            num_experts=num_experts,
            # The router decides outside the layers, for whole images: no capacity, no own router.
            moe_kwargs=dict(k=k, router="external", capacity_factor=None, backend=backend),
            **vit_kwargs,
        )
        self.first_moe = depth - num_moe_layers if num_moe_layers else depth
        self.k = k
        self.router = (
            PerImageRouter(dim, num_experts, k, router_input=router_input, backend=backend) if num_moe_layers else None
        )

    def forward(self, x: Tensor, return_router: bool = False):
        x = self.embed(x)  # [B, N, D]
        route: RouterOutput | None = None
        for i, blk in enumerate(self.blocks):
            if i == self.first_moe:
                route = self.router(x)  # on the output of the last dense block
            x = blk(x, routing=route)
        logits = self.forward_head(x)  # [B, C]
        return (logits, route) if return_router else logits


FAMILY = "mobile_vmoe"


def register_model(name: str) -> Callable:
    """Register a Mobile V-MoE size's factory in the one registry (``models.registry``)."""
    return registry.register_model(FAMILY, name)


def list_models() -> list[str]:
    """The registered Mobile V-MoE sizes (``"tiny"`` and the smaller ``"<blocks>x<width>"``)."""
    return registry.list_models(FAMILY)


def _build(size: str, *, patch_size: int = 16, **kw) -> MobileVMoE:
    """Mobile V-MoE of ``SIZES[size]`` (blocks x width, heads, MLP width)."""
    dim, mlp_dim, heads, depth = SIZES[size]
    model = MobileVMoE(dim=dim, mlp_dim=mlp_dim, num_heads=heads, depth=depth, patch_size=patch_size, **kw)
    model.variant = size
    return model


# One explicit factory per size (timm-style), each ``_build`` of its ``SIZES`` row.
@register_model("tiny")
def mobile_vmoe_tiny(**kw) -> MobileVMoE:
    return _build("tiny", **kw)


@register_model("9x192")
def mobile_vmoe_9x192(**kw) -> MobileVMoE:
    return _build("9x192", **kw)


@register_model("6x192")
def mobile_vmoe_6x192(**kw) -> MobileVMoE:
    return _build("6x192", **kw)


@register_model("12x96")
def mobile_vmoe_12x96(**kw) -> MobileVMoE:
    return _build("12x96", **kw)


@register_model("9x96")
def mobile_vmoe_9x96(**kw) -> MobileVMoE:
    return _build("9x96", **kw)


@register_model("6x96")
def mobile_vmoe_6x96(**kw) -> MobileVMoE:
    return _build("6x96", **kw)


@register_model("12x64")
def mobile_vmoe_12x64(**kw) -> MobileVMoE:
    return _build("12x64", **kw)


@register_model("9x64")
def mobile_vmoe_9x64(**kw) -> MobileVMoE:
    return _build("9x64", **kw)


@register_model("6x64")
def mobile_vmoe_6x64(**kw) -> MobileVMoE:
    return _build("6x64", **kw)


def create_model(
    size: str = "tiny",
    *,
    num_experts: int = 10,
    num_moe_layers: int = 2,
    k: int = 2,
    num_classes: int = 1000,
    image_size: int = 224,
    router_input: str = "cls",
    **kwargs,
) -> MobileVMoE:
    """A Mobile V-MoE of a registered size.

    Args:
        size: ``"tiny"`` (12 x 192, 3 heads, MLP 768) or a smaller ``"<blocks>x<width>"``
            size of ``list_models()``.
        num_experts: E, also the number of super-classes.
        num_moe_layers: MoE in the last this many blocks (0: the dense ViT of the same size).
        k: K experts per image (2, or 1).
        num_classes: head outputs.
        image_size: input side in pixels.
        router_input: ``"cls"`` (class token) or ``"mean"`` (mean of the tokens).
        **kwargs: ``patch_size`` (16), ``in_chans`` (3), ``representation_size``,
            ``share_expert_init`` (True), ``backend``.
    """
    if size not in list_models():
        raise ValueError(f"unknown Mobile V-MoE size {size!r}; registered: {list_models()}")
    return registry.get_factory(FAMILY, size)(
        num_experts=num_experts,
        num_moe_layers=num_moe_layers,
        k=k,
        num_classes=num_classes,
        image_size=image_size,
        router_input=router_input,
        **kwargs,
    )


def derive_superclasses(confusion_matrix, num_experts: int, *, seed: int = 0) -> np.ndarray:
    """Group classes the dense model confuses into ``num_experts`` super-classes.

    Affinity ``A = (M + M.T) / 2`` with a zero diagonal, spectral clustering on it
    (``sklearn.cluster.SpectralClustering(affinity="precomputed")``). Clusters are numbered by
    their smallest class, so the labelling is stable for a given partition.

    Args:
        confusion_matrix: ``[C, C]`` counts or rates, rows = true class.
        num_experts: E <= C, the number of super-classes.
        seed: the clustering's random state.

    Returns:
        ``[C]`` int64: the super-class (= expert) of every class.
    """
    from sklearn.cluster import SpectralClustering

    M = np.asarray(confusion_matrix, dtype=np.float64)
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"confusion_matrix must be square, got shape {M.shape}")
    C = M.shape[0]
    if not 1 <= num_experts <= C:
        raise ValueError(f"num_experts must be in [1, {C}] (the number of classes), got {num_experts}")
    if num_experts == C:
        return np.arange(C, dtype=np.int64)
    A = (M + M.T) / 2
    np.fill_diagonal(A, 0.0)
    # A class never confused with any other has an empty row, which spectral clustering cannot
    # place; a tiny uniform affinity keeps the graph connected without changing real structure.
    A = A + 1e-6 * A.max(initial=0.0) * (1 - np.eye(C)) + 1e-12 * (1 - np.eye(C))
    labels = SpectralClustering(
        n_clusters=num_experts, affinity="precomputed", random_state=seed, assign_labels="cluster_qr"
    ).fit_predict(A)
    first = {lab: i for i, lab in reversed(list(enumerate(labels)))}
    order = {lab: r for r, lab in enumerate(sorted(first, key=first.get))}
    return np.array([order[lab] for lab in labels], dtype=np.int64)


def router_superclass_accuracy(router_logits: Tensor, superclass: Tensor) -> Tensor:
    """Fraction of images whose top-1 router expert is their super-class."""
    return (router_logits.argmax(dim=-1) == superclass).float().mean()

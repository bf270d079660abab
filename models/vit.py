"""The Vision Transformer both reference models are built from (big_vision / V-MoE style).

Pre-LN blocks, LayerNorm eps 1e-6, tanh-approximate GELU, a class token, a learned position
embedding, an optional representation layer (``Linear + tanh``) and a zero-initialised head.
Any block's MLP can be an ``moe_kernels.MoEMlp``; how it is routed is the subclass's business
(``models.vmoe``: a token router inside each layer; ``models.mobile_vmoe``: one per-image router).

Shape letters: B images, N tokens per image (patches + class token), D width, H MLP width,
E experts, P patch size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from moe_kernels import MoEMlp, SoftMoEMlp
from moe_kernels.layers import images_per_group

__all__ = ["Attention", "Block", "GELUTanh", "Mlp", "PatchEmbed", "VisionTransformer", "LN_EPS"]

LN_EPS = 1e-6


class GELUTanh(nn.GELU):
    """``nn.GELU(approximate="tanh")`` that takes no arguments (``MoEMlp`` builds ``act_layer()``)."""

    def __init__(self) -> None:
        super().__init__(approximate="tanh")


class PatchEmbed(nn.Module):
    """``[B, C, I, I] -> [B, (I/P)^2, D]`` with a stride-P convolution."""

    def __init__(self, image_size: int, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_patches = (image_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}x{self.image_size} images, got {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N-1, D]


class Attention(nn.Module):
    """Multi-head self-attention written with plain matmuls: ``FlopCounterMode`` counts them
    (it has no formula for the CPU flash-attention op ``scaled_dot_product_attention`` picks)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} must be a multiple of num_heads={num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, N, D/heads]
        attn = (q * self.scale) @ k.transpose(-2, -1)  # [B, heads, N, N]
        out = attn.softmax(dim=-1) @ v  # [B, heads, N, D/heads]
        return self.proj(out.transpose(1, 2).reshape(B, N, D))  # [B, N, D]


class Mlp(nn.Module):
    """The dense MLP, timm's ``Mlp`` layout (``fc1 -> act -> fc2``), so ``mk.moeify`` finds it."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = GELUTanh()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``; the MLP is dense, an ``MoEMlp`` or a
    ``SoftMoEMlp`` (whose groups are the images: it is called on ``[B, N, D]``).

    With a token router (``MoEMlp.router`` set), routing groups are ``group_images`` whole
    images: the group size is passed per call from the batch's tokens per image. A batch that is
    not a multiple of ``group_images`` is grouped by its largest divisor below that, so the
    last, smaller batch of an epoch still routes in groups of equal size.
    """

    def __init__(self, dim: int, num_heads: int, mlp: nn.Module, group_images: int = 8) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = mlp
        self.group_images = group_images

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoEMlp)

    def forward(self, x: Tensor, routing=None) -> Tensor:
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)  # [B, N, D], what the router sees (class token too)
        if not self.is_moe:
            return x + self.mlp(h)
        if routing is None and self.mlp.router is not None:
            B, N = h.shape[:2]
            return x + self.mlp(h, group_size=images_per_group(B, self.group_images) * N)
        return x + self.mlp(h, routing=routing)


def moe_mlp(dim: int, hidden: int, *, num_experts: int, share_init: bool = True, **kwargs) -> MoEMlp | SoftMoEMlp:
    """An ``MoEMlp`` (``router="soft"``: a ``SoftMoEMlp``) with big_vision's MLP initialisation
    (Xavier-uniform kernels, N(0, 1e-6) biases); with ``share_init`` every expert starts from
    expert 0's weights (V-MoE)."""
    if kwargs.get("router") == "soft":
        kwargs = {k: v for k, v in kwargs.items() if k != "router"}
        layer = SoftMoEMlp(dim, hidden, act_layer=GELUTanh, num_experts=num_experts, **kwargs)
    else:
        layer = MoEMlp(dim, hidden, act_layer=GELUTanh, num_experts=num_experts, **kwargs)
    with torch.no_grad():
        for w, b in ((layer.fc1_weight, layer.fc1_bias), (layer.fc2_weight, layer.fc2_bias)):
            for e in range(1 if share_init else num_experts):
                nn.init.xavier_uniform_(w[e])
                if b is not None:
                    nn.init.normal_(b[e], std=1e-6)
            if share_init:
                w[1:].copy_(w[:1].expand_as(w[1:]))
                if b is not None:
                    b[1:].copy_(b[:1].expand_as(b[1:]))
    return layer


class VisionTransformer(nn.Module):
    """ViT with a class-token (or global-average-pooling) classifier; blocks in ``moe_blocks``
    get an ``MoEMlp`` (a ``SoftMoEMlp`` with ``moe_kwargs["router"] == "soft"``).

    Args:
        image_size, patch_size, in_chans: input geometry.
        num_classes: head outputs.
        dim, mlp_dim, num_heads, depth: D, H, heads, blocks.
        representation_size: width of the ``Linear + tanh`` pre-logits layer, or None.
        moe_blocks: indices of the blocks whose MLP is an ``MoEMlp``.
        num_experts: E of every MoE layer.
        moe_kwargs: further ``MoEMlp`` keywords (``k``, ``capacity_factor``, ``router``, ...).
        group_images: images per routing group of the token routers.
        share_expert_init: all experts of a layer start from the same weights.
        expert_mlp_dim: hidden width of each expert (None: ``mlp_dim``); e.g. ``mlp_dim // K``
            keeps a K-expert token's MLP FLOPs at the dense block's.
        classifier: ``"token"`` (a class token, read by the head) or ``"gap"`` (no class token;
            the head reads the mean of the final-normed tokens: vmoe's Soft MoE models).
    """

    def __init__(
        self,
        *,
        image_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        dim: int = 768,
        mlp_dim: int = 3072,
        num_heads: int = 12,
        depth: int = 12,
        representation_size: int | None = None,
        moe_blocks: Iterable[int] = (),
        num_experts: int = 8,
        moe_kwargs: dict | None = None,
        group_images: int = 8,
        share_expert_init: bool = True,
        classifier: str = "token",
        expert_mlp_dim: int | None = None,
    ) -> None:
        super().__init__()
        if classifier not in ("token", "gap"):
            raise ValueError(f"classifier must be 'token' or 'gap', got {classifier!r}")
        self.classifier = classifier
        self.moe_blocks = tuple(sorted(set(moe_blocks)))
        if any(not 0 <= i < depth for i in self.moe_blocks):
            raise ValueError(f"moe_blocks {self.moe_blocks} out of range for depth {depth}")
        self.num_classes = num_classes
        self.image_size = image_size
        self.in_chans = in_chans
        self.num_experts = num_experts if self.moe_blocks else 0
        self.patch_embed = PatchEmbed(image_size, patch_size, in_chans, dim)
        self.num_tokens = self.patch_embed.num_patches + (classifier == "token")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if classifier == "token" else None
        self.pos_embed = nn.Parameter(torch.empty(1, self.num_tokens, dim))
        moe_kwargs = dict(moe_kwargs or {})
        blocks = []
        for i in range(depth):
            if i in self.moe_blocks:
                hidden = expert_mlp_dim or mlp_dim
                mlp = moe_mlp(dim, hidden, num_experts=num_experts, share_init=share_expert_init, **moe_kwargs)
            else:
                mlp = Mlp(dim, mlp_dim)
            blocks.append(Block(dim, num_heads, mlp, group_images))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        if representation_size:
            self.pre_logits = nn.Sequential(nn.Linear(dim, representation_size), nn.Tanh())
            head_in = representation_size
        else:
            self.pre_logits = nn.Identity()
            head_in = dim
        self.head = nn.Linear(head_in, num_classes)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        fan_in = self.patch_embed.proj.weight[0].numel()
        nn.init.trunc_normal_(self.patch_embed.proj.weight, std=math.sqrt(1.0 / fan_in))  # LeCun normal
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.pos_embed, std=0.02)
        for blk in self.blocks:
            for lin in (blk.attn.qkv, blk.attn.proj):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)
            if isinstance(blk.mlp, Mlp):
                for lin in (blk.mlp.fc1, blk.mlp.fc2):
                    nn.init.xavier_uniform_(lin.weight)
                    nn.init.normal_(lin.bias, std=1e-6)
        if isinstance(self.pre_logits, nn.Sequential):
            nn.init.xavier_uniform_(self.pre_logits[0].weight)
            nn.init.zeros_(self.pre_logits[0].bias)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def embed(self, x: Tensor) -> Tensor:
        """``[B, C, I, I] -> [B, N, D]``: patches, class token first (if any), plus position
        embedding."""
        x = self.patch_embed(x)  # [B, N-1, D] (N-1 = N without a class token)
        if self.cls_token is None:
            return x + self.pos_embed
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # [B, 1, D]
        return torch.cat([cls, x], dim=1) + self.pos_embed  # [B, N, D]

    def forward_head(self, x: Tensor) -> Tensor:
        """``[B, N, D] -> [B, num_classes]`` from the class token (or the tokens' mean)."""
        x = self.norm(x)
        return self.head(self.pre_logits(x[:, 0] if self.cls_token is not None else x.mean(dim=1)))

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.forward_head(x)

    def moe_layers(self) -> list[MoEMlp]:
        return [blk.mlp for blk in self.blocks if blk.is_moe]

    def set_capacity_factor(self, train: float | None = None, eval: float | None = None) -> None:
        """Reassign the capacity factors of every token-routed MoE layer (e.g. ``eval=4.0``)."""
        for m in self.moe_layers():
            if m.router is not None:
                if train is not None:
                    m.capacity_factor = train
                if eval is not None:
                    m.eval_capacity_factor = eval

"""Import google-research/vmoe checkpoints into ``models.vmoe`` models, without JAX.

vmoe releases its V-MoE weights (e.g. ``gs://vmoe_checkpoints/vmoe_s32_last2_ilsvrc2012_randaug_light1``)
in the format of its ``vmoe/checkpoints`` code: a msgpack **index** file ``PREFIX.index`` and
one or more msgpack **data shards** ``PREFIX.data-00000-of-0000N``. The index holds
``{"version", "shard_count", "index"}``, where ``index`` is the flax state dict of the
parameters with, at each leaf, the array's global shape and dtype, its slices and the shard of
each slice; a shard holds, for each leaf (numbered in the sorted-key order of the tree), the
chunks of the slices stored there. This module reads that with ``msgpack`` and ``numpy`` only,
maps every flax name and layout onto ``models.vit.VisionTransformer``, and converts it to
safetensors.

After downloading a released checkpoint (``gsutil -m cp "gs://vmoe_checkpoints/NAME*" .``)::

    python -m models.vmoe_checkpoint vmoe_s32_last2_ilsvrc2012_randaug_light1 --variant S/32 \\
        --out vmoe_s32_last2.safetensors

then ``model = models.vmoe_checkpoint.load_safetensors("vmoe_s32_last2.safetensors")``
(``pip install msgpack safetensors``). The fine-tuned 384-pixel checkpoints need
``--image-size 384`` only as a check: the size is read from the position embedding.

What the imported model computes is vmoe's ``VisionTransformerMoe`` in eval mode: patch
embedding, class token, learned position embedding, pre-LN blocks (LayerNorm eps 1e-6,
multi-head attention, MLPs with flax's tanh-approximate GELU), V-MoE layers (router
``x @ W``, softmax over E, top-K, capacity ``ceil(S*K*c/E)`` rounded up to a multiple of 4 per
group of S tokens, K-major priority, no renormalisation), ``encoder_norm``, the class token's
``pre_logits`` (Linear + tanh) and ``head``. vmoe routes groups of ``group_size`` tokens (8
images: ``8 * tokens per image`` in its configs); ``--group-size`` takes that number. vmoe's
einsum dispatcher runs in bfloat16 on TPUs; this port runs fp32 (or whatever dtype you choose).

Flax names -> this model (D width, H MLP width, E experts, h heads, d = D/h, P patch, C channels)::

    embedding/kernel [P, P, C, D]                 patch_embed.proj.weight [D, C, P, P]
    cls [1, 1, D]                                 cls_token
    Encoder/posembed_input/pos_embedding [1,N,D]  pos_embed
    Encoder/encoderblock_i/LayerNorm_{0,1}        blocks.i.norm{1,2} (scale -> weight)
    .../SelfAttention/{query,key,value}/kernel [D, h, d], bias [h, d]   blocks.i.attn.qkv [3D, D], [3D]
    .../SelfAttention/out/kernel [h, d, D], bias [D]                    blocks.i.attn.proj
    .../Mlp/Dense_{0,1}/kernel [in, out], bias    blocks.i.mlp.fc{1,2} (dense blocks)
    .../Moe/Mlp/Dense_0/kernel [E, D, H], bias [E, H]   blocks.i.mlp.fc1_weight [E, H, D], fc1_bias
    .../Moe/Mlp/Dense_1/kernel [E, H, D], bias [E, D]   blocks.i.mlp.fc2_weight [E, D, H], fc2_bias
    .../Moe/Router/dense/kernel [D, E]            blocks.i.mlp.router.weight [E, D]
    Encoder/encoder_norm                          norm
    pre_logits/kernel, bias                       pre_logits.0
    head/kernel, bias                             head
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
from collections.abc import Callable

import numpy as np
import torch

from models.vit import VisionTransformer
from models.vmoe import WIDTHS

__all__ = [
    "CheckpointError",
    "convert",
    "load_safetensors",
    "load_vmoe_checkpoint",
    "read_checkpoint",
    "state_dict_from_flax",
]

# vmoe.checkpoints.partitioned.Version. Before 20220622 (None) the shards number the arrays in
# the order of jax.tree_leaves of the saved tree, not of its state dict; for a tree of dicts
# (parameters: no lists) both are the sorted-key order this reader uses.
_VERSIONS = (None, "20220622")
_ARRAY_CHUNKS_KEY = "__msgpack_array_chunk_a87ca2__"
_FLAX_CHUNKED_KEY = "__msgpack_chunked_array__"
# msgpack extension type codes of vmoe.checkpoints.serialization (flax's 1-3 plus vmoe's).
_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR, _EXT_SHAPED, _EXT_SLICE, _EXT_SLICE_ND, _EXT_SLICE_ND_ARRAY, _EXT_INDEX = (
    range(1, 9)
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model (the message names the file or
    the parameter)."""


def _msgpack():
    try:
        import msgpack
    except ImportError as exc:  # an optional dependency
        raise ImportError("reading vmoe checkpoints needs msgpack: pip install msgpack") from exc
    return msgpack


# ----------------------------------------------------------------------------------- reading
@dataclasses.dataclass(frozen=True)
class _IndexInfo:
    shape: tuple[int, ...]
    dtype: str
    slices: tuple[tuple[tuple[int, int], ...], ...]  # per chunk, (start, stop) per axis
    shards: tuple[int, ...]


def _name(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _dtype(name: str) -> np.dtype:
    # bfloat16 has no numpy dtype without ml_dtypes: its bits are read as uint16 and widened.
    return np.dtype(np.uint16) if name == "bfloat16" else np.dtype(name)


def _ndarray(data: bytes) -> np.ndarray:
    msgpack = _msgpack()
    shape, dtype, buf = msgpack.unpackb(data, raw=True)
    name = _name(dtype)
    arr = np.frombuffer(buf, dtype=_dtype(name)).reshape(shape)
    if name == "bfloat16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr


def _slice_nd(data: bytes) -> tuple[tuple[int, int], ...]:
    msgpack = _msgpack()
    out = []
    for s in msgpack.unpackb(data, raw=True):
        start, stop, step = msgpack.unpackb(s, raw=True)
        if step not in (None, 1):
            raise CheckpointError(f"unsupported slice step {step} in a checkpoint slice")
        out.append((start, stop))
    return tuple(out)


def _ext_hook(code: int, data: bytes):
    msgpack = _msgpack()
    if code == _EXT_NDARRAY:
        return _ndarray(data)
    if code == _EXT_NPSCALAR:
        return _ndarray(data)[()]
    if code == _EXT_COMPLEX:
        re_, im = msgpack.unpackb(data)
        return complex(re_, im)
    if code == _EXT_SLICE_ND:
        return _slice_nd(data)
    if code == _EXT_INDEX:
        shaped, slices, shards = msgpack.unpackb(data, raw=True)
        shape, dtype, _weak, _ = msgpack.unpackb(shaped, raw=True)
        return _IndexInfo(tuple(shape), _name(dtype), tuple(_slice_nd(s) for s in slices), tuple(shards))
    return msgpack.ExtType(code, data)


def _flatten(tree, prefix: str = "") -> list[tuple[str, object]]:
    """Leaves in jax's order for a flax state dict (keys sorted at every level), named
    ``a/b/c``; flax's chunked-array dicts are leaves."""
    if isinstance(tree, dict) and _FLAX_CHUNKED_KEY not in tree:
        out = []
        for k in sorted(tree):
            out += _flatten(tree[k], f"{prefix}{k}/")
        return out
    return [(prefix[:-1], tree)]


def _read(path: str, **kw):
    msgpack = _msgpack()
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file {path} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False, **kw)
    except (ValueError, msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException) as exc:
        raise CheckpointError(f"{path} is not a msgpack checkpoint file ({exc})") from exc


def _chunks_hook(mapping: dict):
    # A shard's {array index: [[subchunks, global slice], ...]} dict, as vmoe decodes it.
    if _ARRAY_CHUNKS_KEY not in mapping:
        return mapping
    out: dict[int, list] = {}
    for key, chunks in mapping.items():
        if key == _ARRAY_CHUNKS_KEY:
            continue
        out[int(key)] = []
        for subchunks, slc in chunks:
            flat = np.concatenate([np.asarray(s).reshape(-1) for s in subchunks]) if subchunks else np.zeros(0)
            out[int(key)].append((flat.reshape([b - a for a, b in slc]), slc))
    return out


def _shard_path(prefix: str, shard: int, count: int) -> str:
    return f"{prefix}.data-{shard:05d}-of-{count:05d}"  # vmoe.checkpoints.base.add_shard_suffix


def read_checkpoint(prefix: str) -> dict[str, np.ndarray]:
    """All arrays of a vmoe checkpoint, by flax name (``"Encoder/encoder_norm/scale"``).

    Args:
        prefix: the checkpoint prefix (``PREFIX.index`` and ``PREFIX.data-*`` exist), or the
            index file's path.

    Raises:
        CheckpointError: a missing or unreadable file, an unknown version, or a slice the index
            lists that its shard does not hold.
    """
    if prefix.endswith(".index"):
        prefix = prefix[: -len(".index")]
    index = _read(prefix + ".index")
    if not isinstance(index, dict) or "index" not in index or "shard_count" not in index:
        raise CheckpointError(f"{prefix}.index is not a vmoe checkpoint index (no 'index'/'shard_count')")
    version = index.get("version")
    if version not in _VERSIONS:
        raise CheckpointError(f"{prefix}.index: unsupported checkpoint version {version!r}, known: {_VERSIONS}")
    count = int(index["shard_count"])
    leaves = _flatten(index["index"])
    shards: dict[int, dict] = {}
    out: dict[str, np.ndarray] = {}
    for i, (name, info) in enumerate(leaves):
        if not isinstance(info, _IndexInfo):
            raise CheckpointError(f"{prefix}.index: the entry of {name} is not an array index entry")
        arr = np.zeros(info.shape, dtype=np.float32 if info.dtype == "bfloat16" else _dtype(info.dtype))
        filled = 0
        for slc, shard in zip(info.slices, info.shards, strict=True):
            if shard not in shards:
                shards[shard] = _read(_shard_path(prefix, shard, count), object_hook=_chunks_hook)
            chunk = next((c for c, s in shards[shard].get(i, ()) if tuple(map(tuple, s)) == slc), None)
            if chunk is None:
                raise CheckpointError(
                    f"{_shard_path(prefix, shard, count)} lacks the slice {slc} of {name} that the index lists"
                )
            arr[tuple(slice(a, b) for a, b in slc)] = chunk
            filled += chunk.size
        if filled < arr.size:
            raise CheckpointError(f"{prefix}: the slices of {name} cover {filled} of its {arr.size} values")
        out[name] = arr
    return out


# ----------------------------------------------------------------------------------- mapping
_BLOCK = re.compile(r"^Encoder/encoderblock_(\d+)/")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The geometry of a checkpoint's model, read from its shapes."""

    image_size: int
    patch_size: int
    in_chans: int
    dim: int
    mlp_dim: int
    num_heads: int
    depth: int
    num_classes: int
    representation_size: int | None
    moe_blocks: tuple[int, ...]
    num_experts: int


def _get(params: dict[str, np.ndarray], name: str, ndim: int | None = None) -> np.ndarray:
    if name not in params:
        raise CheckpointError(f"the checkpoint has no parameter {name}")
    a = params[name]
    if ndim is not None and a.ndim != ndim:
        raise CheckpointError(f"{name} must have {ndim} dimensions, got shape {tuple(a.shape)}")
    return a


def infer_config(params: dict[str, np.ndarray]) -> ModelConfig:
    """The model geometry of flax ``params`` (names as ``read_checkpoint`` gives them)."""
    P, _, C, D = _get(params, "embedding/kernel", 4).shape
    N = _get(params, "Encoder/posembed_input/pos_embedding", 3).shape[1]
    side = math.isqrt(N - 1)
    if side * side != N - 1:
        raise CheckpointError(
            f"Encoder/posembed_input/pos_embedding has {N} tokens, not a square grid plus a class token"
        )
    blocks = sorted({int(m.group(1)) for n in params if (m := _BLOCK.match(n))})
    if not blocks or blocks != list(range(len(blocks))):
        raise CheckpointError(f"the checkpoint's encoder blocks are {blocks}, expected encoderblock_0 .. _L-1")
    moe = tuple(i for i in blocks if any(n.startswith(f"Encoder/encoderblock_{i}/Moe/") for n in params))
    heads = _get(params, "Encoder/encoderblock_0/SelfAttention/query/kernel", 3).shape[1]
    first = f"Encoder/encoderblock_{blocks[0]}/" + ("Moe/Mlp/Dense_0/kernel" if 0 in moe else "Mlp/Dense_0/kernel")
    H = _get(params, first).shape[-1]
    E = _get(params, f"Encoder/encoderblock_{moe[0]}/Moe/Router/dense/kernel", 2).shape[1] if moe else 0
    rep = params["pre_logits/kernel"].shape[1] if "pre_logits/kernel" in params else None
    return ModelConfig(
        image_size=side * P,
        patch_size=P,
        in_chans=C,
        dim=D,
        mlp_dim=H,
        num_heads=heads,
        depth=len(blocks),
        num_classes=_get(params, "head/kernel", 2).shape[1],
        representation_size=rep,
        moe_blocks=moe,
        num_experts=E,
    )


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).float()


def state_dict_from_flax(params: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Every flax parameter as the ``VisionTransformer`` parameter it is (module docstring).

    Raises:
        CheckpointError: a parameter is missing, has the wrong number of dimensions, or is
            left over (the checkpoint has more than the model takes).
    """
    used: set[str] = set()

    def g(name: str, ndim: int) -> np.ndarray:
        used.add(name)
        return _get(params, name, ndim)

    D = cfg.dim
    sd: dict[str, torch.Tensor] = {
        "patch_embed.proj.weight": _t(g("embedding/kernel", 4).transpose(3, 2, 0, 1)),
        "patch_embed.proj.bias": _t(g("embedding/bias", 1)),
        "cls_token": _t(g("cls", 3)),
        "pos_embed": _t(g("Encoder/posembed_input/pos_embedding", 3)),
        "norm.weight": _t(g("Encoder/encoder_norm/scale", 1)),
        "norm.bias": _t(g("Encoder/encoder_norm/bias", 1)),
        "head.weight": _t(g("head/kernel", 2).T),
        "head.bias": _t(g("head/bias", 1)),
    }
    if cfg.representation_size:
        sd["pre_logits.0.weight"] = _t(g("pre_logits/kernel", 2).T)
        sd["pre_logits.0.bias"] = _t(g("pre_logits/bias", 1))
    for i in range(cfg.depth):
        src, dst = f"Encoder/encoderblock_{i}/", f"blocks.{i}."
        for n in (0, 1):
            sd[f"{dst}norm{n + 1}.weight"] = _t(g(f"{src}LayerNorm_{n}/scale", 1))
            sd[f"{dst}norm{n + 1}.bias"] = _t(g(f"{src}LayerNorm_{n}/bias", 1))
        att = src + "SelfAttention/"
        # DenseGeneral kernels [D, h, d]: the output features flatten head-major, the order in
        # which Attention splits qkv's rows.
        qkv = [g(f"{att}{n}/kernel", 3) for n in ("query", "key", "value")]
        sd[dst + "attn.qkv.weight"] = _t(np.concatenate([k.reshape(k.shape[0], -1).T for k in qkv]))
        sd[dst + "attn.qkv.bias"] = _t(
            np.concatenate([g(f"{att}{n}/bias", 2).reshape(-1) for n in ("query", "key", "value")])
        )
        sd[dst + "attn.proj.weight"] = _t(g(att + "out/kernel", 3).reshape(-1, D).T)
        sd[dst + "attn.proj.bias"] = _t(g(att + "out/bias", 1))
        if i in cfg.moe_blocks:
            moe = src + "Moe/"
            sd[dst + "mlp.router.weight"] = _t(g(moe + "Router/dense/kernel", 2).T)
            sd[dst + "mlp.fc1_weight"] = _t(g(moe + "Mlp/Dense_0/kernel", 3).transpose(0, 2, 1))
            sd[dst + "mlp.fc1_bias"] = _t(g(moe + "Mlp/Dense_0/bias", 2))
            sd[dst + "mlp.fc2_weight"] = _t(g(moe + "Mlp/Dense_1/kernel", 3).transpose(0, 2, 1))
            sd[dst + "mlp.fc2_bias"] = _t(g(moe + "Mlp/Dense_1/bias", 2))
        else:
            for n in (0, 1):
                sd[f"{dst}mlp.fc{n + 1}.weight"] = _t(g(f"{src}Mlp/Dense_{n}/kernel", 2).T)
                sd[f"{dst}mlp.fc{n + 1}.bias"] = _t(g(f"{src}Mlp/Dense_{n}/bias", 1))
    extra = sorted(set(params) - used)
    if extra:
        raise CheckpointError(f"the checkpoint has parameters the model does not take: {extra[:8]}")
    return sd


# ----------------------------------------------------------------------------------- models
def _check(cond: bool, param: str, msg: str) -> None:
    if not cond:
        raise CheckpointError(f"{param}: {msg}")


def _check_against(cfg: ModelConfig, variant: str | None, num_experts: int | None, image_size: int | None) -> None:
    """The checkpoint's geometry against what the caller says it is, naming the parameter
    that disagrees."""
    if variant is not None:
        m = re.fullmatch(r"([A-Za-z]+)/(\d+)", variant)
        if m is None or m.group(1) not in WIDTHS:
            raise CheckpointError(f"variant must be like 'S/32' with a width in {list(WIDTHS)}, got {variant!r}")
        D, H, heads, depth = WIDTHS[m.group(1)]
        P = int(m.group(2))
        kshape = (P, P, cfg.in_chans, D)
        _check((cfg.patch_size, cfg.dim) == (P, D), "embedding/kernel",
               f"variant {variant} needs shape {kshape}, the checkpoint has"
               f" {(cfg.patch_size, cfg.patch_size, cfg.in_chans, cfg.dim)}")  # fmt: skip
        _check(cfg.depth == depth, "Encoder/encoderblock_*",
               f"variant {variant} has {depth} blocks, the checkpoint {cfg.depth}")  # fmt: skip
        _check(cfg.num_heads == heads, "Encoder/encoderblock_0/SelfAttention/query/kernel",
               f"variant {variant} has {heads} heads, the checkpoint {cfg.num_heads}")  # fmt: skip
        mlp = "Moe/Mlp/Dense_0/kernel" if 0 in cfg.moe_blocks else "Mlp/Dense_0/kernel"
        _check(cfg.mlp_dim == H, f"Encoder/encoderblock_0/{mlp}",
               f"variant {variant} has MLP width {H}, the checkpoint {cfg.mlp_dim}")  # fmt: skip
    if num_experts is not None and cfg.moe_blocks:
        _check(cfg.num_experts == num_experts, f"Encoder/encoderblock_{cfg.moe_blocks[0]}/Moe/Router/dense/kernel",
               f"num_experts={num_experts} was asked for, the checkpoint has {cfg.num_experts} experts")  # fmt: skip
    if image_size is not None:
        _check(cfg.image_size == image_size, "Encoder/posembed_input/pos_embedding",
               f"image_size={image_size} was asked for, the position embedding is for {cfg.image_size}")  # fmt: skip


def _build(cfg: ModelConfig, *, k: int, group_images: int, capacity_factor: float | None,
           eval_capacity_factor: float | None, batch_priority: bool) -> VisionTransformer:  # fmt: skip
    model = VisionTransformer(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        num_classes=cfg.num_classes,
        dim=cfg.dim,
        mlp_dim=cfg.mlp_dim,
        num_heads=cfg.num_heads,
        depth=cfg.depth,
        representation_size=cfg.representation_size,
        moe_blocks=cfg.moe_blocks,
        num_experts=max(cfg.num_experts, 1),
        moe_kwargs=dict(
            k=k,
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            batch_priority=batch_priority,
        ),
        group_images=group_images,
    )
    return model


def _check_shapes(model: VisionTransformer, sd: dict[str, torch.Tensor], names: Callable[[str], str]) -> None:
    want = model.state_dict()
    missing = sorted(set(want) - set(sd))
    if missing:
        raise CheckpointError(f"the checkpoint lacks what the model needs for {missing[:8]}")
    for key, t in sd.items():
        if key not in want:
            raise CheckpointError(f"{names(key)}: no parameter {key} in the model")
        if tuple(t.shape) != tuple(want[key].shape):
            raise CheckpointError(
                f"{names(key)}: gives {key} the shape {tuple(t.shape)}, the model needs {tuple(want[key].shape)}"
            )


def _flax_name(key: str) -> str:
    """The flax parameter a model key comes from (for error messages)."""
    m = re.match(r"blocks\.(\d+)\.(.*)", key)
    if m is None:
        return {
            "patch_embed.proj.weight": "embedding/kernel",
            "patch_embed.proj.bias": "embedding/bias",
            "cls_token": "cls",
            "pos_embed": "Encoder/posembed_input/pos_embedding",
            "norm.weight": "Encoder/encoder_norm/scale",
            "norm.bias": "Encoder/encoder_norm/bias",
            "pre_logits.0.weight": "pre_logits/kernel",
            "pre_logits.0.bias": "pre_logits/bias",
            "head.weight": "head/kernel",
            "head.bias": "head/bias",
        }.get(key, key)
    blk, rest = f"Encoder/encoderblock_{m.group(1)}/", m.group(2)
    table = {
        "norm1.weight": "LayerNorm_0/scale",
        "norm1.bias": "LayerNorm_0/bias",
        "norm2.weight": "LayerNorm_1/scale",
        "norm2.bias": "LayerNorm_1/bias",
        "attn.qkv.weight": "SelfAttention/{query,key,value}/kernel",
        "attn.qkv.bias": "SelfAttention/{query,key,value}/bias",
        "attn.proj.weight": "SelfAttention/out/kernel",
        "attn.proj.bias": "SelfAttention/out/bias",
        "mlp.router.weight": "Moe/Router/dense/kernel",
        "mlp.fc1_weight": "Moe/Mlp/Dense_0/kernel",
        "mlp.fc1_bias": "Moe/Mlp/Dense_0/bias",
        "mlp.fc2_weight": "Moe/Mlp/Dense_1/kernel",
        "mlp.fc2_bias": "Moe/Mlp/Dense_1/bias",
        "mlp.fc1.weight": "Mlp/Dense_0/kernel",
        "mlp.fc1.bias": "Mlp/Dense_0/bias",
        "mlp.fc2.weight": "Mlp/Dense_1/kernel",
        "mlp.fc2.bias": "Mlp/Dense_1/bias",
    }
    return blk + table.get(rest, rest)


def _group_images(group_size: int | None, tokens_per_image: int) -> int:
    if group_size is None:
        return 8  # vmoe's configs: 8 images per group
    if group_size < tokens_per_image or group_size % tokens_per_image:
        raise CheckpointError(
            f"group_size={group_size} must be a multiple of the {tokens_per_image} tokens per image"
            " (vmoe's configs use 8 * tokens per image)"
        )
    return group_size // tokens_per_image


def load_vmoe_checkpoint(
    prefix: str,
    variant: str | None = None,
    *,
    num_experts: int | None = None,
    k: int = 2,
    image_size: int | None = None,
    group_size: int | None = None,
    capacity_factor: float | None = 1.05,
    eval_capacity_factor: float | None = None,
    batch_priority: bool = False,
) -> VisionTransformer:
    """A ``VisionTransformer`` (eval mode) holding a vmoe checkpoint's weights.

    Args:
        prefix: the checkpoint prefix (files ``PREFIX.index``, ``PREFIX.data-*``).
        variant: ``"S/32"``, ``"B/16"``, ...: checked against the checkpoint's shapes (widths,
            blocks, heads, patch). ``None``: the geometry is read from the checkpoint alone.
        num_experts: E, checked against the checkpoint (``None``: not checked).
        k: experts per token (not stored in the checkpoint; 2 for vmoe's released models).
        image_size: checked against the position embedding (``None``: not checked).
        group_size: vmoe's ``group_size``, tokens per routing group (``8 * tokens per image``
            in its configs; ``None``: 8 images).
        capacity_factor, eval_capacity_factor: the layers' factors (vmoe: 1.05 in training;
            its ILSVRC2012 configs evaluate with 4.0 via ``--eval-capacity-factor``).
        batch_priority: Batch Prioritized Routing.

    Raises:
        CheckpointError: unreadable files, a missing or left-over parameter, a wrong shape or a
            mismatch with ``variant``/``num_experts``/``image_size``, naming the parameter.
    """
    params = read_checkpoint(prefix)
    if "params" in params or any(n.startswith("params/") for n in params):
        params = {n[len("params/") :]: a for n, a in params.items() if n.startswith("params/")}  # a train state
    cfg = infer_config(params)
    _check_against(cfg, variant, num_experts, image_size)
    sd = state_dict_from_flax(params, cfg)
    tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
    model = _build(
        cfg,
        k=k,
        group_images=_group_images(group_size, tokens),
        capacity_factor=capacity_factor,
        eval_capacity_factor=eval_capacity_factor,
        batch_priority=batch_priority,
    )
    _check_shapes(model, sd, _flax_name)
    model.load_state_dict(sd, strict=True)
    model.vmoe_config = dataclasses.asdict(cfg) | dict(
        k=k,
        group_images=model.blocks[0].group_images,
        capacity_factor=capacity_factor,
        eval_capacity_factor=eval_capacity_factor,
        batch_priority=batch_priority,
    )
    return model.eval()


def convert(prefix: str, out: str, variant: str | None = None, **kwargs) -> VisionTransformer:
    """``load_vmoe_checkpoint(prefix, variant, **kwargs)`` saved to ``out`` as safetensors,
    with the model's configuration in the file's metadata (``load_safetensors`` reads it)."""
    from safetensors.torch import save_file

    model = load_vmoe_checkpoint(prefix, variant, **kwargs)
    meta = {"format": "pt", "vmoe_config": json.dumps(model.vmoe_config), "source": os.path.basename(prefix)}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out, metadata=meta)
    return model


def load_safetensors(path: str) -> VisionTransformer:
    """The model ``convert`` (or the CLI) wrote to ``path``, in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if "vmoe_config" not in meta:
        raise CheckpointError(f"{path} has no vmoe_config metadata (not written by models.vmoe_checkpoint)")
    c = json.loads(meta["vmoe_config"])
    run = {
        key: c.pop(key) for key in ("k", "group_images", "capacity_factor", "eval_capacity_factor", "batch_priority")
    }
    c["moe_blocks"] = tuple(c["moe_blocks"])
    group = run.pop("group_images")
    model = _build(ModelConfig(**c), group_images=group, **run)
    model.load_state_dict(load_file(path), strict=True)
    model.vmoe_config = json.loads(meta["vmoe_config"])
    return model.eval()


# ----------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m models.vmoe_checkpoint",
        description="Convert a google-research/vmoe checkpoint (PREFIX.index + PREFIX.data-*) to safetensors.",
    )
    p.add_argument("src", help="checkpoint prefix, e.g. vmoe_s32_last2_ilsvrc2012_randaug_light1")
    p.add_argument("--variant", help="S/32, B/16, ...: checked against the checkpoint's shapes")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--num-experts", type=int, help="check the checkpoint has this many experts")
    p.add_argument("--k", type=int, default=2, help="experts per token (default 2, as vmoe's releases)")
    p.add_argument("--image-size", type=int, help="check the position embedding is for this size")
    p.add_argument("--group-size", type=int, help="vmoe's group_size in tokens (default: 8 images)")
    p.add_argument("--capacity-factor", type=float, default=1.05)
    p.add_argument("--eval-capacity-factor", type=float, help="e.g. 4.0, as vmoe's ILSVRC2012 evaluation")
    p.add_argument("--batch-priority", action="store_true", help="Batch Prioritized Routing")
    a = p.parse_args(argv)
    try:
        model = convert(
            a.src,
            a.out,
            a.variant,
            num_experts=a.num_experts,
            k=a.k,
            image_size=a.image_size,
            group_size=a.group_size,
            capacity_factor=a.capacity_factor,
            eval_capacity_factor=a.eval_capacity_factor,
            batch_priority=a.batch_priority,
        )
    except CheckpointError as exc:
        p.exit(2, f"{p.prog}: error: {exc}\n")
    n = sum(t.numel() for t in model.state_dict().values())
    print(f"wrote {a.out}: {n:,} parameters, {json.dumps(model.vmoe_config)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""V-MoE checkpoint import (``models.vmoe_checkpoint``) on checkpoints written here.

``_write_checkpoint`` writes vmoe's format as ``vmoe/checkpoints/partitioned.py`` and
``serialization.py`` do (version 20220622): ``PREFIX.index``, a msgpack map
``{shard_count, index, version}`` whose leaves are IndexInfo extensions (code 8: shaped array,
slices, shards), and ``PREFIX.data-0000s-of-0000n`` shards, each a map with the array-chunks
magic key and, per leaf number (sorted-key order), ``[[subchunks], SliceNd]`` pairs (ndarray
extension code 1, SliceNd code 6). Expert parameters are split over two shards along the expert
axis, as vmoe's expert partitioning saves them, and chunks are cut into several subchunks.

The parameters have the real names and shapes of V-MoE S/32 "Last 2" (8 blocks, 8 experts in
blocks 5 and 7, class token, ``pre_logits`` of the hidden width) at reduced width. The reference
(``_vmoe_forward``) computes vmoe's ``VisionTransformerMoe`` from the flax arrays with float64
einsums and Python-loop routing; the imported model must give its logits.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

msgpack = pytest.importorskip("msgpack", reason="reading vmoe checkpoints needs msgpack")
pytest.importorskip("safetensors")

from models import vmoe_checkpoint as vc  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D, H, HEADS, DEPTH, E, P, C, IMG, CLASSES = 32, 64, 4, 8, 8, 32, 3, 64, 10
N = (IMG // P) ** 2 + 1  # 5 tokens per image
MOE_BLOCKS = (5, 7)  # "Last 2": range(1, 8, 2)[-2:]


# ------------------------------------------------------------------------ the format, written
def _ext_ndarray(a: np.ndarray) -> msgpack.ExtType:
    return msgpack.ExtType(1, msgpack.packb((a.shape, a.dtype.name, a.tobytes("C")), use_bin_type=True))


def _slice_nd_bytes(slc) -> bytes:
    return msgpack.packb(tuple(msgpack.packb((a, b, None), use_bin_type=True) for a, b in slc), use_bin_type=True)


def _write_checkpoint(prefix: str, params: dict[str, np.ndarray], *, subchunk: int = 1000, dtypes=None) -> None:
    """vmoe's partitioned format for ``params`` (flax names), 2 shards."""
    dtypes = dtypes or {}
    names = sorted(params, key=lambda n: tuple(n.split("/")))  # jax's leaf order of the nested dict
    tree: dict = {}
    shards: list[dict] = [{"__msgpack_array_chunk_a87ca2__": True} for _ in range(2)]
    for i, name in enumerate(names):
        a = params[name]
        dtype = dtypes.get(name, "float32")
        if "/Moe/Mlp/" in name:  # expert axis split over the two shards
            h = a.shape[0] // 2
            slices = [
                ((0, h),) + tuple((0, s) for s in a.shape[1:]),
                ((h, a.shape[0]),) + tuple((0, s) for s in a.shape[1:]),
            ]
            where = [0, 1]
        else:
            slices, where = [tuple((0, s) for s in a.shape)], [i % 2]
        for slc, shard in zip(slices, where, strict=True):
            chunk = a[tuple(slice(x, y) for x, y in slc)].reshape(-1)
            if dtype == "bfloat16":  # upper 16 bits of the fp32 values (truncation)
                raw = (np.ascontiguousarray(chunk, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
                subs = [msgpack.ExtType(1, msgpack.packb((raw[j : j + subchunk].shape, "bfloat16",
                                                          raw[j : j + subchunk].tobytes()), use_bin_type=True))
                        for j in range(0, raw.size, subchunk)]  # fmt: skip
            else:
                chunk = chunk.astype(dtype)
                subs = [_ext_ndarray(chunk[j : j + subchunk]) for j in range(0, chunk.size, subchunk)]
            shards[shard].setdefault(str(i), []).append([subs, msgpack.ExtType(6, _slice_nd_bytes(slc))])
        shaped = msgpack.packb((list(a.shape), dtype, False, {}), use_bin_type=True)
        info = msgpack.packb((shaped, tuple(_slice_nd_bytes(s) for s in slices), tuple(where)), use_bin_type=True)
        node = tree
        parts = name.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = msgpack.ExtType(8, info)
    with open(prefix + ".index", "wb") as f:
        f.write(msgpack.packb({"shard_count": 2, "index": tree, "version": "20220622"}, use_bin_type=True))
    for s, content in enumerate(shards):
        with open(f"{prefix}.data-{s:05d}-of-00002", "wb") as f:
            f.write(msgpack.packb(content, use_bin_type=True))


def _s32_last2_params(seed: int = 0, router_scale: float = 3.0) -> dict[str, np.ndarray]:
    """Random weights under V-MoE S/32 Last-2's flax names, at width D=32."""
    rng = np.random.default_rng(seed)

    def w(*shape, fan_in=None):
        fan = fan_in or shape[0]
        return (rng.standard_normal(shape) / math.sqrt(fan)).astype(np.float32)

    def b(*shape):
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)

    p = {
        "embedding/kernel": w(P, P, C, D, fan_in=P * P * C),
        "embedding/bias": b(D),
        "cls": b(1, 1, D),
        "Encoder/posembed_input/pos_embedding": b(1, N, D),
        "Encoder/encoder_norm/scale": 1 + b(D),
        "Encoder/encoder_norm/bias": b(D),
        "pre_logits/kernel": w(D, D),
        "pre_logits/bias": b(D),
        "head/kernel": w(D, CLASSES),
        "head/bias": b(CLASSES),
    }
    for i in range(DEPTH):
        blk = f"Encoder/encoderblock_{i}/"
        for n in (0, 1):
            p[f"{blk}LayerNorm_{n}/scale"] = 1 + b(D)
            p[f"{blk}LayerNorm_{n}/bias"] = b(D)
        for n in ("query", "key", "value"):
            p[f"{blk}SelfAttention/{n}/kernel"] = w(D, HEADS, D // HEADS)
            p[f"{blk}SelfAttention/{n}/bias"] = b(HEADS, D // HEADS)
        p[f"{blk}SelfAttention/out/kernel"] = w(HEADS, D // HEADS, D, fan_in=D)
        p[f"{blk}SelfAttention/out/bias"] = b(D)
        if i in MOE_BLOCKS:
            p[f"{blk}Moe/Router/dense/kernel"] = router_scale * w(D, E)
            p[f"{blk}Moe/Mlp/Dense_0/kernel"] = w(E, D, H, fan_in=D)
            p[f"{blk}Moe/Mlp/Dense_0/bias"] = b(E, H)
            p[f"{blk}Moe/Mlp/Dense_1/kernel"] = w(E, H, D, fan_in=H)
            p[f"{blk}Moe/Mlp/Dense_1/bias"] = b(E, D)
        else:
            p[f"{blk}Mlp/Dense_0/kernel"] = w(D, H)
            p[f"{blk}Mlp/Dense_0/bias"] = b(H)
            p[f"{blk}Mlp/Dense_1/kernel"] = w(H, D)
            p[f"{blk}Mlp/Dense_1/bias"] = b(D)
    return p


# ------------------------------------------------------------------------ vmoe, transcribed
def _ln(x, scale, bias):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * scale + bias


def _gelu(x):  # flax nn.gelu: approximate=True
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def _moe(y, p, blk, group_size, k, capacity_factor, stats):
    """vmoe's MlpMoeBlock on tokens ``y [T, D]``: top-K per token, capacity per group, K-major."""
    T = y.shape[0]
    gates = _softmax(y @ p[blk + "Moe/Router/dense/kernel"])  # [T, E]
    cap = math.ceil(group_size * k * capacity_factor / E)
    cap = int(math.ceil(cap / 4) * 4)
    out = np.zeros((T, D))
    for g in range(T // group_size):
        toks = range(g * group_size, (g + 1) * group_size)
        top = {t: np.argsort(-gates[t], kind="stable")[:k] for t in toks}
        fill = [0] * E
        for r in range(k):
            for t in toks:
                e = top[t][r]
                if fill[e] >= cap:
                    stats["dropped"] += 1
                    continue
                fill[e] += 1
                h = _gelu(y[t] @ p[blk + "Moe/Mlp/Dense_0/kernel"][e] + p[blk + "Moe/Mlp/Dense_0/bias"][e])
                o = h @ p[blk + "Moe/Mlp/Dense_1/kernel"][e] + p[blk + "Moe/Mlp/Dense_1/bias"][e]
                out[t] += gates[t, e] * o
    return out


def _vmoe_forward(p, images_nchw, *, group_size, k=2, capacity_factor=1.05, stats=None):
    p = {n: a.astype(np.float64) for n, a in p.items()}
    stats = stats if stats is not None else {"dropped": 0}
    x = images_nchw.numpy().astype(np.float64).transpose(0, 2, 3, 1)  # NHWC, as vmoe's inputs
    B = x.shape[0]
    g = IMG // P
    patches = x.reshape(B, g, P, g, P, C).transpose(0, 1, 3, 2, 4, 5)  # [B, h, w, P, P, C]
    x = np.einsum("bhwijc,ijcd->bhwd", patches, p["embedding/kernel"]) + p["embedding/bias"]
    x = x.reshape(B, g * g, D)
    x = np.concatenate([np.repeat(p["cls"], B, 0), x], 1) + p["Encoder/posembed_input/pos_embedding"]
    for i in range(DEPTH):
        blk = f"Encoder/encoderblock_{i}/"
        y = _ln(x, p[blk + "LayerNorm_0/scale"], p[blk + "LayerNorm_0/bias"])
        a = {n: np.einsum("bnd,dhk->bnhk", y, p[f"{blk}SelfAttention/{n}/kernel"]) + p[f"{blk}SelfAttention/{n}/bias"]
             for n in ("query", "key", "value")}  # fmt: skip
        att = _softmax(np.einsum("bqhk,bshk->bhqs", a["query"] / np.sqrt(D // HEADS), a["key"]))
        o = np.einsum("bhqs,bshk->bqhk", att, a["value"])
        x = x + np.einsum("bqhk,hkd->bqd", o, p[blk + "SelfAttention/out/kernel"]) + p[blk + "SelfAttention/out/bias"]
        y = _ln(x, p[blk + "LayerNorm_1/scale"], p[blk + "LayerNorm_1/bias"])
        if i in MOE_BLOCKS:
            x = x + _moe(y.reshape(-1, D), p, blk, group_size, k, capacity_factor, stats).reshape(x.shape)
        else:
            h = _gelu(y @ p[blk + "Mlp/Dense_0/kernel"] + p[blk + "Mlp/Dense_0/bias"])
            x = x + h @ p[blk + "Mlp/Dense_1/kernel"] + p[blk + "Mlp/Dense_1/bias"]
    x = _ln(x, p["Encoder/encoder_norm/scale"], p["Encoder/encoder_norm/bias"])[:, 0]
    x = np.tanh(x @ p["pre_logits/kernel"] + p["pre_logits/bias"])
    return torch.from_numpy(x @ p["head/kernel"] + p["head/bias"])


# ------------------------------------------------------------------------ tests
@pytest.fixture()
def ckpt(tmp_path):
    params = _s32_last2_params()
    prefix = str(tmp_path / "vmoe_s32_last2_small")
    _write_checkpoint(prefix, params)
    return prefix, params


def test_reader_round_trips_every_array(ckpt):
    prefix, params = ckpt
    assert sorted(os.listdir(os.path.dirname(prefix))) == [
        "vmoe_s32_last2_small.data-00000-of-00002",
        "vmoe_s32_last2_small.data-00001-of-00002",
        "vmoe_s32_last2_small.index",
    ]
    got = vc.read_checkpoint(prefix)
    assert sorted(got) == sorted(params)
    for name, a in params.items():
        np.testing.assert_array_equal(got[name], a, err_msg=name)
    assert vc.read_checkpoint(prefix + ".index").keys() == got.keys()  # the index path works too


def test_imported_logits_equal_vmoe(ckpt):
    prefix, params = ckpt
    model = vc.load_vmoe_checkpoint(prefix, num_experts=E, group_size=2 * N, image_size=IMG)
    assert not model.training and model.moe_blocks == MOE_BLOCKS
    assert model.vmoe_config["group_images"] == 2 and model.vmoe_config["num_experts"] == E
    torch.manual_seed(0)
    images = torch.randn(8, C, IMG, IMG)
    stats = {"dropped": 0}
    want = _vmoe_forward(params, images, group_size=2 * N, stats=stats)
    assert stats["dropped"] > 0  # the router's scale makes capacity bite: drops are compared too
    with torch.no_grad():
        got = model(images)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    # Eval capacity 4.0 (vmoe's ILSVRC2012 evaluation): nothing is dropped, logits still equal.
    model.set_capacity_factor(eval=4.0)
    stats = {"dropped": 0}
    want4 = _vmoe_forward(params, images, group_size=2 * N, capacity_factor=4.0, stats=stats)
    assert stats["dropped"] == 0
    with torch.no_grad():
        torch.testing.assert_close(model(images).double(), want4, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(want4, want)


def test_cli_converts_to_safetensors(ckpt, tmp_path):
    prefix, params = ckpt
    out = str(tmp_path / "model.safetensors")
    proc = subprocess.run(
        [sys.executable, "-m", "models.vmoe_checkpoint", prefix, "--out", out, "--num-experts", "8",
         "--group-size", str(2 * N), "--eval-capacity-factor", "4.0"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and os.path.getsize(out) > 0
    model = vc.load_safetensors(out)
    assert model.vmoe_config["eval_capacity_factor"] == 4.0 and model.blocks[5].mlp.eval_capacity_factor == 4.0
    images = torch.randn(4, C, IMG, IMG)
    want = _vmoe_forward(params, images, group_size=2 * N, capacity_factor=4.0)
    with torch.no_grad():
        torch.testing.assert_close(model(images).double(), want, rtol=1e-4, atol=1e-4)


def test_cli_reports_a_bad_checkpoint(ckpt, tmp_path):
    prefix, _ = ckpt
    with pytest.raises(SystemExit) as exc:
        vc.main([prefix, "--out", str(tmp_path / "x.safetensors"), "--num-experts", "4"])
    assert exc.value.code == 2
    assert not os.path.exists(tmp_path / "x.safetensors")


def test_variant_is_checked_against_the_shapes(ckpt):
    prefix, _ = ckpt
    with pytest.raises(vc.CheckpointError, match=r"embedding/kernel: variant S/32 needs shape \(32, 32, 3, 512\)"):
        vc.load_vmoe_checkpoint(prefix, "S/32")
    with pytest.raises(vc.CheckpointError, match="variant must be like 'S/32'"):
        vc.load_vmoe_checkpoint(prefix, "Q/32")


def test_full_size_s32_shapes_pass_the_variant_check():
    """The real S/32 Last-2 geometry (D=512, 8 heads, MLP 2048, 224 px -> 50 tokens) maps onto
    ``create_model("S/32")``'s parameter shapes (checked on the meta device, no memory)."""
    from models.vmoe import create_model

    cfg = vc.ModelConfig(image_size=224, patch_size=32, in_chans=3, dim=512, mlp_dim=2048, num_heads=8, depth=8,
                         num_classes=1000, representation_size=512, moe_blocks=(5, 7), num_experts=8)  # fmt: skip
    vc._check_against(cfg, "S/32", 8, 224)
    with torch.device("meta"):
        ours = create_model("S/32", num_experts=8, moe_layers="last-2", representation_size=512)
        built = vc._build(cfg, k=2, group_images=8, capacity_factor=1.05, eval_capacity_factor=None,
                          batch_priority=False)  # fmt: skip
    assert {k: tuple(v.shape) for k, v in built.state_dict().items()} == {
        k: tuple(v.shape) for k, v in ours.state_dict().items()
    }


def _broken(tmp_path, edit) -> str:
    params = _s32_last2_params()
    edit(params)
    prefix = str(tmp_path / "broken")
    _write_checkpoint(prefix, params)
    return prefix


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda p: p.pop("Encoder/encoderblock_7/Moe/Router/dense/kernel"),
         "no parameter Encoder/encoderblock_7/Moe/Router/dense/kernel"),
        (lambda p: p.pop("Encoder/encoderblock_2/LayerNorm_1/bias"),
         "no parameter Encoder/encoderblock_2/LayerNorm_1/bias"),
        (lambda p: p.update({"Encoder/encoderblock_3/LayerNorm_1/scale": np.ones(D + 1, np.float32)}),
         r"Encoder/encoderblock_3/LayerNorm_1/scale: gives blocks.3.norm2.weight the shape \(33,\)"),
        (lambda p: p.update({"Encoder/encoderblock_5/Moe/Mlp/Dense_0/kernel": np.ones((6, D, H), np.float32)}),
         r"Encoder/encoderblock_5/Moe/Mlp/Dense_0/kernel: gives blocks.5.mlp.fc1_weight the shape \(6, 64, 32\)"),
        (lambda p: p.update({"Encoder/encoderblock_7/Moe/Router/dense/kernel": np.ones((D, 6), np.float32)}),
         r"Encoder/encoderblock_7/Moe/Router/dense/kernel: gives blocks.7.mlp.router.weight the shape \(6, 32\)"),
        (lambda p: p.update({"Encoder/encoderblock_1/SelfAttention/query/kernel": np.ones((D, HEADS, 9), np.float32)}),
         r"SelfAttention/\{query,key,value\}/kernel: gives blocks.1.attn.qkv.weight the shape"),
        (lambda p: p.update({"head/kernel": np.ones((D, CLASSES, 1), np.float32)}),
         "head/kernel must have 2 dimensions"),
        (lambda p: p.update({"Encoder/extra/thing": np.ones(3, np.float32)}), "does not take: .*Encoder/extra/thing"),
    ],
    ids=["missing-router", "missing-ln", "wrong-shape", "wrong-expert-count-mlp", "wrong-expert-count-router",
         "wrong-head-dim", "wrong-ndim", "extra"],
)  # fmt: skip
def test_bad_checkpoints_name_the_parameter(tmp_path, edit, match):
    with pytest.raises(vc.CheckpointError, match=match):
        vc.load_vmoe_checkpoint(_broken(tmp_path, edit))


def test_expert_count_other_than_asked(ckpt):
    prefix, _ = ckpt
    with pytest.raises(vc.CheckpointError, match=r"Encoder/encoderblock_5/Moe/Router/dense/kernel: num_experts=4"):
        vc.load_vmoe_checkpoint(prefix, num_experts=4)
    with pytest.raises(vc.CheckpointError, match="pos_embedding: image_size=224 was asked for"):
        vc.load_vmoe_checkpoint(prefix, image_size=224)


def test_broken_files(ckpt, tmp_path):
    prefix, _ = ckpt
    with pytest.raises(vc.CheckpointError, match="does not exist"):
        vc.read_checkpoint(str(tmp_path / "nothing"))
    os.remove(prefix + ".data-00001-of-00002")
    with pytest.raises(vc.CheckpointError, match=r"data-00001-of-00002 does not exist"):
        vc.read_checkpoint(prefix)
    bad = str(tmp_path / "garbage")
    with open(bad + ".index", "wb") as f:
        f.write(msgpack.packb({"shard_count": 1, "index": {}, "version": "19990101"}))
    with pytest.raises(vc.CheckpointError, match="unsupported checkpoint version '19990101'"):
        vc.read_checkpoint(bad)
    # A shard without a slice its index lists.
    prefix2 = str(tmp_path / "holes")
    _write_checkpoint(prefix2, {"a/b": np.ones((4, 2), np.float32), "c": np.zeros(3, np.float32)})
    with open(prefix2 + ".data-00000-of-00002", "wb") as f:
        f.write(msgpack.packb({"__msgpack_array_chunk_a87ca2__": True}))
    with pytest.raises(vc.CheckpointError, match=r"lacks the slice .* of a/b"):
        vc.read_checkpoint(prefix2)


def test_bfloat16_arrays_and_a_train_state_tree(tmp_path):
    params = {f"params/{n}": a for n, a in _s32_last2_params(seed=1).items()}
    params["opt_state/count"] = np.zeros(1, np.float32)
    prefix = str(tmp_path / "state")
    _write_checkpoint(prefix, params, dtypes={"params/head/kernel": "bfloat16"})
    arrays = vc.read_checkpoint(prefix)
    want = (params["params/head/kernel"].view(np.uint32) & 0xFFFF0000).view(np.float32)  # bf16 truncation
    np.testing.assert_array_equal(arrays["params/head/kernel"], want)
    model = vc.load_vmoe_checkpoint(prefix, group_size=2 * N)
    torch.testing.assert_close(model.head.weight, torch.from_numpy(want.T.copy()))

"""Reference models: the paper's parameter counts, forward shapes of every variant, layer
placement, shared expert init, FLOP formulas, checkpoints, super-class derivation, and a short
training run that must lower the loss.

Big models are built (and run) on the meta device: shapes only, no memory. Everything that
computes runs on 16 x 16 inputs with the 6 x 64 backbone to stay within seconds on 2 cores.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import moe_kernels as mk
from models import mobile_vmoe, vmoe
from models.flops import count_flops, param_counts
from models.mobile_vmoe import derive_superclasses, superclass_loss


@pytest.fixture(autouse=True)
def _one_thread():
    # These models' matmuls are tiny: on a busy 2-core machine two OpenMP threads spin against
    # each other and run ~10x slower than one.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def small_vmoe(**kw):
    kw = {"num_classes": 10, "image_size": 16, "in_chans": 1, **kw}
    return vmoe.create_model("Mu/4", **kw)


def small_mobile(**kw):
    kw = {"num_classes": 10, "image_size": 16, "in_chans": 1, "patch_size": 4, "num_experts": 5, **kw}
    return mobile_vmoe.create_model("6x64", **kw)


# --- parameter counts of the papers' models (meta device) -----------------------------------


def test_vit_b16_jft_param_count():
    # ViT-B/16 with JFT's 18,291-class head and a 768-wide representation layer (V-MoE Table 8).
    with torch.device("meta"):
        m = vmoe.create_model("B/16", moe_layers=None, num_classes=18291, representation_size=768)
    assert all(p.is_meta for p in m.parameters())
    assert n_params(m) == 100_455_027


def test_vmoe_b16_32_experts_adds_params():
    # 6 MoE layers x (31 extra copies of a 768 -> 3072 -> 768 MLP + a 768 x 32 router).
    with torch.device("meta"):
        m = vmoe.create_model("B/16", num_experts=32, moe_layers="every-2", num_classes=18291, representation_size=768)
    assert n_params(m) - 100_455_027 == 878_519_808
    assert [i for i, b in enumerate(m.blocks) if b.is_moe] == [1, 3, 5, 7, 9, 11]


def test_mobile_vmoe_tiny_param_count():
    with torch.device("meta"):
        m = mobile_vmoe.create_model("tiny", num_experts=10, num_moe_layers=2, num_classes=1000)
    # ViT-Ti/16 (5,717,416) + 2 x 9 extra experts (295,872 each) + router (LayerNorm + Linear).
    assert n_params(m) == 11_045_426
    assert abs(n_params(m) - 11.05e6) < 0.01e6
    assert [i for i, b in enumerate(m.blocks) if b.is_moe] == [10, 11]


# --- forward shapes ----------------------------------------------------------------------


@pytest.mark.parametrize("variant", vmoe.list_models())
@pytest.mark.parametrize("moe_layers", [None, "every-2"], ids=["dense", "moe"])
def test_vmoe_forward_shape_meta(variant, moe_layers):
    with torch.device("meta"):
        m = vmoe.create_model(variant, num_experts=4, moe_layers=moe_layers, num_classes=7)
        # 12 images: not a multiple of group_images=8, so groups of 6 images.
        y = m(torch.empty(12, 3, 224, 224))
    assert y.shape == (12, 7) and y.is_meta


@pytest.mark.parametrize("size", mobile_vmoe.list_models())
def test_mobile_forward_shape_meta(size):
    with torch.device("meta"):
        m = mobile_vmoe.create_model(size, num_classes=7)
        y, route = m(torch.empty(3, 3, 224, 224), return_router=True)
    assert y.shape == (3, 7)
    assert route.logits.shape == (3, 10)


@pytest.mark.parametrize("batch", [1, 5, 16])
def test_small_models_forward_backward(batch):
    x = torch.randn(batch, 1, 16, 16)
    for m in (small_vmoe(), small_vmoe(moe_layers=None), small_mobile(), small_mobile(router_input="mean", k=1)):
        y = m(x)
        assert y.shape == (batch, 10)
        (y.sum() + mk.aux_loss(m)).backward()


# --- architecture details --------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [("every-2", [1, 3, 5]), ("every-3", [2, 5]), ("last-2", [3, 5]), ((0, 4), [0, 4]), (None, [])],
    ids=["every-2", "every-3", "last-2", "tuple", "dense"],
)
def test_moe_placement(spec, expected):
    m = small_vmoe(moe_layers=spec)
    assert [i for i, b in enumerate(m.blocks) if b.is_moe] == expected


def test_vit_details():
    m = small_vmoe(representation_size=32)
    assert torch.count_nonzero(m.head.weight) == 0 and torch.count_nonzero(m.head.bias) == 0
    assert isinstance(m.pre_logits[1], torch.nn.Tanh)
    assert all(ln.eps == 1e-6 for ln in m.modules() if isinstance(ln, torch.nn.LayerNorm))
    assert m.blocks[0].mlp.act.approximate == "tanh" and m.blocks[1].mlp.act.approximate == "tanh"
    assert m.pos_embed.shape == (1, 17, 64)


def test_experts_share_initial_weights():
    layer = small_vmoe().blocks[1].mlp
    for p in (layer.fc1_weight, layer.fc1_bias, layer.fc2_weight, layer.fc2_bias):
        assert torch.equal(p, p[:1].expand_as(p))


def test_routing_groups_are_whole_images():
    m = small_vmoe(group_images=4)
    groups = []
    m.blocks[1].mlp.router.register_forward_hook(lambda mod, inp, out: groups.append(out.plan.num_groups))
    m(torch.randn(8, 1, 16, 16))  # 2 groups of 4 images (17 tokens each)
    m(torch.randn(6, 1, 16, 16))  # 6 is no multiple of 4: its largest divisor up to 4, 2 groups of 3
    m(torch.randn(5, 1, 16, 16))  # prime: groups of 1 image
    assert groups == [2, 2, 5]
    assert m.blocks[1].mlp.group_size is None  # the group size is per call, the layer keeps none


def test_mobile_router_drives_every_moe_layer():
    m = small_mobile().eval()
    seen = []
    for blk in m.blocks[-2:]:
        blk.mlp.register_forward_hook(lambda mod, args, kwargs, out: seen.append(kwargs["routing"]), with_kwargs=True)
    x = torch.randn(3, 1, 16, 16)
    _, route = m(x, return_router=True)
    assert len(seen) == 2 and all(r is route for r in seen)
    # Every token of an image goes to the image's top-K experts.
    top = route.logits.topk(2, dim=-1).indices  # [B, K]
    idx = route.plan.indices.view(3, 17, 2)
    assert torch.equal(idx, top[:, None, :].expand(3, 17, 2))


# --- FLOPs, parameters, checkpoints ------------------------------------------------------------


def test_flops_and_active_params():
    x = torch.randn(8, 1, 16, 16)
    dense, moe = small_vmoe(moe_layers=None), small_vmoe()
    N, D, H = 17, 64, 256
    block = 2 * N * (4 * D * D + 2 * D * H) + 2 * 2 * N * N * D  # qkv, proj, MLP; QK^T and AV
    expected = 6 * block + 2 * 16 * 16 * D + 2 * D * 10  # + patch embedding + head
    assert count_flops(dense, x) == expected
    # 3 MoE layers: 8 images x 17 tokens per group, C = ceil(136*2*1.05/8) -> 36 slots per expert.
    rows = 8 * 36
    moe_extra = 3 * (2 * rows * 2 * D * H / 8 - 2 * N * 2 * D * H + 2 * N * D * 8)  # experts - dense MLP + router
    layers = [m for m in moe.modules() if isinstance(m, mk.MoEMlp)]
    layers[0].skip_empty_slots = False  # a user's own setting survives the count
    assert count_flops(moe, x) == pytest.approx(expected + moe_extra)
    assert layers[0].__dict__["skip_empty_slots"] is False
    assert all("skip_empty_slots" not in m.__dict__ and m.skip_empty_slots for m in layers[1:])
    total, active = param_counts(moe)
    expert = 2 * D * H + H + D
    assert total - n_params(dense) == 3 * (7 * expert + D * 8)
    assert total - active == 3 * 6 * expert  # K=2 of 8 experts are active


def test_flop_formulas_of_the_fused_expert_mlp_ops():
    # The ops a backend with fused epilogues runs (Triton) must be counted like the unfused pair,
    # or count_flops on a GPU would leave the expert MLPs out. Called directly on the CPU here.
    from torch.utils.flop_counter import FlopCounterMode

    M, D, H, Dout, E = 10, 6, 8, 5, 3
    x, g, h = torch.randn(M, D), torch.randn(M, Dout), torch.randn(M, H)
    w1, w2, off = torch.randn(E, H, D), torch.randn(E, Dout, H), torch.tensor([0, 3, 7, 10])
    ops = torch.ops.moe_kernels
    calls = [
        (lambda: ops.gelu_mlp(x, w1, None, w2, None, off, "none", True, "cpu"), 2 * M * H * D + 2 * M * Dout * H),
        (lambda: ops.grouped_mm_act_grad(g, w2.transpose(1, 2), off, h, "none", "cpu"), 2 * M * Dout * H),
        (lambda: ops.grouped_mm_weight_grad_fused(h, g, off, "none", True, True, "cpu"), 2 * M * Dout * H),
        (lambda: ops.grouped_mm_weight_grad_fused(h, g, off, "none", False, True, "cpu"), 0),
    ]
    for call, want in calls:
        with FlopCounterMode(display=False) as fc:
            call()
        assert fc.get_total_flops() == want


def test_checkpoint_roundtrip(tmp_path):
    from models.train import build_model, load_checkpoint, save_checkpoint

    cfg = dict(
        model="mobile",
        variant="6x64",
        patch_size=4,
        num_experts=5,
        k=2,
        num_moe_layers=2,
        router_input="cls",
        moe_layers="every-2",
        capacity_factor=1.05,
        group_images=8,
        representation_size=None,
        num_classes=10,
        image_size=16,
        in_chans=1,
    )
    m = build_model(cfg).eval()
    torch.nn.init.normal_(m.head.weight)
    save_checkpoint(m, cfg, str(tmp_path / "m.safetensors"), superclass=[0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    m2, cfg2, sc = load_checkpoint(str(tmp_path / "m.safetensors"))
    x = torch.randn(4, 1, 16, 16)
    assert cfg2 == cfg and sc.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    torch.testing.assert_close(m2.eval()(x), m(x), rtol=0, atol=0)


# --- super-classes and training --------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_derive_superclasses_recovers_planted_blocks(seed):
    rng = np.random.default_rng(seed)
    C = 12
    blocks = [[0, 5, 9], [1, 2, 3, 11], [4, 10], [6, 7, 8]]
    M = rng.random((C, C))  # background confusion
    for b in blocks:
        for i in b:
            for j in b:
                M[i, j] += rng.uniform(15, 30)
    M += np.diag(rng.uniform(200, 400, C))  # a large diagonal must not matter
    perm = rng.permutation(C)  # block structure is not about class order
    inv = np.argsort(perm)
    labels = derive_superclasses(M[np.ix_(perm, perm)], 4)[inv]
    assert labels.dtype == np.int64 and sorted(set(labels.tolist())) == [0, 1, 2, 3]
    got = sorted(sorted(np.flatnonzero(labels == c).tolist()) for c in range(4))
    assert got == sorted(blocks)


def test_derive_superclasses_edges():
    assert derive_superclasses(np.eye(5), 5).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        derive_superclasses(np.eye(3), 4)


def _digits_batch(n=32):
    from models.data import load_digits

    s = load_digits(16)
    x, y = s.train.tensors
    return x[:n], y[:n]


@pytest.mark.parametrize("kind", ["vmoe", "mobile"])
def test_short_training_lowers_loss(kind):
    torch.manual_seed(0)
    x, y = _digits_batch()
    m = small_vmoe() if kind == "vmoe" else small_mobile()
    sc = y.new_tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)

    def loss_fn():
        if kind == "vmoe":
            return F.cross_entropy(m(x), y) + mk.aux_loss(m)
        logits, route = m(x, return_router=True)
        return F.cross_entropy(logits, y) + superclass_loss(route.logits, sc[y])

    losses = []
    for _ in range(20):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_digits_split_is_fixed_and_disjoint():
    from models.data import load_digits

    a, b = load_digits(16), load_digits(16)
    assert (len(a.train), len(a.val), len(a.test)) == (1257, 270, 270)
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    assert a.train.tensors[0].shape[1:] == (1, 16, 16)


def test_digit_pairs_compose_two_digits_and_label_them_by_the_table():
    from models.data import _compose_pairs, load_digit_pairs, pair_table

    images = torch.zeros(3, 8, 8)
    images[1] = 1.0  # a full square: where it lands shows the height
    images[2, 0, 0] = 2.0  # one marked pixel
    digits = torch.tensor([4, 7, 9])
    gen = torch.Generator().manual_seed(0)
    x, pair = _compose_pairs(images, digits, np.array([1, 2]), 64, gen)
    assert x.shape == (64, 1, 16, 16) and pair.shape == (64, 2)
    for i in range(64):
        for half, cols in ((0, slice(0, 8)), (1, slice(8, 16))):
            part = x[i, 0, :, cols]
            if pair[i, half] == 7:  # the square: 8 full rows, starting 0-8 rows down
                rows = part.sum(1).nonzero().flatten()
                assert len(rows) == 8 and rows[-1] - rows[0] == 7 and rows[0] <= 8 and part.sum() == 64
            else:  # the marked pixel, in the half's first column
                assert pair[i, half] == 9 and part.sum() == 2 and part[:, 0].sum() == 2
    a, b = load_digit_pairs(200, 50, 60, seed=3), load_digit_pairs(200, 50, 60, seed=3)
    assert torch.equal(a.test.tensors[0], b.test.tensors[0]) and torch.equal(a.train.tensors[1], b.train.tensors[1])
    assert (len(a.train), len(a.val), len(a.test), a.num_classes, a.image_size) == (200, 50, 60, 10, 16)
    assert set(a.train.tensors[1].tolist()) <= set(pair_table(0).flatten().tolist())
    assert not torch.equal(pair_table(0), pair_table(1))
    with pytest.raises(ValueError, match="image_size for 'digit-pairs' must be 16"):
        from models.data import load_dataset

        load_dataset("digit-pairs", 32)


# --- the training CLI (python -m models.train) -------------------------------------------------


def _cli(argv, capsys):
    from models.train import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "mobile", "--variant", "Mu/4"], "'Mu/4' is a V-MoE variant"),
        (["--model", "vmoe", "--variant", "6x64"], "'6x64' is a Mobile V-MoE size"),
        (["--variant", "Z/9"], "unknown variant 'Z/9'"),
        (["--k", "0"], "argument --k: must be an integer >= 1, got 0"),
        (["--k", "3", "--num-experts", "2"], "k must be an int in [1, num_experts=2], got 3"),
        (["--moe-layers", "every-0"], "every-0"),
        (["--capacity-factor", "-1"], "argument --capacity-factor: must be a finite number > 0, got -1.0"),
        (["--batch-size", "x"], "argument --batch-size: must be an integer >= 1, got 'x'"),
        (["--epochs", "0"], "--epochs 0 evaluates a --checkpoint"),
        (["--checkpoint", "nowhere.safetensors"], "--checkpoint: no such file"),
        (["--data", "/no/such/folder"], "--data must be 'digits', 'digit-pairs' or an existing image folder"),
        (["--expert-mlp-dim", "0"], "argument --expert-mlp-dim: must be an integer >= 1, got 0"),
    ],
)
def test_cli_rejects_bad_arguments_before_any_work(argv, message, capsys, tmp_path):
    # argparse errors (exit 2, the usage and the message), not tracebacks; nothing written.
    code, out = _cli([*argv, "--out", str(tmp_path / "run"), "--no-progress"], capsys)
    assert code == 2
    assert "usage: python -m models.train" in out.err and message in out.err, out.err
    assert not (tmp_path / "run").exists()


def test_run_config_sets_expert_width_and_renormalisation():
    from models.build import DEFAULTS, build_model

    cfg = {**DEFAULTS, "variant": "Nano/4", "num_classes": 10, "in_chans": 1, "image_size": 16}
    with torch.device("meta"):
        plain = build_model(cfg)
        fine = build_model({**cfg, "expert_mlp_dim": 28, "renormalize": True, "num_experts": 16})
    a, b = plain.moe_layers()[0], fine.moe_layers()[0]
    assert (a.hidden_features, a.renormalize) == (64, False)
    assert (b.hidden_features, b.renormalize, b.fc1_weight.shape) == (28, True, (16, 28, 32))


def test_cli_help_shows_defaults(capsys):
    code, out = _cli(["--help"], capsys)
    assert code == 0
    text = " ".join(out.out.split())  # argparse wraps to the terminal's width
    for want in ("--num-experts NUM_EXPERTS experts per MoE layer (E) (default: 8)", "(default: 1.05)",
                 "(default: every-2)", "--overwrite"):
        assert want in text, want


def test_cli_eval_only_leaves_the_training_run_byte_identical(tmp_path, capsys):
    from models.train import main

    old = os.umask(0o022)
    try:
        run = tmp_path / "run"
        args = ["--model", "vmoe", "--variant", "Mu/4", "--num-experts", "4", "--no-progress"]
        res = main([*args, "--epochs", "1", "--batch-size", "256", "--out", str(run)])
        files = sorted(p.name for p in run.iterdir())
        assert files == ["accuracy.png", "expert_use.png", "metrics.json", "model.safetensors", "routing.png"]
        # Written with the user's umask: 0644 here (safetensors alone would give 0600).
        assert {oct(os.stat(run / f).st_mode & 0o777) for f in files} == {"0o644"}
        before = {f: (run / f).read_bytes() for f in files}
        assert len(json.loads(before["metrics.json"])["epochs"]) == 1

        ck = str(run / "model.safetensors")
        ev = main(["--checkpoint", ck, "--epochs", "0", "--eval-capacity-factor", "4", "--no-progress"])
        assert {f: (run / f).read_bytes() for f in files} == before
        assert sorted(p.name for p in run.iterdir()) == sorted([*files, "eval-cf4"])
        metrics = json.loads((run / "eval-cf4" / "metrics.json").read_text())
        assert metrics["checkpoint"] == ck and metrics["epochs"] == [] and 0 <= metrics["test_acc"] <= 1
        assert sorted(p.name for p in (run / "eval-cf4").iterdir()) == ["metrics.json", "routing.png"]
        # Without a change of weights, eval at capacity factor 1.05 reproduces the run's test accuracy.
        ev2 = main(["--checkpoint", ck, "--epochs", "0", "--no-progress"])
        assert ev2["test_acc"] == res["test_acc"] and (run / "eval" / "metrics.json").exists()
        assert ev["params_total"] == res["params_total"]
    finally:
        os.umask(old)
    capsys.readouterr()
    # Nothing overwrites a run without --overwrite: the evaluation again, or the training run's folder.
    code, out = _cli(["--checkpoint", ck, "--epochs", "0", "--no-progress"], capsys)
    assert code == 2 and "holds a run (metrics.json, routing.png); pass another --out, or --overwrite" in out.err
    code, out = _cli([*args, "--checkpoint", ck, "--epochs", "0", "--out", str(run)], capsys)
    assert code == 2 and "is the checkpoint's own run folder" in out.err
    code, out = _cli([*args, "--epochs", "1", "--out", str(run)], capsys)
    assert code == 2 and "already holds a run" in out.err
    assert {f: (run / f).read_bytes() for f in files} == before


def test_accuracy_plot_of_one_epoch_shows_a_point(tmp_path):
    from PIL import Image

    from models.plots import plot_accuracy

    hist = [{"epoch": 1, "train_acc": 0.5, "val_acc": 0.6}]
    plot_accuracy({"run": hist}, str(tmp_path / "a.png"))
    img = np.asarray(Image.open(tmp_path / "a.png").convert("RGB")).astype(int)
    # The val curve's colour (matplotlib's C0, #1f77b4) marks the single point.
    blue = (abs(img - np.array([0x1F, 0x77, 0xB4])).sum(-1) < 30).sum()
    assert blue > 20


def test_training_logs_routing_stats_per_epoch_and_plots_expert_use(tmp_path, capsys):
    """A 2-epoch V-MoE run: each epoch's record holds every MoE layer's routing statistics,
    consistent with themselves (kept + dropped = assignments), and expert_use.png is written."""
    from models.train import main

    out = tmp_path / "run"
    res = main(["--model", "vmoe", "--variant", "Mu/4", "--num-experts", "4", "--epochs", "2", "--batch-size", "256",
                "--capacity-factor", "0.5", "--no-progress", "--out", str(out)])  # fmt: skip
    epochs = res["epochs"]
    assert len(epochs) == 2
    for rec in epochs:
        layers = rec["routing"]
        assert layers and all(name.startswith("blocks.") for name in layers)
        for st in layers.values():
            assert len(st["tokens_per_expert"]) == 4
            assert sum(st["tokens_per_expert"]) + st["dropped"] == st["assignments"]
            assert st["dropped"] > 0  # capacity factor 0.5 must drop
            assert 0 < st["drop_fraction"] < 1 and 0 <= st["router_entropy"] <= math.log(4) + 1e-6
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["epochs"][0]["routing"] == epochs[0]["routing"]
    assert (out / "expert_use.png").stat().st_size > 0

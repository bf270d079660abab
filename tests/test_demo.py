"""models.demo: the experts-pay comparison's claims about its two models, and the command's
outputs on a tiny stand-in for the data."""

from __future__ import annotations

import json
import os

import pytest
import torch

from models import demo
from models.build import DEFAULTS, build_model
from models.data import load_digit_pairs
from models.flops import count_flops, param_counts


def _pairs_model(name: str):
    cfg = {**DEFAULTS, **demo.PAIRS_RECIPE, **demo.PAIRS_ROWS[name], "num_classes": 10, "in_chans": 1}
    torch.manual_seed(0)
    return build_model({**cfg, "image_size": 16})


def test_vmoe_costs_no_more_flops_than_its_dense_twin():
    dense, moe = _pairs_model("dense ViT"), _pairs_model("V-MoE")
    images = torch.randn(32, 1, 16, 16)  # one routing group of 32 images
    f_dense, f_moe = count_flops(dense, images), count_flops(moe, images)
    assert f_moe <= f_dense, (f_moe, f_dense)
    assert f_moe >= 0.99 * f_dense  # equal, not a smaller model in disguise
    total, active = param_counts(moe)
    assert total > 3.5 * param_counts(dense)[0]
    assert len(moe.moe_layers()) == len(moe.blocks) == 4
    layer = moe.moe_layers()[0]
    assert (layer.num_experts, layer.k, layer.hidden_features, layer.renormalize) == (16, 2, 28, True)


def test_demo_writes_table_summary_and_plot(tmp_path, monkeypatch):
    small = load_digit_pairs(256, 64, 64, seed=0)
    monkeypatch.setattr(demo, "_splits", lambda data, seed: small)
    out = str(tmp_path / "demo")
    table = demo.main(["--seeds", "0", "1", "--epochs", "1", "--jobs", "1", "--out", out])
    rows = [line for line in table.splitlines() if line.startswith("| dense ViT") or line.startswith("| V-MoE")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.split("|")]
        assert " ± " in cells[3] and len(cells[4].split(", ")) == 2  # mean ± sd, one value per seed
    assert "| 4x32, dense |" in rows[0] and "4x32, E=16 K=2 every block, experts 28 wide" in rows[1]
    assert "1.00x" in rows[1]  # the measured FLOPs ratio
    for f in ("table.md", "summary.json", "accuracy.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert set(summary) == {"dense ViT", "V-MoE"} and set(summary["V-MoE"]) == {"0", "1"}
    assert summary["V-MoE"]["0"]["test_routing"]  # class-by-expert counts of every MoE layer
    assert os.path.isfile(os.path.join(out, "v-moe-seed1", "routing.png"))


def test_rows_and_ablation_are_checked(capsys):
    for argv, message in (
        (["--ablation", "--rows", "nope"], "--rows: unknown ['nope']"),
        (["--data", "digits", "--ablation"], "--ablation is for --data digit-pairs"),
        (["--data", "digits", "--rows", "Mobile V-MoE"], "Mobile V-MoE needs the dense ViT"),
    ):
        with pytest.raises(SystemExit) as e:
            demo.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert set(demo.ABLATION_ROWS) == {"dense ViT, 12 epochs", "V-MoE, 12 epochs", "V-MoE, weights not renormalised"}
    assert demo.ABLATION_ROWS["V-MoE, weights not renormalised"]["renormalize"] is False

"""The benchmark's honesty fields (``python -m bench``, docs/benchmarks.md): the ``dense``
reference, ``gflops`` from the FLOP formula, ``sgemm_gflops``, "x dense" and the targets. Tiny
shapes, timings never judged (the machine may be loaded): only what the numbers are made of.

Shape letters: T tokens, D width, H hidden, E experts, K choices, S group size, C capacity.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bench import baselines as bl
from bench import report
from bench.cases import (
    EXPERT_SWEEP,
    MAIN_CASES,
    MOBILE_TINY,
    SWEEP_CASES,
    TOKEN_SWEEP,
    VMOE_S32,
    VMOE_S32_T4096_E32,
    expert_sweep,
    token_sweep,
)
from bench.measure import Step, backward, sgemm
from bench.suite import FLOPS_PER_ROW, run_layer_case, useful_flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# V-MoE routing in 2 groups of 48: C = 16 (ceil(48*2*1.05/8) = 13, rounded up to a multiple of 4)
# against 12 assignments per expert on average; the busiest experts overflow, so some drop.
TINY = dataclasses.replace(VMOE_S32, name="tiny", tokens=96, width=32, hidden=64, group_size=48)
# Per-image dropless routing: 4 images of 12 tokens.
TINY_IMG = dataclasses.replace(
    MOBILE_TINY, name="tiny_img", tokens=48, width=16, hidden=24, group_size=12, per_image=12
)
CPU = torch.device("cpu")


def test_useful_flops_formula():
    # 4*D*H per kept assignment forward (two GEMMs, 2 FLOPs per multiply-add), twice that backward.
    assert FLOPS_PER_ROW == {"fwd": 4, "bwd": 8, "fwd_bwd": 12}
    assert useful_flops(VMOE_S32, 800, "fwd") == 4 * 512 * 2048 * 800
    assert useful_flops(VMOE_S32, 800, "bwd") == 8 * 512 * 2048 * 800
    assert useful_flops(VMOE_S32, 797, "fwd_bwd") == 12 * 512 * 2048 * 797
    assert useful_flops(VMOE_S32, 800, "fwd") == VMOE_S32.gemm_flops(800)


def _eval_kept(case, p, x) -> int:
    """Kept assignments recomputed from the baselines' own routing (positions below C)."""
    with torch.no_grad():
        _, idx = bl.gate(case, x, p)
    S, C = bl.routing_groups(case)
    return int((bl.positions(idx, case.experts, S) < C).sum())


@pytest.mark.parametrize("case", [TINY, TINY_IMG], ids=["capacity", "per_image"])
def test_kept_rows_counts_the_layers_assignments(case):
    p = bl.Params.make(case, torch.float32, CPU)
    x = torch.randn(case.tokens, case.width, generator=torch.Generator().manual_seed(1))
    fn, mods = bl.moe_kernels_impl(case, p)
    kept = bl.kept_rows(fn, mods, x)
    assert kept == _eval_kept(case, p, x)
    if case.per_image:
        assert kept == case.tokens * case.k  # dropless
    else:
        assert 0 < kept < case.tokens * case.k  # this case drops some


def test_dense_is_one_mlp_on_the_kept_rows():
    p = bl.Params.make(TINY, torch.float32, CPU)
    fn, inp = bl.dense_impl(p, 77)
    assert inp.shape == (77, TINY.width) and inp.dtype == torch.float32
    want = F.linear(F.gelu(F.linear(inp, p.w1[0], p.b1[0])), p.w2[0], p.b2[0])  # [R, D]
    torch.testing.assert_close(fn(inp), want)
    assert [tuple(t.shape) for t in fn.params] == [(64, 32), (64,), (32, 64), (32,)]
    pb = bl.Params.make(TINY, torch.bfloat16, CPU)
    assert bl.dense_impl(pb, 5)[1].dtype == torch.bfloat16 and all(
        t.dtype == torch.bfloat16 for t in bl.dense_impl(pb, 5)[0].params
    )


@pytest.mark.parametrize("form", bl.FLOOR_FORMS)
def test_floor_forms_compute_the_same(form):
    p = bl.Params.make(TINY, torch.float32, CPU)
    x = torch.randn(TINY.tokens, TINY.width)
    fn, buf = bl.floor_impl(TINY, p.leaves(), x, form)
    assert fn.form == form and buf.shape == (TINY.experts, TINY.groups * TINY.capacity, TINY.width)
    h = F.gelu(torch.einsum("end,ehd->enh", buf, p.w1) + p.b1[:, None])  # [E, G*C, H]
    torch.testing.assert_close(fn(buf), torch.einsum("enh,edh->end", h, p.w2) + p.b2[:, None], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="form must be one of"):
        bl.floor_impl(TINY, p, x, "einsum")


def test_train_mode_backward_runs_through_the_aux_loss():
    """The layer's train-mode step backpropagates its auxiliary loss too: the router's gradient
    differs from the output-only backward's by exactly the aux loss's gradient."""
    p = bl.Params.make(TINY, torch.float32, CPU)
    x = torch.randn(TINY.tokens, TINY.width)
    fn, mods = bl.moe_kernels_impl(TINY, p, train=True)
    router = mods[0].router.weight  # [E, D]
    inp = x.requires_grad_(True)
    g = torch.randn(TINY.tokens, TINY.width)
    torch.manual_seed(0)
    y, aux = fn(inp)
    assert aux.requires_grad and aux.item() > 0
    backward((y, aux), g)
    both = router.grad.clone()
    router.grad = None
    torch.manual_seed(0)  # the same router noise
    y2, aux2 = fn(inp)
    y2.backward(g, retain_graph=True)
    out_only = router.grad.clone()
    router.grad = None
    (aux_only,) = torch.autograd.grad(aux2, router)
    assert not torch.allclose(both, out_only)
    torch.testing.assert_close(both, out_only + aux_only)


@pytest.mark.parametrize("case", [TINY, TINY_IMG], ids=["capacity", "per_image"])
def test_run_layer_case_records(case):
    logs = []
    recs = run_layer_case(case, "fp32", CPU, min_run_time=0.0, min_runs=2, max_warmup=1, log=logs.append)
    impls = {r["impl"] for r in recs}
    want = set(bl.IMPLS) - ({"grouped_mm"} if bl.grouped_mm_unsupported(torch.float32, CPU) else set())
    assert impls == want
    assert {r["mode"] for r in recs} == {"fwd", "bwd", "fwd_bwd"}
    kept = recs[0]["kept"]
    assert 0 < kept <= case.tokens * case.k
    for r in recs:
        assert r["kept"] == kept and (r["tokens"], r["width"], r["hidden"], r["experts"]) == (
            case.tokens,
            case.width,
            case.hidden,
            case.experts,
        )
        flops = FLOPS_PER_ROW[r["mode"]] * case.width * case.hidden * kept
        assert r["gflops"] == pytest.approx(flops / r["median_ms"] / 1e6, rel=1e-3, abs=2e-3)
    floor = next(r for r in recs if r["impl"] == "floor")
    assert floor["floor_form"] == ("per_expert" if case.per_image else floor["floor_form"])
    if not case.per_image:
        assert floor["floor_form"] in bl.FLOOR_FORMS
        assert any("floor formulation" in m for m in logs)
    table = report.layer_table(recs, sgemm_gflops=100.0)
    assert "x dense" in table and "% sgemm" in table and "| dense |" in table


def test_sgemm_rate():
    rate, timing = sgemm(CPU, n=64, runs=3)
    assert timing.runs == 3 and rate == pytest.approx(2 * 64**3 / timing.median_ms / 1e6)


def _rec(case, impl, ms, *, dtype="fp32", mode="fwd_bwd", mem=10.0, tokens=400, experts=8, gflops=1.0):
    return dict(
        case=case,
        impl=impl,
        mode=mode,
        dtype=dtype,
        median_ms=ms,
        iqr_ms=0.1,
        peak_mem_mb=mem,
        runs=5,
        gflops=gflops,
        tokens=tokens,
        experts=experts,
    )


def test_layer_table_ratios():
    recs = [
        _rec("c", "moe_kernels", 110.0, gflops=50.0),
        _rec("c", "dense", 100.0, gflops=55.0),
        _rec("c", "einsum", 220.0, gflops=25.0),
    ]
    rows = {
        ln.split("|")[4].strip(): [c.strip() for c in ln.split("|")[1:-1]]
        for ln in report.layer_table(recs, 200.0).splitlines()[2:]
    }
    # columns: case dtype mode impl median IQR peak GFLOP/s %sgemm x-dense speed-up
    assert rows["**moe_kernels**"][7:10] == ["50", "25%", "1.10"]
    assert rows["dense"][9] == "1.00" and rows["einsum"][9:] == ["2.20", "2.00x"]
    assert "| - |" in report.layer_table(recs)  # no sgemm rate: no percentage


def _targets(recs):
    return {(t["case"], t["dtype"], t["target"]): t for t in report.check_targets(recs)}


def test_targets_against_dense():
    recs = [
        _rec("vmoe_s32", "moe_kernels", 114.0, mem=12.0),
        _rec("vmoe_s32", "dense", 100.0, mem=10.0),
        _rec("vmoe_s32", "loop", 120.0),
        _rec("vmoe_s32", "einsum", 300.0),
        _rec("vmoe_s32", "floor", 90.0),
        _rec("vmoe_b16", "moe_kernels", 116.0, mem=14.0),
        _rec("vmoe_b16", "dense", 100.0, mem=10.0),
        _rec("vmoe_b16", "grouped_mm", 118.0),
        _rec("sweep", "moe_kernels", 109.0, tokens=4096, experts=32),
        _rec("sweep", "dense", 100.0),
        _rec("vmoe_s32", "moe_kernels", 170.0, dtype="bf16"),
        _rec("vmoe_s32", "dense", 3000.0, dtype="bf16"),
    ]
    t = _targets(recs)
    assert t[("vmoe_s32", "fp32", "x dense")]["met"] and t[("vmoe_s32", "fp32", "x dense")]["limit"] == 1.15
    assert not t[("vmoe_b16", "fp32", "x dense")]["met"]  # 1.16 > 1.15
    assert t[("sweep", "fp32", "x dense")]["limit"] == 1.10 and t[("sweep", "fp32", "x dense")]["met"]
    # baselines: loop 120/114 = 1.053 >= 1.05 (the floor is no baseline); grouped_mm 118/116 < 1.05
    assert t[("vmoe_s32", "fp32", "smallest speed-up over a baseline")]["value"] == pytest.approx(120 / 114)
    assert t[("vmoe_s32", "fp32", "smallest speed-up over a baseline")]["met"]
    assert not t[("vmoe_b16", "fp32", "smallest speed-up over a baseline")]["met"]
    assert t[("vmoe_s32", "fp32", "peak memory x dense")]["met"]  # 1.2
    assert not t[("vmoe_b16", "fp32", "peak memory x dense")]["met"]  # 1.4
    bf = t[("vmoe_s32", "bf16", "x the layer's fp32 time")]
    assert bf["value"] == pytest.approx(170 / 114) and bf["met"]
    text = report.targets(recs)
    assert "MISSED" in text and "met" in text and "no such case" not in text


def test_targets_say_what_is_missing():
    text = report.targets([_rec("vmoe_s32", "moe_kernels", 100.0)])
    assert "vmoe_b16 fp32: not in this run" in text and "T=4096, E=32 fp32: no such case" in text
    t = _targets([_rec("vmoe_s32", "moe_kernels", 100.0), _rec("vmoe_s32", "moe_kernels", 100.0, dtype="bf16")])
    assert math.isnan(t[("vmoe_s32", "fp32", "x dense")]["value"]) and not t[("vmoe_s32", "fp32", "x dense")]["met"]


def test_memory_less_the_parameter_gradients_is_information():
    ours = dict(_rec("vmoe_s32", "moe_kernels", 100.0, mem=76.0), param_grad_mb=64.0)
    dense = dict(_rec("vmoe_s32", "dense", 90.0, mem=24.0), param_grad_mb=8.0)
    lines = report.memory_without_grads([ours, dense, _rec("vmoe_b16", "moe_kernels", 1.0)])
    assert len(lines) == 1  # vmoe_b16 has no dense row and no gradient sizes
    assert "12 MB against dense's 16 MB (x0.75; information, not a target" in lines[0]
    assert lines[0] in report.targets([ours, dense])
    t = _targets([ours, dense])
    assert not t[("vmoe_s32", "fp32", "peak memory x dense")]["met"]  # the target itself is unchanged


def test_step_backward_of_plain_and_constant_loss_outputs():
    w = torch.randn(3, 3, requires_grad=True)
    x = torch.randn(2, 3)
    s = Step(lambda inp: (inp @ w, torch.zeros(())), x.clone().requires_grad_(True), torch.ones(2, 3), [w])
    s()  # a constant auxiliary loss (external routing) is skipped, not an error
    assert w.grad is None  # cleared after the step
    backward((x @ w, torch.zeros(())), torch.ones(2, 3))
    torch.testing.assert_close(w.grad, x.t() @ torch.ones(2, 3))


def test_main_writes_the_fields(tmp_path):
    """``python -m bench --quick`` end to end on the tiny case (a subprocess: the benchmark sets
    glibc malloc options for its whole process)."""
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    code = (
        "import sys, bench.__main__ as m, tests.test_bench as t; m.MAIN_CASES = (t.TINY,);"
        f" sys.exit(m.main(['--quick', '--json', {str(js)!r}, '--plot', {str(png)!r}, '--sgemm-n', '64',"
        " '--copy-mib', '8', '--min-run-time', '0']))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(js.read_text())
    assert data["sgemm_gflops"] > 0 and data["sgemm"]["n"] == 64 and data["copy_gbps"] > 0
    assert {r["impl"] for r in data["records"]} >= {"moe_kernels", "moe_kernels_eval", "dense", "floor"}
    assert all(r["gflops"] > 0 for r in data["records"])
    assert data["cpu_wgrad_avx512"] == bool(torch.ops.moe_kernels_C.cpu_wgrad_avx512())
    layer = [r for r in data["records"] if r["case"] == TINY.name and ":" not in r["case"]]
    grads = {r["impl"]: r["param_grad_mb"] for r in layer}
    assert grads["moe_kernels"] > grads["dense"] > 0  # E experts' gradients against one MLP's
    assert "x dense" in out.stdout and "% sgemm" in out.stdout and "## Targets" in out.stdout
    assert png.stat().st_size > 0


# The sweeps (bench.sweep) on tiny shapes: tokens in 1, 2 and 4 groups of TINY's 48; experts
# 8, 32 and 128 on 96 tokens in one group (E=128 above T: C = ceil(96*2*1.05/128) = 2 -> 4 slots,
# 1.5 assignments per expert on average).
TINY_TOKENS = token_sweep(TINY, (1, 2, 4), "tiny_sweep")
TINY_EXPERTS = expert_sweep(dataclasses.replace(TINY, group_size=96), (8, 32, 128), "tiny_sweep")


def test_sweep_cases():
    s32 = dict(width=512, hidden=2048, k=2, capacity_factor=1.05)
    assert [c.tokens for c in TOKEN_SWEEP] == [400 * g for g in (1, 2, 4, 8, 16, 32, 41)]
    assert TOKEN_SWEEP[-1].tokens >= 16384 and SWEEP_CASES == TOKEN_SWEEP[:4]
    assert [c.name for c in SWEEP_CASES] == ["sweep_s32_T400", "sweep_s32_T800", "sweep_s32_T1600", "sweep_s32_T3200"]
    for c in TOKEN_SWEEP:
        assert {f: getattr(c, f) for f in s32} == s32 and (c.experts, c.group_size, c.capacity) == (8, 400, 108)
    # Expert sweep: T, S, D, H, K fixed (the active FLOPs per token), E = 8, 32, 128; one group of
    # 4096, so the capacity's rounding keeps the effective capacity factor at 1.05-1.0625.
    assert [c.experts for c in EXPERT_SWEEP] == [8, 32, 128]
    assert [c.capacity for c in EXPERT_SWEEP] == [1076, 272, 68]
    for c in EXPERT_SWEEP:
        assert {f: getattr(c, f) for f in s32} == s32 and (c.tokens, c.group_size) == (4096, 4096)
        assert 1.05 <= c.capacity * c.experts / (c.group_size * c.k) <= 1.0625
        assert c.name == f"sweep_s32_T4096_E{c.experts}"
    # The T=4096, E=32 case is a main case, the expert sweep's E=32 point, and the run
    # checks it against the 1.10x-dense target.
    assert VMOE_S32_T4096_E32 in MAIN_CASES
    assert dataclasses.replace(EXPERT_SWEEP[1], name=VMOE_S32_T4096_E32.name) == VMOE_S32_T4096_E32
    assert report.DENSE_LIMITS_BY_SHAPE[(VMOE_S32_T4096_E32.tokens, VMOE_S32_T4096_E32.experts)] == 1.10
    assert len({c.name for c in MAIN_CASES + TOKEN_SWEEP + EXPERT_SWEEP}) == len(
        MAIN_CASES + TOKEN_SWEEP + EXPERT_SWEEP
    )


def test_sweep_table_and_plot(tmp_path):
    """The per-token table and the two-panel plot from made-up records (no timing involved)."""
    recs = []
    for sweep, field, values in (("tokens", "tokens", (400, 800)), ("experts", "experts", (8, 32))):
        for v in values:
            for impl, ms in (("moe_kernels", 0.12), ("dense", 0.1)):
                r = _rec(f"c{v}", impl, ms * (v if field == "tokens" else 400), experts=8, tokens=400)
                r.update({field: v, "sweep": sweep, "kept": 790, "capacity": 108})
                recs.append(r)
    table = report.sweep_table(recs)
    rows = [[c.strip() for c in ln.split("|")[1:-1]] for ln in table.splitlines()[2:]]
    assert len(rows) == 4
    # columns: sweep case T E C kept ours-us/token IQR dense-us/token IQR x-dense
    assert rows[0][:6] == ["tokens", "c400", "400", "8", "108", "790"]
    assert rows[0][6] == "120" and rows[0][8] == "100" and rows[0][10] == "1.20"
    png = tmp_path / "s.png"
    report.plot_sweep(recs, str(png), "test")
    assert png.stat().st_size > 0
    report.plot_sweep([r for r in recs if r["sweep"] == "tokens"], str(png), "one sweep only")


def test_sweep_main_writes_records_and_plot(tmp_path):
    """``python -m bench.sweep`` end to end on the tiny sweeps (a subprocess, as for ``python -m
    bench``: glibc malloc options for the whole process), one thread."""
    js, png = tmp_path / "s.json", tmp_path / "s.png"
    code = (
        "import sys, torch, bench.sweep as s, tests.test_bench as t; torch.set_num_threads(1);"
        f" sys.exit(s.main(['--quick', '--json', {str(js)!r}, '--plot', {str(png)!r}, '--sgemm-n', '64',"
        " '--copy-mib', '8', '--min-run-time', '0'], token_cases=t.TINY_TOKENS, expert_cases=t.TINY_EXPERTS))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(js.read_text())
    assert data["sgemm_gflops"] > 0 and data["copy_gbps"] > 0 and data["threads"] == 1 and data["quick"]
    assert data["sweeps"] == {"tokens": [c.name for c in TINY_TOKENS], "experts": [c.name for c in TINY_EXPERTS]}
    recs = data["records"]
    cases = {c.name: (sweep, c) for sweep, cs in (("tokens", TINY_TOKENS), ("experts", TINY_EXPERTS)) for c in cs}
    assert {(r["case"], r["impl"]) for r in recs} == {(n, i) for n in cases for i in ("moe_kernels", "dense")}
    for r in recs:
        sweep, case = cases[r["case"]]
        assert r["sweep"] == sweep and r["mode"] == "fwd_bwd" and r["dtype"] == "fp32"
        assert (r["tokens"], r["experts"], r["group_size"], r["capacity"]) == (
            case.tokens,
            case.experts,
            case.group_size,
            case.capacity,
        )
        assert 0 < r["kept"] <= case.tokens * case.k and r["gflops"] > 0 and r["runs"] >= 5
        assert r["us_per_token"] == pytest.approx(r["median_ms"] * 1e3 / r["tokens"], rel=1e-3, abs=1e-3)
        dense = next(d for d in recs if d["case"] == r["case"] and d["impl"] == "dense")
        assert r["kept"] == dense["kept"]  # dense runs on the layer's kept rows
        assert r["x_dense"] == pytest.approx(r["median_ms"] / dense["median_ms"], rel=1e-3)
    assert all(r["x_dense"] == 1.0 for r in recs if r["impl"] == "dense")
    assert "us/token" in out.stdout and "x dense" in out.stdout
    assert png.stat().st_size > 0

"""Every Triton kernel compiles ahead of time for sm_80 and sm_90, without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` runs the whole pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled ptxas), so it catches what the
interpreter cannot: type errors in compiled code, register/shared-memory blow-ups, and which
tensor-core instructions the grouped GEMM gets. Each case uses the constexprs and warps the
launchers in ``moe_kernels/ops/_triton.py`` pass, and, like a real launch, marks pointers and
leading strides 16-divisible and inner strides equal to 1 (Triton specialises on both; without
them it neither vectorises nor software-pipelines the loads).

Checks: shared memory within the target (sm_80: 163 KiB, sm_90: 227 KiB) for every autotune
config the launcher can pick there; the grouped GEMM's PTX uses ``mma.sync`` on sm_80 and
``wgmma`` on sm_90, for fp16 and bf16; and no config spills registers (no ``LDL``/``STL`` in the
SASS, read with the cuobjdump of the toolkit or of Triton's wheel: ``bench/kernels.py``).
"""

from __future__ import annotations

import os
import tempfile

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip(
        "TRITON_INTERPRET=1 replaces @triton.jit by the interpreter: nothing to compile", allow_module_level=True
    )
triton = pytest.importorskip("triton", reason="triton is not installed")

from bench.kernels import (  # noqa: E402
    SHARED_LIMIT,
    analyze_cubin,
    compile_kernel,
    config_id,
    find_cuobjdump,
    gemm_configs,
    gemm_signature,
)
from moe_kernels.kernels import dispatch_combine, gating, routing  # noqa: E402
from moe_kernels.kernels import grouped_mm as gm  # noqa: E402

MMA = {80: "mma.sync", 90: "wgmma"}
CCS = [80, 90]
DTYPES = ["fp16", "bf16"]


def _compile(fn, cc: int, sig: dict, constexprs: dict, divisible: list[str], num_warps: int, num_stages: int = 3):
    try:
        return compile_kernel(fn, cc, sig, constexprs, divisible, num_warps, num_stages)
    except Exception as exc:  # a wheel without its ptxas cannot check anything
        if "ptxas" in str(exc) and ("not found" in str(exc) or "No such file" in str(exc)):
            pytest.skip(f"triton's ptxas is unavailable: {exc}")
        raise


def _check_no_spills(kernel, what: str, tmp_dir: str | None = None):
    """No register spills (local-memory loads/stores) in the SASS, when a cuobjdump is at hand."""
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        return  # the shared-memory and instruction checks above still ran
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        r = analyze_cubin(path, cuobjdump)
    assert r["n_spills"] == 0 and r["ldl"] == 0 and r["stl"] == 0, f"{what} spills: {r}"


def _check_shared(kernel, cc: int):
    assert kernel.metadata.shared <= SHARED_LIMIT[cc], (
        f"{kernel.metadata.shared} B shared > {SHARED_LIMIT[cc]} B on sm_{cc}"
    )


# ---------------------------------------------------------------------------------------------
# Gating, routing and gathers: the configurations the launchers use.


def _small_kernels(dt: str):
    """(id, fn, signature, constexprs, 16-divisible args, num_warps)."""
    i32 = "i32"
    return [
        # E=256, K=8: the largest gate (BLOCK_T = 4096 // 256); E=8, K=2: the common one.
        ("topk_softmax-E256-K8", gating._topk_softmax_kernel,
         dict(L_ptr=f"*{dt}", W_ptr="*fp32", I_ptr="*i64", T=i32, E=i32, stride_lt=i32),
         dict(stride_le=1, K=8, RENORMALIZE=True, BLOCK_T=16, BLOCK_E=256, BLOCK_K=8),
         ["L_ptr", "W_ptr", "I_ptr", "E", "stride_lt"], 4),
        ("topk_softmax-E8-K2", gating._topk_softmax_kernel,
         dict(L_ptr=f"*{dt}", W_ptr="*fp32", I_ptr="*i64", T=i32, E=i32, stride_lt=i32),
         dict(stride_le=1, K=2, RENORMALIZE=False, BLOCK_T=512, BLOCK_E=8, BLOCK_K=2),
         ["L_ptr", "W_ptr", "I_ptr"], 4),
        ("topk_softmax_backward-E256-K8", gating._topk_softmax_backward_kernel,
         dict(G_ptr="*fp32", L_ptr=f"*{dt}", I_ptr="*i64", DL_ptr=f"*{dt}", T=i32, E=i32, stride_lt=i32, stride_dt=i32),
         dict(stride_le=1, stride_de=1, K=8, RENORMALIZE=True, BLOCK_T=16, BLOCK_E=256),
         ["G_ptr", "L_ptr", "I_ptr", "DL_ptr", "E", "stride_lt", "stride_dt"], 4),
        ("routing_histogram", routing._routing_histogram_kernel,
         dict(I_ptr="*i64", O_ptr="*i64", H_ptr="*i32", S=i32, K=i32, E=i32, NCHUNK=i32),
         dict(HAS_ORDER=True, BLOCK=128, BLOCK_E=64),
         ["I_ptr", "O_ptr", "H_ptr"], 4),
        ("routing_positions-capacity", routing._routing_positions_kernel,
         dict(I_ptr="*i64", O_ptr="*i64", B_ptr="*i64", Off_ptr="*i64", Slot_ptr="*i64", Rows_ptr="*i64",
              Src_ptr="*i64", S=i32, K=i32, E=i32, NCHUNK=i32, C=i32),
         dict(HAS_ORDER=True, DROPLESS=False, BLOCK=128),
         ["I_ptr", "O_ptr", "B_ptr", "Off_ptr", "Slot_ptr", "Rows_ptr", "Src_ptr"], 8),
        ("routing_positions-dropless", routing._routing_positions_kernel,
         dict(I_ptr="*i64", O_ptr="*i64", B_ptr="*i64", Off_ptr="*i64", Slot_ptr="*i64", Rows_ptr="*i64",
              Src_ptr="*i64", S=i32, K=i32, E=i32, NCHUNK=i32, C=i32),
         dict(HAS_ORDER=False, DROPLESS=True, BLOCK=128),
         ["I_ptr", "O_ptr", "B_ptr", "Off_ptr", "Slot_ptr", "Rows_ptr", "Src_ptr"], 8),
        ("dispatch", dispatch_combine._dispatch_kernel,
         dict(X_ptr=f"*{dt}", Src_ptr="*i64", Wt_ptr="*fp32", Out_ptr=f"*{dt}", R=i32, D=i32, K=i32,
              stride_xt=i32, stride_or=i32),
         dict(stride_xd=1, stride_od=1, HAS_WEIGHTS=True, BLOCK_R=32, BLOCK_D=128),
         ["X_ptr", "Src_ptr", "Wt_ptr", "Out_ptr", "D", "stride_xt", "stride_or"], 4),
        ("combine", dispatch_combine._combine_kernel,
         dict(Y_ptr=f"*{dt}", Rows_ptr="*i64", Wt_ptr="*fp32", Out_ptr=f"*{dt}", T=i32, D=i32, K=i32,
              stride_yr=i32, stride_ot=i32),
         dict(stride_yd=1, stride_od=1, HAS_WEIGHTS=True, BLOCK_T=32, BLOCK_D=128),
         ["Y_ptr", "Rows_ptr", "Wt_ptr", "Out_ptr", "D", "stride_yr", "stride_ot"], 4),
        ("combine_weights_grad", dispatch_combine._combine_weights_grad_kernel,
         dict(A_ptr=f"*{dt}", B_ptr=f"*{dt}", Rows_ptr="*i64", G_ptr="*fp32", T=i32, D=i32, K=i32,
              stride_at=i32, stride_br=i32),
         dict(stride_ad=1, stride_bd=1, BLOCK_T=32, BLOCK_D=128),
         ["A_ptr", "B_ptr", "Rows_ptr", "G_ptr", "D", "stride_at", "stride_br"], 4),
    ]  # fmt: skip


SMALL_IDS = [case[0] for case in _small_kernels("fp16")]


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("cc", CCS, ids=[f"sm{c}" for c in CCS])
@pytest.mark.parametrize("name", SMALL_IDS)
def test_small_kernel_compiles(name, cc, dt):
    _, fn, sig, const, div, warps = next(c for c in _small_kernels(dt) if c[0] == name)
    kernel = _compile(fn, cc, sig, const, div, warps)
    _check_shared(kernel, cc)
    assert kernel.metadata.num_warps == warps


# ---------------------------------------------------------------------------------------------
# Grouped GEMM: every autotune config that survives the launcher's shared-memory pruning for
# the target must compile, fit, and use the target's tensor-core instruction.


def _gemm_case(dt: str, wgrad: bool, transposed_w: bool = False):
    return gemm_signature("weight_grad" if wgrad else "dx" if transposed_w else "forward", dt)


def _configs(wgrad: bool, cc: int, elem_size: int):
    return gemm_configs("weight_grad" if wgrad else "forward", cc, elem_size)


_cfg_id = config_id


GEMM_CASES = [
    pytest.param(kind, cc, dt, i, id=f"{kind}-sm{cc}-{dt}-{_cfg_id(c)}")
    for kind in ("forward", "dx", "weight_grad")
    for cc in CCS
    for dt in DTYPES
    for i, c in enumerate(_configs(kind == "weight_grad", cc, 2))
    # Every config in fp16; bf16 lowers the same way, so its largest and smallest tiles (and
    # the transposed dX view, one config) keep the cold-cache run near a minute on 2 cores.
    if (dt == "fp16" or i in (0, len(_configs(kind == "weight_grad", cc, 2)) - 1)) and (kind != "dx" or i == 0)
]


@pytest.mark.parametrize("kind,cc,dt,index", GEMM_CASES)
def test_grouped_mm_compiles_with_tensor_cores(kind, cc, dt, index):
    wgrad = kind == "weight_grad"
    cfg = _configs(wgrad, cc, 2)[index]
    fn, sig, const, div = _gemm_case(dt, wgrad, transposed_w=kind == "dx")
    const.update(INPUT_PRECISION="tf32", DOT_FP32=False, **cfg.kwargs)
    kernel = _compile(fn, cc, sig, const, div, cfg.num_warps, cfg.num_stages)
    _check_shared(kernel, cc)
    ptx = kernel.asm["ptx"]
    assert MMA[cc] in ptx, f"no {MMA[cc]} in the PTX of {kind} on sm_{cc} with {_cfg_id(cfg)}"
    assert "cp.async" in ptx, "operand loads are not software-pipelined"
    _check_no_spills(kernel, f"{kind} on sm_{cc} with {_cfg_id(cfg)} ({dt})")


@pytest.mark.parametrize("cc", CCS, ids=[f"sm{c}" for c in CCS])
def test_grouped_mm_fp32_fits(cc):
    """fp32 needs twice the shared memory: the pruning must leave configs that fit."""
    for wgrad in (False, True):
        cfg = _configs(wgrad, cc, 4)[0]
        fn, sig, const, div = _gemm_case("fp32", wgrad)
        const.update(INPUT_PRECISION="ieee", DOT_FP32=False, **cfg.kwargs)
        _check_shared(_compile(fn, cc, sig, const, div, cfg.num_warps, cfg.num_stages), cc)


def test_interpreter_uses_one_config(monkeypatch):
    # Autotuning over several configs fails under TRITON_INTERPRET=1; _config switches to one.
    from moe_kernels.kernels._config import autotune_configs

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert len(autotune_configs(gm.GROUPED_MM_CONFIGS, gm.GROUPED_MM_CONFIGS[-1])) == 1
    assert len(gm.GROUPED_MM_CONFIGS) > 1


# ---------------------------------------------------------------------------------------------
# The weight gradient split over rows (the router's path: fp32 in, IEEE products) and the sum
# of its partial results: every config the launcher can pick, fp16 with tensor cores, fp32
# (the router's dtype, split and not) within shared memory and without spills.


def _split_case(dt: str):
    return gemm_signature("weight_grad_split", dt)


def _wgrad_configs(cc: int, dt: str) -> list:
    """What the launcher can pick: fp32 (IEEE products) has its own candidates."""
    if dt == "fp32":
        return gm.prune_configs(gm.wgrad_configs(True), 4, SHARED_LIMIT[cc], wgrad=True)
    return gemm_configs("weight_grad", cc, 2)


SPLIT_CASES = [
    pytest.param(split, cc, dt, i, id=f"{'split' if split else 'plain'}-sm{cc}-{dt}-{_cfg_id(c)}")
    for split in (True, False)
    for cc in CCS
    for dt in (("fp16", "fp32") if split else ("fp32",))  # the plain kernel's fp16/bf16: above
    for i, c in enumerate(_wgrad_configs(cc, dt))
]


@pytest.mark.parametrize("split,cc,dt,index", SPLIT_CASES)
def test_grouped_mm_weight_grad_split_compiles(split, cc, dt, index):
    cfg = _wgrad_configs(cc, dt)[index]
    fn, sig, const, div = _split_case(dt) if split else gemm_signature("weight_grad", dt)
    const.update(INPUT_PRECISION="tf32" if dt == "fp16" else "ieee", DOT_FP32=False, **cfg.kwargs)
    kernel = _compile(fn, cc, sig, const, div, cfg.num_warps, cfg.num_stages)
    _check_shared(kernel, cc)
    if dt == "fp16":
        assert MMA[cc] in kernel.asm["ptx"], f"no {MMA[cc]} in the split weight gradient on sm_{cc}"
    _check_no_spills(kernel, f"weight gradient (split={split}) on sm_{cc} with {_cfg_id(cfg)} ({dt})")


@pytest.mark.parametrize("dt", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("cc", CCS, ids=[f"sm{c}" for c in CCS])
def test_split_sum_compiles(cc, dt):
    sig = dict(WS_ptr="*fp32", Out_ptr=f"*{dt}", NUMEL="i32", SPLIT="i32")
    kernel = _compile(gm._split_sum_kernel, cc, sig, dict(BLOCK=1024), ["WS_ptr", "Out_ptr", "NUMEL"], 4)
    _check_shared(kernel, cc)
    _check_no_spills(kernel, f"split sum on sm_{cc} ({dt})")


IEEE_CASES = [
    pytest.param(kind, cc, i, id=f"{kind}-sm{cc}-fp32-{_cfg_id(c)}")
    for kind in ("forward", "dx")
    for cc in CCS
    for i, c in enumerate(gm.prune_configs(gm.fwd_configs(True), 4, SHARED_LIMIT[cc]))
]


@pytest.mark.parametrize("kind,cc,index", IEEE_CASES)
def test_grouped_mm_fp32_ieee_does_not_spill(kind, cc, index):
    """The router's logits (fp32, IEEE products: FMAs, not tensor cores) and their dX."""
    cfg = gm.prune_configs(gm.fwd_configs(True), 4, SHARED_LIMIT[cc])[index]
    fn, sig, const, div = gemm_signature(kind, "fp32")
    const.update(INPUT_PRECISION="ieee", DOT_FP32=False, **cfg.kwargs)
    kernel = _compile(fn, cc, sig, const, div, cfg.num_warps, cfg.num_stages)
    _check_shared(kernel, cc)
    _check_no_spills(kernel, f"{kind} fp32/IEEE on sm_{cc} with {_cfg_id(cfg)}")


def test_bench_kernels_cli_reports_every_kernel(tmp_path):
    """``python -m bench.kernels --arch sm_90 --json PATH`` (one config per kernel and dtype here):
    a record per compiled kernel with the fields DESIGN.md section 8 names."""
    from bench import kernels

    path = tmp_path / "k.json"
    assert kernels.main(["--arch", "sm_90", "--limit", "1", "--json", str(path)]) == 0
    import json

    records = json.loads(path.read_text())
    names = {(r["kernel"], r["dtype"]) for r in records}
    for kind in kernels.KINDS:
        for dt in ("fp16", "bf16", "fp32"):
            assert (f"grouped_mm_{kind}", dt) in names
    assert ("grouped_mm_split_sum", "fp32") in names
    assert ("grouped_mm_chunk_sum", "fp32") in names and ("grouped_mm_chunk_table", "i64") in names
    for r in records:
        assert {"kernel", "config", "arch", "n_regs", "n_spills", "shared_bytes", "wgmma", "mma", "tma"} <= set(r) or (
            kernels.find_cuobjdump() is None
        )
        assert r["arch"] == "sm_90"
        if kernels.find_cuobjdump() is not None:
            assert r["n_spills"] == 0, r
            helpers = ("grouped_mm_split_sum", "grouped_mm_chunk_sum", "grouped_mm_chunk_table")  # no GEMM
            if r["dtype"] != "fp32" and r["kernel"] not in helpers:
                assert r["wgmma"] > 0, r


@pytest.mark.skipif(find_cuobjdump() is None, reason="no cuobjdump (toolkit or Triton wheel) to read the SASS with")
@pytest.mark.parametrize("cc", CCS, ids=[f"sm{c}" for c in CCS])
def test_every_autotune_config_of_every_gemm_compiles_clean(cc):
    """Every (kernel, dtype, config) the launchers can pick, as ``python -m bench.kernels`` lists
    them (fused epilogues, split and chunked weight gradients and, for sm_90, the persistent TMA
    kernels included): no register spills, at most 255 registers, within the arch's shared
    memory, tensor-core instructions in every GEMM (wgmma on sm_90, mma on sm_80; IEEE fp32
    runs FMAs) and TMA loads in every TMA kernel. With a cold Triton cache, one process took 11
    minutes for sm_90 and 6 for sm_80; two processes (2 cores) about half; a warm cache seconds."""
    from bench.kernels import TMA_KINDS, aot_records

    records = aot_records(cc, jobs=min(2, os.cpu_count() or 1))
    assert len(records) >= (300 if cc == 90 else 200), len(records)  # 314 and 212 on 2026-11-30
    helpers = ("grouped_mm_split_sum", "grouped_mm_chunk_sum", "grouped_mm_chunk_table")  # no GEMM
    tma_names = {f"grouped_mm_{k}" for k in TMA_KINDS}
    assert any(r["kernel"] in tma_names for r in records) == (cc == 90)
    for r in records:
        what = f"{r['kernel']} {r['dtype']} {r['config']} on sm_{cc}"
        assert r["n_spills"] == 0, f"{what}: {r['n_spills']} spill words"
        assert r["n_regs"] <= 255, f"{what}: {r['n_regs']} registers"
        assert r["shared_bytes"] <= SHARED_LIMIT[cc], f"{what}: {r['shared_bytes']} B shared"
        if r["kernel"] in helpers:
            continue
        if r["dtype"] != "fp32" or r["kernel"] in tma_names:  # fp32 IEEE products lower to FMAs
            assert r["wgmma" if cc == 90 else "mma"] > 0, f"{what}: no tensor-core instructions"
        if r["kernel"] in tma_names:
            assert r["tma"] > 0, f"{what}: no TMA loads (UTMALDG)"

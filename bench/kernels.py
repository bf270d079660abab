"""What the compiler made of the Triton kernels: registers, spills, shared memory, tensor-core
and TMA instructions, read from the cubins (``cuobjdump``), no GPU needed.

``python -m bench.kernels --arch sm_90|sm_80 [--json PATH]`` compiles every grouped-GEMM
config the launcher can pick on that architecture (forward, dX, weight gradient, the weight
gradient split over rows and its partial-sum kernel, the weight gradient over row chunks and its
chunk-table and chunk-sum kernels, and the fused variants of ``FUSED``: GELU
in fc1's epilogue, GELU' in fc2's dX epilogue, GELU on the weight gradient's operand load, bias
gradients; the persistent TMA forward and dX of ``kernels/grouped_mm_tma.py`` (plain and with the GELU
epilogues), sm_90 only;
fp16/bf16 on tensor cores, fp32 with IEEE products as the router runs, and with TF32 products for
the TMA kernels, which the launcher never gives IEEE fp32) ahead of time
and reports one record per kernel and config: ``kernel, config, arch, n_regs, n_spills,
shared_bytes, wgmma, mma, tma`` (and the raw counts behind them). ``make gpu-check`` runs the
same analysis over the kernels a real run compiled (``scan_cache``).

Counts come from the SASS: ``HGMMA`` (wgmma), ``HMMA`` (mma.sync), ``UTMALDG``/``UTMASTG``
(TMA), ``LDL``/``STL`` (local memory: spills), ``LDGSTS`` (cp.async). ``n_spills`` is the
per-thread local memory (stack frame included) in 4-byte words, as Triton's ``n_spills``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

SASS_OPS = ("HGMMA", "HMMA", "UTMALDG", "UTMASTG", "LDL", "STL", "LDGSTS")
_DOT = re.compile(r"tt\.dot\b.*?:\s*tensor<(\d+)x(\d+)x(\w+)>\s*\*\s*tensor<(\d+)x(\d+)x\w+>")


def find_cuobjdump() -> str | None:
    """The toolkit's cuobjdump, else the one Triton's wheel carries."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else None


def analyze_cubin(path: str, cuobjdump: str) -> dict:
    """Resource usage and SASS instruction counts of the one kernel in cubin ``path``."""
    res = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True, timeout=60)
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", res.stdout))
    sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, timeout=120).stdout
    counts = {op: len(re.findall(rf"\b{op}(?:\.[A-Z0-9_.]+)?\b", sass)) for op in SASS_OPS}
    regs, stack, local = (int(usage.get(k, 0)) for k in ("REG", "STACK", "LOCAL"))
    return {
        "n_regs": regs,
        "n_spills": (stack + local) // 4,
        "stack_bytes": stack,
        "local_bytes": local,
        "wgmma": counts["HGMMA"],
        "mma": counts["HMMA"],
        "tma": counts["UTMALDG"] + counts["UTMASTG"],
        "ldl": counts["LDL"],
        "stl": counts["STL"],
        "cp_async": counts["LDGSTS"],
    }


def dot_tile(ttir: str) -> str | None:
    """``"AxBxC"`` of the first ``tt.dot`` (``[A, B] @ [B, C]``), from the kernel's TTIR."""
    m = _DOT.search(ttir)
    return None if m is None else f"{m.group(1)}x{m.group(5)}x{m.group(2)} {m.group(3)}"


def scan_cache(cache_dir: str, cuobjdump: str | None = None):
    """Yields one record per kernel compiled into the Triton cache ``cache_dir``, the grouped
    GEMMs first."""
    cuobjdump = cuobjdump or find_cuobjdump()
    paths = sorted(glob.glob(os.path.join(cache_dir, "*", "*.json")), key=lambda p: ("grouped_mm" not in p, p))
    for meta_path in paths:
        if os.path.basename(meta_path).startswith("__grp__"):
            continue
        stem = meta_path[: -len(".json")]
        if not os.path.exists(stem + ".cubin"):
            continue
        with open(meta_path) as f:
            meta = json.load(f)
        ttir = open(stem + ".ttir").read() if os.path.exists(stem + ".ttir") else ""
        rec = {
            "kernel": meta.get("name", os.path.basename(stem)),
            "config": f"w{meta.get('num_warps')}-s{meta.get('num_stages')}",
            "dot": dot_tile(ttir),
            "arch": str(meta.get("arch") or meta.get("target", {}).get("arch")),
            "shared_bytes": meta.get("shared"),
        }
        if cuobjdump:
            rec.update(analyze_cubin(stem + ".cubin", cuobjdump))
        yield rec


# ---------------------------------------------------------------- ahead-of-time compilation
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


# The fused variants (docs/triton.md, "Fused epilogues"): kind -> the constexprs that make it.
# gelu: erf GELU, gelu_tanh: its tanh form; fc1's forward keeps the pre-activation for the
# backward (forward_gelu; forward_gelu_eval writes only the activation, without autograd); fc2's
# dX multiplies by GELU' (dx_gelu); the weight gradients sum the bias gradient (programs of
# their own in the same launch, which alone run when only the bias needs a gradient), fc2's
# applying GELU to h as it loads it.
FUSED = {
    "forward_gelu": ("forward", dict(EPILOGUE=2, ACT=1)),
    "forward_gelu_tanh": ("forward", dict(EPILOGUE=2, ACT=2)),
    "forward_gelu_eval": ("forward", dict(EPILOGUE=1, ACT=1)),
    "dx_gelu": ("dx", dict(EPILOGUE=3, ACT=1)),
    "dx_gelu_tanh": ("dx", dict(EPILOGUE=3, ACT=2)),
    "weight_grad_bias": ("weight_grad", dict(ACT=0, HAS_DB=True)),
    "weight_grad_gelu": ("weight_grad", dict(ACT=1, HAS_DB=True)),
    "weight_grad_gelu_tanh": ("weight_grad", dict(ACT=2, HAS_DB=True)),
    "weight_grad_split_gelu": ("weight_grad_split", dict(ACT=1, HAS_DB=True)),
    "weight_grad_chunked_gelu": ("weight_grad_chunked", dict(ACT=1, HAS_DB=True)),
}


def gemm_signature(kind: str, dt: str) -> tuple:
    """``(kernel, signature, constexprs, 16-divisible args)`` of a grouped-GEMM launch as the
    launcher makes it: ``kind`` is ``forward``, ``dx`` (the transposed expert matrix, so the
    reduction stride is the strided one), ``weight_grad`` or ``weight_grad_split`` (the
    weight gradient split over rows into an fp32 workspace), or a fused variant of ``FUSED``;
    pointers and leading strides 16-divisible, inner strides 1 (Triton specialises on both)."""
    from moe_kernels.kernels import grouped_mm as gm

    i32 = "i32"
    if kind in TMA_KINDS:  # the persistent TMA kernel: dX reads w's storage [E, KD, N] (W_T)
        from moe_kernels.kernels import grouped_mm_tma as gmt

        sig = dict(X_ptr=f"*{dt}", W_ptr=f"*{dt}", Y_ptr=f"*{dt}", Off_ptr="*i64", B_ptr=f"*{dt}", AUX_ptr=f"*{dt}",
                   M=i32, N=i32, KD=i32, E=i32, M_BUCKET=i32, stride_xm=i32, stride_we=i32, stride_w1=i32,
                   stride_ym=i32, stride_be=i32, stride_am=i32)  # fmt: skip
        div = ["X_ptr", "W_ptr", "Y_ptr", "Off_ptr", "B_ptr", "AUX_ptr", "N", "KD", "M_BUCKET", "stride_xm",
               "stride_we", "stride_w1", "stride_ym", "stride_be", "stride_am"]  # fmt: skip
        epilogue = TMA_KINDS[kind]
        has_bias = epilogue["EPILOGUE"] != 3  # fc2's dX has no bias
        const = dict(stride_yn=1, stride_bn=1, stride_an=1, W_T=kind.startswith("dx"), HAS_BIAS=has_bias, **epilogue)
        return gmt._grouped_mm_tma_kernel, sig, const, div
    if kind in FUSED:
        base, extra = FUSED[kind]
        fn, sig, const, div = gemm_signature(base, dt)
        const.update(extra)
        return fn, sig, const, div
    wgrad_plain = dict(ACT=0, HAS_DB=False)
    if kind == "weight_grad_split":  # fp32 partial sums into a workspace [SPLIT, E, N, KD]
        sig = dict(X_ptr=f"*{dt}", G_ptr=f"*{dt}", WS_ptr="*fp32", DBWS_ptr="*fp32", Off_ptr="*i64", M=i32, N=i32,
                   KD=i32, M_BUCKET=i32, SPLIT=i32, stride_xm=i32, stride_gm=i32, stride_ws=i32, stride_we=i32,
                   stride_wn=i32, stride_dbs=i32, stride_dbe=i32)  # fmt: skip
        div = ["X_ptr", "G_ptr", "WS_ptr", "DBWS_ptr", "Off_ptr", "N", "KD", "M_BUCKET", "stride_xm", "stride_gm",
               "stride_ws", "stride_we", "stride_wn", "stride_dbs", "stride_dbe"]  # fmt: skip
        return gm._grouped_mm_weight_grad_split_kernel, sig, dict(stride_xk=1, stride_gn=1, **wgrad_plain), div
    if kind == "weight_grad_chunked":  # over row chunks (kernels/grouped_mm_chunked.py), fp32 partials
        from moe_kernels.kernels import grouped_mm_chunked as gmc

        sig = dict(X_ptr=f"*{dt}", G_ptr=f"*{dt}", DW_ptr=f"*{dt}", DB_ptr=f"*{dt}", WS_ptr="*fp32", DBWS_ptr="*fp32",
                   Sched_ptr="*i64", M=i32, N=i32, KD=i32, E=i32, M_BUCKET=i32, stride_xm=i32,
                   stride_gm=i32)  # fmt: skip
        div = ["X_ptr", "G_ptr", "DW_ptr", "DB_ptr", "WS_ptr", "DBWS_ptr", "Sched_ptr", "N", "KD", "M_BUCKET",
               "stride_xm", "stride_gm"]  # fmt: skip
        return gmc._grouped_mm_weight_grad_chunked_kernel, sig, dict(stride_xk=1, stride_gn=1, **wgrad_plain), div
    if kind == "weight_grad":
        sig = dict(X_ptr=f"*{dt}", G_ptr=f"*{dt}", DW_ptr=f"*{dt}", DB_ptr=f"*{dt}", Off_ptr="*i64", M=i32, N=i32,
                   KD=i32, M_BUCKET=i32, stride_xm=i32, stride_gm=i32, stride_we=i32, stride_wn=i32,
                   stride_be=i32)  # fmt: skip
        const = dict(stride_xk=1, stride_gn=1, stride_wk=1, stride_bn=1, **wgrad_plain)
        div = ["X_ptr", "G_ptr", "DW_ptr", "DB_ptr", "Off_ptr", "N", "KD", "M_BUCKET", "stride_xm", "stride_gm",
               "stride_we", "stride_wn", "stride_be"]  # fmt: skip
        return gm._grouped_mm_weight_grad_kernel, sig, const, div
    sig = dict(X_ptr=f"*{dt}", W_ptr=f"*{dt}", Y_ptr=f"*{dt}", Off_ptr="*i64", B_ptr=f"*{dt}", AUX_ptr=f"*{dt}",
               M=i32, N=i32, KD=i32, E=i32, M_BUCKET=i32, stride_xm=i32, stride_we=i32, stride_ym=i32,
               stride_be=i32, stride_am=i32)  # fmt: skip
    const = dict(stride_xk=1, stride_yn=1, stride_bn=1, stride_an=1, HAS_BIAS=True, EPILOGUE=0, ACT=0)
    div = ["X_ptr", "W_ptr", "Y_ptr", "Off_ptr", "B_ptr", "AUX_ptr", "N", "KD", "M_BUCKET", "stride_xm", "stride_we",
           "stride_ym", "stride_be", "stride_am"]  # fmt: skip
    strided = "stride_wk" if kind == "dx" else "stride_wn"
    sig[strided] = i32
    const["stride_wn" if kind == "dx" else "stride_wk"] = 1
    div.append(strided)
    return gm._grouped_mm_kernel, sig, const, div


def compile_kernel(fn, cc: int, sig: dict, constexprs: dict, divisible: list[str], num_warps: int, num_stages: int):
    """``triton.compile`` for ``sm_<cc>`` without a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = dict(sig)
    signature.update({name: "constexpr" for name in constexprs})
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(
        src, target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )


def gemm_configs(kind: str, cc: int, elem_size: int = 2, ieee_fp32: bool = False) -> list:
    """The grouped-GEMM configs the launcher can pick on ``sm_<cc>`` for ``kind`` (a base kind or
    one of ``FUSED``; shared-memory pruned); ``ieee_fp32``: the candidates for fp32 with IEEE
    products (the router's dtype)."""
    from moe_kernels.kernels import grouped_mm as gm

    if kind in TMA_KINDS:
        from moe_kernels.kernels import grouped_mm_tma as gmt

        return gm.prune_configs(gmt.GROUPED_MM_TMA_CONFIGS, elem_size, SHARED_LIMIT[cc])
    base, extra = FUSED.get(kind, (kind, {}))
    wgrad = base.startswith("weight_grad")
    configs = gm.wgrad_configs(ieee_fp32, extra.get("ACT", 0) != 0) if wgrad else gm.fwd_configs(ieee_fp32)
    return gm.prune_configs(configs, elem_size, SHARED_LIMIT[cc], wgrad=wgrad)


def config_id(cfg) -> str:
    k = cfg.kwargs
    return f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']}-w{cfg.num_warps}-s{cfg.num_stages}"


# The persistent TMA forward and dX (kernels/grouped_mm_tma.py), compiled for sm_90 only: the
# launcher runs them on compute capability 9.0+ alone.
# kind -> its epilogue: plain, fc1's GELU keeping the pre-activation, fc2's dX times GELU'.
TMA_KINDS = {
    "forward_tma": dict(EPILOGUE=0, ACT=0),
    "dx_tma": dict(EPILOGUE=0, ACT=0),
    "forward_gelu_tma": dict(EPILOGUE=2, ACT=1),
    "forward_gelu_tanh_tma": dict(EPILOGUE=2, ACT=2),
    "dx_gelu_tma": dict(EPILOGUE=3, ACT=1),
    "dx_gelu_tanh_tma": dict(EPILOGUE=3, ACT=2),
}
KINDS = ("forward", "dx", "weight_grad", "weight_grad_split", "weight_grad_chunked", *FUSED, *TMA_KINDS)


def _gemm_record(task: tuple) -> dict:
    """One (cc, kind, dt, ieee, config index) compiled and analysed: its record (a worker's task)."""
    cc, kind, dt, ieee, index = task
    cfg = gemm_configs(kind, cc, 4 if dt == "fp32" else 2, ieee_fp32=ieee)[index]
    fn, sig, const, div = gemm_signature(kind, dt)
    const.update(INPUT_PRECISION="ieee" if ieee else "tf32", DOT_FP32=False, **cfg.kwargs)
    k = compile_kernel(fn, cc, sig, const, div, cfg.num_warps, cfg.num_stages)
    return _record(k, cc, f"grouped_mm_{kind}", dt, config_id(cfg))


def _record(kernel, cc: int, name: str, dt: str, config: str) -> dict:
    rec = {"kernel": name, "dtype": dt, "config": config, "arch": f"sm_{cc}", "shared_bytes": kernel.metadata.shared}
    cuobjdump = find_cuobjdump()
    if cuobjdump:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.cubin")
            with open(path, "wb") as f:
                f.write(kernel.asm["cubin"])
            rec.update(analyze_cubin(path, cuobjdump))
    return rec


def aot_records(
    cc: int, dtypes=("fp16", "bf16", "fp32"), kinds=KINDS, limit: int | None = None, jobs: int = 1
) -> list[dict]:
    """Compile every (kind, dtype, config) the launcher can pick for ``sm_<cc>``, plus the split
    weight gradient's partial-sum kernel, and analyse the cubins. fp32 uses the IEEE-product
    candidates (what the router runs); fp16/bf16 the tensor-core ones. ``jobs`` > 1 compiles the
    GEMMs in that many spawned processes (a compile is single-threaded: 2 cores, half the time);
    the records come in the same order either way."""
    tasks = []
    for kind in kinds:
        if kind in TMA_KINDS and cc < 90:
            continue
        for dt in dtypes:
            ieee = dt == "fp32" and kind not in TMA_KINDS
            n = len(gemm_configs(kind, cc, 4 if dt == "fp32" else 2, ieee_fp32=ieee)[:limit])
            tasks += [(cc, kind, dt, ieee, i) for i in range(n)]
    if jobs > 1 and len(tasks) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            records = list(pool.map(_gemm_record, tasks, chunksize=4))
    else:
        records = [_gemm_record(t) for t in tasks]
    from moe_kernels.kernels import grouped_mm as gm

    if "weight_grad_split" in kinds:
        for dt in dtypes:
            sig = dict(WS_ptr="*fp32", Out_ptr=f"*{dt}", NUMEL="i32", SPLIT="i32")
            divisible = ["WS_ptr", "Out_ptr", "NUMEL"]
            k = compile_kernel(gm._split_sum_kernel, cc, sig, dict(BLOCK=1024), divisible, 4, 3)
            records.append(_record(k, cc, "grouped_mm_split_sum", dt, "1024-w4"))
    if "weight_grad_chunked" in kinds:
        from moe_kernels.kernels import grouped_mm_chunked as gmc

        for dt in dtypes:
            sig = dict(WS_ptr="*fp32", Out_ptr=f"*{dt}", Exp_ptr="*i64", NUMEL="i32")
            divisible = ["WS_ptr", "Out_ptr", "Exp_ptr", "NUMEL"]
            k = compile_kernel(gmc._chunk_sum_kernel, cc, sig, dict(BLOCK=1024), divisible, 4, 3)
            records.append(_record(k, cc, "grouped_mm_chunk_sum", dt, "1024-w4"))
        sig = dict(Off_ptr="*i64", Sched_ptr="*i64", Exp_ptr="*i64", M="i32", E="i32", CH="i32")
        k = compile_kernel(gmc._chunk_table_kernel, cc, sig, {}, ["Off_ptr", "Sched_ptr", "Exp_ptr"], 4, 3)
        records.append(_record(k, cc, "grouped_mm_chunk_table", "i64", "w4"))
    return records


def table(records: list[dict]) -> str:
    cols = ["kernel", "dtype", "config", "dot", "arch", "n_regs", "n_spills", "shared_bytes", "wgmma", "mma", "tma",
            "ldl", "stl"]  # fmt: skip
    cols = [c for c in cols if any(c in r for r in records)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--arch", choices=["sm_80", "sm_90"], default="sm_90", help="target architecture")
    p.add_argument("--json", metavar="PATH", help="write the records here as JSON")
    p.add_argument("--limit", type=int, default=None, help="at most this many configs per kernel and dtype")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compiling processes")
    args = p.parse_args(argv)
    if find_cuobjdump() is None:
        print("bench.kernels: no cuobjdump (CUDA toolkit or Triton's wheel): registers and SASS counts are missing",
              file=sys.stderr)  # fmt: skip
    records = aot_records(int(args.arch[3:]), limit=args.limit, jobs=args.jobs)
    print(table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

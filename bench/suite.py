"""Runs the cases and returns one record per (case, impl, mode, dtype) measurement."""

from __future__ import annotations

import torch

import moe_kernels as mk
from bench import baselines as bl
from bench.cases import LayerCase
from bench.measure import MODES, Step, time_fn, train_step_modes

DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _record(case: str, impl: str, mode: str, dtype: str, timing, peak, **extra) -> dict:
    return dict(
        case=case,
        impl=impl,
        mode=mode,
        dtype=dtype,
        median_ms=round(timing.median_ms, 4),
        iqr_ms=round(timing.iqr_ms, 4),
        peak_mem_mb=None if peak is None else round(peak, 2),
        runs=timing.runs,
        **extra,
    )


def run_layer_case(
    case: LayerCase,
    dtype_name: str,
    device: torch.device,
    *,
    impls=bl.IMPLS,
    modes=MODES,
    min_run_time: float = 0.5,
    min_runs: int = 5,
    max_warmup: int = 4,
    log=print,
) -> list[dict]:
    """Every impl of ``case``: outputs checked against the layer's, then timed interleaved."""
    dtype = DTYPE_NAMES[dtype_name]
    p = bl.Params.make(case, dtype, device)
    x = torch.randn(case.tokens, case.width, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    ours, mods = bl.moe_kernels_impl(case, p)
    with torch.no_grad():
        y_ours = ours(x).float()
    backend = mk.backends.choose("grouped_mm", mk.backends.requested_backend(None), x.device)[0]
    tol = 1e-3 if dtype == torch.float32 else 6e-2
    names, steps, extras = [], [], []
    for impl in impls:
        extra = {}
        if impl == "moe_kernels":
            fn, inp, params = ours, x.clone().requires_grad_(True), list(mods.parameters())
            extra["backend"] = backend
        elif impl == "floor":
            leaves = p.leaves()
            fn, buf = bl.floor_impl(case, leaves, x)
            inp, params = buf.requires_grad_(True), bl.params_of(fn, leaves)
        else:
            if impl == "grouped_mm":
                why = bl.grouped_mm_unsupported(dtype, device)
                if why:
                    log(f"  skip {case.name}/{impl}/{dtype_name}: {why}")
                    continue
            leaves = p.leaves()
            fn, inp = bl.BUILDERS[impl](case, leaves), x.clone().requires_grad_(True)
            params = bl.params_of(fn, leaves)
            with torch.no_grad():
                row_diff = (fn(x).float() - y_ours).abs().amax(-1)  # [T]
            scale = max(y_ours.abs().max().item(), 1.0)
            bad = int((row_diff > tol * scale).sum())
            extra["max_abs_diff"] = row_diff.max().item()
            extra["rows_differing"] = bad
            # fp32: every token agrees. Low precision: the router's logits round differently in
            # each implementation's matmul, so a near-tie can send a token (and, through the
            # capacity order, a few behind it) elsewhere; at most 3% of the tokens may differ.
            allowed = 0 if dtype == torch.float32 else case.tokens * 3 // 100
            if bad > allowed:
                raise AssertionError(
                    f"{case.name}/{dtype_name}: {impl} differs from moe_kernels on {bad} of {case.tokens} tokens"
                    f" (max {row_diff.max().item():.3g}, scale {scale:.3g}; {allowed} allowed)"
                )
        shape = (case.tokens, case.width) if impl != "floor" else _out_shape(fn, inp)
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(device, dtype)
        names.append(impl)
        steps.append(Step(fn, inp, grad, params))
        extras.append(extra)
    results = train_step_modes(steps, device, min_run_time=min_run_time, min_runs=min_runs, max_warmup=max_warmup,
                               modes=modes)
    records = []
    for impl, res, extra in zip(names, results, extras, strict=True):
        for mode, (timing, peak) in res.items():
            rec = _record(case.name, impl, mode, dtype_name, timing, peak, **extra)
            records.append(rec)
            log(f"  {case.name:<16} {impl:<12} {mode:<8} {dtype_name:<5} {timing.median_ms:10.3f} ms"
                f" ± {timing.iqr_ms:.3f}  peak {rec['peak_mem_mb']} MB")
    return records


def _out_shape(fn, inp) -> torch.Size:
    with torch.no_grad():
        return fn(inp).shape


def run_op_cases(case: LayerCase, dtype_name: str, device: torch.device, *, min_run_time: float, log=print):
    """Each op of the layer alone: the chosen backend (``moe_kernels``) against the reference."""
    dtype = DTYPE_NAMES[dtype_name]
    g = torch.Generator().manual_seed(2)
    T, D, E, K, H = case.tokens, case.width, case.experts, case.k, case.hidden
    logits = torch.randn(T, E, generator=g).to(device)
    w, idx = mk.topk_softmax(logits, K, backend="torch")
    cap = case.capacity
    S = case.group_size if not case.per_image else T
    plan = mk.make_routing(idx, E, cap, group_size=S, backend="torch")
    x = torch.randn(T, D, generator=g).to(device, dtype)
    buf = mk.dispatch(x, plan, backend="torch")
    w1 = torch.randn(E, H, D, generator=g).to(device, dtype) * D**-0.5
    flat = buf.reshape(-1, D)
    ops = {
        "gating": lambda be: mk.topk_softmax(logits, K, backend=be),
        "routing": lambda be: mk.make_routing(idx, E, cap, group_size=S, priority=w[:, 0], backend=be),
        "dispatch": lambda be: mk.dispatch(x, plan, backend=be),
        "combine": lambda be: mk.combine(buf, plan, w, backend=be),
        "grouped_gemm": lambda be: mk.grouped_mm(flat, w1, plan.offsets, backend=be),
    }
    records = []
    for op, call in ops.items():
        for impl, be in (("moe_kernels", "auto"), ("reference", "torch")):
            timing = time_fn(lambda call=call, be=be: call(be), device, min_run_time)
            records.append(_record(f"{case.name}:{op}", impl, "fwd", dtype_name, timing, None))
            log(f"  {case.name + ':' + op:<26} {impl:<12} {timing.median_ms:10.4f} ms ± {timing.iqr_ms:.4f}")
    return records

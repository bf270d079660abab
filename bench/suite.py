"""Runs the cases and returns one record per (case, impl, mode, dtype) measurement."""

from __future__ import annotations

import torch

import moe_kernels as mk
from bench import baselines as bl
from bench.cases import LayerCase
from bench.measure import MODES, Step, time_fn, train_step_modes

DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


FLOPS_PER_ROW = {"fwd": 4, "bwd": 8, "fwd_bwd": 12}  # x D*H per kept assignment: 2 GEMMs x 2 FLOPs


def useful_flops(case: LayerCase, kept: int, mode: str) -> float:
    """The FLOPs an MoE layer must do: its two expert GEMMs on the ``kept`` assignments, forward
    (4*D*H each), backward (8*D*H: input and weight gradients) or both (12*D*H). Padding,
    dropped assignments, routing and elementwise work are not counted."""
    return float(FLOPS_PER_ROW[mode] * case.width * case.hidden * kept)


def _record(case: str, impl: str, mode: str, dtype: str, timing, peak, *, flops: float | None = None, **extra) -> dict:
    return dict(
        case=case,
        impl=impl,
        mode=mode,
        dtype=dtype,
        median_ms=round(timing.median_ms, 4),
        iqr_ms=round(timing.iqr_ms, 4),
        peak_mem_mb=None if peak is None else round(peak, 2),
        runs=timing.runs,
        gflops=None if flops is None else round(flops / timing.median_ms / 1e6, 3),
        **extra,
    )


def build_impl(impl: str, case: LayerCase, p: bl.Params, x: torch.Tensor, *, kept: int, floor_form: str = "bmm"):
    """``(fn, inp, params)`` of one implementation: its step is ``fn(inp)`` and a backward.

    Args:
        impl: a name of ``bench.baselines.IMPLS``.
        p: the case's weights (each implementation gets its own copies).
        x: ``[T, D]`` the layer's input, dtype of ``p``.
        kept: assignments the layer keeps (the dense reference's rows).
        floor_form: the floor's formulation (``bench.baselines.FLOOR_FORMS``).
    """
    if impl in ("moe_kernels", "moe_kernels_eval"):
        fn, mods = bl.moe_kernels_impl(case, p, train=impl == "moe_kernels")
        return fn, x.clone().requires_grad_(True), list(mods.parameters())
    if impl == "dense":
        fn, inp = bl.dense_impl(p, kept)
        return fn, inp.requires_grad_(True), fn.params
    leaves = p.leaves()
    if impl == "floor":
        fn, buf = bl.floor_impl(case, leaves, x, floor_form)
        return fn, buf.requires_grad_(True), bl.params_of(fn, leaves)
    fn = bl.BUILDERS[impl](case, leaves)
    return fn, x.clone().requires_grad_(True), bl.params_of(fn, leaves)


def pick_floor(case: LayerCase, p: bl.Params, x: torch.Tensor, device: torch.device, log=print) -> str:
    """The faster padded formulation of the floor here (forward+backward, a few interleaved
    steps), so the floor is not slower than the padded GEMMs have to be. Dropless cases have one."""
    if case.per_image:
        return "per_expert"
    steps = []
    for form in bl.FLOOR_FORMS:
        fn, inp, params = build_impl("floor", case, p, x, kept=0, floor_form=form)
        grad = torch.randn(_out_shape(fn, inp), generator=torch.Generator().manual_seed(3)).to(device, p.w1.dtype)
        steps.append(Step(fn, inp, grad, params))
    res = train_step_modes(steps, device, min_run_time=0.0, min_runs=3, max_warmup=1, modes=("fwd_bwd",))
    ms = {form: r["fwd_bwd"][0].median_ms for form, r in zip(bl.FLOOR_FORMS, res, strict=True)}
    best = min(ms, key=ms.get)
    log(f"  {case.name}: floor formulation {best} ({', '.join(f'{f} {v:.1f} ms' for f, v in ms.items())})")
    return best


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
    """Every impl of ``case``: baselines' outputs checked against the layer's (eval mode), then
    all timed interleaved. Each record carries the case's shape, ``kept`` (the assignments the
    layer keeps in train mode: the dense reference's rows and the FLOP count's) and ``gflops``."""
    dtype = DTYPE_NAMES[dtype_name]
    p = bl.Params.make(case, dtype, device)
    x = torch.randn(case.tokens, case.width, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    ours, _ = bl.moe_kernels_impl(case, p)
    with torch.no_grad():
        y_ours = ours(x).float()
    train_fn, train_mods = bl.moe_kernels_impl(case, p, train=True)
    kept = bl.kept_rows(train_fn, train_mods, x)
    backend = mk.backends.choose("grouped_mm", mk.backends.requested_backend(None), x.device)[0]
    floor_form = pick_floor(case, p, x, device, log) if "floor" in impls else None
    tol = 1e-3 if dtype == torch.float32 else 6e-2
    names, steps, extras = [], [], []
    for impl in impls:
        extra = {}
        if impl in ("moe_kernels", "moe_kernels_eval"):
            extra["backend"] = backend
        elif impl == "floor":
            extra["floor_form"] = floor_form
        elif impl == "grouped_mm":
            why = bl.grouped_mm_unsupported(dtype, device)
            if why:
                log(f"  skip {case.name}/{impl}/{dtype_name}: {why}")
                continue
        fn, inp, params = build_impl(impl, case, p, x, kept=kept, floor_form=floor_form or "bmm")
        # The parameter gradients a backward leaves (in the step's peak memory): E expert weights'
        # worth for an MoE layer against one for `dense`, whatever the kernels do.
        extra["param_grad_mb"] = round(sum(t.numel() * t.element_size() for t in params) / 2**20, 2)
        if impl in bl.BASELINES:
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
        grad = torch.randn(_out_shape(fn, inp), generator=torch.Generator().manual_seed(3)).to(device, dtype)
        names.append(impl)
        steps.append(Step(fn, inp, grad, params))
        extras.append(extra)
    results = train_step_modes(steps, device, min_run_time=min_run_time, min_runs=min_runs, max_warmup=max_warmup,
                               modes=modes)
    shape = dict(tokens=case.tokens, width=case.width, hidden=case.hidden, experts=case.experts, k=case.k, kept=kept)
    records = []
    for impl, res, extra in zip(names, results, extras, strict=True):
        for mode, (timing, peak) in res.items():
            rec = _record(case.name, impl, mode, dtype_name, timing, peak, flops=useful_flops(case, kept, mode),
                          **shape, **extra)
            records.append(rec)
            log(f"  {case.name:<16} {impl:<16} {mode:<8} {dtype_name:<5} {timing.median_ms:10.3f} ms"
                f" ± {timing.iqr_ms:.3f}  {rec['gflops']:7.1f} GFLOP/s  peak {rec['peak_mem_mb']} MB")
    return records


def _out_shape(fn, inp) -> torch.Size:
    """Shape of ``fn(inp)``'s output (the first one, where it returns ``(out, loss)``)."""
    with torch.no_grad():
        out = fn(inp)
    return (out[0] if isinstance(out, tuple) else out).shape


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
    # Useful FLOPs of the grouped GEMM: its kept rows only (it also multiplies the padding).
    flops = {"grouped_gemm": 2.0 * int(plan.counts.sum()) * D * H}
    records = []
    for op, call in ops.items():
        for impl, be in (("moe_kernels", "auto"), ("reference", "torch")):
            timing = time_fn(lambda call=call, be=be: call(be), device, min_run_time)
            records.append(_record(f"{case.name}:{op}", impl, "fwd", dtype_name, timing, None, flops=flops.get(op)))
            log(f"  {case.name + ':' + op:<26} {impl:<12} {timing.median_ms:10.4f} ms ± {timing.iqr_ms:.4f}")
    return records

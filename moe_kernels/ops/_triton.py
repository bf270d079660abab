"""The ``triton`` backend: launchers for the kernels of ``moe_kernels.kernels``.

Same names and signatures as ``moe_kernels.reference``. Each launcher allocates its outputs,
picks block sizes from the shapes and launches; none reads tensor values on the host (no
``.item()``, ``.tolist()`` or ``nonzero()``), so the GPU never waits for the CPU.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``. fp32, fp16 and bf16 run
in the kernels (fp32 math and accumulation); ``SUPPORTS`` declares that fp64 inputs (gradcheck
only) run the reference instead, and ``moe_kernels.backends`` applies that rule.

Shape letters: T tokens, D width, E experts, K choices, G groups, S group size, C capacity,
R buffer rows, M rows, N output width.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
import triton
from torch import Tensor

from moe_kernels.backends import Support
from moe_kernels.kernels import _config
from moe_kernels.kernels import grouped_mm as _gm
from moe_kernels.kernels import grouped_mm_chunked as _gmc
from moe_kernels.kernels import grouped_mm_tma as _gmt
from moe_kernels.kernels.dispatch_combine import _combine_kernel, _combine_weights_grad_kernel, _dispatch_kernel
from moe_kernels.kernels.gating import _topk_softmax_backward_kernel, _topk_softmax_kernel
from moe_kernels.kernels.routing import _routing_histogram_kernel, _routing_positions_kernel


def _requirements(device: torch.device) -> list[str]:
    if device.type == "cpu" and not _config.interpreting():
        return ["triton needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)"]
    return []


# Every op has a kernel. The kernels accumulate in fp32 and fp64 tl.dot is not portable across
# GPUs, so fp64 (gradcheck) runs the reference (the declared rule, applied by backends). The
# grouped GEMMs also come fused with GELU, GELU's derivative and the bias gradient
# (backends.FUSED_OPS: grouped_mm_act, grouped_mm_act_grad, grouped_mm_weight_grad_fused).
SUPPORTS = {
    "triton": Support(
        devices=("cuda", "cpu"),
        dtypes=(torch.float32, torch.float16, torch.bfloat16),
        fp64="reference",
        fused_epilogues=True,
        fused_mlp=True,
        requirements=_requirements,
    )
}


def _on_device(t: Tensor):
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _pow2(n: int, lo: int = 1, hi: int | None = None) -> int:
    p = max(triton.next_power_of_2(max(n, 1)), lo)
    return p if hi is None else min(p, hi)


def _warps(elements: int) -> int:
    """4 warps up to 4K elements per tile, 8 beyond: ~16-32 values per thread."""
    return 4 if elements <= 4096 else 8


def _width_block(D: int) -> int:
    # 128 fp32/fp16 columns per program keeps loads 16-byte vectors with 4 warps and a 2-D grid.
    return _pow2(D, lo=16, hi=128)


def _dot_options(dtype: torch.dtype) -> dict:
    """``INPUT_PRECISION`` and ``DOT_FP32`` of the grouped GEMM kernels for ``dtype``."""
    # The interpreter's bf16 tl.dot is wrong: upcast the operands there (GPU: tensor cores).
    dot_fp32 = _config.interpreting() and dtype == torch.bfloat16
    # fp32 follows PyTorch's own switch (off by default), so "fp32" means IEEE fp32 unless the
    # user allowed TF32 for matmuls.
    ieee = dot_fp32 or (dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32)
    return {"INPUT_PRECISION": "ieee" if ieee else "tf32", "DOT_FP32": dot_fp32}


def topk_softmax(logits: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    T, E = logits.shape
    weights = torch.empty(T, k, dtype=torch.float32, device=logits.device)  # [T, K]
    indices = torch.empty(T, k, dtype=torch.int64, device=logits.device)  # [T, K]
    if T == 0:
        return weights, indices
    block_e = _pow2(E)
    block_t = _pow2(T, hi=max(1, 4096 // block_e))
    with _on_device(logits):
        _topk_softmax_kernel[(triton.cdiv(T, block_t),)](
            logits, weights, indices, T, E, logits.stride(0), logits.stride(1),
            K=k, RENORMALIZE=bool(renormalize), BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=_pow2(k),
            num_warps=_warps(block_t * block_e),
        )  # fmt: skip
    return weights, indices


def topk_softmax_backward(grad_weights: Tensor, logits: Tensor, indices: Tensor, renormalize: bool) -> Tensor:
    T, E = logits.shape
    K = indices.shape[1]
    grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)  # [T, E]
    if T == 0:
        return grad_logits
    grad_weights = grad_weights.contiguous()
    indices = indices.contiguous()
    block_e = _pow2(E)
    block_t = _pow2(T, hi=max(1, 4096 // block_e))
    with _on_device(logits):
        _topk_softmax_backward_kernel[(triton.cdiv(T, block_t),)](
            grad_weights, logits, indices, grad_logits, T, E,
            logits.stride(0), logits.stride(1), grad_logits.stride(0), grad_logits.stride(1),
            K=K, RENORMALIZE=bool(renormalize), BLOCK_T=block_t, BLOCK_E=block_e,
            num_warps=_warps(block_t * block_e),
        )  # fmt: skip
    return grad_logits


def _routing_block() -> int:
    # Sequence entries per program: the pairwise rank is BLOCK**2, so 128 keeps it at 16K
    # comparisons. The interpreter uses 32 so that small test shapes span several chunks and
    # exercise the cross-chunk scan.
    return 32 if _config.interpreting() else 128


def make_routing(
    indices: Tensor,
    num_experts: int,
    capacity: int | None,
    group_size: int,
    priority: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    indices = indices.to(torch.int64).contiguous()
    T, K = indices.shape
    E, S, C = num_experts, group_size, capacity
    dev = indices.device
    G = T // S if S > 0 else 0
    R = E * G * C if C is not None else T * K
    i64 = dict(dtype=torch.int64, device=dev)
    slot = torch.empty(T, K, **i64)  # [T, K]
    rows = torch.empty(T, K, **i64)  # [T, K]
    row_src = torch.full((R,), -1, **i64)  # [R]
    if G == 0 or K == 0:
        counts = torch.zeros(E, **i64)
        offsets = torch.arange(E + 1, **i64) * (G * C) if C is not None else torch.zeros(E + 1, **i64)
        return slot, rows, row_src, counts, offsets

    order = indices  # placeholder pointer, unread unless HAS_ORDER
    if priority is not None:
        # Batch Prioritized Routing: torch's stable sort gives the descending, token-order-on-
        # ties permutation [G, S] (NaN last); the kernels read tokens through it.
        key = torch.nan_to_num(priority.float().reshape(G, S), nan=float("-inf"))  # [G, S]
        order = torch.sort(key, dim=1, descending=True, stable=True).indices.contiguous()  # [G, S]

    block = _routing_block()
    nchunk = triton.cdiv(K * S, block)
    grid = (G * nchunk,)
    hist = torch.empty(G, nchunk, E, dtype=torch.int32, device=dev)  # [G, NCHUNK, E]
    has_order = priority is not None
    with _on_device(indices):
        _routing_histogram_kernel[grid](
            indices, order, hist, S, K, E, nchunk,
            HAS_ORDER=has_order, BLOCK=block, BLOCK_E=_pow2(E, hi=64), num_warps=4,
        )  # fmt: skip

        # The exclusive scan over chunks (and groups) runs on a table of G*NCHUNK*E integers:
        # torch.cumsum is exact on integers, so positions stay deterministic.
        per_group = hist.sum(dim=1, dtype=torch.int64)  # [G, E]
        before = hist.cumsum(dim=1, dtype=torch.int64) - hist  # [G, NCHUNK, E] within the group
        if C is not None:
            counts = per_group.clamp(max=C).sum(dim=0)  # [E]
            offsets = torch.arange(E + 1, **i64) * (G * C)  # [E+1]
        else:
            before += (per_group.cumsum(dim=0) - per_group)[:, None, :]  # plus earlier groups
            counts = per_group.sum(dim=0)  # [E]
            offsets = torch.nn.functional.pad(counts.cumsum(0), (1, 0))  # [E+1]
        before = before.contiguous()

        _routing_positions_kernel[grid](
            indices, order, before, offsets, slot, rows, row_src, S, K, E, nchunk, C if C is not None else 0,
            HAS_ORDER=has_order, DROPLESS=C is None, BLOCK=block, num_warps=4 if block <= 64 else 8,
        )  # fmt: skip
    return slot, rows, row_src, counts, offsets


def dispatch(x: Tensor, rows: Tensor, row_src: Tensor, weights: Tensor | None) -> Tensor:
    K = rows.shape[1]
    R, D = row_src.shape[0], x.shape[1]
    out = torch.empty(R, D, dtype=x.dtype, device=x.device)  # [R, D]
    if R == 0 or D == 0:
        return out
    row_src = row_src.contiguous()
    w = weights.contiguous() if weights is not None else row_src
    block_d = _width_block(D)
    block_r = 32
    with _on_device(x):
        _dispatch_kernel[(triton.cdiv(R, block_r), triton.cdiv(D, block_d))](
            x, row_src, w, out, R, D, K, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
            HAS_WEIGHTS=weights is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
    return out


def combine(y: Tensor, rows: Tensor, row_src: Tensor, weights: Tensor | None) -> Tensor:
    T, K = rows.shape
    D = y.shape[1]
    out = torch.empty(T, D, dtype=y.dtype, device=y.device)  # [T, D]
    if T == 0 or D == 0:
        return out
    rows = rows.contiguous()
    w = weights.contiguous() if weights is not None else rows
    block_d = _width_block(D)
    block_t = 32
    with _on_device(y):
        _combine_kernel[(triton.cdiv(T, block_t), triton.cdiv(D, block_d))](
            y, rows, w, out, T, D, K, y.stride(0), y.stride(1), out.stride(0), out.stride(1),
            HAS_WEIGHTS=weights is not None, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
    return out


def combine_weights_grad(a: Tensor, b: Tensor, rows: Tensor) -> Tensor:
    T, K = rows.shape
    D = a.shape[1]
    g = torch.empty(T, K, dtype=torch.float32, device=a.device)  # [T, K]
    if T == 0:
        return g
    rows = rows.contiguous()
    block_d = _width_block(D)
    block_t = 32
    with _on_device(a):
        _combine_weights_grad_kernel[(triton.cdiv(T, block_t),)](
            a, b, rows, g, T, D, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
    return g


def grouped_mm(x: Tensor, w: Tensor, offsets: Tensor, bias: Tensor | None = None) -> Tensor:
    return _forward(x, w, offsets, bias)


def grouped_mm_act(
    x: Tensor, w: Tensor, offsets: Tensor, bias: Tensor | None, approximate: str, keep_pre: bool
) -> tuple[Tensor, Tensor]:
    """``(gelu(p), p)`` with ``p = grouped_mm(x, w, offsets, bias)`` from one GEMM: GELU in its
    epilogue (``approximate`` "none" or "tanh"). ``p`` ([M, N], what the backward needs) is
    written only with ``keep_pre``, else an empty [0, N] is returned."""
    M, N = x.shape[0], w.shape[1]
    pre = torch.empty(M if keep_pre else 0, N, dtype=x.dtype, device=x.device)  # [M, N]
    epilogue = _gm.EPI_ACT_SAVE if keep_pre else _gm.EPI_ACT
    return _forward(x, w, offsets, bias, epilogue=epilogue.value, act=_gm.GELU_ACT[approximate], aux=pre), pre


def grouped_mm_act_grad(grad: Tensor, w: Tensor, offsets: Tensor, pre: Tensor, approximate: str) -> Tensor:
    """``grouped_mm(grad, w, offsets) * gelu'(pre)`` from one GEMM (the derivative in its
    epilogue, which loads the ``pre`` [M, N] tile): GELU's input gradient from fc2's dX, with
    ``w`` fc2's weight transposed ([E, H, Dout], a strided view)."""
    return _forward(grad, w, offsets, None, epilogue=_gm.EPI_ACT_GRAD.value, act=_gm.GELU_ACT[approximate], aux=pre)


def _forward(x: Tensor, w: Tensor, offsets: Tensor, bias: Tensor | None, *, epilogue: int = 0, act: int = 0,
             aux: Tensor | None = None) -> Tensor:  # fmt: skip
    """The forward/dX kernel with ``epilogue`` (kernels/grouped_mm.py: EPI_*) reading or
    writing ``aux`` [M, N] (the pre-activation)."""
    M, KD = x.shape
    E, N, _ = w.shape
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)  # [M, N]
    if M == 0 or N == 0:
        return out
    offsets = offsets.to(torch.int64).contiguous()

    def grid(meta):
        # The tile schedule's worst case per column block (kernels/grouped_mm.py: _tile_of).
        return ((triton.cdiv(M, meta["BLOCK_M"]) + E) * triton.cdiv(N, meta["BLOCK_N"]),)

    dot = _dot_options(x.dtype)
    b = bias if bias is not None else out  # placeholder pointer, unread without HAS_BIAS
    a = aux if aux is not None and aux.numel() else out  # placeholder pointer, untouched by EPI_NONE/EPI_ACT
    if TMA_FAILURE["error"] is None and not tma_reasons(x, w, dot):
        try:
            _forward_tma(x, w, out, offsets, b, a, dot, HAS_BIAS=bias is not None, EPILOGUE=epilogue, ACT=act)
            return out
        except Exception as exc:  # the kernel did not compile or launch on this Triton/driver
            if os.environ.get(TMA_ENV, "auto").strip() == "1":
                raise  # asked for explicitly (tests): the failure is the answer
            _disable_tma(exc)
    candidates = _gm.fwd_configs(x.element_size() == 4 and dot["INPUT_PRECISION"] == "ieee")
    args = (
        x, w, out, offsets, b, a, M, N, KD, E, _config.m_bucket(M),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        b.stride(0), b.stride(1), a.stride(0), a.stride(1),
    )  # fmt: skip
    with _on_device(x):
        _launch_gemm("grouped_mm", grid, args, x.element_size(), wgrad=False, candidates=candidates,
                     HAS_BIAS=bias is not None, EPILOGUE=epilogue, ACT=act, **dot)  # fmt: skip
    return out


# The persistent TMA forward/dX (kernels/grouped_mm_tma.py): "auto" (default) runs it on CUDA
# devices of compute capability 9.0+ whenever the layout allows; "0" never (the non-persistent
# kernel everywhere, e.g. to compare the two on one GPU); "1" as auto, and also on CPU tensors
# under the interpreter (tests).
TMA_ENV = "MOE_KERNELS_TRITON_TMA"
# A first compile or launch of the TMA kernel that raises (a Triton without the device-side
# descriptor API, a driver that rejects it) turns it off for the process with one warning; the
# non-persistent kernel runs instead. Asynchronous CUDA errors do not surface here.
TMA_FAILURE: dict[str, str | None] = {"error": None}


def _disable_tma(exc: Exception) -> None:
    TMA_FAILURE["error"] = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        f"moe_kernels: the persistent TMA grouped GEMM failed ({TMA_FAILURE['error'][:300]}); the"
        f" non-persistent kernel runs from now on in this process ({TMA_ENV}=0 chooses it from the start)",
        RuntimeWarning,
        stacklevel=3,
    )


def _tma_aligned(t: Tensor, *strides: int) -> bool:
    """TMA's rules for a descriptor over ``t``: a 16-byte aligned base and 16-byte multiples
    for every stride but the innermost (which the caller has checked is 1)."""
    es = t.element_size()
    return t.data_ptr() % 16 == 0 and all((s * es) % 16 == 0 for s in strides)


def tma_reasons(x: Tensor, w: Tensor, dot: dict) -> list[str]:
    """Why the persistent TMA kernel cannot run the forward/dX ``x [M, KD] @ w[e].T`` (``w``
    [E, N, KD], any strides) with ``dot`` (``_dot_options``); empty when it can."""
    mode = os.environ.get(TMA_ENV, "auto").strip() or "auto"
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"{TMA_ENV} must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return [f"{TMA_ENV}=0"]
    reasons = []
    if x.is_cuda:
        if torch.cuda.get_device_capability(x.device)[0] < 9:
            reasons.append("TMA needs compute capability 9.0+ (sm_80 runs the non-persistent kernel)")
    elif not (mode == "1" and _config.interpreting()):
        reasons.append(f"CPU tensors run it only under the interpreter with {TMA_ENV}=1")
    if dot["INPUT_PRECISION"] == "ieee" and not dot["DOT_FP32"]:
        reasons.append("fp32 with IEEE products runs the non-persistent kernel's FMA configs")
    if x.shape[1] == 0 or w.shape[0] == 0:
        reasons.append("KD = 0 or E = 0: TMA boxes need every dimension >= 1")
    if x.stride(1) != 1 or not _tma_aligned(x, x.stride(0)):
        reasons.append("x: TMA needs inner stride 1 and a 16-byte aligned base and row stride")
    if not (w.stride(2) == 1 and _tma_aligned(w, w.stride(0), w.stride(1))
            or w.stride(1) == 1 and _tma_aligned(w, w.stride(0), w.stride(2))):  # fmt: skip
        reasons.append("w: TMA needs one of its last two strides 1, the others and the base 16-byte aligned")
    return reasons


def _tma_workspace(size: int, alignment: int, stream: int | None) -> Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Device-side tensor descriptors live in a global workspace Triton asks its allocator for
    (a ContextVar; unset it raises at launch): set a torch one unless the user set one."""
    try:
        from triton.runtime import _allocation

        unset = isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    except (ImportError, AttributeError):  # another Triton layout: set ours
        unset = True
    if unset:
        triton.set_allocator(_tma_workspace)


def _forward_tma(x: Tensor, w: Tensor, out: Tensor, offsets: Tensor, b: Tensor, a: Tensor, dot: dict,
                 **constexprs) -> None:  # fmt: skip
    """The persistent TMA kernel for a launch ``tma_reasons`` allows: ``w`` read as stored
    (W_T when its reduction dimension is the strided one, as dX's transposed view); bias
    ``b``, aux ``a`` and the epilogue in ``constexprs`` as for the other kernel."""
    M, KD = x.shape
    E, N, _ = w.shape
    w_t = w.stride(2) != 1
    num_sms = _num_sms(x.device)

    def grid(meta):
        # At most one program per SM, each looping over the schedule's entries.
        return (min(num_sms, (triton.cdiv(M, meta["BLOCK_M"]) + E) * triton.cdiv(N, meta["BLOCK_N"])),)

    args = (
        x, w, out, offsets, b, a, M, N, KD, E, _config.m_bucket(M), x.stride(0), w.stride(0),
        w.stride(2) if w_t else w.stride(1), out.stride(0), out.stride(1), b.stride(0), b.stride(1),
        a.stride(0), a.stride(1),
    )  # fmt: skip
    with _on_device(x):
        if x.is_cuda:
            _ensure_allocator()
        _launch_gemm("grouped_mm_tma", grid, args, x.element_size(), wgrad=False, W_T=w_t, **constexprs, **dot)


# The weight gradient's grid is (dW tiles) x E programs, 6-12 for the router (E=1, N=32,
# D=768) where a GPU has 132 SMs. Below two waves of the device's SMs the rows are split
# (_grouped_mm_weight_grad_split_kernel); 132 (H100/H200, the design target) is used when no
# GPU can be asked (the interpreter, launch-grid tests).
DEFAULT_NUM_SMS = 132
# A split reduces at least this many rows (a few BLOCK_M steps per program: below that the
# workspace round trip costs more than the extra programs gain).
SPLIT_MIN_ROWS = 256
# The fp32 workspace [SPLIT, E, N, KD] stays within this (it only matters for small grids of
# large experts: the router's is 44 x 96 KiB).
SPLIT_WORKSPACE_BYTES = 64 << 20


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count  # cached by torch, no sync
    return DEFAULT_NUM_SMS


def wgrad_split(M: int, N: int, KD: int, E: int, configs: list, num_sms: int) -> int:
    """How many row splits the weight gradient gets: enough that the grid has at least
    2 x ``num_sms`` programs for the config with the fewest dW tiles among ``configs`` (those
    the launch may use), at most ``M // SPLIT_MIN_ROWS`` and what the workspace allows; 1 (the
    unsplit kernel, no workspace) when the plain grid is large enough."""
    tiles = E * min(triton.cdiv(N, c.kwargs["BLOCK_N"]) * triton.cdiv(KD, c.kwargs["BLOCK_K"]) for c in configs)
    target = 2 * num_sms
    if tiles >= target:
        return 1
    cap = min(M // SPLIT_MIN_ROWS, SPLIT_WORKSPACE_BYTES // (4 * E * N * KD))
    return max(1, min(triton.cdiv(target, tiles), cap))


# The weight gradient over row chunks (kernels/grouped_mm_chunked.py) when one expert's dW
# tiles cannot fill two waves of the SMs: then an expert holding most rows would be a tail.
# A chunk reduces at least this many rows: its fp32 partial costs 8 bytes (written, read) per
# dW element against 2 x CHUNK_MIN_ROWS FLOPs, 256 FLOP/byte, above an H100/H200's ~200-300
# (dense bf16 FLOP/s over HBM bytes/s), so the partials' traffic stays under the GEMM's time.
CHUNK_MIN_ROWS = 1024
# Chunk starts are multiples of this from the expert's first row (every BLOCK_M divides it).
CHUNK_ALIGN = 128
# Programs per expert of the partial-sum kernel (each loops over blocks of dW): with a
# balanced load every expert has one chunk and they all exit at once, so few of them.
CHUNK_SUM_PROGRAMS = 64
CHUNK_SUM_BLOCK = 1024


def wgrad_chunk(M: int, N: int, KD: int, E: int, configs: list, num_sms: int) -> int:
    """Rows per chunk of the weight gradient (0: the unsplit kernel). When one expert's dW
    tiles (for the config with the fewest among ``configs``) are fewer than 2 x ``num_sms``,
    an expert holding most of the M rows would keep that few programs busy long after the
    rest: the rows are cut into chunks of ``CH = M * tiles / (2 * num_sms)`` (rounded up to
    CHUNK_ALIGN, at least CHUNK_MIN_ROWS), so that even one expert holding all rows has two
    waves of programs, and the fp32 workspace (fewer than ``2 * cdiv(M, CH)`` slots of
    ``N * KD`` + N) stays within SPLIT_WORKSPACE_BYTES. Decided from shapes alone (no host
    sync); 0 for one expert (the row split serves small grids), a large grid, or CH >= M."""
    tiles = min(triton.cdiv(N, c.kwargs["BLOCK_N"]) * triton.cdiv(KD, c.kwargs["BLOCK_K"]) for c in configs)
    if E <= 1 or tiles >= 2 * num_sms:
        return 0
    max_chunks = SPLIT_WORKSPACE_BYTES // (2 * 4 * (N * KD + N))  # cdiv(M, CH) that fits the workspace
    if max_chunks == 0:
        return 0
    ch = max(triton.cdiv(M * tiles, 2 * num_sms), CHUNK_MIN_ROWS, triton.cdiv(M, max_chunks))
    ch = triton.cdiv(ch, CHUNK_ALIGN) * CHUNK_ALIGN
    return ch if ch < M else 0


def grouped_mm_weight_grad(
    x: Tensor, grad_out: Tensor, offsets: Tensor, *, split: int | None = None, chunk: int | None = None
) -> Tensor:
    """``dw[e] = grad_out[rows of e].T @ x[rows of e]``; ``split`` forces the number of row
    splits and ``chunk`` the rows per chunk of the chunked kernel (tests), else ``wgrad_split``
    and ``wgrad_chunk`` choose them."""
    return _weight_grad(x, grad_out, offsets, _gm.ACT_NONE.value, True, False, split, chunk)[0]


def grouped_mm_weight_grad_fused(
    x: Tensor,
    grad_out: Tensor,
    offsets: Tensor,
    approximate: str | None,
    need_dw: bool,
    need_db: bool,
    *,
    split: int | None = None,
    chunk: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``(dw, db)``: ``dw[e] = grad_out[rows of e].T @ act(x[rows of e])`` ([E, N, KD]; act is
    GELU with ``approximate`` applied to x as the kernel loads it, or nothing when None) and
    ``db[e] = grad_out[rows of e].sum(0)`` ([E, N], the bias gradient: a fixed-order column sum
    by programs of the same launch, one per N tile and expert, instead of a GEMM against a
    column of ones). Either is an empty [0] when not needed (its programs are not launched)."""
    act = _gm.ACT_NONE.value if approximate is None else _gm.GELU_ACT[approximate]
    return _weight_grad(x, grad_out, offsets, act, need_dw, need_db, split, chunk)


def _weight_grad(
    x: Tensor,
    grad_out: Tensor,
    offsets: Tensor,
    act: int,
    need_dw: bool,
    need_db: bool,
    split: int | None,
    chunk: int | None = None,
) -> tuple[Tensor, Tensor]:
    M, KD = x.shape
    N = grad_out.shape[1]
    E = offsets.shape[0] - 1
    dw = torch.empty(E, N, KD, dtype=x.dtype, device=x.device) if need_dw else x.new_empty(0)  # [E, N, KD]
    db = torch.empty(E, N, dtype=x.dtype, device=x.device) if need_db else x.new_empty(0)  # [E, N]
    if E == 0 or N == 0 or not (need_dw and KD or need_db):
        return dw, db
    if not need_dw:
        KD, act = 0, _gm.ACT_NONE.value  # no dW tiles: the bias programs alone (x is not read)
    offsets = offsets.to(torch.int64).contiguous()
    name = "grouped_mm_weight_grad"
    dot = _dot_options(x.dtype)
    candidates = _gm.wgrad_configs(x.element_size() == 4 and dot["INPUT_PRECISION"] == "ieee", act != 0)
    if split is None:
        fitting = _gm.fitting_configs
        pinned = _config.pinned_config(name, candidates, lambda cs: fitting(cs, x.element_size(), wgrad=True))
        configs = [pinned] if pinned is not None else fitting(candidates, x.element_size(), wgrad=True)
        split = wgrad_split(M, N, max(KD, 1), E, configs, _num_sms(x.device))
        if split == 1 and chunk is None:
            chunk = wgrad_chunk(M, N, max(KD, 1), E, configs, _num_sms(x.device))
    flags = dict(ACT=act, HAS_DB=need_db, **dot)
    if chunk:
        _weight_grad_chunked(x, grad_out, offsets, dw, db, KD, chunk, candidates, flags)
        return dw, db

    def grid(meta):
        # The bias tiles, then the dW tiles (kernels/grouped_mm.py: _grouped_mm_weight_grad_kernel).
        n_tiles = triton.cdiv(N, meta["BLOCK_N"])
        tiles = (n_tiles if need_db else 0) + n_tiles * triton.cdiv(KD, meta["BLOCK_K"])
        return (tiles, E, *((split,) if split > 1 else ()))

    if split == 1:
        # An unneeded output gets the other's pointer and zero strides: the kernel never writes it.
        w_out, b_out = (dw if need_dw else db), (db if need_db else dw)
        args = (
            x, grad_out, w_out, b_out, offsets, M, N, KD, _config.m_bucket(M),
            x.stride(0), x.stride(1), grad_out.stride(0), grad_out.stride(1),
            *(dw.stride() if need_dw else (0, 0, 1)), *(db.stride() if need_db else (0, 1)),
        )  # fmt: skip
        with _on_device(x):
            _launch_gemm(name, grid, args, x.element_size(), wgrad=True, candidates=candidates, **flags)
        return dw, db
    f32 = dict(dtype=torch.float32, device=x.device)
    ws = torch.empty(split, E, N, KD, **f32) if need_dw else None  # [SPLIT, E, N, KD]
    dbws = torch.empty(split, E, N, **f32) if need_db else None  # [SPLIT, E, N]
    w_ws, b_ws = (ws if need_dw else dbws), (dbws if need_db else ws)
    args = (
        x, grad_out, w_ws, b_ws, offsets, M, N, KD, _config.m_bucket(M), split,
        x.stride(0), x.stride(1), grad_out.stride(0), grad_out.stride(1),
        *(ws.stride()[:3] if need_dw else (0, 0, 0)), *(dbws.stride()[:2] if need_db else (0, 0)),
    )  # fmt: skip
    with _on_device(x):
        _launch_gemm(name + "_split", grid, args, x.element_size(), wgrad=True, pin=name, candidates=candidates,
                     **flags)  # fmt: skip
        block = 1024
        for part, out in ((ws, dw), (dbws, db)):
            if part is not None:
                SPLIT_SUM_KERNEL[(triton.cdiv(out.numel(), block),)](part, out, out.numel(), split, BLOCK=block,
                                                                       num_warps=4)  # fmt: skip
    return dw, db


def _weight_grad_chunked(
    x: Tensor, grad_out: Tensor, offsets: Tensor, dw: Tensor, db: Tensor, KD: int, chunk: int, candidates, flags
) -> None:
    """The weight gradient over row chunks of ``chunk`` rows (kernels/grouped_mm_chunked.py)
    into the contiguous ``dw`` [E, N, KD] and ``db`` [E, N] (either may be unneeded: [0])."""
    M, N, E = x.shape[0], grad_out.shape[1], offsets.shape[0] - 1
    need_dw, need_db = dw.numel() > 0, flags["HAS_DB"]
    slots = 2 * triton.cdiv(M, chunk)  # more than the multi-chunk experts' chunks
    f32 = dict(dtype=torch.float32, device=x.device)
    ws = torch.empty(slots, N, KD, **f32) if need_dw else None  # [SLOTS, N, KD]
    dbws = torch.empty(slots, N, **f32) if need_db else None  # [SLOTS, N]

    def grid(meta):
        # The bias tiles, then the dW tiles, for each chunk of the schedule's worst case.
        n_tiles = triton.cdiv(N, meta["BLOCK_N"])
        tiles = (n_tiles if need_db else 0) + n_tiles * triton.cdiv(KD, meta["BLOCK_K"])
        return (tiles, nch)

    # An unneeded output (or workspace) gets the other's pointer: the kernel never touches it.
    w_out, b_out = (dw if need_dw else db), (db if need_db else dw)
    w_ws, b_ws = (ws if need_dw else dbws), (dbws if need_db else ws)
    nch = triton.cdiv(M, chunk) + E
    i64 = dict(dtype=torch.int64, device=x.device)
    sched, per_expert = torch.empty(nch, 4, **i64), torch.empty(E, 2, **i64)  # [NCH, 4], [E, 2]
    args = (
        x, grad_out, w_out, b_out, w_ws, b_ws, sched, M, N, KD, E, _config.m_bucket(M),
        x.stride(0), x.stride(1), grad_out.stride(0), grad_out.stride(1),
    )  # fmt: skip
    with _on_device(x):
        CHUNK_TABLE_KERNEL[(nch,)](offsets, sched, per_expert, M, E, chunk, num_warps=4)
        _launch_gemm("grouped_mm_weight_grad_chunked", grid, args, x.element_size(), wgrad=True,
                     pin="grouped_mm_weight_grad", candidates=candidates, **flags)  # fmt: skip
        block = CHUNK_SUM_BLOCK
        for part, out, numel in ((ws, dw, N * KD), (dbws, db, N)):
            if part is not None:
                grid = (min(triton.cdiv(numel, block), CHUNK_SUM_PROGRAMS), E)
                CHUNK_SUM_KERNEL[grid](part, out, per_expert, numel, BLOCK=block, num_warps=4)


# The grouped GEMMs' kernels: (autotuned, plain @triton.jit, candidates), by the names
# MOE_KERNELS_TRITON_CONFIG uses (the split weight gradient is pinned as grouped_mm_weight_grad).
# Looked up at launch time, as is the split sum, so tests can put recorders in their place.
GEMM_KERNELS = {
    "grouped_mm": (_gm.grouped_mm_kernel, _gm._grouped_mm_kernel, _gm.GROUPED_MM_CONFIGS),
    "grouped_mm_tma": (_gmt.grouped_mm_tma_kernel, _gmt._grouped_mm_tma_kernel, _gmt.GROUPED_MM_TMA_CONFIGS),
    "grouped_mm_weight_grad": (
        _gm.grouped_mm_weight_grad_kernel,
        _gm._grouped_mm_weight_grad_kernel,
        _gm.GROUPED_MM_WGRAD_CONFIGS,
    ),
    "grouped_mm_weight_grad_split": (
        _gm.grouped_mm_weight_grad_split_kernel,
        _gm._grouped_mm_weight_grad_split_kernel,
        _gm.GROUPED_MM_WGRAD_CONFIGS,
    ),
    "grouped_mm_weight_grad_chunked": (
        _gmc.grouped_mm_weight_grad_chunked_kernel,
        _gmc._grouped_mm_weight_grad_chunked_kernel,
        _gm.GROUPED_MM_WGRAD_CONFIGS,
    ),
}
SPLIT_SUM_KERNEL = _gm._split_sum_kernel
CHUNK_SUM_KERNEL = _gmc._chunk_sum_kernel
CHUNK_TABLE_KERNEL = _gmc._chunk_table_kernel


def _launch_gemm(
    name: str,
    grid,
    args: tuple,
    elem_size: int,
    *,
    wgrad: bool,
    pin: str | None = None,
    candidates: list | None = None,
    **constexprs,
) -> None:
    """Launch grouped GEMM ``name``: autotuned, or with the config ``MOE_KERNELS_TRITON_CONFIG``
    pins for ``pin`` (default ``name``) among ``candidates`` (default: its GEMM_KERNELS entry's;
    kernels/_config.py)."""
    tuned, plain, default_candidates = GEMM_KERNELS[name]
    candidates = default_candidates if candidates is None else candidates
    cfg = _config.pinned_config(pin or name, candidates, lambda cs: _gm.fitting_configs(cs, elem_size, wgrad=wgrad))
    if cfg is None:
        tuned[grid](*args, **constexprs)
        return
    meta = {**cfg.kwargs, **constexprs}
    plain[grid(meta)](*args, **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

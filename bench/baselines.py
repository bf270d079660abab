"""What users would otherwise run, written faithfully, and the two references.

Every baseline computes the same function as ``moe_kernels.MoEMlp`` in eval mode (router softmax,
top-K, V-MoE capacity with K-major priority, experts ``fc2(gelu(fc1(x)))``, weighted combine), so
the benchmark checks their outputs against each other before timing them.

  moe_kernels       the layer in train mode (router noise, auxiliary losses in the backward)
  moe_kernels_eval  the layer in eval mode (deterministic routing, as the baselines route)
  dense             a dense MLP of the same active FLOPs: ``F.linear -> GELU -> F.linear`` on as
                    many rows as the layer keeps; what a perfect MoE layer would cost
  floor             the expert GEMMs alone (fc1, GELU, fc2) on an already-dispatched padded
                    ``[E, G*C, D]`` buffer, in the faster of two formulations (``FLOOR_FORMS``)
  einsum            V-MoE's dispatcher: one-hot ``[G, S, E, C]`` dispatch and combine tensors, einsum
  loop              a Python loop over experts: index the tokens, run the expert, ``index_add``
  padded_bmm        index gather/scatter into a padded ``[E, G*C, D]`` buffer and ``baddbmm``
  grouped_mm        assignments sorted by expert and ``torch.nn.functional.grouped_mm``

Shape letters: T tokens, D width, H hidden, E experts, K choices, G groups of S tokens, C capacity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import moe_kernels as mk
from bench.cases import LayerCase

IMPLS = ("moe_kernels", "moe_kernels_eval", "dense", "floor", "einsum", "loop", "padded_bmm", "grouped_mm")
BASELINES = ("einsum", "loop", "padded_bmm", "grouped_mm")  # what users would otherwise write
# Padded-GEMM formulations of the floor: today's baddbmm on transposed [E, H, D] weight views, and
# a plain bmm on [E, D, H] weights with the bias added after. The run times both and keeps the
# faster (bench.suite.pick_floor), so the floor is never a formulation slower than it has to be.
FLOOR_FORMS = ("baddbmm_t", "bmm")


@dataclasses.dataclass
class Params:
    """One set of layer weights, cloned into every implementation."""

    router_w: Tensor  # [E, D] token router (no bias), or the per-image router's Linear weight
    router_b: Tensor  # [E] per-image router bias (zeros for token routing)
    w1: Tensor  # [E, H, D]
    b1: Tensor  # [E, H]
    w2: Tensor  # [E, D, H]
    b2: Tensor  # [E, D]

    @staticmethod
    def make(case: LayerCase, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Params:
        g = torch.Generator().manual_seed(seed)
        E, D, H = case.experts, case.width, case.hidden

        def r(*shape, scale):
            return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

        return Params(r(E, D, scale=D**-0.5), r(E, scale=0.1), r(E, H, D, scale=D**-0.5), r(E, H, scale=0.1),
                      r(E, D, H, scale=H**-0.5), r(E, D, scale=0.1))

    def tensors(self) -> list[Tensor]:
        """The fields themselves (``dataclasses.astuple`` would deep-copy them)."""
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    def leaves(self) -> Params:
        """Fresh leaf copies that require grad (each implementation owns its own)."""
        return Params(*(t.detach().clone().requires_grad_(True) for t in self.tensors()))


def gate(case: LayerCase, x: Tensor, p: Params) -> tuple[Tensor, Tensor]:
    """Top-K of the router softmax: ``(weights [T, K] fp32, indices [T, K])``."""
    if case.per_image:
        B, N = case.tokens // case.per_image, case.per_image
        cls = x.view(B, N, -1)[:, 0]  # [B, D]
        feats = F.layer_norm(cls, (cls.shape[-1],), eps=1e-6)  # [B, D] (affine at its init: 1, 0)
        probs = F.linear(feats, p.router_w, p.router_b).float().softmax(-1)  # [B, E]
        w, idx = probs.topk(case.k, dim=-1)  # [B, K]
        return w.repeat_interleave(N, 0), idx.repeat_interleave(N, 0)  # [T, K]
    probs = F.linear(x, p.router_w).float().softmax(-1)  # [T, E]
    return probs.topk(case.k, dim=-1)


def routing_groups(case: LayerCase) -> tuple[int, int]:
    """(S, C) of the capacity formulation: per image with C = N for per-image (dropless) routing."""
    if case.per_image:
        return case.per_image, case.per_image
    return case.group_size, case.capacity


def positions(idx: Tensor, E: int, S: int) -> Tensor:
    """V-MoE's position of each assignment in its (group, expert), K-major: ``[T, K]``."""
    T, K = idx.shape
    G = T // S
    seq = idx.view(G, S, K).transpose(1, 2).reshape(G, K * S)  # [G, K*S]
    onehot = F.one_hot(seq, E)  # [G, K*S, E]
    pos = ((onehot.cumsum(1) - 1) * onehot).sum(-1)  # [G, K*S]
    return pos.view(G, K, S).transpose(1, 2).reshape(T, K)  # [T, K]


def _mlp(h: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    return F.linear(F.gelu(F.linear(h, w1, b1)), w2, b2)


def _per_expert(p: Params) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Each expert's ``(w1, b1, w2, b2)`` as its own leaves, as an ``nn.ModuleList`` of experts
    holds them. (Indexing ``p.w1[e]`` instead would make every expert's backward write a full
    ``[E, H, D]`` zero gradient: E times the weight traffic, a cost no one would ship.)"""
    return [
        tuple(t[e].detach().clone().requires_grad_(True) for t in (p.w1, p.b1, p.w2, p.b2))
        for e in range(p.w1.shape[0])
    ]


def params_of(fn: Callable, p: Params) -> list[Tensor]:
    """The leaves an implementation trains: ``fn.params`` where it keeps its own, else ``p``'s."""
    return list(getattr(fn, "params", None) or p.tensors())


def einsum_impl(case: LayerCase, p: Params) -> Callable[[Tensor], Tensor]:
    E = case.experts
    S, C = routing_groups(case)

    def fn(x: Tensor) -> Tensor:
        T, D = x.shape
        G = T // S
        w, idx = gate(case, x, p)  # [T, K]
        pos = positions(idx, E, S)  # [T, K]
        keep = pos < C
        oh_e = F.one_hot(idx, E).to(x.dtype)  # [T, K, E]
        oh_c = F.one_hot(torch.where(keep, pos, C), C + 1)[..., :C].to(x.dtype)  # [T, K, C]
        dispatch = torch.einsum("tke,tkc->tec", oh_e, oh_c).view(G, S, E, C)  # [G, S, E, C]
        combine = torch.einsum("tk,tke,tkc->tec", w.to(x.dtype), oh_e, oh_c).view(G, S, E, C)
        xe = torch.einsum("gsd,gsec->egcd", x.view(G, S, D), dispatch).reshape(E, G * C, D)  # [E, G*C, D]
        h = F.gelu(torch.einsum("end,ehd->enh", xe, p.w1) + p.b1[:, None])  # [E, G*C, H]
        o = torch.einsum("enh,edh->end", h, p.w2) + p.b2[:, None]  # [E, G*C, D]
        return torch.einsum("egcd,gsec->gsd", o.view(E, G, C, D), combine).reshape(T, D)

    return fn


def loop_impl(case: LayerCase, p: Params) -> Callable[[Tensor], Tensor]:
    E = case.experts
    S, C = routing_groups(case)
    experts = _per_expert(p)

    def fn(x: Tensor) -> Tensor:
        T, D = x.shape
        w, idx = gate(case, x, p)
        keep = positions(idx, E, S) < C
        flat_e = torch.where(keep, idx, -1).reshape(-1)  # [T*K]
        flat_w = w.reshape(-1)
        tok = torch.arange(T, device=x.device).repeat_interleave(case.k)  # [T*K]
        y = torch.zeros_like(x)
        for e in range(E):
            sel = (flat_e == e).nonzero().squeeze(1)
            t = tok[sel]
            o = _mlp(x[t], *experts[e])
            y = y.index_add(0, t, o * flat_w[sel, None].to(x.dtype))
        return y

    fn.params = [p.router_w, p.router_b] + [t for ws in experts for t in ws]
    return fn


def padded_bmm_impl(case: LayerCase, p: Params) -> Callable[[Tensor], Tensor]:
    E = case.experts
    S, C = routing_groups(case)

    def fn(x: Tensor) -> Tensor:
        T, D = x.shape
        G = T // S
        w, idx = gate(case, x, p)
        pos = positions(idx, E, S)
        keep = (pos < C).reshape(-1)
        tok = torch.arange(T, device=x.device).repeat_interleave(case.k)  # [T*K]
        rows = (idx * (G * C) + (tok.view(T, -1) // S) * C + pos).view(-1)  # [T*K]
        rows_k, tok_k = rows[keep], tok[keep]
        buf = x.new_zeros(E * G * C, D).index_copy(0, rows_k, x[tok_k]).view(E, G * C, D)
        h = F.gelu(torch.baddbmm(p.b1[:, None], buf, p.w1.transpose(1, 2)))  # [E, G*C, H]
        o = torch.baddbmm(p.b2[:, None], h, p.w2.transpose(1, 2)).view(E * G * C, D)
        return torch.zeros_like(x).index_add(0, tok_k, o[rows_k] * w.reshape(-1)[keep, None].to(x.dtype))

    return fn


def grouped_mm_impl(case: LayerCase, p: Params) -> Callable[[Tensor], Tensor]:
    E = case.experts
    S, C = routing_groups(case)

    def fn(x: Tensor) -> Tensor:
        T, D = x.shape
        w, idx = gate(case, x, p)
        keep = (positions(idx, E, S) < C).reshape(-1)
        e_flat = torch.where(keep, idx.reshape(-1), E)  # [T*K], dropped ones sort last
        order = torch.argsort(e_flat, stable=True)
        e_sorted = e_flat[order]
        offs = torch.bincount(e_flat, minlength=E + 1)[:E].cumsum(0).to(torch.int32)  # [E] group ends
        tok = torch.arange(T, device=x.device).repeat_interleave(case.k)[order]
        kept = (e_sorted < E)[:, None]
        eb = e_sorted.clamp(max=E - 1)
        h = F.grouped_mm(x[tok], p.w1.transpose(1, 2), offs=offs) + p.b1[eb]  # [T*K, H]
        o = F.grouped_mm(F.gelu(h), p.w2.transpose(1, 2), offs=offs) + p.b2[eb]  # [T*K, D]
        contrib = torch.where(kept, o * w.reshape(-1)[order, None].to(x.dtype), 0)
        return torch.zeros_like(x).index_add(0, tok, contrib)

    return fn


def moe_kernels_impl(
    case: LayerCase, p: Params, *, train: bool = False
) -> tuple[Callable[[Tensor], Tensor | tuple[Tensor, Tensor]], torch.nn.Module]:
    """The library's layer sharing ``p``'s values (autograd on).

    ``train=False``: eval mode (no router noise), ``fn(x) -> y``. ``train=True``: train mode, as
    users train: router noise, and ``fn(x) -> (y, aux_loss)`` so the step's backward runs through
    the auxiliary losses too (``bench.measure.Step`` backpropagates both).
    """
    dev, dt = p.w1.device, p.w1.dtype
    kw = dict(num_experts=case.experts, k=case.k, device=dev, dtype=dt)
    if case.per_image:
        router = mk.PerImageRouter(case.width, case.experts, case.k, device=dev, dtype=dt)
        layer = mk.MoEMlp(case.width, case.hidden, router="external", capacity_factor=None, **kw)
        with torch.no_grad():
            router.proj.weight.copy_(p.router_w)
            router.proj.bias.copy_(p.router_b)
    else:
        router = None
        layer = mk.MoEMlp(case.width, case.hidden, capacity_factor=case.capacity_factor,
                          group_size=case.group_size, **kw)
        with torch.no_grad():
            layer.router.weight.copy_(p.router_w)
    with torch.no_grad():
        for name in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"):
            getattr(layer, name).copy_(getattr(p, {"fc1_weight": "w1", "fc1_bias": "b1",
                                                   "fc2_weight": "w2", "fc2_bias": "b2"}[name]))
    mods = torch.nn.ModuleList([m for m in (router, layer) if m is not None])
    mods.train(train)

    def fn(x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        if router is None:
            y = layer(x)
        else:
            B = case.tokens // case.per_image
            y = layer(x, routing=router(x.view(B, case.per_image, -1)))
        return (y, layer.aux_loss) if train else y

    return fn, mods


def kept_rows(fn: Callable, mods: torch.nn.Module, x: Tensor) -> int:
    """The assignments the layer keeps on ``x`` (one forward of ``fn``; train mode draws its own
    router noise, so this is one draw's count)."""
    with torch.no_grad():
        fn(x)
    return int(sum(int(s.tokens_per_expert.sum()) for s in mk.routing_stats(mods).values()))


def dense_impl(p: Params, rows: int) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """A dense MLP of the layer's active FLOPs: ``F.linear -> GELU -> F.linear`` on ``rows`` rows
    (the assignments the layer keeps), expert 0's weights and biases, in ``p``'s dtype.

    Returns ``(fn, input [rows, D])``; ``fn.params`` are its four leaves.
    """
    w1, b1, w2, b2 = (t[0].detach().clone().requires_grad_(True) for t in (p.w1, p.b1, p.w2, p.b2))
    g = torch.Generator().manual_seed(4)
    inp = torch.randn(rows, p.w1.shape[2], generator=g).to(p.w1.device, p.w1.dtype)  # [R, D]

    def fn(h: Tensor) -> Tensor:
        return _mlp(h, w1, b1, w2, b2)  # [R, D]

    fn.params = [w1, b1, w2, b2]
    return fn, inp


def floor_impl(
    case: LayerCase, p: Params, x: Tensor, form: str = "bmm"
) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """The expert GEMMs on a buffer already dispatched by the layer's own routing.

    Args:
        form: one of ``FLOOR_FORMS`` for capacity cases; dropless ones ignore it (one GEMM pair
            per expert, ``"per_expert"``).

    Returns ``(fn, buffer)``: ``fn(buffer)`` runs fc1, GELU, fc2 with the layer's shapes;
    ``fn.form`` names the formulation.
    """
    with torch.no_grad():
        w, idx = gate(case, x, p)
    if case.per_image:
        # Dropless: each expert's rows are contiguous; one GEMM pair per expert.
        counts = torch.bincount(idx.view(-1), minlength=case.experts).tolist()
        bounds = [0]
        for c in counts:
            bounds.append(bounds[-1] + c)
        buf = torch.randn(bounds[-1], case.width, dtype=x.dtype, device=x.device)
        experts = _per_expert(p)

        def fn(b: Tensor) -> Tensor:
            outs = [
                _mlp(b[lo:hi], *experts[e])
                for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
                if hi > lo
            ]
            return torch.cat(outs)

        fn.params = [t for ws in experts for t in ws]
        fn.form = "per_expert"
        return fn, buf
    if form not in FLOOR_FORMS:
        raise ValueError(f"floor_impl: form must be one of {FLOOR_FORMS} for a capacity case, got {form!r}")
    G, C = case.groups, case.capacity
    buf = torch.randn(case.experts, G * C, case.width, dtype=x.dtype, device=x.device)  # [E, G*C, D]
    if form == "baddbmm_t":

        def fn(b: Tensor) -> Tensor:
            h = F.gelu(torch.baddbmm(p.b1[:, None], b, p.w1.transpose(1, 2)))  # [E, G*C, H]
            return torch.baddbmm(p.b2[:, None], h, p.w2.transpose(1, 2))  # [E, G*C, D]

        fn.params = [p.w1, p.b1, p.w2, p.b2]
    else:
        # The weights stored K-major, as a bmm user would keep them: no transposed operand.
        w1t, w2t = (t.detach().transpose(1, 2).contiguous().requires_grad_(True) for t in (p.w1, p.w2))

        def fn(b: Tensor) -> Tensor:
            h = F.gelu(torch.bmm(b, w1t) + p.b1[:, None])  # [E, G*C, H]
            return torch.bmm(h, w2t) + p.b2[:, None]  # [E, G*C, D]

        fn.params = [w1t, p.b1, w2t, p.b2]
    fn.form = form
    return fn, buf


BUILDERS = {
    "einsum": einsum_impl,
    "loop": loop_impl,
    "padded_bmm": padded_bmm_impl,
    "grouped_mm": grouped_mm_impl,
}


def grouped_mm_unsupported(dtype: torch.dtype, device: torch.device) -> str | None:
    """Why torch's grouped_mm cannot run here, or None."""
    if not hasattr(F, "grouped_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm"
    try:
        a = torch.randn(8, 8, dtype=dtype, device=device)
        b = torch.randn(2, 8, 8, dtype=dtype, device=device).transpose(1, 2)
        F.grouped_mm(a, b, offs=torch.tensor([3, 8], dtype=torch.int32, device=device))
    except Exception as exc:  # e.g. bf16 on CPU: "strides should be multiple of 16 bytes"
        return f"torch grouped_mm fails for {dtype} on {device.type}: {exc}"
    return None

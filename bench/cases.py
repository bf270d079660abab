"""Benchmark cases: whole MoE layers at the shapes of the papers' models, and each op alone.

Shape letters: T tokens, D width, H expert hidden width, E experts, K choices, S group size,
C capacity per (group, expert), B images, N tokens per image.
"""

from __future__ import annotations

import dataclasses

import moe_kernels as mk


@dataclasses.dataclass(frozen=True)
class LayerCase:
    """One MoE layer call. ``per_image`` routes every token of an image to the image's K experts
    (Mobile V-MoE, dropless); otherwise tokens route alone, V-MoE style, in groups of S."""

    name: str
    tokens: int  # T
    width: int  # D
    hidden: int  # H
    experts: int  # E
    k: int  # K
    capacity_factor: float | None  # None: dropless
    group_size: int  # S
    per_image: int = 0  # N tokens per image when routing per image

    @property
    def capacity(self) -> int | None:
        if self.per_image:
            return None
        return mk.compute_capacity(self.group_size, self.experts, self.k, self.capacity_factor)

    @property
    def groups(self) -> int:
        return self.tokens // self.group_size

    def gemm_flops(self, rows: int) -> float:
        """FLOPs of the two expert matmuls, forward, over ``rows`` buffer rows."""
        return 2.0 * rows * self.width * self.hidden * 2


# V-MoE-S/32: one routing group of 8 images x 50 tokens (DESIGN.md section 3 examples).
VMOE_S32 = LayerCase("vmoe_s32", 400, 512, 2048, 8, 2, 1.05, 400)
# V-MoE-B/16: one group of 8 images x 197 tokens.
VMOE_B16 = LayerCase("vmoe_b16", 1576, 768, 3072, 32, 2, 1.05, 1576)
# Mobile V-MoE tiny: 64 images x 197 tokens, per-image top-2 of 10 experts, dropless.
MOBILE_TINY = LayerCase("mobile_tiny", 64 * 197, 192, 768, 10, 2, None, 197, per_image=197)

# The "<= 1.10x dense at T=4096, E=32" (bench.report.DENSE_LIMITS_BY_SHAPE): V-MoE-S/32
# widths, K=2, c=1.05, all 4096 tokens in one routing group: C = ceil(4096*2*1.05/32) = 269,
# rounded up to 272 (an effective c of 1.0625). One group, not groups of 400 (4096 is no multiple
# of 400), and the same group size as EXPERT_SWEEP, of which this is the E=32 point.
VMOE_S32_T4096_E32 = LayerCase("vmoe_s32_T4096_E32", 4096, 512, 2048, 32, 2, 1.05, 4096)

MAIN_CASES = (VMOE_S32, VMOE_B16, MOBILE_TINY, VMOE_S32_T4096_E32)


def token_sweep(base: LayerCase, groups: tuple[int, ...], prefix: str) -> tuple[LayerCase, ...]:
    """``base`` on 1 or more routing groups of its S tokens: ``{prefix}_T{T}`` for T = S*g."""
    return tuple(
        dataclasses.replace(base, name=f"{prefix}_T{base.group_size * g}", tokens=base.group_size * g) for g in groups
    )


def expert_sweep(base: LayerCase, experts: tuple[int, ...], prefix: str) -> tuple[LayerCase, ...]:
    """``base`` with E experts each, D, H, K, S and T fixed: the active FLOPs per token do not
    change with E (K expert MLPs of D x H per token), the parameters grow as E."""
    return tuple(dataclasses.replace(base, name=f"{prefix}_T{base.tokens}_E{e}", experts=e) for e in experts)


# Token sweep at V-MoE-S/32 widths (E=8, groups of S=400, C=108): 1 to 41 groups, T=400 to
# 16,400 (41 groups: the first multiple of 400 at or above T=16,384). Time per token should stay
# flat: the cost grows linearly in T. `python -m bench.sweep` (docs/sweep.md).
TOKEN_SWEEP = token_sweep(VMOE_S32, (1, 2, 4, 8, 16, 32, 41), "sweep_s32")
# `python -m bench` runs the first four (1 to 8 groups) against the baselines too.
SWEEP_CASES = TOKEN_SWEEP[:4]

# Expert sweep at V-MoE-S/32 widths: T=4096 in one group of S=4096, K=2, c=1.05, E = 8, 32, 128.
# One group of 4096 keeps the capacity's rounding (up to a multiple of 4) from changing the
# effective capacity factor with E, so the kept assignments (the active FLOPs) stay about the
# same: C = 1076, 272, 68, an effective c of 1.051, 1.0625, 1.0625 (groups of 1024 would give
# C = 20 at E=128, c = 1.25; groups of 400, C = 8, c = 1.28). At E=128 an expert still gets 64
# assignments on average and C = 68 slots. The weights grow as E: 8 MB of fc1 + fc2 per expert
# in fp32, 1 GB at E=128 (and as much again in gradients).
EXPERT_SWEEP = expert_sweep(VMOE_S32_T4096_E32, (8, 32, 128), "sweep_s32")

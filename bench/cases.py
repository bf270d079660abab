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

MAIN_CASES = (VMOE_S32, VMOE_B16, MOBILE_TINY)

# Token sweep at V-MoE-S/32 widths: 1, 2, 4 and 8 groups of 400 tokens.
SWEEP_CASES = tuple(dataclasses.replace(VMOE_S32, name=f"sweep_s32_T{400 * g}", tokens=400 * g) for g in (1, 2, 4, 8))

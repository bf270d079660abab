"""Triton kernels of the ``triton`` backend: ``@triton.jit`` code only, no torch glue.

The launchers that allocate outputs and pick grids live in ``moe_kernels.ops._triton``.

  gating            fused softmax + top-K over experts, and its backward
  routing           per-chunk expert histogram and K-major positions (capacity / dropless)
  dispatch_combine  dispatch (tokens -> buffer rows), combine (buffer rows -> tokens), combine_weights_grad
  grouped_mm        grouped GEMM over ``offsets`` row ranges: forward (dX too) and weight gradient

Shape letters: T tokens, D width, E experts, K choices per token, G groups, S group size,
C capacity, R buffer rows, M rows of a grouped matmul, N output width, KD reduction width.
"""

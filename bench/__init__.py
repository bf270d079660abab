"""moe_kernels benchmark suite: ``python -m bench [--quick] [--json PATH] [--plot PATH]``; the token and
expert sweeps (time per token): ``python -m bench.sweep`` (docs/sweep.md)."""

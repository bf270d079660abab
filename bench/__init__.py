"""moe_kernels benchmark suite: ``python -m bench [--quick] [--json PATH] [--plot PATH]``."""

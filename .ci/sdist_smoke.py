"""Run by ``make sdist-check`` in the fresh virtual environment, from outside the checkout: the
installed package (not a source tree) is imported, its _C loaded, and one layer runs."""

import os

import torch

import moe_kernels as mk
from moe_kernels import _ext

assert not _ext.SOURCE_CHECKOUT, f"imported a source checkout: {_ext.PACKAGE_DIR}"
assert "site-packages" in _ext.PACKAGE_DIR, _ext.PACKAGE_DIR
assert _ext.LOADED, _ext.LOAD_ERROR
layer = mk.MoEMlp(32, 64, num_experts=4, k=2, group_images=2)
x = torch.randn(3, 5, 32, requires_grad=True)
y = layer(x)
y.sum().backward()
assert y.shape == x.shape and x.grad is not None and torch.isfinite(y).all()
print(f"sdist smoke: moe_kernels {mk.__version__} from {os.path.dirname(mk.__file__)}: forward + backward ok")

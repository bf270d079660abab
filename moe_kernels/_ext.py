"""Loads the compiled extension ``moe_kernels._C`` once and remembers why it failed, if it did.

The package works without it (the ``torch`` reference backend); ``python -m moe_kernels.info``
reports the recorded error and where the package was imported from.

A source checkout shadows an installed build: ``python -m ...`` run from the repository root
imports ``./moe_kernels``, whose ``_C`` exists only after ``make build``. When that happens while
a built copy is installed elsewhere on ``sys.path``, or the checkout was set up to be built (a
``build/`` folder or ``make``'s ``.venv``), one warning says so and how to fix it
(``MOE_KERNELS_BACKEND=torch``, a deliberate choice of the reference, silences it).
"""

from __future__ import annotations

import glob
import importlib
import os
import sys
import warnings

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(PACKAGE_DIR)


def _is_source_checkout(root: str) -> bool:
    """Whether ``root`` (the folder holding the imported ``moe_kernels/``) is the repository."""
    return all(os.path.exists(os.path.join(root, f)) for f in ("setup.py", "pyproject.toml", "csrc"))


def _built_libraries(package_dir: str) -> list[str]:
    return glob.glob(os.path.join(package_dir, "_C*.so")) + glob.glob(os.path.join(package_dir, "_C*.pyd"))


#: Whether the imported package is a source checkout (an editable install counts: it is one).
SOURCE_CHECKOUT = _is_source_checkout(_ROOT)
LOAD_ERROR: str | None = None
# MOE_KERNELS_LIBRARY=path/to/_C.so loads another build of the extension (make test-asan uses it
# for the sanitizer build, which lives outside the package).
LIBRARY = os.environ.get("MOE_KERNELS_LIBRARY")
try:
    if LIBRARY:
        torch.ops.load_library(LIBRARY)
    else:
        importlib.import_module("moe_kernels._C")  # importing registers the moe_kernels_C ops

    LOADED = True
except Exception as exc:  # ImportError, or an OSError from a broken/ABI-mismatched build
    LOADED = False
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"


def other_builds() -> list[str]:
    """Built ``moe_kernels/_C`` libraries on ``sys.path`` other than the imported package's."""
    found = []
    for entry in sys.path:
        d = os.path.join(os.path.abspath(entry or os.curdir), "moe_kernels")
        if os.path.realpath(d) != os.path.realpath(PACKAGE_DIR):
            found += _built_libraries(d)
    return sorted(set(found))


def shadowing_warning() -> str | None:
    """The warning for an unbuilt checkout that hides a build, or ``None`` when there is none."""
    if LOADED or LIBRARY or not SOURCE_CHECKOUT or _built_libraries(PACKAGE_DIR):
        return None
    if os.environ.get("MOE_KERNELS_BACKEND", "").strip().lower() == "torch":
        return None
    others = other_builds()
    expected = os.path.isdir(os.path.join(_ROOT, "build")) or os.path.exists(
        os.path.join(_ROOT, ".venv", ".moe-kernels-deps")
    )
    if not others and not expected:
        return None
    where = f"a built copy is installed at {os.path.dirname(others[0])}, " if others else ""
    return (
        f"moe_kernels was imported from the source checkout {_ROOT}, whose moe_kernels._C is not built: "
        f"{where}but every op here runs on the slow torch reference backend. Fix: run `make build` in "
        f"{_ROOT} (or `pip install --no-build-isolation -e .`), or run from another directory so that the "
        "installed package is imported. MOE_KERNELS_BACKEND=torch silences this warning."
    )


if not LOADED:
    if _built_libraries(PACKAGE_DIR):
        # A library is there but does not load: worth one warning.
        warnings.warn(f"moe_kernels._C failed to load, using the torch reference: {LOAD_ERROR}", stacklevel=2)
    elif (_msg := shadowing_warning()) is not None:
        warnings.warn(_msg, stacklevel=2)


def cuda_kernels_built() -> bool:
    """Whether ``_C`` was compiled with its CUDA sources."""
    if not LOADED:
        return False
    return bool(torch.ops.moe_kernels_C.cuda_built())


def build_info() -> str:
    """The flags ``_C`` was compiled with (empty when it did not load)."""
    if not LOADED:
        return ""
    return str(torch.ops.moe_kernels_C.build_info())

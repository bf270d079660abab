"""What a user of an installed package relies on: ``info`` says where ``moe_kernels`` came from,
and an unbuilt source checkout that shadows a build warns once with the fix.

The shadowing cases run in child processes on a copy of the package's Python files laid out as
a checkout (``setup.py``, ``pyproject.toml``, ``csrc/``) without ``_C``, imported from its root
as ``python -m ...`` from a clone would; a built copy elsewhere is a ``moe_kernels/_C*.so`` in
another ``sys.path`` folder. (``make sdist-check`` covers the real sdist, wheel and install.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import moe_kernels as mk
from moe_kernels import _ext, info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARNING = "whose moe_kernels._C is not built"


def test_info_says_where_moe_kernels_was_imported_from():
    text = info.report()
    assert f"imported from      {os.path.join(ROOT, 'moe_kernels')} (a source checkout)" in text
    assert _ext.SOURCE_CHECKOUT and _ext.PACKAGE_DIR == os.path.dirname(mk.__file__)


def test_one_version_source():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert "version" not in project and project["dynamic"] == ["version"]
    assert project["license"] == "Apache-2.0"
    with open(os.path.join(ROOT, "LICENSE")) as f:
        assert "Apache License" in f.readline() + f.readline() and "END OF TERMS AND CONDITIONS" in f.read()


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """An unbuilt checkout (root with setup.py, pyproject.toml, csrc/ and moe_kernels/*.py) and
    a folder holding a "built" moe_kernels/_C library."""
    base = tmp_path_factory.mktemp("shadow")
    root = base / "checkout"
    shutil.copytree(
        os.path.join(ROOT, "moe_kernels"), root / "moe_kernels", ignore=shutil.ignore_patterns("*.so", "__pycache__")
    )
    for f in ("setup.py", "pyproject.toml"):
        shutil.copy(os.path.join(ROOT, f), root / f)
    (root / "csrc").mkdir()
    other = base / "site" / "moe_kernels"
    other.mkdir(parents=True)
    (other / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    return root, other.parent


def _import(root, *, pythonpath=None, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("MOE_KERNELS_LIBRARY", "MOE_KERNELS_BACKEND", "PYTHONPATH")}
    e.update(env)
    if pythonpath:
        e["PYTHONPATH"] = str(pythonpath)
    # Without the editable install's finder of the test venv, which would resolve moe_kernels._C
    # to this repository's build whatever package was imported.
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]\n"
        "import moe_kernels, moe_kernels.info as i; print(i.report())"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=root, env=e, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return p.stdout, p.stderr


def test_unbuilt_checkout_shadowing_a_build_warns_once_with_the_fix(checkout):
    root, site = checkout
    out, err = _import(root, pythonpath=site)
    assert err.count(WARNING) == 1, err
    assert f"a built copy is installed at {site / 'moe_kernels'}" in err
    assert "run `make build` in" in err and "or run from another directory" in err
    assert f"imported from      {root / 'moe_kernels'} (a source checkout)" in out
    assert "_C loaded          False" in out and "warning" in out  # info repeats it
    # A deliberate choice of the reference backend is not a mistake: no warning.
    _, err = _import(root, pythonpath=site, MOE_KERNELS_BACKEND="torch")
    assert WARNING not in err


def test_unbuilt_checkout_warns_only_when_a_build_exists_or_was_expected(checkout):
    root, _ = checkout
    _, err = _import(root)  # a pure-Python checkout, nothing built anywhere: quiet
    assert WARNING not in err, err
    (root / "build").mkdir()  # a build was started here (make build, setup.py build_ext)
    try:
        _, err = _import(root)
        assert err.count(WARNING) == 1 and "make build" in err, err
    finally:
        (root / "build").rmdir()

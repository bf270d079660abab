"""Checks what the sdist and the wheel in a folder carry (``make sdist-check`` runs it).

- the sdist: every file under csrc/ (sources *and* headers: a missing header fails the build
  only on a user's machine), LICENSE, README.md, setup.py, pyproject.toml and the package;
- the wheel: the top level is ``moe_kernels`` (and its .dist-info) alone, with LICENSE in the
  .dist-info, the compiled ``moe_kernels/_C``, and no ``models/``, ``bench/`` or ``tests/``.

Usage: python .ci/check_dist.py DIST_FOLDER
"""

from __future__ import annotations

import glob
import os
import sys
import tarfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_sdist(path: str) -> list[str]:
    with tarfile.open(path) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    want = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True)}
    want = {p for p in want if os.path.isfile(os.path.join(ROOT, p))}
    want |= {"LICENSE", "README.md", "setup.py", "pyproject.toml", "moe_kernels/__init__.py"}
    return [f"sdist {os.path.basename(path)} lacks {p}" for p in sorted(want - names)]


def check_wheel(path: str) -> list[str]:
    with zipfile.ZipFile(path) as whl:
        names = whl.namelist()
    top = {n.split("/", 1)[0] for n in names}
    extra = sorted(t for t in top if t != "moe_kernels" and not t.endswith(".dist-info"))
    problems = [f"wheel top level has {t!r} (only moe_kernels belongs there)" for t in extra]
    if not any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names):
        problems.append("wheel has no LICENSE in its .dist-info")
    if not any(n.startswith("moe_kernels/_C") and n.endswith(".so") for n in names):
        problems.append("wheel has no compiled moe_kernels/_C*.so")
    return problems


def main(folder: str) -> int:
    sdists = glob.glob(os.path.join(folder, "moe_kernels-*.tar.gz"))
    wheels = glob.glob(os.path.join(folder, "moe_kernels-*.whl"))
    if len(sdists) != 1 or len(wheels) != 1:
        print(f"check_dist: expected one sdist and one wheel in {folder}, found {sdists + wheels}")
        return 1
    problems = check_sdist(sdists[0]) + check_wheel(wheels[0])
    for p in problems:
        print("check_dist:", p)
    if not problems:
        print(f"check_dist: {os.path.basename(sdists[0])} and {os.path.basename(wheels[0])} carry what they must")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "dist"))

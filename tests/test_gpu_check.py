"""``make gpu-check`` without a GPU: the dry run runs every stage's CPU code path, prints the
plan and writes a summary and one JSON per stage; every stage is bounded by a timeout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from bench import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE_NAMES = [name for name, _, _ in gpu_check.STAGES]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine make gpu-check is the real check")
@pytest.mark.skipif(shutil.which("make") is None or not os.path.exists(os.path.join(ROOT, ".venv", "bin", "python")),
                    reason="needs make and the .venv that make test sets up")  # fmt: skip
def test_make_gpu_check_dry_run(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    t0 = time.monotonic()
    proc = subprocess.run(["make", "--no-print-directory", "gpu-check", f"GPU_CHECK_OUT={out}"], cwd=ROOT,
                          env={**os.environ, "GPU_CHECK_WORK": str(work)}, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    took = time.monotonic() - t0
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert took < 180, f"the dry run took {took:.0f} s (at most 3 minutes)"
    assert "DRY RUN" in log and "plan:" in log
    for name in STAGE_NAMES:
        assert f"  {name} " in log, f"stage {name} missing from the plan"
        assert f"] {name}: ok" in log, f"stage {name} did not finish ok"
    files = sorted(os.listdir(out))
    assert len(files) <= 8, files  # what comes back from a GPU machine
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary
    for name in STAGE_NAMES:
        assert f"| {name} | 0 |" in summary
    assert set(files) == {"summary.md", "log.txt", "facts.json", "build.json", "tests.json", "introspect.json",
                          "microbench.json", "layer.json"}  # fmt: skip
    tests = json.loads((out / "tests.json").read_text())
    assert set(tests) == {"triton_tests", "cuda_tests"}
    intro = json.loads((out / "introspect.json").read_text())
    assert intro["kernels"] and intro["kernels"][0]["kernel"] == "_grouped_mm_kernel"
    if intro["cuobjdump"]:
        assert intro["kernels"][0]["n_regs"] > 0 and intro["kernels"][0]["wgmma"] > 0
    mb = json.loads((out / "microbench.json").read_text())
    ours = [r for r in mb["records"] if r["impl"].startswith("moe_kernels")]
    assert {r["op"] for r in ours} == {"fwd", "dx", "wgrad", "dispatch", "combine"}
    assert all(r["ms"] and r["ms"] > 0 for r in ours)
    layer = json.loads((out / "layer.json").read_text())
    assert {r["impl"] for r in layer["records"] if "ms" in r} == {"moe_kernels MoEMlp", "dense MLP, same active FLOPs"}
    assert "tiny" in layer["profiles"] and "grouped_mm" in layer["profiles"]["tiny"]
    build = json.loads((out / "build.json").read_text())
    assert build["env"]["TORCH_CUDA_ARCH_LIST"] == "9.0a" and build["env"]["MAX_JOBS"] == "16"


def test_a_stage_past_its_timeout_is_killed(tmp_path):
    t0 = time.monotonic()
    res = gpu_check._run_child([sys.executable, "-c", "import time; time.sleep(60)"], 1.0, str(tmp_path / "log"),
                               dict(os.environ))  # fmt: skip
    assert res["timed_out"] and time.monotonic() - t0 < 10


def test_stage_timeouts_fit_the_budget(tmp_path):
    check = gpu_check.Check(str(tmp_path / "out"), str(tmp_path / "work"), budget=540, dry_run=True)
    caps = dict((n, c) for n, c, _ in gpu_check.STAGES)
    total_reserve = sum(gpu_check.RESERVE.values())
    for name in STAGE_NAMES:
        t = check.timeout_for(name)
        assert 5 <= t <= caps[name]
        assert t <= check.remaining()
    assert total_reserve < 540 - 60  # the first stages keep at least a minute
    check.budget = 30  # late in the run: later stages keep their reserve, the stage gets the rest
    assert check.timeout_for("triton_tests") == 5.0


def test_build_is_skipped_when_cuda_majors_differ(monkeypatch):
    monkeypatch.setattr(gpu_check, "nvcc_cuda_version", lambda: "12.8")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    d = gpu_check.build_decision()
    assert not d["build"] and "differ in their major version" in d["reason"]
    monkeypatch.setattr(gpu_check, "nvcc_cuda_version", lambda: "13.0")
    assert gpu_check.build_decision()["build"]

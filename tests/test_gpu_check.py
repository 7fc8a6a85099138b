"""benchmarks/gpu_check.py: it runs to its skip line without CUDA (CI), and its checks pass on
the CPU (``--device cpu``), so the script is known to work before it meets a GPU."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import PYTHON, REPO

SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.py")


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, SCRIPT, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600)  # fmt: skip


def test_skips_without_cuda_or_passes_with_it():
    """Guards the skip: exit 0 with one line saying why (never a failure for lack of a GPU)."""
    proc = gpu_check("-n", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu_check: skipped: ") or last == "gpu_check: all checks passed"


@pytest.mark.torch
def test_checks_pass_on_the_cpu():
    """Guards the check's own plumbing (warm-up model in a warm child, the barrier that keeps
    two children alive at once, the server's fds, cold against warm) on any machine."""
    pytest.importorskip("transformers")
    proc = gpu_check("--device", "cpu", "-n", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout and proc.stdout.endswith("gpu_check: all checks passed\n")
    assert "two concurrent warm children both ran the model on the device" in proc.stdout
    assert "warm / python" in proc.stdout

"""What a newcomer meets at the command line: help, refusals, damaged files, platforms.

Each case runs the real CLI (``python -m preloaded.cli``) or a real starter in a subprocess.
"""

from __future__ import annotations

import os
import subprocess

from conftest import PYTHON, REPO, server_pids

# Run py-preload's CLI, or a starter, in an interpreter that believes it is on another system.
# The starter is the file itself, run as its shebang would (python -SI FILE ARGS).
FAKE_OS = "import sys, runpy; sys.platform = 'darwin'; sys.argv = sys.argv[1:]; "
FAKE_CLI = FAKE_OS + "runpy.run_module('preloaded.cli', run_name='__main__')"
FAKE_STARTER = FAKE_OS + "runpy.run_path(sys.argv[0], run_name='__main__')"


def test_bundle_on_another_system_stops_with_one_line(tmp_path):
    out = tmp_path / "python-j.bin"
    proc = subprocess.run([PYTHON, "-c", FAKE_CLI, "py-preload", "bundle", "json", "-o", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1
    assert "needs Linux" in proc.stderr and "darwin" in proc.stderr
    assert not out.exists()


def test_a_starter_on_another_system_runs_python_cold_with_one_warning(tmp_path, light_bundle):
    before = server_pids()
    proc = subprocess.run(
        [PYTHON, "-SI", "-c", FAKE_STARTER, light_bundle, "-c", "import sys; print(sys.argv)", "a"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "['-c', 'a']\n"  # python's own run (the cold exec)
    assert proc.stderr == "py-preload: the server needs Linux, not darwin; running without it\n"
    assert server_pids() == before  # no server was started for it


def test_pyproject_says_linux():
    with open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8") as f:
        assert '"Operating System :: POSIX :: Linux"' in f.read()



"""Shared fixtures: a private runtime/cache directory per test session, bundles, cleanup.

Every server a test starts lives under the session's own XDG_RUNTIME_DIR, and all of them are
stopped (and, if need be, killed) when the session ends.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

PYTHON = sys.executable  # the venv's interpreter, symlink kept (never the pyenv shim)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SESSION_DIR = tempfile.mkdtemp(prefix="py-preload-tests-")
os.environ["XDG_RUNTIME_DIR"] = os.path.join(_SESSION_DIR, "run")
os.environ["XDG_CACHE_HOME"] = os.path.join(_SESSION_DIR, "cache")
os.makedirs(os.environ["XDG_RUNTIME_DIR"], mode=0o700)
# Hypothesis would create .hypothesis/ in the repository, a directory on every server's sys.path:
# that change makes all running servers stale in the middle of the session.
os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = os.path.join(_SESSION_DIR, "hypothesis")
os.environ.pop("PY_PRELOAD_COLD", None)
# The memory budget's settings (preloaded/server/budget.py): none from the developer's config
# or environment; and no server retires for low memory while other tests need it (a test of
# it sets its own threshold).
os.environ["XDG_CONFIG_HOME"] = os.path.join(_SESSION_DIR, "config")
os.environ.pop("PY_PRELOAD_MEMORY_BUDGET", None)
os.environ["PY_PRELOAD_LOW_MEMORY"] = "off"


def cli(*args, check=True, **kw) -> subprocess.CompletedProcess:
    """Run the py-preload CLI (this checkout) with the session's environment."""
    proc = subprocess.run([PYTHON, "-m", "preloaded.cli", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=120, **kw)  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"py-preload {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def make_bundle(path, *modules, idle_timeout=600) -> str:
    cli("bundle", *modules, "-o", str(path), "--idle-timeout", str(idle_timeout))
    return str(path)


def server_pids() -> list:
    """PIDs of this session's servers (from their info files)."""
    import json

    directory = os.path.join(os.environ["XDG_RUNTIME_DIR"], "py-preload")
    pids = []
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.endswith(".json"):
                try:
                    with open(os.path.join(directory, name)) as f:
                        pids.append(json.load(f)["pid"])
                except (OSError, ValueError):
                    pass
    return pids


@pytest.fixture(scope="session")
def bundle_dir():
    return _SESSION_DIR


@pytest.fixture
def module_dir(tmp_path):
    """A directory of fake modules, importable by bundles made with ``test_server.bundle_from``."""
    directory = tmp_path / "mods"
    directory.mkdir()
    return directory


@pytest.fixture(scope="session")
def light_bundle(bundle_dir):
    """A starter preloading small stdlib modules: fast to start, for most tests."""
    return make_bundle(os.path.join(bundle_dir, "python-light.bin"), "json", "decimal")


def pytest_sessionfinish(session, exitstatus):
    pids = server_pids()
    cli("stop", "--all", check=False)
    import time

    import psutil

    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for child in proc.children(recursive=True):
                child.kill()
            proc.wait(3)
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.05)
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)

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
from pathlib import Path

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


def _default_dispositions() -> None:
    """The suite's processes (python's oracle runs, starters, servers) start with the default
    dispositions however the suite itself was started: `nohup bin/test` ignores SIGHUP, and a
    script's `bin/test &` SIGINT and SIGQUIT, which every child would inherit (python keeps
    them ignored, so would the warm runs). A test that needs one ignored says so itself."""
    for signum in (signal.SIGHUP, signal.SIGQUIT):
        if signal.getsignal(signum) == signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


_default_dispositions()


def cli(*args, check=True, **kw) -> subprocess.CompletedProcess:
    """Run the py-preload CLI (this checkout) with the session's environment."""
    proc = subprocess.run([PYTHON, "-m", "preloaded.cli", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=120, **kw)  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"py-preload {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def bare_venv(directory) -> tuple:
    """(interpreter, site-packages) of a new venv in ``directory`` holding nothing but the
    standard library (``--without-pip``: a few ms)."""
    subprocess.run([PYTHON, "-m", "venv", "--without-pip", str(directory)], check=True,
                   timeout=60)  # fmt: skip
    python = str(Path(directory) / "bin" / "python")
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = subprocess.run([python, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()  # fmt: skip
    return python, site


def make_bundle(path, *modules, idle_timeout=600, client=None) -> str:
    client_args = ("--client", client) if client else ()
    cli("bundle", *modules, "-o", str(path), "--idle-timeout", str(idle_timeout), *client_args)
    return str(path)


def need_native() -> None:
    """Skip the test where no C compiler can build the native client."""
    from preloaded.install import nativebuild

    try:
        nativebuild.build()
    except nativebuild.BuildError as exc:
        pytest.skip(f"no native client here: {exc}")


def native_only(path, *modules, binary=None) -> str:
    """A native starter whose server runs, and which cannot fall back to Python.

    The fallback's PKG_ROOT (a field only the C client reads) points nowhere, so that a run the
    C client does not take itself fails ("No module named 'preloaded'") instead of passing
    through the Python starter: tests that use it check the C client, not the Python one. The
    server is started first, through the intact starter, and the file keeps its mtime (the
    server would retire as stale otherwise).
    """
    need_native()
    make_bundle(path, *modules, idle_timeout=3600, client="native")
    if binary:  # another build of the client (the sanitized one)
        from preloaded.install import installer, nativebuild

        data = nativebuild.starter_bytes(installer.starter_config(str(path)), binary)
        with open(path, "wb") as f:
            f.write(data)
    subprocess.run([str(path), "-c", "pass"], check=True, timeout=120, capture_output=True,
                   stdin=subprocess.DEVNULL)  # fmt: skip
    disable_fallback(path)
    return str(path)


def disable_fallback(path) -> None:
    """Point the native starter's fallback PKG_ROOT nowhere, keeping the file's mtime."""
    from preloaded.client import native

    st = os.stat(path)
    with open(path, "rb") as f:
        data = f.read()
    length = int(data[-native.TRAILER + len(native.MAGIC) :], 16)
    binary, block = data[: -native.TRAILER - length], data[-native.TRAILER - length : -native.TRAILER]
    fields = block.split(b"\0")[:4]
    fields[3] = b"/nonexistent-py-preload-fallback"
    block = b"".join(field + b"\0" for field in fields)
    with open(path, "wb") as f:
        f.write(binary + block + native.MAGIC + b"%08x" % len(block))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


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
    return make_bundle(os.path.join(bundle_dir, "python-light.bin"), "json", "decimal",
                       client="python")


@pytest.fixture(scope="session")
def native_bundle(bundle_dir):
    """The light bundle as a native starter (it falls back to Python where it must)."""
    need_native()
    return make_bundle(os.path.join(bundle_dir, "python-light-native.bin"), "json", "decimal",
                       client="native")


@pytest.fixture(scope="module")
def native_strict(bundle_dir):
    """The light bundle as a native starter that cannot fall back: see ``native_only``. Made
    again for a module when its server is gone (a test module in between stopped every server
    of the session: its runs cannot start one)."""
    path = os.path.join(bundle_dir, "python-light-strict.bin")
    if not serving(path):
        native_only(path, "json", "decimal")
    return path


def serving(path) -> bool:
    """Whether a server of the bundle ``path`` listens on its socket."""
    import socket

    from preloaded.paths import Paths

    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(Paths(path).socket)
        except OSError:
            return False
    return True


def pytest_sessionfinish(session, exitstatus):
    pids = server_pids()
    cli("stop", "--all", "--now", check=False)
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

"""First run: start the bundle's server and wait until it serves (stdlib only).

Only one server starts even when many first runs race: they queue on an flock(2) of the
bundle's spawn lock (the same lock ``filelock`` takes on Unix, without importing it on this
path), and whoever gets it first starts the server while the others then find it listening.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time

from preloaded.client.connection import Fallback, connect

START_TIMEOUT = 600.0  # seconds; importing torch from a cold network file system can be slow
FAILED_BACKOFF = 30.0  # after a failed start, run cold without retrying for this long
ALREADY_RUNNING = 3  # server exit status: another server holds the bundle's lock
ORPHAN_GRACE = 2.0  # after ALREADY_RUNNING, how long the other server has to show its socket


def server_env(env) -> dict:
    """The caller's environment without PYTHON* variables.

    The server must not take the first caller's PYTHONPATH, PYTHONWARNINGS, ...: every child
    applies its own caller's over the server's state.
    """
    clean = {k: v for k, v in env.items() if not k.startswith("PYTHON")}
    clean["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # is_available() must not initialise CUDA
    if sys.flags.utf8_mode:
        # The C locale: python (as this starter) runs in UTF-8 mode, after coercing LC_CTYPE
        # to C.UTF-8 in the environment, which alone would not put the server in it.
        clean["PYTHONUTF8"] = "1"
    return clean


def server_argv(config: dict, bundle: str) -> list:
    import json

    # The modules python imports while starting, before sys.path[0] exists: no local file
    # shadows those (see server/shadowing.py). Taken first, before py-preload's own imports.
    boot = (
        "import sys; s = frozenset(sys.modules); sys.path.append(sys.argv.pop(1)); "
        "from preloaded.server.keeper import split; split(); "
        "from preloaded.server.loop import main; main(s)"
    )
    payload = json.dumps({**config, "bundle": os.path.abspath(bundle)})
    return [config["python"], "-c", boot, config["pkg_root"], payload]


def start_and_connect(config: dict, bundle: str, paths):
    """Start the server (unless another run is already doing so) and return a connection."""
    _check_recent_failure(paths, config)
    try:
        lock_fd = os.open(paths.spawn_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:  # a runtime directory we may not write to
        raise Fallback(f"cannot create {paths.spawn_lock}: {exc.strerror}") from exc
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        sock = connect(paths.socket)  # someone else may have started it while we queued
        if sock is not None:
            return sock
        _check_recent_failure(paths, config)
        if config.get("overlay"):
            from preloaded.client import overlay

            overlay.ensure(config)  # first run: install what the bundle needs (exit 1 if not)
        return _start(config, bundle, paths)
    finally:
        os.close(lock_fd)  # releases the flock


def _check_recent_failure(paths, config: dict) -> None:
    try:
        st = os.stat(paths.failed)
    except OSError:
        return
    if config.get("warmup") and _mtime(config["warmup"]) > st.st_mtime:
        return  # the warm-up was edited since it failed: try it now, not after the back-off
    if time.time() - st.st_mtime < FAILED_BACKOFF:
        raise Fallback(f"the server failed to start: {_read_failure(paths)}")


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def _read_failure(paths) -> str:
    try:
        with open(paths.failed, encoding="utf-8") as f:
            return f.read().strip() or "no reason given"
    except OSError:
        return f"see {paths.log}"


def _start(config: dict, bundle: str, paths):
    import subprocess

    try:
        os.unlink(paths.failed)
    except OSError:
        pass
    try:
        proc = subprocess.Popen(
            server_argv(config, bundle),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
            env=server_env(os.environ),
            start_new_session=True,  # no controlling terminal, out of the caller's job
        )
    except OSError as exc:  # fork refused (RLIMIT_NPROC, pids cgroup) or no interpreter
        raise Fallback(f"cannot start the server: {exc.strerror}") from exc
    note = _Progress(config)
    try:
        return _wait_ready(proc, paths, note)
    finally:
        note.clear()


def _wait_ready(proc, paths, note):
    deadline = time.monotonic() + START_TIMEOUT
    delay = 0.005
    while time.monotonic() < deadline:
        sock = connect(paths.socket)
        if sock is not None:
            return sock
        code = proc.poll()
        if code is not None and code != ALREADY_RUNNING:
            raise Fallback(f"the server failed to start: {_read_failure(paths)}")
        if code == ALREADY_RUNNING and deadline > time.monotonic() + ORPHAN_GRACE:
            # Another server holds the lock: it may be about to listen; it must not take long.
            deadline = time.monotonic() + ORPHAN_GRACE
        note.tick()
        time.sleep(delay)
        delay = min(delay * 1.5, 0.05)
    if proc.poll() == ALREADY_RUNNING:
        raise Fallback("another server of this bundle holds its lock but has no socket; "
                       "`py-preload stop --all` or kill it")
    raise Fallback(f"the server did not start within {START_TIMEOUT:.0f} s (see {paths.log})")


class _Progress:
    """A one-line note on stderr while the modules import; only when stderr is a terminal.

    Ticked every few ms while waiting for the server: drawn only when its text changes (whole
    seconds elapsed, never rounded up)."""

    def __init__(self, config: dict) -> None:
        self.shown = ""
        self.started = time.monotonic()
        self.enabled = os.isatty(2)
        self.text = "py-preload: warming " + ", ".join(config["modules"])

    def tick(self) -> None:
        elapsed = time.monotonic() - self.started
        if not self.enabled or elapsed <= 0.2:
            return
        line = f"{self.text} ({int(elapsed)} s)"
        if line != self.shown:
            sys.stderr.write(f"\r\x1b[K{line}")
            sys.stderr.flush()
            self.shown = line

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()

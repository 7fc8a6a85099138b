"""``py-preload bench``: the user's command cold (the real interpreter) against warm (the starter).

Two measures, as container lazy-loaders report them: time to completion (the command runs to
its end), or time to readiness (until a URL first answers HTTP 200; the command, a server, is
then stopped). Cold and warm runs alternate so that machine noise hits both alike. Not on the
starter path: httpx is imported here, and only for readiness.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse

POLL = 0.005  # seconds between readiness probes: small against a warm start (~50 ms)
STOP_GRACE = 5.0  # SIGTERM, then SIGKILL after this long
PORT_FREE_WAIT = 10.0  # the next run needs the port; a stopped server frees it in milliseconds


class BenchError(Exception):
    """A bench that cannot go on; the message is one line. ``exit_code`` 2 for bad input."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Progress:
    """One status line on stderr: rewritten in place on a terminal, plain lines otherwise."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()

    def show(self, text: str) -> None:
        self.stream.write(f"\r\033[K{text}" if self.tty else text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


def load_bundle(file: str) -> dict:
    """The config of the starter ``file``; BenchError (exit status 2) if it is not one."""
    from preloaded.install import installer as install

    if not os.path.exists(file):
        raise BenchError(f"no such file: {file}", 2)
    if not os.path.isfile(file):
        raise BenchError(f"{file} is not a file; pass a starter written by py-preload bundle", 2)
    try:
        return install.starter_config(file)
    except install.InstallError:
        raise BenchError(f"{file} is not a starter written by py-preload bundle", 2) from None


def commands(file: str, config: dict, args: list) -> dict:
    """argv and environment of the cold and the warm run of python ``args``."""
    from preloaded.client.starter import with_overlay

    env = dict(os.environ)
    env.pop("PY_PRELOAD_COLD", None)  # would make the warm runs cold
    cold_env = dict(env)
    if config.get("overlay"):  # what the starter's own cold path does: see the same packages
        cold_env["PYTHONPATH"] = with_overlay(env.get("PYTHONPATH", ""), config["overlay"])
    starter = file if os.sep in file else os.path.join(os.curdir, file)
    return {
        "cold": ([config["python"], *args], cold_env),
        "warm": ([starter, *args], env),
    }


def start(argv: list, env: dict, errors) -> subprocess.Popen:
    """Start ``argv`` in a process group of its own (so that stopping it stops all of it)."""
    try:
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=errors,
                                start_new_session=True)  # fmt: skip
    except OSError as exc:
        raise BenchError(f"cannot run {argv[0]}: {exc.strerror}") from exc


def stop(proc: subprocess.Popen) -> None:
    """End ``proc`` and its process group: SIGTERM, SIGKILL after STOP_GRACE; reap it."""
    if proc.poll() is None:
        _killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _killpg(proc.pid, signal.SIGKILL)  # what the leader left behind in its group


def _killpg(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _last_line(errors) -> str:
    errors.seek(0)
    lines = errors.read().decode("utf-8", "replace").strip().splitlines()
    return f": {lines[-1].strip()}" if lines else ""


def _status(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


def time_completion(argv: list, env: dict, timeout: float) -> float:
    """Seconds from start to the end of ``argv``; BenchError if it fails or outlasts timeout."""
    with tempfile.TemporaryFile() as errors:
        began = time.perf_counter()
        proc = start(argv, env, errors)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{_show(argv)} did not finish within {timeout:g} s") from None
        finally:
            elapsed = time.perf_counter() - began
            stop(proc)
        if code != 0:
            raise BenchError(f"{_show(argv)} failed ({_status(code)}){_last_line(errors)}")
    return elapsed


class Readiness:
    """Polls one URL with httpx (no proxies from the environment, no kept-alive connection)."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BenchError(f"--readiness needs an http:// or https:// URL, not {url!r}", 2)
        try:
            self.port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise BenchError(f"bad port in {url!r}", 2) from None
        import httpx

        self.httpx = httpx
        self.url, self.host = url, parts.hostname
        self.client = httpx.Client(trust_env=False, timeout=2.0, verify=False,
                                   limits=httpx.Limits(max_keepalive_connections=0))  # fmt: skip

    def ready(self) -> bool:
        try:
            return self.client.get(self.url).status_code == 200
        except self.httpx.HTTPError:
            return False

    def port_busy(self) -> bool:
        import socket

        try:
            socket.create_connection((self.host, self.port), timeout=1.0).close()
            return True
        except OSError:
            return False

    def wait_port_free(self) -> None:
        deadline = time.monotonic() + PORT_FREE_WAIT
        while self.port_busy():
            if time.monotonic() > deadline:
                raise BenchError(f"port {self.port} is still in use after the server stopped")
            time.sleep(POLL)

    def close(self) -> None:
        self.client.close()


def time_readiness(argv: list, env: dict, probe: Readiness, timeout: float) -> float:
    """Seconds from start until the URL answers 200; the process is stopped and the port free."""
    with tempfile.TemporaryFile() as errors:
        began = time.perf_counter()
        proc = start(argv, env, errors)
        try:
            while not probe.ready():
                code = proc.poll()
                if code is not None:
                    raise BenchError(f"{_show(argv)} ended ({_status(code)}) before {probe.url} "
                                     f"answered{_last_line(errors)}")  # fmt: skip
                if time.perf_counter() - began > timeout:
                    raise BenchError(f"{probe.url} did not answer 200 within {timeout:g} s "
                                     f"of starting {_show(argv)}")  # fmt: skip
                time.sleep(POLL)
            elapsed = time.perf_counter() - began
        finally:
            stop(proc)
    probe.wait_port_free()
    return elapsed


def _show(argv: list) -> str:
    text = " ".join(argv)
    return text if len(text) <= 80 else text[:77] + "..."


def summary(times: list) -> dict:
    """Median and spread of ``times`` (seconds), in milliseconds."""
    ms = [t * 1000 for t in times]
    quartiles = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms),
            "q1_ms": quartiles[0], "q3_ms": quartiles[2], "times_ms": ms}  # fmt: skip


def run(file: str, args: list, runs: int = 5, url=None, timeout: float = 120.0,
        progress=None) -> dict:  # fmt: skip
    """Bench python ``args`` cold and warm with the starter ``file``; return the summary dict."""
    if not args:
        raise BenchError("name the command to bench after --, e.g. -- script.py ARGS", 2)
    config = load_bundle(file)
    cmds = commands(file, config, args)
    progress = progress or Progress()
    probe = Readiness(url) if url else None
    if probe and probe.port_busy():
        raise BenchError(f"port {probe.port} is already in use; stop what listens there first")

    def once(kind: str) -> float:
        argv, env = cmds[kind]
        if probe:
            return time_readiness(argv, env, probe, timeout)
        return time_completion(argv, env, timeout)

    times: dict = {"cold": [], "warm": []}
    try:
        progress.show("bench: warm-up run (starts the server)")
        once("warm")
        _check_server(file)
        for i in range(runs):
            for kind in ("cold", "warm"):
                progress.show(f"bench: run {i + 1}/{runs} {kind}" + _so_far(times))
                times[kind].append(once(kind))
    finally:
        progress.clear()
        if probe:
            probe.close()
    cold, warm = summary(times["cold"]), summary(times["warm"])
    return {
        "bundle": file,
        "command": list(args),
        "python": config["python"],
        "mode": "readiness" if url else "completion",
        "url": url,
        "runs": runs,
        "cold": cold,
        "warm": warm,
        "ratio": cold["median_ms"] / warm["median_ms"],
    }


def _so_far(times: dict) -> str:
    parts = [f"{kind} {statistics.median(t) * 1000:.0f} ms" for kind, t in times.items() if t]
    return f"  (medians so far: {', '.join(parts)})" if parts else ""


def _check_server(file: str) -> None:
    """Warn when no server listens after the warm-up: the "warm" runs would be cold ones."""
    from preloaded.paths import Paths, UnsafeDirectory

    try:
        listening = os.path.exists(Paths(file, create=False).socket)
    except (OSError, UnsafeDirectory):
        listening = False
    if not listening:
        sys.stderr.write(f"py-preload bench: warning: no server is running for {file} after "
                         f"the warm-up; see py-preload logs {file}\n")  # fmt: skip


def format_table(result: dict) -> str:
    """The human-readable summary of ``run``'s result."""
    what = (f"time until {result['url']} answers 200" if result["mode"] == "readiness"
            else "time to completion")  # fmt: skip
    lines = [
        f"{result['bundle']}: {_show(result['command'])}",
        f"{what}, {result['runs']} runs each, alternating",
        f"{'':<10}{'median':>11}{'min - max':>22}{'IQR':>22}",
    ]
    for kind in ("cold", "warm"):
        s = result[kind]
        lines.append(f"{kind:<10}{s['median_ms']:>8.1f} ms"
                     f"{s['min_ms']:>10.1f} - {s['max_ms']:>7.1f} ms"
                     f"{s['q1_ms']:>10.1f} - {s['q3_ms']:>7.1f} ms")  # fmt: skip
    lines.append(f"{'cold/warm':<10}{result['ratio']:>8.1f} x")
    return "\n".join(lines)

"""A throw-away copy of the server that imports learned modules first, so the server never has to.

Importing a module into the server cannot be undone: one that prints, warns, starts a thread,
initialises CUDA or takes the server's signal handlers used to retire the server (learning the
modules of a Jupyter kernel restarted it four times in a row). A probe is a fork of the server:
the same modules, handlers and state, so an import does there exactly what it would do in the
server. It imports the candidates in order and reports each verdict on a pipe, one JSON line
each; the server imports only the modules the probe found clean, in the same order, and refuses
the first unsafe one without restarting. The probe stops at the first unsafe module, or failed
one that left modules behind (what it did would colour every later check); the names after it
are probed again by the next probe. A probe that hangs is killed after its deadline, and the module it was importing is
refused. The server's loop only reads the pipe when it is readable: it never waits for a probe.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from preloaded.server.preload import HANDLED, leave_server

TIMEOUT_ENV = "PY_PRELOAD_PROBE_TIMEOUT"  # seconds (server's environment); for tests mostly
TIMEOUT = 120.0  # a probe importing this long is stuck (torch alone takes ~3 s on 2 cores)
READ_LIMIT = 1 << 20  # bytes of verdicts: a probe sending more is broken


def timeout() -> float:
    try:
        return max(0.1, float(os.environ.get(TIMEOUT_ENV, TIMEOUT)))
    except ValueError:
        return TIMEOUT


class Probe:
    """A running probe, seen from the server: its pid, the read end of its pipe, the names it
    was given, and what it said so far."""

    def __init__(self, pid: int, fd: int, names: list, deadline: float) -> None:
        self.pid = pid
        self.fd = fd
        self.names = names
        self.deadline = deadline
        self.buffer = b""
        self.current: str | None = None  # the name it is importing (said "try", no verdict yet)
        self.last: str | None = None  # the last name it gave a verdict on
        self.done = False  # it went through every name

    def read(self) -> tuple:
        """Read what is there; return (verdicts, ended). A verdict: (kind, name, detail) with
        kind "ok" (detail: ms), "unsafe" or "failed" (detail: why)."""
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return [], False
        except OSError:
            data = b""
        self.buffer += data
        if len(self.buffer) > READ_LIMIT:
            return [], True
        lines = self.buffer.split(b"\n")
        self.buffer = lines.pop()
        return [v for v in map(self._parse, lines) if v is not None], not data

    def _parse(self, line: bytes):
        try:
            message = json.loads(line)
            kind, name = message["kind"], str(message["name"])
        except (ValueError, KeyError, TypeError):
            return None
        if kind == "try":
            self.current = name
            return None
        if kind == "done":
            self.done = True
            return None
        self.current, self.last = None, name
        return kind, name, message.get("detail")

    def unreached(self) -> list:
        """The names after the last verdict (or the name it was stuck in): to be probed again."""
        if self.done:
            return []
        stop = self.current or self.last
        if stop is None or stop not in self.names:
            return list(self.names) if stop is None else []
        return self.names[self.names.index(stop) + 1:]

    def close(self, kill: bool) -> None:
        if kill:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.close(self.fd)
        except OSError:
            pass


def start(names: list, server_fds: list, check) -> Probe:
    """Fork a probe that imports ``names`` in order with ``check(name)`` (which returns
    ("ok", ms) / ("unsafe", why) / ("failed", why)). Raises OSError when it cannot fork."""
    r, w = os.pipe()
    # As for standbys: a signal before the probe dropped the wakeup fd would wake the server.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    try:
        pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(r)
        os.close(w)
        raise
    if pid == 0:
        try:
            _probe(w, [fd for fd in server_fds + [r] if fd != w], names, check, mask)
        finally:
            os._exit(0)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    os.close(w)
    os.set_blocking(r, False)
    return Probe(pid, r, list(names), time.monotonic() + timeout())


def _probe(w: int, server_fds: list, names: list, check, mask) -> None:
    """The probe's whole life. Keeps the server's signal handlers (a changed one is what it
    looks for) but not its wakeup fd, its sockets or its lock."""
    leave_server(server_fds)  # a probe left behind by a killed server would import for nobody
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    for name in names:
        if name in sys.modules:
            continue  # came with an earlier one: the server will have it the same way
        _say(w, "try", name)
        before = len(sys.modules)
        kind, detail = check(name)
        _say(w, kind, name, detail)
        # A failed import that left no module behind (not found, say) changed nothing the
        # next checks could see: go on. Anything else stops here.
        if kind == "unsafe" or (kind == "failed" and len(sys.modules) != before):
            return
    _say(w, "done", "")


def _say(w: int, kind: str, name: str, detail=None) -> None:
    line = json.dumps({"kind": kind, "name": name, "detail": detail}) + "\n"
    os.write(w, line.encode("utf-8", "backslashreplace"))


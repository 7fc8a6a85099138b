"""The plain server's side of its pytest server (``pytestserver``): start it on the first pytest
run (that run goes cold), then hand it each pytest run's connection, and xdist's workers of its
runs. The client is never told: the pytest server answers on the connection it was given."""

from __future__ import annotations

import json
import os
import signal
import socket

from preloaded import wire
from preloaded.paths import Paths
from preloaded.server.pytestserver import FLAVOUR, is_worker

ALREADY_RUNNING = 3  # loop.ALREADY_RUNNING: another pytest server holds the lock
HAND_OVER_TIMEOUT = 2.0


class PytestLink:
    def __init__(self, config: dict, log) -> None:
        self.config = config
        self.paths = Paths(config["bundle"], flavour=FLAVOUR)
        self.log = log
        self.pid: int | None = None  # the pytest server we started, until it is reaped
        self.failed: str | None = None  # why it could not start: pytest runs go cold

    def takes_worker(self, request: dict, peer) -> bool:
        """Is this run an xdist worker of a run of our pytest server? (Its starter's parent is
        a child of that server: the controller, whose sys.executable is the starter.)"""
        if not is_worker(request) or peer is None:
            return False
        parent = _ppid(peer.pid)
        server = _ppid(parent) if parent is not None else None
        return server is not None and self._is_pytest_server(server)

    def hand_over(self, conn, request: dict, modules: list) -> str | None:
        """Give the run's connection to the pytest server: None once done, else why the run
        goes cold (the server is starting, or could not start)."""
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(HAND_OVER_TIMEOUT)
            sock.connect(self.paths.socket)
        except OSError:
            sock.close()
            return self._start(modules, request["env"])
        try:
            wire.send(sock, {"v": 1, "adopt": request}, [conn.sock.fileno()] + conn.fds)
        except OSError as exc:
            return f"the pytest server did not take the run ({exc})"
        finally:
            sock.close()
        return None

    def _start(self, modules: list, env: dict) -> str:
        """Start the pytest server in the environment of the run that asks for it, as a first
        run starts a plain server (its imports read the environment: see envdeps)."""
        if self.failed:
            return self.failed
        if self.pid is not None:
            return "the pytest server is starting"
        import subprocess

        from preloaded.client.spawn import server_argv, server_env

        config = dict(self.config, flavour=FLAVOUR, modules=modules)
        try:
            proc = subprocess.Popen(server_argv(config, config["bundle"]), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/",
                                    env=server_env(env), start_new_session=True)  # fmt: skip
        except OSError as exc:
            return f"cannot start the pytest server: {exc.strerror}"
        self.pid = proc.pid
        proc.returncode = 0  # reaped by the loop's waitpid, not by Popen
        self.log(f"starting the pytest server ({proc.pid})")
        return "the pytest server is starting"

    def reaped(self, pid: int, status: int) -> bool:
        """The loop reaped ``pid``: True if it was our pytest server."""
        if pid != self.pid:
            return False
        self.pid = None
        code = os.waitstatus_to_exitcode(status)
        if code not in (0, ALREADY_RUNNING):
            self.failed = f"the pytest server exited with {code} (see {self.paths.log})"
            self.log(self.failed)
        return True

    def stop(self, now: bool) -> None:
        """``stop`` (``now``: its runs end too) of the plain server stops its pytest server."""
        from preloaded import servers

        if self.pid is not None:  # still importing: no socket to ask on yet
            try:
                os.kill(self.pid, signal.SIGTERM)
            except OSError:
                pass
        servers.ask(self.paths.socket, {"cmd": "stop", "now": now}, timeout=HAND_OVER_TIMEOUT)

    def _is_pytest_server(self, pid: int) -> bool:
        """Is ``pid`` a pytest server of this bundle (serving or retiring: a worker of a run it
        started must not run here, where pytest would warn)?"""
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            config = json.loads(argv[-2] if argv[-1] == b"" else argv[-1])
        except (OSError, ValueError, IndexError):
            return False
        return isinstance(config, dict) and config.get("flavour") == FLAVOUR and \
            config.get("bundle") == self.config["bundle"]  # fmt: skip


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None

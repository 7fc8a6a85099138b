"""A client's connection, and its run request as the server accepts it: every field checked
before anything is done with it (see DESIGN.md, wire protocol). A bad request is refused; the
server never dies of one."""

from __future__ import annotations

import socket
import time

from preloaded import wire

FIRST_FRAME_TIMEOUT = 10.0  # a client that connects and never sends is dropped after this

MODES = ("script", "module", "code", "stdin", "repl")
STDIO = ("pipe", "pty", "closed")


class BadRequest(Exception):
    pass


def validate_request(req, nfds: int) -> None:
    """Raise BadRequest unless ``req`` is a well-formed run request with its descriptors: 3 for
    stdio, then one for each number in ``fds``."""
    if not isinstance(req, dict):
        raise BadRequest("request is not an object")
    expected = {"v", "mode", "target", "argv", "orig_argv", "cwd", "env", "umask", "flags", "stdio",
                "ignored"}
    req.setdefault("fds", [])  # native starters built before fds were passed send none
    unknown = set(req) - expected - {"fds"}
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    missing = expected - set(req)
    if missing:
        raise BadRequest(f"missing field(s): {', '.join(sorted(missing))}")
    if req["v"] != 1:
        raise BadRequest(f"unsupported protocol version {req['v']!r}")
    if req["mode"] not in MODES:
        raise BadRequest(f"unknown mode {req['mode']!r}")
    if req["mode"] in ("script", "module", "code") and not isinstance(req["target"], str):
        raise BadRequest("target must be a string")
    _check_strings(req["argv"], "argv")
    _check_strings(req["orig_argv"], "orig_argv")
    if not isinstance(req["cwd"], str) or not isinstance(req["env"], dict):
        raise BadRequest("cwd must be a string and env an object")
    _check_strings(list(req["env"]) + list(req["env"].values()), "env")
    if type(req["umask"]) is not int or not 0 <= req["umask"] <= 0o777:
        raise BadRequest("umask must be an integer in 0..0o777")
    flags = req["flags"]
    if not isinstance(flags, dict) or set(flags) != {"u", "B", "i", "q", "W"}:
        raise BadRequest("flags must have exactly u, B, i, q, W")
    if not all(type(flags[k]) is bool for k in "uBiq"):
        raise BadRequest("flags u, B, i, q must be booleans")
    _check_strings(flags["W"], "flags.W")
    stdio = req["stdio"]
    if not isinstance(stdio, list) or len(stdio) != 3 or any(k not in STDIO for k in stdio):
        raise BadRequest("stdio must list 3 of pipe, pty, closed")
    ignored = req["ignored"]
    if not isinstance(ignored, list) or not all(type(s) is int and 0 < s < 65 for s in ignored):
        raise BadRequest("ignored must list signal numbers")
    _check_fds(req["fds"], nfds)


def _check_fds(fds, nfds: int) -> None:
    """``fds``: the number each descriptor after the 3 of stdio lands at in the child."""
    if not isinstance(fds, list) or not all(type(fd) is int and 2 < fd < 1 << 30 for fd in fds):
        raise BadRequest("fds must list descriptor numbers above 2")
    if len(set(fds)) != len(fds):
        raise BadRequest("fds lists a descriptor twice")
    if nfds != 3 + len(fds):
        raise BadRequest(f"expected {3 + len(fds)} file descriptors, got {nfds}")


def _check_strings(value, name: str) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"{name} must be a list of strings")
    if any("\0" in v for v in value):
        raise BadRequest(f"{name} contains a NUL character")


class Conn:
    """One client connection: at first waiting for its request, then tied to one child."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = wire.FrameReader()
        self.fds: list = []
        self.deadline = time.monotonic() + FIRST_FRAME_TIMEOUT
        self.pid: int | None = None
        self.kill_at: float | None = None
        self.closed = False
        self.client_stopped = False  # we stopped the child because its client was stopped
        self.peer = None  # peer.Peer, pinned at accept
        self.changes: dict = {}  # what its child changes to be its process (context.Gate)

    def close(self) -> None:
        self.sock.close()
        if self.peer is not None:
            self.peer.close()  # its pidfd

    def reply(self, obj) -> bool:
        """Send ``obj``; False if the client could not be told (gone, or not reading)."""
        try:
            self.sock.setblocking(True)
            self.sock.settimeout(1.0)  # a tiny frame; a client that never reads loses it
            wire.send(self.sock, obj)
            return True
        except OSError:
            return False
        finally:
            try:
                self.sock.setblocking(False)
            except OSError:
                pass

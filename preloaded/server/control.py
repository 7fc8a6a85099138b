"""Control commands on a server's socket, answered by its loop between runs: ``status``,
``stop`` (graceful: running programs finish first; ``"now"``: they end) and ``forget`` (the CLI), ``usage`` and ``evict`` (the memory budget: other servers
and ``py-preload list``, see ``preloaded.server.budget``). Apart from the loop's class so that
it stays one job (the run's path) and under its size limit."""

from __future__ import annotations

import os
import signal

from preloaded.server.standby import kill


def handle(server, conn, frame: dict) -> None:
    """Answer one command frame on ``conn`` (a ``request.Conn`` of ``server``, a
    ``loop.Server``), then close it."""
    cmd = frame.get("cmd")
    if cmd == "status":
        conn.reply(server.status())
    elif cmd == "stop":  # running programs finish, then the server exits; "now": they end
        now = frame.get("now") is True
        conn.reply({"stopping": os.getpid(), "runs": 0 if now else len(server.children)})
        server._close(conn)
        server.begin_stop(kill_children=now)
        if server.pytest_link is not None:
            server.pytest_link.stop(now)
    elif cmd in ("usage", "evict") and server.budget is not None:
        server.budget.handle(conn, frame)
    elif cmd == "forget":  # running children finish; the next run starts a fresh server
        if server.learner is not None:
            server.learner.forget()
        conn.reply({"stopping": os.getpid()})
        server._close(conn)
        server.begin_stop()
    else:
        conn.reply({"error": f"unknown command {cmd!r}"})
    server._close(conn)


def terminated(server, signum: int, log) -> None:
    """SIGTERM, SIGINT or SIGHUP from outside: stop now. Running programs go on, left to the
    keeper as a SIGKILL would leave them (keeper.py); without one, they end with the server."""
    if not server.keeper:
        log(f"got signal {signum}: stopping, ending the runs")
        server.begin_stop(kill_children=True)
        return
    log(f"got signal {signum}: stopping; the keeper {server.keeper['keeper']} takes over "
        f"{len(server.children)} running program(s)")  # fmt: skip
    server.begin_stop()
    for conn in server.children.values():
        if conn.kill_at is not None:  # its client is gone: SIGHUPed, its grace ends now
            kill(conn.pid, signal.SIGKILL, group=True)
    server.children.clear()  # the loop ends: the server's exit closes their connections

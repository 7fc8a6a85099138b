"""Control commands on a server's socket, answered by its loop between runs: ``status``,
``stop`` and ``forget`` (the CLI), ``usage`` and ``evict`` (the memory budget: other servers
and ``py-preload list``, see ``preloaded.server.budget``). Apart from the loop's class so that
it stays one job (the run's path) and under its size limit."""

from __future__ import annotations

import os


def handle(server, conn, frame: dict) -> None:
    """Answer one command frame on ``conn`` (a ``request.Conn`` of ``server``, a
    ``loop.Server``), then close it."""
    cmd = frame.get("cmd")
    if cmd == "status":
        conn.reply(server.status())
    elif cmd == "stop":
        conn.reply({"stopping": os.getpid()})
        server._close(conn)
        server.begin_stop(kill_children=True)
        if server.pytest_link is not None:
            server.pytest_link.stop()
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

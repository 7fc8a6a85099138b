"""A run's child follows its client's stops: `kill -STOP` on the starter pauses the program as it
would pause python, and SIGCONT resumes it.

SIGSTOP cannot be caught, so the client cannot forward it; the server looks instead: while runs
are going, every WATCH_INTERVAL, it reads the state of each run's client in /proc/<pid>/stat
(the pid from SO_PEERCRED: ``Conn.peer``, pinned by a pidfd), and stops the child's process
group when the client is seen stopped. The client forwards the SIGCONT that continues it; this continues the child only if it
is still stopped then. (A client that stops itself, Ctrl-Z or a background read, stops its child
first; this sees it too and does nothing more.)
"""

from __future__ import annotations

import signal
import time

from preloaded.server.standby import kill

# The delay before a stopped client's child is stopped too.
WATCH_INTERVAL = 0.1


class ClientStops:
    def __init__(self) -> None:
        self.next = 0.0  # when to look again

    def due_in(self, children: dict, now: float) -> float:
        """Seconds until ``check`` wants to look again (a long time when no run is going)."""
        return self.next - now if children else 3600.0

    def check(self, children: dict) -> None:
        """Look at the clients of ``children`` (pid -> Conn) if it is time; follow their stops."""
        now = time.monotonic()
        if not children or now < self.next:
            return
        self.next = now + WATCH_INTERVAL
        for pid, conn in children.items():
            if conn.closed or conn.peer is None or conn.peer.pid <= 0:
                continue
            stopped = _stopped(conn.peer.pid)
            if stopped == conn.client_stopped:
                continue
            conn.client_stopped = stopped
            if stopped:
                kill(pid, signal.SIGSTOP, group=True)
            elif _stopped(pid):
                # The client forwards the SIGCONT that continued it; only if that did not come
                # (yet) do we send one: a second one would run a SIGCONT handler twice.
                kill(pid, signal.SIGCONT, group=True)


def _stopped(pid: int) -> bool:
    """True when process ``pid`` is stopped by a signal (state T; not a tracer's stop, t)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split(None, 1)[0] == b"T"
    except (OSError, IndexError):
        return False

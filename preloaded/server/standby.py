"""The standby pool: children forked ahead and parked, so that forking is off a run's path.

A standby is forked when the loop is idle, parks in a read on its end of a socketpair (see
``child.park``), and is handed a run (the request and the caller's stdio fds) when one comes.
With a pool of 0 (``--standby 0``, ``PY_PRELOAD_STANDBY=0``) a child is forked per run at its
request.
"""

from __future__ import annotations

import importlib
import os
import resource
import signal
import sys
import socket
import time

from preloaded import wire
from preloaded.server import child, hugepages, stdio
from preloaded.server.peer import Cold
from preloaded.server.preload import HANDLED

# When to fork the next standby (measured on 2 cores, torch server): not during a run just
# handed over, which may be short (forking at once delayed its exit and won nothing), unless it
# lasts over REFILL_AFTER; and REFILL_AFTER_EXIT after a run's end, so that its client exits
# first (1-1.6 ms saved per run; 5 ms made back-to-back runs wait for the fork).
REFILL_AFTER = 0.05
REFILL_AFTER_EXIT = 0.002
MAX_STANDBYS = 64
HAND_OVER_TIMEOUT = 5.0  # a parked standby reads its request at once; this is only a safety net


class Standby:
    """A child forked ahead and parked in a read on its end of ``channel``."""

    def __init__(self, pid: int, channel: socket.socket, kept: frozenset = frozenset()) -> None:
        self.pid = pid
        self.channel = channel
        self.kept = kept  # the fds (above 2) it keeps from the server: a library's, say

    def go(self) -> None:
        """Let the run start: its client was told "started". The go is a frame, not the
        channel's EOF alone: a dying server's channel closes before its children are
        reparented, and a standby must not take that EOF for a go."""
        try:
            wire.send(self.channel, child.GO)
        except OSError:
            pass  # it died meanwhile: reaped like any run
        self.channel.close()


class StandbyPool:
    """Up to ``size`` parked standbys, oldest first. ``own_fds()`` lists the server's fds that a
    new child must close; ``log`` writes to the server's log."""

    def __init__(self, size: int, own_fds, log) -> None:
        self.size = size
        self.parked: list = []
        self.own_fds = own_fds
        self.log = log
        self.setup = None  # child.Setup, once the server has preloaded
        # The last standby could not be forked, or died parked: fork one only when a run comes.
        self.failed = False
        self.last_hand_over = 0.0
        self.last_exit = 0.0
        self.imports_seen = None  # sizes of the import state when caches were last invalidated
        # The server's memory into huge pages before the first standby is forked (a standby
        # forked before pays the small pages' fork and exit), and again after a learned import.
        self.hugepages = hugepages.Collapser(log)

    def hand_over(self, request: dict, fds: list, context: dict | None = None) -> Standby:
        """Send the request and the caller's fds to a standby; return it. A standby that died
        while parked (its end of the channel is closed) is discarded and a fresh one tried.

        ``context``: what the child changes to be the caller's process (context.Planner); it
        answers once it did, and raises Cold (the standby gone) if it could not."""
        if context:
            request = dict(request, context=context)
        for _attempt in range(3):
            standby = self.parked.pop(0) if self.parked else self.spawn()
            if request["fds"]:
                self._check_fds(standby, request["fds"])
            try:
                standby.channel.settimeout(HAND_OVER_TIMEOUT)  # it reads at once: it is parked
                wire.send(standby.channel, request, fds)
                self.last_hand_over = time.monotonic()
            except OSError as exc:
                self.log(f"standby {standby.pid} lost ({exc}): forking another")
                self.discard(standby)
                continue
            if context:
                self._await_ready(standby)
            return standby
        raise OSError(0, "every standby died before its hand-over")

    def _check_fds(self, standby: Standby, targets: list) -> None:
        """Cold (``standby`` parked again) unless the caller's fds can land at their numbers
        in it: not on an fd it keeps from the server (python would have had the library open
        its own at another number), and within the limit on fd numbers."""
        reason = None
        taken = standby.kept.intersection(targets)
        if taken:
            reason = f"fd {min(taken)} of the caller is one the server's imports hold open"
        elif max(targets) + len(targets) + 8 > _fd_ceiling():
            reason = f"fd {max(targets)} of the caller is above the server's RLIMIT_NOFILE"
        if reason:
            self.parked.insert(0, standby)
            raise Cold(reason)

    def _await_ready(self, standby: Standby) -> None:
        """The child's answer once it took on the caller's context; Cold if it could not."""
        try:
            answer = wire.recv_frame(standby.channel, wire.FrameReader())
        except (OSError, EOFError, wire.ProtocolError) as exc:
            answer = {"cold": f"the child did not take on the caller's context ({exc})"}
        if not isinstance(answer, dict) or answer.get("ready") is not True:
            # Killed before its channel closes: EOF would be its "go".
            kill(standby.pid, signal.SIGKILL, group=False)
            self.discard(standby)
            raise Cold(str(answer.get("cold") if isinstance(answer, dict) else answer))

    def spawn(self) -> Standby:
        """Fork a child that parks until a run is handed to it (see child.park)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        server_fds = self.own_fds() + self.channel_fds() + [ours.fileno()]
        kept = open_fds().difference(server_fds, (0, 1, 2, theirs.fileno()))
        # A signal reaching the child before it dropped the server's handlers would wake the
        # server's loop through the wakeup pipe they share: blocked until child.park resets them.
        self._invalidate_import_caches()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            ours.close()
            theirs.close()
            raise
        if pid == 0:
            try:
                child.park(theirs.fileno(), server_fds, self.setup, sigmask=mask)
            finally:
                os._exit(70)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        theirs.close()
        self.failed = False
        return Standby(pid, ours, frozenset(kept))

    def _invalidate_import_caches(self) -> None:
        """A child must find the files as they are at its first import, not as the server's
        finders listed them: their directory caches are marked stale, in the server, and
        refilled lazily in the child. Marked here, not in every child (where writing a mark
        in each finder copied ~400 pages, 1.2 ms of a torch server's run), and again only
        once the server imported something (its finders may have listed a directory since)."""
        seen = (len(sys.modules), len(sys.path_importer_cache))
        if seen != self.imports_seen:
            importlib.invalidate_caches()
            self.imports_seen = (len(sys.modules), len(sys.path_importer_cache))

    def idle_turn(self) -> None:
        """The loop is idle and ``refill_in`` said now: until the server's memory is in huge
        pages, collapse some of it (see hugepages.py); then fork the next standby."""
        if self.hugepages.pending():
            self.hugepages.step()
        else:
            self.refill()

    def refill(self) -> None:
        """Fork the next standby now: the loop is idle, so that forking delays no run (the run
        just handed over, nor a run arriving). Whether one is wanted, and when, is
        ``refill_in``'s to say."""
        try:
            self.parked.append(self.spawn())
        except OSError as exc:  # the next run forks on demand (and is refused if that fails)
            self.log(f"cannot fork a standby: {exc.strerror}")
            self.failed = True

    def refill_in(self, running: bool, now: float) -> float | None:
        """Seconds until the next standby should be forked (0: now); None if none is wanted.

        On a small machine the fork competes with the runs and clients around it: not while a
        run just handed over is still going (for REFILL_AFTER at most), and REFILL_AFTER_EXIT
        after the last run ended."""
        if self.hugepages.pending():
            return 0.0
        if len(self.parked) >= self.size or self.failed:
            return None
        if not running:
            return max(0.0, self.last_exit + REFILL_AFTER_EXIT - now)
        return max(0.0, self.last_hand_over + REFILL_AFTER - now)

    def discard_all(self) -> None:
        """Kill and reap every parked standby: the server's state changed (more imports, for
        instance), and the next run must get a child forked after that change. The next one is
        forked at the loop's next idle moment (or on demand by the next run)."""
        parked, self.parked = self.parked, []
        self.imports_seen = None  # a learned import, even a failed one, may have listed dirs
        self.hugepages.replan()  # and added memory
        for standby in parked:
            self.discard(standby)
        self.failed = False

    def discard(self, standby: Standby) -> None:
        standby.channel.close()  # EOF: a standby that has not yet parked exits by itself
        kill(standby.pid, signal.SIGKILL, group=False)
        try:
            os.waitpid(standby.pid, 0)
        except ChildProcessError:  # already reaped by the loop
            pass

    def channel_fds(self) -> list:
        """The parked standbys' channels: a new child must not hold its siblings'."""
        return [standby.channel.fileno() for standby in self.parked]

    def died(self, pid: int, status: int) -> bool:
        """The loop reaped ``pid``: if it was parked, forget it and say so."""
        for standby in self.parked:
            if standby.pid == pid:
                self.log(f"standby {pid} died while parked ({describe(status)})")
                standby.channel.close()
                self.parked.remove(standby)
                self.failed = True  # no fork storm if standbys keep dying: on demand
                return True
        return False

    def pids(self) -> list:
        return [standby.pid for standby in self.parked]


def open_fds() -> set:
    """This process's open fds (the listing's own, closed by then, left out)."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.get_inheritable(int(name))
            fds.add(int(name))
        except OSError:
            pass
    return fds


def _fd_ceiling() -> int:
    """The highest fd number a child may place a caller's fd at (plus room to move others):
    it raises its soft RLIMIT_NOFILE to the hard one for that (see stdio.place_fds)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return stdio.NR_OPEN if hard == resource.RLIM_INFINITY else min(hard, stdio.NR_OPEN)


def pool_size(config: dict) -> int:
    """How many standbys to keep parked: PY_PRELOAD_STANDBY=N in the server's environment (0:
    fork per run), else the bundle's config ``"standby"`` (a count, or false), else 1."""
    value = os.environ.get("PY_PRELOAD_STANDBY", "").strip().lower()
    if value in ("false", "no", "off"):
        return 0
    if value.isdigit():
        return min(int(value), MAX_STANDBYS)
    return min(int(config.get("standby", 1)), MAX_STANDBYS)


def describe(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"signal {-code}" if code < 0 else f"exit {code}"


def kill(pid: int, signum: int, group: bool) -> None:
    """Signal a child (its whole process group with ``group``), if it is still there."""
    try:
        if group:
            os.killpg(pid, signum)
            return
    except ProcessLookupError:
        pass  # not yet a group leader (setsid pending): fall through to the process itself
    except PermissionError:
        pass
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass

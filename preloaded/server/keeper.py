"""The server's parent, which outlives it: a program the server was running when it ended
(SIGKILL, the OOM killer, a crash) goes on, and its caller still gets its exit status.

The keeper is a child subreaper (PR_SET_CHILD_SUBREAPER): when the server dies the kernel makes
it the parent of the runs the server leaves. It reaps each and writes its status to
``<runtime>/<key>.exit.<keeper pid>.<run pid>``, where the run's client reads it: the client
saw its connection close and follows the run by the pidfd it took at "started" (see
``preloaded.client.connection``). While the server lives the keeper sleeps in ``waitpid``, so a
run costs nothing more: the server records its running programs in memory the two share (one
int32 store per run start and end, ``RunTable``), read only once the server is gone. The keeper
exits, with the server's status, once the server and the runs it left have ended.

Being a subreaper, it also becomes the parent of what a run leaves behind while the server lives
(a daemon's double fork): it reaps those as they end, and never waits for them.
"""

from __future__ import annotations

import mmap
import os
import signal
import struct
import sys
import time

from preloaded.paths import Paths, exit_file

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
PR_SET_NAME = 15
NAME = b"py-preload-keep"  # its comm (15 bytes at most)
# Once the server is gone, a run's os.getppid() is the keeper: a signal the run sends its
# parent must not end the keeper, and with it the status of every run it keeps (SIGKILL does).
LEFT_ALONE = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1,
              signal.SIGUSR2, signal.SIGALRM, signal.SIGPIPE)  # fmt: skip
SLOTS = 1 << 16  # programs running at once that the keeper can take over (256 KiB, touched lazily)
_SLOT = struct.Struct("=i")
STALE_AFTER = 3600.0  # an exit file nobody read (its client died too) is removed this much later


class RunTable:
    """Pids of the programs the server is running, in a shared anonymous mapping: the server
    writes it, the keeper reads it after the server is gone, forks of the server unmap it."""

    def __init__(self) -> None:
        self.map: mmap.mmap | None = mmap.mmap(-1, SLOTS * _SLOT.size, flags=mmap.MAP_SHARED)
        self.slots: dict = {}  # pid -> slot (the server's side)
        self.free: list = []
        self.used = 0

    def add(self, pid: int) -> None:
        if self.map is None:
            return
        if self.free:
            slot = self.free.pop()
        elif self.used < SLOTS:
            slot, self.used = self.used, self.used + 1
        else:
            return  # that many at once: if the server dies, its client says it lost it
        self.slots[pid] = slot
        _SLOT.pack_into(self.map, slot * _SLOT.size, pid)

    def remove(self, pid: int) -> None:
        slot = self.slots.pop(pid, None)
        if slot is not None and self.map is not None:
            _SLOT.pack_into(self.map, slot * _SLOT.size, 0)
            self.free.append(slot)

    def pids(self) -> set:
        if self.map is None:
            return set()
        return {pid for (pid,) in _SLOT.iter_unpack(self.map) if pid}  # once, in the keeper

    def close(self) -> None:
        """In a fork of the server: the table is the server's and the keeper's only."""
        if self.map is not None:
            self.map.close()
            self.map = None


TABLE: RunTable | None = None  # made by the keeper before it forks the server


def running(pid: int) -> None:
    """The server handed a run to ``pid``: the keeper takes it over if the server dies."""
    if TABLE is not None:
        TABLE.add(pid)


def ended(pid: int) -> None:
    if TABLE is not None:
        TABLE.remove(pid)


def started_field() -> dict:
    """What the server adds to "started": the keeper, whose exit file the client reads."""
    return {"keeper": os.getppid()} if TABLE is not None else {}


def leave() -> None:
    """First thing in every fork of the server (see preload.leave_server)."""
    if TABLE is not None:
        TABLE.close()


def split() -> None:
    """First thing in a server process (see client/spawn.py): fork; the parent becomes the
    keeper and never returns, the child returns and is the server. Where that cannot be (not
    Linux; fork refused: RLIMIT_NPROC, a pids cgroup), this process is the server alone, as
    before: its runs then end with it."""
    global TABLE
    if not _subreaper(True):
        return
    TABLE = RunTable()
    try:
        server = os.fork()
    except OSError:
        TABLE.close()
        TABLE = None
        _subreaper(False)
        return
    if server == 0:
        return
    import json

    socket_path = Paths(json.loads(sys.argv[1])["bundle"]).socket
    os.chdir("/")
    _prctl(PR_SET_NAME, NAME, 0, 0, 0)  # ps -o comm, top: the keeper apart from its server
    for signum in LEFT_ALONE:  # after the fork: the server's own dispositions stay the caller's
        signal.signal(signum, signal.SIG_IGN)
    _remove_stale(socket_path)
    os._exit(keep(server, socket_path))


def keep(server: int, socket_path: str) -> int:
    """Reap until the server and the runs it left have ended; return the server's exit code."""
    runs: set | None = None  # known once the server is gone
    code = 1
    while runs is None or runs:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid == server:
            code = os.waitstatus_to_exitcode(status)
            runs = {p for p in TABLE.pids() if _parent(p) == os.getpid()}
            TABLE.close()
        elif runs is not None and pid in runs:
            runs.discard(pid)
            _publish(exit_file(socket_path, os.getpid(), pid), status)
    return code if code >= 0 else 128 - code


def _publish(path: str, status: int) -> None:
    """The run's exit code as ``os.waitstatus_to_exitcode`` gives it (negative: a signal)."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="ascii") as f:
            f.write(str(os.waitstatus_to_exitcode(status)))
        os.rename(tmp, path)  # whole, or not there: the client reads it once it appears
    except OSError:
        pass  # the runtime dir is gone: the client says it lost the server


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    return int(stat[stat.rindex(b")") + 2 :].split()[1])


def _prctl(*args) -> bool:
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(*args) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def _subreaper(on: bool) -> bool:
    return _prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)


def _remove_stale(socket_path: str) -> None:
    """Exit files whose client never read them (it died with the server) and that are old."""
    directory, prefix = os.path.split(exit_file(socket_path, 0, 0).removesuffix("0.0"))
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        path = os.path.join(directory, name)
        try:
            if time.time() - os.stat(path).st_mtime > STALE_AFTER:
                os.unlink(path)
        except OSError:
            pass

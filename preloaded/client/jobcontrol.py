"""Job control facts the PTY relay needs: does this run own the caller's terminal now, would a
write stop it (``stty tostop``), and is the child blocked reading its PTY.

Stdlib only. The child runs on a PTY of its own, in a session whose process group is orphaned
(its parent, the server, is in another session), so the kernel never stops it for touching that
PTY from the background. The client stands in for it: it owns the caller's terminal only while
its process group is the terminal's foreground, and stops itself (and the child) exactly where
the kernel would have stopped ``python`` in its place.
"""

from __future__ import annotations

import os
import termios

# Syscalls that read one fd (arg 0) and put a reader to sleep on a terminal with no input, per
# machine (the numbers /proc/PID/syscall shows). A read through select/poll is not among them:
# python waiting there in the background is not stopped either (only its read would be).
READ_SYSCALLS = {
    "x86_64": {0, 17, 19, 295, 327},  # read, pread64, readv, preadv, preadv2
    "aarch64": {63, 65, 67, 69, 286},  # read, readv, pread64, preadv, preadv2
}.get(os.uname().machine, set())
MAX_PROCESSES = 64  # how many of the child's processes one look covers (a bound on its cost)


def foreground(fd: int) -> bool:
    """True when this process's group is the foreground group of the terminal on ``fd``."""
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False  # no longer our controlling terminal (hung up): own nothing


def tostop(fd: int) -> bool:
    """True when a background write to the terminal on ``fd`` stops the writer (SIGTTOU)."""
    try:
        return bool(termios.tcgetattr(fd)[3] & termios.TOSTOP)
    except termios.error:
        return False


def reads_tty(pid: int, rdev: int) -> bool:
    """True when a thread of ``pid``, or of a process it started, sleeps in a read of the
    terminal device ``rdev`` (the kernel would stop python's whole process group for that).

    /proc/PID/task/TID/syscall names the syscall a sleeping thread is blocked in ("running"
    otherwise). Reading it needs the right to ptrace the child (same user; under Yama
    ptrace_scope >= 1 only the child's ancestors have it): without it this says False and the
    child just waits for input, as it would in the foreground.
    """
    if not READ_SYSCALLS:
        return False
    todo, seen = [pid], 0
    while todo and seen < MAX_PROCESSES:
        proc = todo.pop()
        seen += 1
        try:
            tids = os.listdir(f"/proc/{proc}/task")
        except OSError:
            continue
        for tid in tids:
            if _reading(f"/proc/{proc}/task/{tid}", proc, rdev):
                return True
            todo.extend(_children(f"/proc/{proc}/task/{tid}"))
    return False


def _reading(task: str, proc: int, rdev: int) -> bool:
    try:
        with open(f"{task}/syscall", "rb") as f:
            fields = f.read().split()
        if len(fields) < 2 or not fields[0].isdigit() or int(fields[0]) not in READ_SYSCALLS:
            return False
        return os.stat(f"/proc/{proc}/fd/{int(fields[1], 16)}").st_rdev == rdev
    except (OSError, ValueError):
        return False


def _children(task: str) -> list:
    """The processes this thread started (empty where the kernel has no such file)."""
    try:
        with open(f"{task}/children", "rb") as f:
            return [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return []

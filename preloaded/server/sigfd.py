"""The server's signals with their sender: blocked, and read from a signalfd in the selector loop.

A warm run is the server's child, so ``os.kill(os.getppid(), n)`` in a program (a common way to
tell a supervising script "ready") reaches the server. A plain handler cannot tell that signal
from a ``kill`` of the server itself; a signalfd gives each signal's siginfo, and with it the
sender. The signals stay blocked (the server never starts a thread: no thread can take them
instead), so none is lost and none runs a handler; the loop reads them in the kernel's order
(lowest number first), before a run's SIGCHLD.
"""

from __future__ import annotations

import ctypes
import os
import selectors
import signal
import struct

from preloaded.server.preload import HANDLED

SFD_CLOEXEC = 0o2000000
SFD_NONBLOCK = 0o4000
_SIZE = 128  # struct signalfd_siginfo
_INFO = struct.Struct("=IiiI")  # ssi_signo, ssi_errno, ssi_code, ssi_pid
_BITS = 8 * ctypes.sizeof(ctypes.c_ulong)
# The handlers where there is no signalfd (then a run's signal to its parent stops the server).
FALLBACK_HANDLED = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
SI_USER, SI_QUEUE, SI_TKILL = 0, -1, -6  # sent by a process (kill, sigqueue, tgkill)


def install(sel, wake: tuple, on_wakeup, runs: dict, log) -> int | None:
    """The server's signals: the wakeup pipe ``wake`` (read, write) with handlers that only
    write to it (``on_wakeup`` reads it), then HANDLED blocked and read with their senders from
    the signalfd returned: a signal from a process of one of ``runs`` (pid -> its connection)
    is relayed, the others go on to the wakeup pipe. Without a signalfd they stay unblocked:
    the handlers take them, without their sender (None is returned)."""
    for fd in wake:
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(wake[1], warn_on_full_buffer=False)
    for signum in FALLBACK_HANDLED:
        signal.signal(signum, lambda s, f: None)
    sel.register(wake[0], selectors.EVENT_READ, on_wakeup)
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    try:
        fd = open_signalfd(HANDLED)
    except OSError as exc:
        log(f"{exc}: a run's signal to its parent would stop the server")
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        return None
    sel.register(fd, selectors.EVENT_READ, lambda _fileobj: _dispatch(fd, runs, wake[1], log))
    return fd


def _dispatch(fd: int, runs: dict, wake_w: int, log) -> None:
    for signum, sender in read_signals(fd):
        if not relay(run_of(runs, sender, signum), signum, log):
            os.write(wake_w, bytes([signum]))  # as the handlers would: the loop acts on it


def relay(conn, signum: int, log) -> bool:
    """Have the run's client (``conn``) send ``signum`` to its own parent, the process python's
    ``os.getppid()`` would have named; False when ``conn`` is None (not a run's signal). A run
    whose client is gone loses it."""
    if conn is None:
        return False
    if not conn.closed:
        log(f"run {conn.pid} sent signal {signum} to its parent: relayed to its caller's")
        conn.reply({"parent_signal": signum})
    return True


def run_of(children: dict, pid: int | None, signum: int):
    """The run (``children``' value) whose process sent ``signum``: the run's child or a process
    of its session (a run is a session leader); None for any other sender, and for SIGCHLD."""
    if pid is None or signum == signal.SIGCHLD:
        return None
    run = children.get(pid)
    if run is None and pid != os.getpid():
        run = children.get(session_of(pid))
    return run


def open_signalfd(signums) -> int:
    """A non-blocking signalfd for ``signums`` (which the caller keeps blocked); OSError if the
    kernel or libc has none."""
    mask = (ctypes.c_ulong * (1024 // _BITS))()  # glibc's sigset_t
    for signum in signums:
        mask[(signum - 1) // _BITS] |= 1 << ((signum - 1) % _BITS)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.signalfd(-1, ctypes.byref(mask), SFD_NONBLOCK | SFD_CLOEXEC)
    except (OSError, AttributeError) as exc:
        raise OSError(f"no signalfd: {exc}") from exc
    if fd < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return fd


def read_signals(fd: int) -> list:
    """The signals waiting on ``fd``: [(signum, sender pid or None)], in the kernel's order.
    The sender is None unless a process sent it (the kernel's SIGCHLD, a terminal's SIGINT)."""
    try:
        data = os.read(fd, _SIZE * 32)
    except (BlockingIOError, InterruptedError):
        return []
    signals = []
    for offset in range(0, len(data) - _SIZE + 1, _SIZE):
        signum, _errno, code, pid = _INFO.unpack_from(data, offset)
        signals.append((signum, pid if code in (SI_USER, SI_QUEUE, SI_TKILL) else None))
    return signals


def session_of(pid: int) -> int | None:
    """The session id of ``pid`` (from /proc), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # After the command name (in parentheses, which may hold anything): state ppid pgrp session
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[3])
    except (IndexError, ValueError):
        return None

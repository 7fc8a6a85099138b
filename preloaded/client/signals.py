"""The client's signals during a run: forwarded to the child, or job control (Ctrl-Z).

Stdlib only, on the fast path.
"""

from __future__ import annotations

import _signal
import os

from preloaded.client.connection import send_signal

# Signals the client passes on to the child; the client itself keeps running until the child's
# status comes back, so that it can mirror it.
FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")

# Dispositions a child inherits from its caller when they are "ignore" (nohup ignores SIGHUP,
# a non-interactive shell's `cmd &` ignores SIGINT and SIGQUIT): python keeps them, so must we.
INHERITABLE = FORWARDED + ("SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGWINCH", "SIGCONT")


def ignored_signals() -> list:
    signums = [getattr(_signal, name) for name in INHERITABLE]
    return [s for s in signums if _signal.getsignal(s) == _signal.SIG_IGN]


class Signals:
    """The client's handlers during a run: they only write the signal number to a pipe."""

    def __init__(self, tty: bool, ignored: list) -> None:
        self.rfd, self.wfd = os.pipe()
        os.set_blocking(self.rfd, False)
        os.set_blocking(self.wfd, False)
        self.old_wakeup = _signal.set_wakeup_fd(self.wfd, warn_on_full_buffer=False)
        handled = [getattr(_signal, name) for name in FORWARDED]
        handled.append(_signal.SIGTSTP)
        if tty:
            handled += [_signal.SIGWINCH, _signal.SIGCONT]
        handled = [s for s in handled if s not in ignored]  # the child ignores them too
        self.previous = {signum: _signal.signal(signum, noop) for signum in handled}

    def restore(self, redeliver: bool) -> None:
        """Put the old handlers back; with ``redeliver``, signals that came meanwhile act now."""
        pending = b""
        if redeliver:
            try:
                pending = os.read(self.rfd, 64)
            except OSError:
                pass
        for signum, handler in self.previous.items():
            _signal.signal(signum, handler)
        _signal.set_wakeup_fd(self.old_wakeup)
        os.close(self.rfd)
        os.close(self.wfd)
        forwarded = {getattr(_signal, name) for name in FORWARDED}
        for signum in pending:
            if signum in forwarded:
                os.kill(os.getpid(), signum)


def noop(signum, frame) -> None:
    """Python-level handler: the C handler writes the number to the wakeup fd; that is all."""


def suspend(sock, relay) -> None:
    """Ctrl-Z: stop the child, give the terminal back to the shell, and stop ourselves.

    The child's process group is orphaned (its parent, the server, is in another session), so
    the kernel discards SIGTSTP there: the child gets SIGSTOP instead. On SIGCONT (``fg``) the
    terminal goes back to raw mode and the child continues.
    """
    send_signal(sock, _signal.SIGSTOP)
    if relay:
        relay.restore()
    _signal.signal(_signal.SIGTSTP, _signal.SIG_DFL)
    os.kill(os.getpid(), _signal.SIGTSTP)
    # ... stopped here until the shell continues us ...
    _signal.signal(_signal.SIGTSTP, noop)
    if relay:
        relay.resume()
    send_signal(sock, _signal.SIGCONT)

"""The client's signals during a run: forwarded to the child, or job control (Ctrl-Z).

Stdlib only, on the fast path.
"""

from __future__ import annotations

import _signal
import os


# Signals the client passes on to the child; the client itself keeps running until the child's
# status comes back, so that it can mirror it. SIGCONT is passed on as well; SIGSTOP cannot be
# caught: the server sees this process stopped and stops the child (see server/loop.py).
FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")

# Dispositions a child inherits from its caller when they are "ignore" (nohup ignores SIGHUP,
# a non-interactive shell's `cmd &` ignores SIGINT and SIGQUIT): python keeps them, so must we.
INHERITABLE = FORWARDED + ("SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGWINCH", "SIGCONT")


def ignored_signals() -> list:
    signums = [getattr(_signal, name) for name in INHERITABLE]
    return [s for s in signums if _signal.getsignal(s) == _signal.SIG_IGN]


class Signals:
    """The client's handlers during a run: they only write the signal number to a pipe."""

    def __init__(self, tty: bool) -> None:
        self.rfd, self.wfd = os.pipe()
        os.set_blocking(self.rfd, False)
        os.set_blocking(self.wfd, False)
        self.old_wakeup = _signal.set_wakeup_fd(self.wfd, warn_on_full_buffer=False)
        # Signals the caller ignored are caught and forwarded too: the child starts with them
        # ignored, as python would, but a handler the program installs must still get them.
        handled = [getattr(_signal, name) for name in FORWARDED]
        handled += [_signal.SIGTSTP, _signal.SIGCONT]
        if tty:
            handled.append(_signal.SIGWINCH)
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


def suspend(link, relay, signum: int = _signal.SIGTSTP) -> None:
    """Stop the run: the child, then this process by ``signum``; on SIGCONT, go on.

    Ctrl-Z (SIGTSTP), or a background run that touches the terminal where python would be
    stopped (SIGTTIN, SIGTTOU): the shell then shows the job stopped for the same reason. The
    child's process group is orphaned (its parent, the server, is in another session), so the
    kernel discards SIGTSTP there: the child gets SIGSTOP instead. On SIGCONT (``fg`` or
    ``bg``) the relay takes the terminal again only if it is ours, and the SIGCONT is forwarded.
    """
    link.send_signal(_signal.SIGSTOP)
    if relay:
        relay.restore()
    previous = _signal.signal(signum, _signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    # ... stopped here until the shell continues us ...
    _signal.signal(signum, previous)
    if relay:
        relay.resume()
    # The child continues when our SIGCONT handler's wakeup is read: it forwards the signal
    # (sending it here as well would run a handler the program has for SIGCONT twice).

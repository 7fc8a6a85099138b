"""What ``preloaded.Executor`` raises besides a task's own exceptions."""

from __future__ import annotations

import concurrent.futures
import signal


class BundleError(Exception):
    """The bundle FILE does not exist or is not a starter written by ``py-preload bundle``."""


class ServerUnavailable(Exception):
    """The bundle's server cannot be started or reached, or was lost during a task."""


class WorkerDied(Exception):
    """The child running a task ended without sending its outcome (``os._exit``, a signal).

    ``exitcode`` is its exit status, or ``-N`` when signal ``N`` killed it. The executor keeps
    working: following tasks get fresh workers.
    """

    def __init__(self, pid: int, exitcode: int) -> None:
        self.pid = pid
        self.exitcode = exitcode
        self.signal = -exitcode if exitcode < 0 else None
        if exitcode < 0:
            try:
                name = signal.Signals(-exitcode).name
            except ValueError:
                name = "unknown"
            how = f"was killed by signal {-exitcode} ({name})"
        else:
            how = f"exited with status {exitcode}"
        super().__init__(f"the worker (pid {pid}) {how} before returning a result")

    def __reduce__(self):
        return (type(self), (self.pid, self.exitcode))


class BrokenExecutor(concurrent.futures.BrokenExecutor):
    """A worker's initializer raised: as with ``ProcessPoolExecutor`` (``BrokenProcessPool``),
    the executor takes no more tasks, and pending ones fail with this. ``__cause__`` is the
    initializer's exception."""


class RemoteTraceback(Exception):
    """Attached as ``__cause__`` of a task's exception: the traceback text from the child."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return '\n"""\n' + self.tb + '"""'

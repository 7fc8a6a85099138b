"""``preloaded.Executor``: a ``concurrent.futures.Executor`` whose tasks run in warm workers.

A worker is a warm child of a bundle's server (started on first use, as the starter does) that
runs task after task, as a ``ProcessPoolExecutor`` worker does, so a task that needs torch
starts in milliseconds and a tiny task costs about what it costs in a reused process pool.
``max_tasks_per_child=N`` retires a worker after N tasks (1: a fresh child per task);
``initializer(*initargs)`` runs once in each worker. The functions and their arguments go over
with cloudpickle (lambdas and closures work); the result, or the exception with its remote
traceback, comes back. Client side only: each thread of a ``ThreadPoolExecutor`` in the caller
owns at most one worker and waits on it, which gives ``max_workers``, ``map``, ``cancel`` and
``shutdown`` their usual meaning. The workers' stdout and stderr are the caller's own; calls and
outcomes travel on a separate channel (the child's stdin, a socket pair), see
``preloaded.pool.worker``.
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
import threading

import cloudpickle

from preloaded.pool import worker
from preloaded.pool.errors import (
    BrokenExecutor,
    BundleError,
    RemoteTraceback,
    ServerUnavailable,
    WorkerDied,
)
from preloaded.pool.handle import Handle

__all__ = ["Executor", "BrokenExecutor", "BundleError", "RemoteTraceback", "ServerUnavailable",
           "WorkerDied"]  # fmt: skip


class Executor(concurrent.futures.Executor):
    """Run calls in warm workers, children of the bundle ``FILE``'s server.

    ``max_workers`` workers run at once (default: the number of CPUs); each runs tasks until
    it has run ``max_tasks_per_child`` (default: no limit) or the executor shuts down. The
    server is started by the first task if it is not running; it keeps running afterwards
    (until its idle timeout, or ``py-preload stop FILE``), so the next program's first task is
    warm too. A worker takes the environment and working directory of the caller when it starts.
    """

    def __init__(self, bundle: str, max_workers: int | None = None, *,
                 max_tasks_per_child: int | None = None, initializer=None,
                 initargs: tuple = ()) -> None:  # fmt: skip
        if max_workers is None:
            max_workers = os.cpu_count() or 1
        if max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if max_tasks_per_child is not None:  # ProcessPoolExecutor's checks and words
            if not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._bundle = os.path.abspath(bundle)  # the same server after a chdir
        self._config = _read_bundle(bundle)
        self._umask = _current_umask()
        self._max_tasks = max_tasks_per_child
        self._init = cloudpickle.dumps((initializer, tuple(initargs))) if initializer else None
        self._shut = False
        self._broken: tuple | None = None  # (message, the initializer's exception)
        self._local = threading.local()  # the calling thread's worker
        self._handles: set = set()
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers, thread_name_prefix="preloaded-executor"
        )

    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:
        """Schedule ``fn(*args, **kwargs)`` in a warm worker; return its Future.

        The call is pickled now (a later change to a mutable argument does not reach the
        task); an unpicklable call gives a Future holding the ``PicklingError``.
        """
        if self._broken is not None:
            raise self._broken_error()
        if self._shut:
            raise RuntimeError("cannot schedule new futures after shutdown")
        try:
            payload = _frame(cloudpickle.dumps((fn, args, kwargs)))
        except Exception as exc:
            future: concurrent.futures.Future = concurrent.futures.Future()
            future.set_exception(exc)
            return future
        worker.flush_stdio()  # what the caller printed first comes first on a shared stdout
        return self._pool.submit(self._run_call, payload)  # raises after shutdown

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new tasks; with ``cancel_futures`` pending ones are cancelled; with ``wait``,
        return once the running ones are done and the workers have ended. The server keeps
        running."""
        self._shut = True
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)
        if wait:
            self._close_all()
        else:  # the workers end once the tasks still running are done
            threading.Thread(target=self._finish_shutdown, name="preloaded-executor-shutdown",
                             daemon=True).start()  # fmt: skip

    # -- in a waiting thread ------------------------------------------------------------------

    def _run_call(self, payload: bytes):
        """Run one call in this thread's worker and return its result (or raise)."""
        if self._broken is not None:
            raise self._broken_error()
        handle = self._worker()
        try:
            outcome = handle.run(payload)
        except BaseException:  # WorkerDied, ServerUnavailable: the next task gets a new one
            self._drop(handle)
            raise
        if outcome[0] == "init":
            self._drop(handle)
            self._break(outcome[1], outcome[2])
            raise self._broken_error()
        if self._max_tasks is not None and handle.tasks >= self._max_tasks:
            handle.retire()  # it ends while the result goes back; reaped before the next starts
        if outcome[0] == "ok":
            return outcome[1]
        _kind, exc, tb = outcome
        exc.__cause__ = RemoteTraceback(tb)
        raise exc

    def _worker(self) -> Handle:
        """This thread's worker; a new one if it has none, or if its own retired or died."""
        handle = getattr(self._local, "handle", None)
        if handle is not None:
            if handle.usable():
                return handle
            self._drop(handle)  # a retired worker has ended by now (or is hung up on)
        hello = _frame(cloudpickle.dumps((list(sys.path), self._init)))
        # The caller's environment and directory as the worker starts (dict(os.environ) costs
        # 30 us: not on every submit).
        env, cwd = dict(os.environ), os.getcwd()
        handle = Handle.start(self._bundle, self._config, env, cwd, self._umask, hello)
        with self._lock:
            self._handles.add(handle)
        self._local.handle = handle
        return handle

    def _drop(self, handle: Handle) -> None:
        self._local.handle = None
        with self._lock:
            self._handles.discard(handle)
        handle.close()

    def _break(self, exc: BaseException, tb: str) -> None:
        """An initializer raised: no more tasks, as ``ProcessPoolExecutor`` does."""
        exc.__cause__ = RemoteTraceback(tb)
        message = (f"a worker's initializer raised {type(exc).__name__}: {exc}; "
                   f"the executor takes no more tasks")  # fmt: skip
        with self._lock:
            if self._broken is None:
                self._broken = (message, exc)

    def _broken_error(self) -> BrokenExecutor:
        message, cause = self._broken
        error = BrokenExecutor(message)
        error.__cause__ = cause
        return error

    def _close_all(self) -> None:
        with self._lock:
            handles, self._handles = list(self._handles), set()
        for handle in handles:
            handle.retire()  # all of them first: they end side by side
        for handle in handles:
            handle.close()

    def _finish_shutdown(self) -> None:
        self._pool.shutdown(wait=True)
        self._close_all()


def _frame(body: bytes) -> bytes:
    return worker.HEADER.pack(len(body)) + body


def _read_bundle(bundle: str) -> dict:
    """The starter's config; its overlay (packages the bundle needs) installed if missing."""
    if not os.path.isfile(bundle):
        raise BundleError(f"{bundle}: no such bundle file (write one with "
                          f"`py-preload bundle MODULES -o {bundle}`)")  # fmt: skip
    from preloaded.install import installer as install

    try:
        config = install.starter_config(bundle)
        overlay = config.get("overlay")
        if overlay and not install.is_installed(overlay):
            # Here, not in the spawn path: that one exits the process when the install fails.
            install.ensure(overlay, config["requirements"], config["python"])
    except install.InstallError as exc:
        raise BundleError(str(exc).removeprefix("py-preload: ")) from None
    return config


def _current_umask() -> int:
    """The umask without setting it (os.umask's set-and-restore races with other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o22)
    os.umask(mask)
    return mask

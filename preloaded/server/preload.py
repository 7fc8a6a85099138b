"""Importing the bundle's modules into the server, with the fork-safety checks, then gc.freeze()."""

from __future__ import annotations

import ctypes  # imported by the server, so that each fork can arm PR_SET_PDEATHSIG at no cost
import gc
import importlib
import os
import signal
import sys
import time

from preloaded.server import keeper

# The server's own signals. The server keeps them blocked and reads them with their sender from
# a signalfd (see sigfd.py): those a run sends to its parent are relayed to the caller's parent.
# A fork unblocks them once it has left the server (child.park). A learned import must leave
# their handlers as they are.
HANDLED = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
           signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)  # fmt: skip

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: forks may outlive a killed server
    _prctl = None


def leave_server(server_fds: list) -> None:
    """First thing in a fork of the server (a standby, a probe): die with the server, and let go
    of its wakeup fd, of ``server_fds`` (its sockets, lock, pipes) and of the keeper's table.

    Without PR_SET_PDEATHSIG a server killed by SIGKILL (OOM killer, ``kill -9``) would leave a
    probe behind. A standby clears it once it is sure to see its channel's EOF if the server
    dies (``outlive_server``): the run it becomes must outlive the server."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    keeper.leave()
    signal.set_wakeup_fd(-1)
    for fd in server_fds:
        try:
            os.close(fd)
        except OSError:
            pass


def outlive_server() -> None:
    """In a standby, before it parks: the run it will be must outlive a server that dies (the
    keeper reaps it then, see keeper.py). Parked, it still ends with the server: its channel
    closes, and a standby leaves at that EOF (before the "go", never running the command)."""
    if _prctl is not None and keeper.TABLE is not None:  # else no one would report its end
        _prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0)


class ForkUnsafe(Exception):
    """A preloaded module left the server in a state its forked children cannot use."""


def thread_count() -> int:
    """OS threads of this process (not only Python's): the ones fork would silently drop."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        return threading.active_count()


def cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    check = getattr(cuda, "is_initialized", None)
    return bool(check and check())


def import_modules(modules, log) -> tuple:
    """Import ``modules`` in order; return ({name: seconds}, [(module, new threads)]).

    Raises ImportError (naming the module) or ForkUnsafe (naming the module that initialised
    CUDA). Threads are only suspected here: see ``thread_warnings``.
    """
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    times: dict = {}
    suspects: list = []
    threads = thread_count()
    for name in modules:
        start = time.perf_counter()
        try:
            importlib.import_module(name)
        except BaseException as exc:
            raise ImportError(f"importing {name} failed: {type(exc).__name__}: {exc}") from exc
        times[name] = round(time.perf_counter() - start, 4)
        log(f"imported {name} in {times[name]:.3f} s")
        if cuda_initialised():
            raise ForkUnsafe(
                f"importing {name} initialised CUDA in the server; forked children could not use"
                " the GPU. Remove it from the bundle or make it initialise CUDA lazily."
            )
        now = thread_count()
        if now > threads:
            suspects.append((name, now - threads))
            threads = now
    return times, suspects


def thread_warnings(suspects, baseline: int) -> list:
    """Warnings for threads still alive after settling (torch starts one that soon ends):
    what it means for the runs, and what to do (`py-preload status` shows them)."""
    if thread_count() <= baseline:
        return []
    return [
        f"importing {name} started {count} thread(s) that still run in the server. Warm runs"
        " do not have them (a fork copies only the thread that forks), which most programs"
        " never notice; one that waits on such a thread would hang. If a warm run hangs, run it"
        f" with PY_PRELOAD_COLD=1 and {_thread_remedy(name)}"
        for name, count in suspects
    ]


def _thread_remedy(name: str) -> str:
    if name.startswith("the warm-up "):
        return "end the thread before the warm-up returns, or start it in the program"
    return f"leave {name} out of the bundle"


def settle() -> None:
    """Make the imported state cheap to share: flush C stdio, collect, freeze."""
    for stream in (sys.stdout, sys.stderr):  # what a module printed goes to the log, once,
        try:  # not into every child's stdout (the buffer is copied by fork)
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)  # pending C-level output must not reach children's fds
    except (OSError, AttributeError):
        pass
    _keep_finalizers_in_server()
    gc.collect()
    gc.freeze()  # no more refcount writes from GC passes over preloaded objects: pages stay shared


def _keep_finalizers_in_server() -> None:
    """Exit-time ``weakref.finalize`` callbacks registered while preloading stay the server's.

    They clean up state the server owns: a child running them at its exit would remove the
    server's temporary directories, and torch's would deregister ~130 operator libraries, 30 ms
    of every warm run. The server itself ends with ``os._exit`` and never runs them either.
    """
    import weakref

    for finalizer in list(getattr(weakref.finalize, "_registry", ())):
        finalizer.atexit = False

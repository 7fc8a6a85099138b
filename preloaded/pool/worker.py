"""The child's half of ``preloaded.Executor``: read one call, run it, send back its outcome.

A warm child runs ``BOOT`` (a ``-c`` run) with fd 0 connected to the executor's channel and fds
1 and 2 the caller's own. The call and its outcome travel on that channel only, so a task may
print whatever it likes. Imported in every executor child: stdlib only, nothing slow (cloudpickle
is imported only to pickle the outcome, and the call needs it to be unpickled anyway).

Channel format, both ways: an 8-byte big-endian length, then a pickle.
- executor -> child: ``(sys_path, call)``, ``call`` being ``cloudpickle.dumps((fn, args, kwargs))``.
- child -> executor: ``("ok", value)`` or ``("raise", exception, traceback_text)``.
"""

from __future__ import annotations

import os
import pickle
import struct
import sys

# What the child runs (a -c run). A server whose py-preload predates the executor says so.
BOOT = """\
try:
    from preloaded.pool.worker import main
except ImportError as exc:
    import preloaded, sys
    sys.exit(f"py-preload: this bundle's server cannot run executor tasks ({exc}): its "
             f"py-preload ({preloaded.__path__[0]}) is older than preloaded.Executor")
main()
"""
HEADER = struct.Struct(">Q")


class RemoteError(Exception):
    """Stands in for a task's exception that could not be pickled (its type and message)."""


def main() -> None:
    """Run the call waiting on fd 0; the child then ends like any run (threads, atexit)."""
    channel = os.dup(0)
    _stdin_to_devnull()  # the task's reads of stdin must not eat the channel
    try:
        outcome = _run(_read_frame(channel))
    except BaseException as exc:  # a call that cannot even be unpickled
        outcome = _failure(exc, skip=0)
    flush_stdio()  # the task's output is out before the caller can see its result
    try:
        _write_frame(channel, _dumps(outcome))
    finally:
        os.close(channel)


def _run(frame: bytes) -> tuple:
    sys_path, call = pickle.loads(frame)
    # As multiprocessing does: the caller's sys.path, so that functions it pickled by reference
    # (defined in modules it imported) can be imported here.
    sys.path[:] = list(sys_path) + [p for p in sys.path if p not in sys_path]
    fn, args, kwargs = pickle.loads(call)
    try:
        return ("ok", fn(*args, **kwargs))
    except BaseException as exc:
        return _failure(exc, skip=1)


def _failure(exc: BaseException, skip: int) -> tuple:
    """``("raise", exc, text)``: the traceback text without this module's own frames."""
    import traceback

    tb = exc.__traceback__
    for _ in range(skip):
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    return ("raise", exc, text)


def _dumps(outcome: tuple) -> bytes:
    """Pickle the outcome; an unpicklable one becomes an exception that says so."""
    import cloudpickle

    try:
        return cloudpickle.dumps(outcome)
    except BaseException as exc:
        if outcome[0] == "ok":
            error = pickle.PicklingError(
                f"the task's result ({type(outcome[1]).__qualname__}) cannot be pickled: {exc}"
            )
            return cloudpickle.dumps(_failure(error, skip=0))
        original = outcome[1]
        stand_in = RemoteError(f"{type(original).__qualname__}: {original}")
        return cloudpickle.dumps(("raise", stand_in, outcome[2]))


def _read_frame(fd: int) -> bytes:
    (size,) = HEADER.unpack(_read_exact(fd, HEADER.size))
    return _read_exact(fd, size)


def _read_exact(fd: int, size: int) -> bytes:
    chunks = []
    while size:
        data = os.read(fd, min(size, 1 << 20))
        if not data:
            raise EOFError("the executor closed the channel before sending the call")
        chunks.append(data)
        size -= len(data)
    return b"".join(chunks)


def _write_frame(fd: int, body: bytes) -> None:
    view = memoryview(HEADER.pack(len(body)) + body)
    while view:
        view = view[os.write(fd, view) :]


def _stdin_to_devnull() -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)


def flush_stdio() -> None:
    """Flush sys.stdout and sys.stderr, whatever state they are in (the executor uses it too)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass

"""The child's half of ``preloaded.Executor``: run call after call, send back each outcome.

A warm child runs ``BOOT`` (a ``-c`` run) with fd 0 connected to the executor's channel and fds
1 and 2 the caller's own. Calls and outcomes travel on that channel only, so a task may print
whatever it likes. The child runs tasks until the executor closes its end of the channel (it
retires the worker after ``max_tasks_per_child`` tasks, or at shutdown); it then ends like any
run (non-daemon threads, atexit). Imported in every executor child: stdlib only, nothing slow
(cloudpickle is imported only to pickle outcomes, and the calls need it to be unpickled anyway).

Channel format, both ways: an 8-byte big-endian length, then a pickle.
- executor -> child, once: ``(sys_path, init)``, ``init`` being None or
  ``cloudpickle.dumps((initializer, initargs))``; then per task
  ``cloudpickle.dumps((fn, args, kwargs))``.
- child -> executor, per task: ``("ok", value)`` or ``("raise", exception, traceback_text)``;
  instead of the first task's outcome, ``("init", exception, traceback_text)`` when the
  initializer raised (the child then ends).
"""

from __future__ import annotations

import os
import pickle
import struct
import sys

# What the child runs (a -c run). A server whose py-preload predates the reusable worker says so.
BOOT = """\
try:
    from preloaded.pool.worker import serve
except ImportError as exc:
    import preloaded, sys
    sys.exit(f"py-preload: this bundle's server cannot run executor tasks ({exc}): its "
             f"py-preload ({preloaded.__path__[0]}) is older than this preloaded.Executor")
serve()
"""
HEADER = struct.Struct(">Q")


class RemoteError(Exception):
    """Stands in for a task's exception that could not be pickled (its type and message)."""


def serve() -> None:
    """Run the initializer, then every call that comes on fd 0, until the executor closes it."""
    channel = os.dup(0)
    _stdin_to_devnull()  # the task's reads of stdin must not eat the channel
    frames = _Frames(channel)
    try:
        hello = frames.next()
        if hello is None or not _initialize(hello, channel):
            return
        while True:
            frame = frames.next()
            if frame is None:  # the executor retired this worker
                return
            outcome = _run(frame)
            flush_stdio()  # the task's output is out before the caller can see its result
            _write_frame(channel, _dumps(outcome))
    finally:
        os.close(channel)


def _initialize(hello: bytes, channel: int) -> bool:
    """Take the caller's sys.path, run the initializer; False (after saying why) if it raised."""
    try:
        sys_path, init = pickle.loads(hello)
        # As multiprocessing does: the caller's sys.path, so that functions it pickled by
        # reference (defined in modules it imported) can be imported here.
        sys.path[:] = list(sys_path) + [p for p in sys.path if p not in sys_path]
        if init is not None:
            initializer, initargs = pickle.loads(init)
            initializer(*initargs)
        return True
    except BaseException as exc:
        _kind, error, text = _failure(exc, skip=1)
        flush_stdio()
        _write_frame(channel, _dumps(("init", error, text)))
        return False


def _run(frame: bytes) -> tuple:
    try:
        fn, args, kwargs = pickle.loads(frame)
    except BaseException as exc:  # a call that cannot even be unpickled here
        return _failure(exc, skip=0)
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


# Results that plain pickle writes exactly as cloudpickle does, 10x faster (0.3 us, not 3.7).
_PLAIN = frozenset({int, float, str, bytes, bool, type(None), complex})


def _dumps(outcome: tuple) -> bytes:
    """Pickle the outcome; an unpicklable one becomes an exception that says so."""
    if outcome[0] == "ok" and type(outcome[1]) in _PLAIN:
        return pickle.dumps(outcome, pickle.HIGHEST_PROTOCOL)
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
        return cloudpickle.dumps((outcome[0], stand_in, outcome[2]))


class _Frames:
    """Length-prefixed frames read from ``fd``, with one read for a small call and its header."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = bytearray()

    def next(self) -> bytes | None:
        """The next frame; None at EOF (a frame cut short too: the executor went away)."""
        if not self._fill(HEADER.size):
            return None
        (size,) = HEADER.unpack_from(self.buffer)
        if not self._fill(HEADER.size + size):
            return None
        frame = bytes(self.buffer[HEADER.size : HEADER.size + size])
        del self.buffer[: HEADER.size + size]
        return frame

    def _fill(self, size: int) -> bool:
        while len(self.buffer) < size:
            data = os.read(self.fd, max(size - len(self.buffer), 1 << 16))
            if not data:
                return False
            self.buffer += data
        return True


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

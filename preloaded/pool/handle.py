"""The executor's handle on one warm worker: a child of the bundle's server running
``preloaded.pool.worker.serve``, reached through its channel (the child's fd 0, a socket pair)
and watched through its run's connection to the server (which reports how it ended).

Used by one executor thread at a time: no locking here.
"""

from __future__ import annotations

import os
import select
import socket
import time

import cloudpickle

from preloaded import wire
from preloaded.client import connection, run
from preloaded.pool import worker
from preloaded.pool.errors import ServerUnavailable, WorkerDied

STALE_RETRIES = 3  # a retiring server answers "stale": the next connection starts a fresh one
RETIRE_WAIT = 5.0  # a retired worker ends its run (threads, atexit); then it is hung up on


class Handle:
    """One warm worker. ``start`` makes it; ``run`` sends a task and returns its outcome tuple;
    ``retire`` lets it end; ``close`` waits for that end (or hangs up on it)."""

    def __init__(self, pid: int, sock, reader, channel: socket.socket) -> None:
        self.pid = pid
        self.sock = sock
        self.reader = reader
        self.channel = channel
        self.tasks = 0
        self.retired = False  # its channel is closed: it ends, or has ended
        self.ended = False  # the server reported its end, or was lost
        self.buffer = bytearray()
        self.poller = select.poll()
        self.poller.register(sock.fileno(), select.POLLIN)
        self.poller.register(channel.fileno(), select.POLLIN)

    @classmethod
    def start(cls, bundle: str, config: dict, env: dict, cwd: str, umask: int, hello: bytes):
        """Start a warm child running the worker and send it ``hello`` (sys.path, initializer)."""
        for attempt in range(STALE_RETRIES):
            sock = _open_server(bundle, config)
            ours, theirs = socket.socketpair()
            try:
                started = _hand_over(bundle, config, sock, theirs, env, cwd, umask)
            except (_Reset, _Cold) as exc:  # _Reset: a dying server's listener (a new one
                # starts once it is gone); _Cold: another environment than the server's (a second
                # request alike retires it, see server/envdeps.py, and a new one is made with it)
                sock.close()
                ours.close()
                if attempt + 1 == STALE_RETRIES:
                    raise ServerUnavailable(str(exc)) from None
                time.sleep(0.05 * (attempt + 1))
                continue
            except BaseException:
                sock.close()
                ours.close()
                raise
            finally:
                theirs.close()
            if started is None:  # the server was stale: it retires, the next one is fresh
                sock.close()
                ours.close()
                continue
            handle = cls(started[0], sock, started[1], ours)
            handle._send(hello)
            return handle
        raise ServerUnavailable(f"the server of {bundle} kept restarting")

    def usable(self) -> bool:
        """An idle worker that is still there: the server sent nothing, the child wrote nothing
        (a worker killed between tasks, or lost with its server, is replaced, not blamed)."""
        return not self.retired and not self.poller.poll(0)

    def run(self, payload: bytes) -> tuple:
        """Send one task, return its outcome tuple; raise WorkerDied or ServerUnavailable."""
        self.tasks += 1
        self._send(payload)
        return self._outcome()

    def retire(self) -> None:
        """EOF on its channel: the worker ends its run as any program ends (see worker.serve)."""
        if not self.retired:
            self.retired = True
            self.channel.close()

    def close(self, wait: float = RETIRE_WAIT) -> None:
        """Retire it and wait (up to ``wait`` s) for the server to report its end; then hang up
        (the server ends a child whose connection closed)."""
        self.retire()
        deadline = time.monotonic() + wait
        try:
            while not self.ended and _buffered_status(self.reader) is None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                    break
                data = self.sock.recv(65536)
                if not data:
                    break
                self.reader.feed(data)
        except (OSError, ServerUnavailable):
            pass
        finally:
            self.sock.close()

    def _send(self, data: bytes) -> None:
        try:
            self.channel.sendall(data)
        except OSError:
            pass  # the child died before reading it all: its status says how

    def _outcome(self) -> tuple:
        """Read the channel until one whole outcome is there. If the server reports the child's
        end first, what the child wrote before it ended is already buffered: read it all."""
        while True:
            frame = self._frame()
            if frame is not None:
                return _decode(frame)
            status = None
            for fd, _event in self.poller.poll():
                if fd == self.channel.fileno():
                    if not self._recv():
                        self.poller.unregister(fd)
                else:
                    try:
                        status = _read_status(self.sock, self.reader)
                    except ServerUnavailable:
                        self.retired = self.ended = True
                        raise
            if status is not None:
                self.ended = True
                while self.poller.poll(0) and self._recv():
                    pass  # a process the task forked may hold the channel open: no blocking read
                frame = self._frame()
                if frame is not None:
                    return _decode(frame)
                self.retired = True
                raise WorkerDied(self.pid, status)

    def _recv(self) -> bool:
        try:
            data = self.channel.recv(1 << 20)
        except (ConnectionResetError, BlockingIOError):  # closed without reading the whole call
            data = b""
        self.buffer += data
        return bool(data)

    def _frame(self) -> bytes | None:
        size = worker.HEADER.size
        if len(self.buffer) < size:
            return None
        (length,) = worker.HEADER.unpack_from(self.buffer)
        if len(self.buffer) < size + length:
            return None
        frame = bytes(self.buffer[size : size + length])
        del self.buffer[: size + length]
        return frame


class _Reset(Exception):
    """The connection broke before the server answered (it was being killed, for instance)."""


class _Cold(Exception):
    """The server would not run the task warm (its reason: another environment, say)."""


def _open_server(bundle: str, config: dict):
    try:
        return run.open_server(config, bundle)
    except connection.Fallback as exc:
        raise ServerUnavailable(f"cannot start the server of {bundle}: "
                                f"{exc.message or exc}") from None  # fmt: skip


def _hand_over(bundle, config, sock, channel: socket.socket, env, cwd, umask):
    """Send the run request with the child's end of the channel as its stdin and our stdout and
    stderr; (pid, reader) once it started, None if the server is stale."""
    kinds = run.stdio_kinds()[1:]
    stdio = ["pipe"] + ["closed" if kind == "closed" else "pipe" for kind in kinds]
    python = config["python"]
    request = {
        "v": 1, "mode": "code", "target": worker.BOOT, "argv": ["-c"],
        "orig_argv": [python, "-c", worker.BOOT], "cwd": cwd, "env": env, "umask": umask,
        "flags": {"u": False, "B": False, "i": False, "q": False, "W": []},
        "stdio": stdio, "ignored": [],
    }  # fmt: skip
    out = [fd if kind != "closed" else _devnull() for fd, kind in zip((1, 2), kinds)]
    fds = [channel.detach()] + out
    try:  # it closes the fds above 2 it is given, whatever happens
        reply, reader = connection.hand_over(sock, fds, request)
    except connection.Fallback as exc:  # it closed the fds it was given
        raise _Reset(f"the server of {bundle} did not take the task: {exc.message}") from None
    if "started" in reply:
        return reply["started"], reader
    if reply.get("error") == "stale":
        return None
    if "cold" in reply:
        raise _Cold(f"the server of {bundle} cannot run the task warm: {reply['cold']}")
    raise ServerUnavailable(f"the server of {bundle} refused the task: {reply.get('error')}")


def _read_status(sock, reader):
    """The child's exit status (negative: killed by that signal) once it is there, else None."""
    try:
        data = sock.recv(65536)
    except OSError:
        data = b""
    if not data:
        raise ServerUnavailable("lost the server while a task ran (was it stopped?)")
    reader.feed(data)
    return _buffered_status(reader)


def _buffered_status(reader):
    try:
        frames = list(reader.frames())
    except wire.ProtocolError as exc:
        raise ServerUnavailable(f"bad reply from the server: {exc}") from None
    for frame in frames:
        if "exit" in frame:
            return frame["exit"]
        if "signal" in frame:
            return -frame["signal"]
        if "error" in frame:
            raise ServerUnavailable(f"the server failed the task: {frame['error']}")
    return None


def _decode(frame: bytes) -> tuple:
    try:
        return cloudpickle.loads(frame)
    except Exception as exc:
        import pickle

        error = pickle.UnpicklingError(f"cannot unpickle the task's outcome here: {exc!r}")
        return ("raise", error, "")


def _devnull() -> int:
    """/dev/null on an fd above 2: a caller whose stdout is closed must not get it there."""
    fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    if fd > 2:
        return fd
    import fcntl

    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(fd)
    return high


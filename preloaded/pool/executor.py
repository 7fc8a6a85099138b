"""``preloaded.Executor``: a ``concurrent.futures.Executor`` whose tasks run in warm children.

Each ``submit`` runs one call in a fresh fork of a bundle's server (started on first use, as
the starter does), so a task that needs torch starts in milliseconds and no worker carries
state from one task to the next. The function and its arguments go over with cloudpickle
(lambdas and closures work); the result, or the exception with its remote traceback, comes
back. Client side only: a thread of a ``ThreadPoolExecutor`` in the caller waits on each
running child, which gives ``max_workers``, ``map``, ``cancel`` and ``shutdown`` their usual
meaning. The child's stdout and stderr are the caller's own; the call and its outcome travel on
a separate channel (the child's stdin, a socket pair), see ``preloaded.worker``.
"""

from __future__ import annotations

import concurrent.futures
import os
import select
import signal
import socket
import sys

import cloudpickle

from preloaded import wire
from preloaded.client import connection, run
from preloaded.pool import worker

STALE_RETRIES = 3  # a retiring server answers "stale": the next connection starts a fresh one


class BundleError(Exception):
    """The bundle FILE does not exist or is not a starter written by ``py-preload bundle``."""


class ServerUnavailable(Exception):
    """The bundle's server cannot be started or reached, or was lost during a task."""


class WorkerDied(Exception):
    """The child running a task ended without sending its outcome (``os._exit``, a signal).

    ``exitcode`` is its exit status, or ``-N`` when signal ``N`` killed it. The executor keeps
    working: following tasks get fresh children.
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


class RemoteTraceback(Exception):
    """Attached as ``__cause__`` of a task's exception: the traceback text from the child."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return '\n"""\n' + self.tb + '"""'


class Executor(concurrent.futures.Executor):
    """Run calls in fresh warm children of the bundle ``FILE``'s server.

    ``max_workers`` children run at once (default: the number of CPUs). The server is started
    by the first task if it is not running; it keeps running afterwards (until its idle
    timeout, or ``py-preload stop FILE``), so the next program's first task is warm too.
    """

    def __init__(self, bundle: str, max_workers: int | None = None) -> None:
        if max_workers is None:
            max_workers = os.cpu_count() or 1
        if max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        self._bundle = os.path.abspath(bundle)  # the same server after a chdir
        self._config = _read_bundle(bundle)
        self._umask = _current_umask()
        self._shut = False
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers, thread_name_prefix="preloaded-executor"
        )

    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:
        """Schedule ``fn(*args, **kwargs)`` in a fresh warm child; return its Future.

        The call is pickled now (a later change to a mutable argument does not reach the
        task); an unpicklable call gives a Future holding the ``PicklingError``.
        """
        if self._shut:
            raise RuntimeError("cannot schedule new futures after shutdown")
        try:
            payload = _dump_call(fn, args, kwargs)
        except Exception as exc:
            future: concurrent.futures.Future = concurrent.futures.Future()
            future.set_exception(exc)
            return future
        worker.flush_stdio()  # what the caller printed first comes first on a shared stdout
        env, cwd = dict(os.environ), os.getcwd()
        return self._pool.submit(self._run_call, payload, env, cwd)  # raises after shutdown

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new tasks; with ``cancel_futures`` pending ones are cancelled; with ``wait``,
        return once the running ones are done. The server keeps running."""
        self._shut = True
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)

    # -- in a waiting thread ------------------------------------------------------------------

    def _run_call(self, payload: bytes, env: dict, cwd: str):
        """Run one call in a warm child and return its result (or raise its exception)."""
        for _attempt in range(STALE_RETRIES):
            ours, theirs = socket.socketpair()
            try:
                sock = self._open_server()
                try:
                    started = self._hand_over(sock, theirs, env, cwd)
                    if started is not None:
                        return _finish(*started, sock, ours, payload)
                finally:
                    sock.close()
            finally:
                ours.close()
                theirs.close()
        raise ServerUnavailable(f"the server of {self._bundle} kept restarting")

    def _open_server(self):
        try:
            return run.open_server(self._config, self._bundle)
        except connection.Fallback as exc:
            raise ServerUnavailable(f"cannot start the server of {self._bundle}: "
                                    f"{exc.message or exc}") from None  # fmt: skip

    def _hand_over(self, sock, channel: socket.socket, env: dict, cwd: str):
        """Send the run request with the child's end of the channel as its stdin and our
        stdout and stderr; (pid, reader) once it started, None if the server is stale."""
        kinds = run.stdio_kinds()[1:]
        stdio = ["pipe"] + ["closed" if kind == "closed" else "pipe" for kind in kinds]
        request = self._request(env, cwd, stdio)
        out = [fd if kind != "closed" else _devnull() for fd, kind in zip((1, 2), kinds)]
        fds = [channel.detach()] + out
        try:  # it closes the fds above 2 it is given, whatever happens
            reply, reader = connection.hand_over(sock, fds, request)
        except connection.Fallback as exc:  # it closed the fds it was given
            raise ServerUnavailable(f"the server of {self._bundle} did not take the task: "
                                    f"{exc.message}") from None  # fmt: skip
        if "started" in reply:
            return reply["started"], reader
        if reply.get("error") == "stale":
            return None
        raise ServerUnavailable(f"the server of {self._bundle} refused the task: "
                                f"{reply.get('error')}")  # fmt: skip

    def _request(self, env: dict, cwd: str, stdio: list) -> dict:
        python = self._config["python"]
        return {
            "v": 1, "mode": "code", "target": worker.BOOT, "argv": ["-c"],
            "orig_argv": [python, "-c", worker.BOOT], "cwd": cwd, "env": env,
            "umask": self._umask, "flags": {"u": False, "B": False, "i": False, "q": False, "W": []},
            "stdio": stdio, "ignored": [],
        }  # fmt: skip


def _finish(pid: int, reader, sock, channel: socket.socket, payload: bytes):
    """Send the call, then collect the outcome and the exit status; return or raise."""
    try:
        channel.sendall(payload)
    except OSError:
        pass  # the child died before reading it: its status says how
    status, data = _collect(sock, reader, channel)
    outcome = _decode(data)
    if outcome is None:
        raise WorkerDied(pid, status)
    if outcome[0] == "ok":
        return outcome[1]
    _kind, exc, tb = outcome
    exc.__cause__ = RemoteTraceback(tb)
    raise exc


def _collect(sock, reader, channel: socket.socket):
    """Read the channel (the outcome may be bigger than a socket buffer) until the server sends
    the child's status; then whatever the child wrote before it ended is already buffered."""
    chunks: list = []
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    poller.register(channel.fileno(), select.POLLIN)
    status = _buffered_status(reader)  # "started" and the status may have come in one read
    while status is None:
        for fd, _event in poller.poll():
            if fd == channel.fileno():
                data = _recv(channel)
                if data:
                    chunks.append(data)
                else:
                    poller.unregister(fd)
            else:
                status = _read_status(sock, reader)
    channel.setblocking(False)
    try:
        while True:
            data = _recv(channel)
            if not data:
                break
            chunks.append(data)
    except BlockingIOError:
        pass  # a process the task forked may still hold the channel open
    return status, b"".join(chunks)


def _recv(channel: socket.socket) -> bytes:
    try:
        return channel.recv(1 << 20)
    except ConnectionResetError:  # the child closed its end without reading the whole call
        return b""


def _read_status(sock, reader):
    """The child's exit status (negative: killed by that signal) once it is there, else None."""
    data = sock.recv(65536)
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


def _decode(data: bytes):
    """The child's outcome tuple, or None if it did not send a complete one."""
    size = worker.HEADER.size
    if len(data) < size:
        return None
    (length,) = worker.HEADER.unpack_from(data)
    if len(data) < size + length:
        return None
    try:
        return cloudpickle.loads(data[size : size + length])
    except Exception as exc:
        import pickle

        error = pickle.UnpicklingError(f"cannot unpickle the task's outcome here: {exc!r}")
        return ("raise", error, "")


def _dump_call(fn, args: tuple, kwargs: dict) -> bytes:
    call = cloudpickle.dumps((fn, args, kwargs))
    body = cloudpickle.dumps((list(sys.path), call))
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


def _devnull() -> int:
    """/dev/null on an fd above 2: a caller whose stdout is closed must not get it there."""
    fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    if fd > 2:
        return fd
    import fcntl

    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(fd)
    return high

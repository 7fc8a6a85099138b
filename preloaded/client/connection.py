"""The connection to the server: connect, hand over a run, forward signals, read the status;
if the server dies during the run, follow the program itself.

Stdlib only, on the fast path.
"""

from __future__ import annotations

import _signal
import _socket
import os
import time

from preloaded import wire
from preloaded.paths import exit_file


class Fallback(Exception):
    """The server cannot run this command; run it cold. ``message`` is warned about (if any)."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message


def connect(path: str):
    """A connected socket to the server at ``path``, or None when nothing listens there."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except OSError as exc:
        sock.close()
        raise Fallback(f"cannot connect to {path}: {exc.strerror}") from exc
    return sock


def hand_over(sock, fds, request: dict):
    """Send the request with the child's fds (its stdio, then the caller's others); return the
    server's first reply and the reader."""
    try:
        try:
            wire.send(sock, request, fds)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before it read our request (another uid): its reply says why
        reader = wire.FrameReader()
        return wire.recv_frame(sock, reader), reader
    except (OSError, EOFError, wire.ProtocolError) as exc:
        raise Fallback(f"the server did not take the run ({exc})") from exc
    finally:
        for fd in set(fds[:3]) - {0, 1, 2}:  # the PTY slave or /dev/null: the child has them now
            os.close(fd)


# Signals that reach the run's whole process group, as the server's loop.GROUP_SIGNALS do: for a
# run the server left, the client sends them itself.
GROUP_SIGNALS = (_signal.SIGINT, _signal.SIGQUIT, _signal.SIGSTOP, _signal.SIGCONT, _signal.SIGTSTP,
                 _signal.SIGTERM, _signal.SIGHUP)
EXIT_FILE_WAIT = 2.0  # after the run ended: how long its keeper may take to publish its status


class Link:
    """A started run's line to its server, and what replaces it if the server dies.

    The server sends the run's status; a server that ends while its program runs (SIGKILL, the
    OOM killer, a crash) leaves the program to its keeper (server/keeper.py). The client then
    follows the program by the pidfd it took at "started" (before the pid could be reused),
    signals it directly, and reads its status from the keeper's exit file once it ended.
    ``fileno()`` is what to wait on: the socket, then the pidfd.
    """

    def __init__(self, sock, reader, started: dict, socket_path: str) -> None:
        self.sock, self.reader = sock, reader
        self.pid = started["started"]
        self.pidfd = None
        self.exit_path = None
        self.lost = False
        keeper = started.get("keeper")
        if type(keeper) is int and type(self.pid) is int and self.pid > 0:
            try:
                self.pidfd = os.pidfd_open(self.pid)
            except (OSError, AttributeError):  # Linux < 5.3: the run is lost with its server
                return
            self.exit_path = exit_file(socket_path, keeper, self.pid)

    def fileno(self) -> int:
        return self.pidfd if self.lost else self.sock.fileno()

    def send_signal(self, signum: int) -> None:
        if self.lost:
            self._signal_run(signum)
            return
        try:
            wire.send(self.sock, {"signal": signum})
        except OSError:
            pass  # the server is gone; read_status sees it

    def read_status(self):
        """Read what is ready; return the final status once it is there, else None."""
        if self.lost:
            return self._published_status()
        status = _buffered_status(self.reader)  # "started" and "exit" can arrive in one recv
        if status:
            return status
        try:
            data = self.sock.recv(65536)
        except OSError:
            data = b""
        if data:
            self.reader.feed(data)
            return _buffered_status(self.reader)
        if self.pidfd is None:
            os.write(2, b"py-preload: lost the server during the run\n")
            return ("exit", 1)
        self.lost = True  # the program goes on: wait for it on the pidfd
        return None

    def hang_up(self) -> None:
        """The caller's end of the run (its Jupyter died): closing the connection has the
        server SIGHUP the program; once the server is gone, the client does it."""
        if self.lost:
            self._signal_run(_signal.SIGHUP)

    def close(self) -> None:
        self.sock.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    def _signal_run(self, signum: int) -> None:
        try:
            if signum in GROUP_SIGNALS:  # the run leads its own process group
                os.killpg(self.pid, signum)
            else:
                _signal.pidfd_send_signal(self.pidfd, signum)
        except OSError:
            pass  # it ended meanwhile: its status is on its way

    def _published_status(self):
        """The program ended (its pidfd is readable): its status, as its keeper wrote it."""
        deadline = time.monotonic() + EXIT_FILE_WAIT
        while True:
            try:
                with open(self.exit_path, "rb") as f:
                    code = int(f.read())
                os.unlink(self.exit_path)
                return ("signal", -code) if code < 0 else ("exit", code)
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    os.write(2, b"py-preload: lost the server during the run\n")
                    return ("exit", 1)
                time.sleep(0.002)


def _buffered_status(reader):
    try:
        for frame in reader.frames():
            if "parent_signal" in frame:
                signal_parent(frame["parent_signal"])
            elif "exit" in frame:
                return ("exit", frame["exit"])
            elif "signal" in frame:
                return ("signal", frame["signal"])
            elif "error" in frame:
                os.write(2, f"py-preload: {frame['error']}\n".encode())
                return ("exit", 1)
    except wire.ProtocolError as exc:
        os.write(2, f"py-preload: bad reply from the server: {exc}\n".encode())
        return ("exit", 1)
    return None


def signal_parent(signum) -> None:
    """The program signalled its parent (the server, as the kernel sees it): python's parent
    would have been ours, so the signal goes there (see server/sigfd.py)."""
    if type(signum) is int and 0 < signum < 65:
        try:
            os.kill(os.getppid(), signum)
        except OSError:
            pass  # as the program's own kill would have failed

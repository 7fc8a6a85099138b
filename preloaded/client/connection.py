"""The connection to the server: connect, hand over a run, forward signals, read the status.

Stdlib only, on the fast path.
"""

from __future__ import annotations

import _socket
import os

from preloaded import wire


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
    """Send the request with the child's fds; return the server's first reply and the reader."""
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
        for fd in set(fds) - {0, 1, 2}:  # the PTY slave or /dev/null: the child has them now
            os.close(fd)


def send_signal(sock, signum: int) -> None:
    try:
        wire.send(sock, {"signal": signum})
    except OSError:
        pass  # the server is gone; read_status reports it


def read_status(sock, reader):
    """Read what the server sent; return the final status once it is there, else None."""
    status = _buffered_status(reader)  # "started" and "exit" can arrive in one recv
    if status:
        return status
    try:
        data = sock.recv(65536)
    except OSError:
        data = b""
    if not data:
        os.write(2, b"py-preload: lost the server during the run\n")
        return ("exit", 1)
    reader.feed(data)
    return _buffered_status(reader)


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

"""Framing shared by the client and the server: a 4-byte big-endian length, then UTF-8 JSON.

The first frame of a connection may carry file descriptors (SCM_RIGHTS). This module is on the
starter's fast path, so it uses the C halves of ``json`` and ``struct`` (``_json``, ``_struct``)
and ``_socket`` directly: importing ``json``, ``struct`` and ``socket`` costs ~20 ms of imports
(``re``, ``enum``) that every warm run would pay.
"""

from __future__ import annotations

import _json
import _socket
import _struct

HEADER = _struct.Struct(">I")
MAX_FRAME = 1 << 20  # 1 MiB: a request carries argv and the environment, nothing bulky
# stdin, stdout, stderr (or the PTY slave in their place), then every other fd the caller holds.
# The kernel's SCM_MAX_FD: one message carries at most this many, and a request is one message
# (a caller holding more runs cold: see client/fds.py).
MAX_FDS = 253
FD_SIZE = _struct.calcsize("i")


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame."""


def _default(obj):
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


_encode = _json.make_encoder(
    None, _default, _json.encode_basestring_ascii, None, ":", ",", False, False, False
)


class _DecodeContext:
    # The attributes _json.make_scanner reads; the same defaults as json.JSONDecoder.
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo: dict = {}

    @staticmethod
    def parse_constant(name):
        raise ValueError(f"invalid constant {name}")


_scan = _json.make_scanner(_DecodeContext())


def dumps(obj) -> bytes:
    """Encode ``obj`` as compact ASCII JSON."""
    return "".join(_encode(obj, 0)).encode("ascii")


def loads(data: bytes):
    """Decode one JSON value that must fill ``data`` exactly."""
    text = data.decode("utf-8")
    try:
        value, end = _scan(text, 0)
    except StopIteration as exc:
        raise ProtocolError("invalid JSON") from exc
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"invalid JSON: {exc}") from exc
    finally:
        _DecodeContext.memo.clear()
    if text[end:].strip():
        raise ProtocolError("trailing data after JSON value")
    return value


def pack(obj) -> bytes:
    """One frame: length header plus the JSON body."""
    body = dumps(obj)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(len(body)) + body


def send(sock, obj, fds=()) -> None:
    """Send one frame; ``fds`` ride along with its first byte."""
    data = pack(obj)
    if fds:
        anc = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, _struct.pack(f"{len(fds)}i", *fds))]
        sent = sock.sendmsg([data], anc)
        data = data[sent:]
    if data:
        sock.sendall(data)


def unpack_fds(ancdata, flags) -> list:
    """File descriptors from ``recvmsg`` ancillary data. Raises on truncation, after closing them."""
    fds: list = []
    for level, kind, payload in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % FD_SIZE
            fds.extend(_struct.unpack(f"{usable // FD_SIZE}i", payload[:usable]))
    if flags & getattr(_socket, "MSG_CTRUNC", 0):
        close_all(fds)
        raise ProtocolError("too many file descriptors (ancillary data truncated)")
    return fds


def anc_space() -> int:
    """Room for one more descriptor than allowed, so that too many shows up as a count."""
    return _socket.CMSG_SPACE((MAX_FDS + 1) * FD_SIZE)


def close_all(fds) -> None:
    import os

    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class FrameReader:
    """Incremental frame parser for non-blocking or blocking sockets."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> None:
        self.buf += data

    def frames(self):
        """Yield every complete frame in the buffer; raise ProtocolError on a bad one."""
        while len(self.buf) >= HEADER.size:
            (size,) = HEADER.unpack_from(self.buf)
            if size > MAX_FRAME:
                raise ProtocolError(f"frame of {size} bytes exceeds {MAX_FRAME}")
            if len(self.buf) < HEADER.size + size:
                return
            body = bytes(self.buf[HEADER.size : HEADER.size + size])
            del self.buf[: HEADER.size + size]
            try:
                yield loads(body)
            except UnicodeDecodeError as exc:
                raise ProtocolError("frame is not UTF-8") from exc


def recv_frame(sock, reader: FrameReader):
    """Blocking read of the next frame from ``sock``; raises EOFError when the peer closes."""
    while True:
        for frame in reader.frames():
            return frame
        data = sock.recv(65536)
        if not data:
            raise EOFError("connection closed")
        reader.feed(data)

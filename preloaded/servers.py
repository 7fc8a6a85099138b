"""This user's servers as the runtime directory lists them, and one control request to one of
them: what the CLI (status, stop, list) and the memory budget of a starting server share."""

from __future__ import annotations

import json
import os
import socket

from preloaded import wire
from preloaded.paths import UnsafeDirectory, runtime_dir


def ask(path: str, request: dict, timeout: float = 5.0):
    """One control request to the server listening at ``path``; None if nothing answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            wire.send(sock, {"v": 1, **request})
            return wire.recv_frame(sock, wire.FrameReader())
        except (OSError, EOFError, wire.ProtocolError):
            return None


def listed() -> list:
    """The info (a dict, see the server's write_info) of every server in the runtime directory."""
    try:
        directory = runtime_dir(create=False)
        names = sorted(os.listdir(directory))
    except (OSError, ValueError, UnsafeDirectory):
        return []
    found = []
    for name in names:
        if name.endswith(".json"):
            try:
                with open(os.path.join(directory, name), encoding="utf-8") as f:
                    found.append(json.load(f))
            except (OSError, ValueError):
                continue
    return found

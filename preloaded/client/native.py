"""The Python side of a native starter: its embedded configuration, and the boot it execs.

A native starter is ``native.c`` compiled, followed by one block and a 16-byte trailer::

    CONFIG-JSON \\0 PYTHON \\0 OVERLAY \\0 PKG_ROOT \\0 MAGIC LENGTH

``CONFIG-JSON`` is the config dict a Python starter passes to ``starter.main`` (ASCII JSON, so
``strings FILE`` shows it); the three paths after it are what the C client needs itself (raw
filesystem bytes, OVERLAY empty when there is none); MAGIC is 8 bytes and LENGTH the block's
size in 8 hex digits. Whatever the C client does not run warm it hands to ``main`` below, run
as ``python -SI -c BOOT PKG_ROOT FILE ARGS...``: the same starter as a Python starter file.

Stdlib only: ``main`` is on the path of every native run that goes through Python.
"""

from __future__ import annotations

import os

MAGIC = b"PYPRLD1\n"
TRAILER = 16
MAX_BLOCK = 1 << 20  # native.c MAX_BLOCK
ELF = b"\x7fELF"


def pack(config: dict) -> bytes:
    """The block and trailer appended to the compiled client for ``config``."""
    from preloaded import wire

    fields = [
        wire.dumps(config),
        os.fsencode(config["python"]),
        os.fsencode(config.get("overlay") or ""),
        os.fsencode(config["pkg_root"]),
    ]
    if any(b"\0" in field for field in fields):
        raise ValueError("a path in the configuration contains a NUL byte")
    block = b"".join(field + b"\0" for field in fields)
    if len(block) > MAX_BLOCK:
        raise ValueError(f"configuration of {len(block)} bytes exceeds {MAX_BLOCK}")
    return block + MAGIC + b"%08x" % len(block)


def is_native(head: bytes) -> bool:
    """Whether a file starting with ``head`` is a native (compiled) starter."""
    return head.startswith(ELF)


def read_config(path: str):
    """The config dict embedded in the native starter ``path``; None if it carries none."""
    from preloaded import wire

    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size < TRAILER:
            return None
        f.seek(size - TRAILER)
        trailer = f.read(TRAILER)
        if not trailer.startswith(MAGIC):
            return None
        try:
            length = int(trailer[len(MAGIC) :], 16)
        except ValueError:
            return None
        if not 0 < length <= min(MAX_BLOCK, size - TRAILER):
            return None
        f.seek(size - TRAILER - length)
        block = f.read(length)
    try:
        config = wire.loads(block.split(b"\0", 1)[0])
    except (wire.ProtocolError, UnicodeDecodeError):
        return None
    return config if isinstance(config, dict) and "python" in config else None


def main() -> None:
    """The C client's fallback: ``sys.argv`` is ``["-c", FILE, ARGS...]``; run FILE's starter."""
    import sys

    del sys.argv[0]  # now what a Python starter's sys.argv is: [FILE, ARGS...]
    try:
        config = read_config(sys.argv[0])
    except OSError as exc:
        config = None
        why = exc.strerror
    else:
        why = "no configuration"
    if config is None:
        os.write(2, f"py-preload: cannot read the starter {sys.argv[0]}: {why}\n".encode())
        os._exit(127)
    from preloaded.client.starter import main as starter_main

    starter_main(config)

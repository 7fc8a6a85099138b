"""Compiling the native client (``preloaded/client/native.c``) and writing native starters.

The compiler is ``$CC``, else ``cc``, else the ``ziglang`` package's (``python -m ziglang cc``,
the optional extra ``py-preload[native]``). The binary is cached under the cache directory by
the hash of the source, the compiler and the flags, so that bundles after the first cost no
compile. Not on the starter path.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

from preloaded.client import native
from preloaded.paths import cache_dir

SOURCE = os.path.join(os.path.dirname(os.path.abspath(native.__file__)), "native.c")
FLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-g", "-O1"]


class BuildError(Exception):
    """No compiler, or the compile failed; the message is one line."""


def compiler() -> list:
    """The compiler command: ``$CC``, ``cc`` on PATH, or ziglang's; BuildError if none."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        return shlex.split(cc)
    if shutil.which("cc"):
        return ["cc"]
    try:
        import importlib.util

        if importlib.util.find_spec("ziglang") is not None:
            return [sys.executable, "-m", "ziglang", "cc"]
    except (ImportError, ValueError):
        pass
    raise BuildError("no C compiler ($CC, cc, or the ziglang package: pip install "
                     "'py-preload[native]')")  # fmt: skip


def build(extra_flags=(), cc=None) -> str:
    """The compiled client (from the cache when this source was compiled the same way).

    Linked statically where the C library allows it (no dynamic loader at start: ~0.35 ms of
    a run here), else dynamically; sanitized builds (``extra_flags``) are always dynamic.
    """
    cc = list(cc) if cc else compiler()
    if not extra_flags:
        static = _cached(cc, FLAGS + ["-static"])
        if not os.path.exists(static + ".failed"):
            try:
                return _build(cc, FLAGS + ["-static"])
            except BuildError:  # no static C library (libc.a): the dynamic build works as well
                os.makedirs(os.path.dirname(static), mode=0o700, exist_ok=True)
                open(static + ".failed", "w").close()  # not tried again for this source
    return _build(cc, FLAGS + list(extra_flags))


def _cached(cc: list, flags: list) -> str:
    """Where the build of this source with ``cc`` and ``flags`` is cached."""
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(b"\0".join([source, *map(os.fsencode, cc + flags)])).hexdigest()[:16]
    return os.path.join(cache_dir(), "native", f"py-preload-native-{key}")


def _build(cc: list, flags: list) -> str:
    binary = _cached(cc, flags)
    if os.path.exists(binary):
        return binary
    directory = os.path.dirname(binary)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", dir=directory)
    os.close(fd)
    try:
        _compile(cc, flags, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, binary)  # concurrent builds write the same bytes; the last one wins
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return binary


def _compile(cc: list, flags: list, output: str) -> None:
    argv = cc + flags + ["-o", output, SOURCE]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"cannot run {shlex.join(cc)}: {exc}") from None
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        errors = [line for line in lines if "error" in line] or lines
        raise BuildError(f"{shlex.join(cc)} failed: {errors[0]}")


def starter_bytes(config: dict, binary: str) -> bytes:
    """A native starter: the compiled client with ``config`` appended."""
    with open(binary, "rb") as f:
        return f.read() + native.pack(config)

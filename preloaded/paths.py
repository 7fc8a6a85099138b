"""Runtime and cache directories, their permission checks, and the per-bundle key.

Stdlib only: the starter imports this on every run.
"""

from __future__ import annotations

import os
import stat


class UnsafeDirectory(Exception):
    """A runtime directory that another user could reach or control."""


def runtime_dir(create: bool = True) -> str:
    """``$XDG_RUNTIME_DIR/py-preload``, else ``/tmp/py-preload-$UID``: private (0700), ours.

    Never followed through a symlink; refused when another user owns it.
    """
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isabs(base):
        path = os.path.join(base, "py-preload")
    else:
        path = f"/tmp/py-preload-{os.getuid()}"
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    check_private_dir(path)
    return path


def check_private_dir(path: str) -> None:
    """Raise UnsafeDirectory unless ``path`` is a real directory of ours with mode 0700."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectory(f"{path} is not a directory (a symlink?); remove it and retry")
    if st.st_uid != os.getuid():
        raise UnsafeDirectory(
            f"{path} belongs to uid {st.st_uid}, not to you; remove it or set XDG_RUNTIME_DIR"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)


def cache_dir() -> str:
    """``$XDG_CACHE_HOME/py-preload``, else ``~/.cache/py-preload`` (not created here)."""
    base = os.environ.get("XDG_CACHE_HOME")
    if not (base and os.path.isabs(base)):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "py-preload")


def bundle_key(bundle_path: str) -> str:
    """A short stable name for the server of one bundle file.

    The locale's encodings and python's UTF-8 mode are part of the key: a child inherits the
    server's filesystem encoding, locale and ``sys.flags.utf8_mode``, which python fixes at
    start-up, so callers with another locale get a server of their own. (``LANG=C`` is coerced
    to C.UTF-8, the encoding of a UTF-8 locale, but python runs in UTF-8 mode there.)
    """
    import _locale
    import sys

    getencoding = getattr(_locale, "getencoding", None)  # 3.11+
    encoding = getencoding() if getencoding else _locale.nl_langinfo(_locale.CODESET)
    parts = [os.path.realpath(bundle_path), sys.getfilesystemencoding(), encoding]
    if sys.flags.utf8_mode:  # the C or POSIX locale (PEP 540): python runs in UTF-8 mode
        parts.append("utf8")
    text = "\0".join(parts)
    return _fnv1a64(text.encode("utf-8", "surrogateescape"))


def _fnv1a64(data: bytes) -> str:
    # hashlib costs ~3 ms to import; this runs on every warm run and needs no cryptography.
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def exit_file(socket_path: str, keeper: int, pid: int) -> str:
    """Where a server's keeper writes the exit status of a run the server left running (see
    server/keeper.py), for the run's client to read: next to the server's socket."""
    return f"{socket_path.removesuffix('.sock')}.exit.{keeper}.{pid}"


class Paths:
    """The files of one bundle's server."""

    def __init__(self, bundle_path: str, create: bool = True, flavour: str = "") -> None:
        # A flavour (the pytest server of the bundle, see preloaded.server.pytestserver) has
        # files of its own.
        self.flavour = flavour
        self.key = bundle_key(bundle_path) + (f"-{flavour}" if flavour else "")
        self.runtime = runtime_dir(create)
        base = os.path.join(self.runtime, self.key)
        self.socket = base + ".sock"
        self.spawn_lock = base + ".spawn.lock"
        self.server_lock = base + ".lock"
        self.info = base + ".json"
        self.failed = base + ".failed"
        self.log = os.path.join(cache_dir(), "logs", self.key + ".log")
        # Learned preloads: the set kept per bundle, and the per-run reports (name + child pid).
        self.learned = os.path.join(cache_dir(), "learned", self.key + ".json")
        self.report_prefix = base + ".report."

"""The files the server imported from, watched with inotify (a few ctypes lines, no thread).

An edit in place of any of them (a print added to a transformers model file, a patched
standard-library module) makes the server stale: its children hold the old code. A ``stat`` of
each file per run would cost milliseconds with torch loaded (thousands of files); inotify costs
nothing per run: the kernel queues an event when a watched directory's entry is written,
replaced, removed or has its attributes changed, and the server reads the queue, without
blocking, before each hand-over (an edit finished before the run connected is already queued:
fsnotify runs inside the writer's system call) and whenever the loop sees it readable.

One watch per directory, events filtered by name: a run writing its output, or ``__pycache__``
appearing, in a watched directory is no change. Where inotify cannot be had (no instance left,
``max_user_watches`` reached), every imported file's mtime is checked on each run instead, and
the log says so.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

IN_ATTRIB, IN_CLOSE_WRITE, IN_MOVED_FROM, IN_MOVED_TO = 0x4, 0x8, 0x40, 0x80
IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
IN_Q_OVERFLOW, IN_ONLYDIR = 0x4000, 0x01000000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
# Not IN_MODIFY: an event per write() would wake the loop for every write of a run's output
# into a watched directory; an edit is finished when its file is closed (or renamed over).
MASK = (IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
        | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)  # fmt: skip
SELF_EVENTS = IN_DELETE_SELF | IN_MOVE_SELF
EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name


def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc if hasattr(libc, "inotify_init1") else None
    except OSError:
        return None


_LIBC = _libc()


class Unavailable(Exception):
    pass


class Watcher:
    """Watches the directories of ``files``; ``changed()`` names the first imported file that
    changed since (sticky), or None. ``log`` writes to the server's log."""

    def __init__(self, log) -> None:
        self.log = log
        self.fd: int | None = None
        self.names: dict = {}  # wd -> (directory, set of watched names in it)
        self.stamps: dict | None = None  # path -> mtime: the fallback, checked on each run
        self.reason: str | None = None
        self.problem: str | None = None  # why it fell back, for status
        try:
            self.fd = _init()
        except Unavailable as exc:
            self._fall_back(str(exc))

    def fileno(self) -> int | None:
        return self.fd

    def watch(self, files) -> None:
        """Watch ``files`` too (after learned imports: the new modules' files)."""
        files = [f for f in files if f]
        if self.fd is not None:
            try:
                self._add(files)
            except Unavailable as exc:
                self._fall_back(str(exc))
        if self.stamps is not None:
            self.stamps.update({path: _mtime(path) for path in files if path not in self.stamps})

    def _add(self, files: list) -> None:
        by_dir: dict = {}
        for path in files:
            directory, name = os.path.split(path)
            by_dir.setdefault(directory, set()).add(name)
        for directory, names in by_dir.items():
            wd = self._add_watch(directory)
            if wd is None:  # inside an archive (a zip on the path, an egg), or not there at all
                directory, name = _nearest_directory(directory)
                wd = self._add_watch(directory) if directory else None
                names = {name}
            if wd is not None:
                self.names.setdefault(wd, (directory, set()))[1].update(names)

    def _add_watch(self, directory: str) -> int | None:
        """The watch descriptor of ``directory``; None if it is no directory."""
        wd = _LIBC.inotify_add_watch(self.fd, os.fsencode(directory), MASK)
        if wd >= 0:
            return wd
        err = ctypes.get_errno()
        if err in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
            return None
        hint = " (fs.inotify.max_user_watches reached)" if err == errno.ENOSPC else ""
        raise Unavailable(f"inotify_add_watch {directory}: {os.strerror(err)}{hint}")

    def _fall_back(self, why: str) -> None:
        files = [os.path.join(d, n) for d, names in self.names.values() for n in names]
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.names = {}
        self.stamps = {path: _mtime(path) for path in files}
        self.problem = (f"cannot watch the imported files ({why}): checking their mtimes on"
                        " every run instead (slower warm runs). Raise the inotify limits"
                        " (sysctl fs.inotify.max_user_watches, max_user_instances), then"
                        " `py-preload stop FILE`: the next run starts a server that watches")  # fmt: skip
        self.log("warning: " + self.problem)

    def changed(self) -> str | None:
        """The first watched file that changed, reading the kernel's queue without blocking."""
        if self.reason is None and self.fd is not None:
            self.drain()
        if self.reason is None and self.stamps is not None:
            for path, stamp in self.stamps.items():
                if _mtime(path) != stamp:
                    self.reason = f"{path} changed"
                    break
        return self.reason

    def drain(self) -> None:
        """Read every queued event (the loop calls this when the fd is readable)."""
        while self.fd is not None:
            try:
                data = os.read(self.fd, 65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fall_back(f"reading inotify events: {exc.strerror}")
                return
            if not data:
                return
            self._parse(data)

    def _parse(self, data: bytes) -> None:
        offset = 0
        while offset + EVENT.size <= len(data):
            wd, mask, _cookie, length = EVENT.unpack_from(data, offset)
            name = data[offset + EVENT.size : offset + EVENT.size + length].rstrip(b"\0")
            offset += EVENT.size + length
            if self.reason is not None:
                continue
            if mask & IN_Q_OVERFLOW:
                self.reason = "too many file changes to follow (inotify queue overflow)"
                continue
            watched = self.names.get(wd)
            if watched is None:
                continue
            directory, names = watched
            if mask & SELF_EVENTS:
                self.reason = f"{directory} changed"
            elif os.fsdecode(name) in names:
                self.reason = f"{os.path.join(directory, os.fsdecode(name))} changed"

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _nearest_directory(path: str) -> tuple:
    """(the nearest existing directory above ``path``, the name under it on the way to
    ``path``): for a module in ``lib.zip/pkg``, the zip's directory and ``lib.zip``."""
    below, parent = path, os.path.dirname(path)
    while parent != below:
        if os.path.isdir(parent):
            return parent, os.path.basename(below)
        below, parent = parent, os.path.dirname(parent)
    return None, None


def _init() -> int:
    if _LIBC is None:
        raise Unavailable("no inotify in this C library")
    fd = _LIBC.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        hint = " (fs.inotify.max_user_instances reached)" if err == errno.EMFILE else ""
        raise Unavailable(f"inotify_init1: {os.strerror(err)}{hint}")
    return fd


def _mtime(path: str):
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None

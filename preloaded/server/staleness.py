"""Cheap checks that the server still matches its environment (the Spring problem).

Checked before every fork: a few ``stat`` calls on the directories of ``sys.path`` (installing,
upgrading or removing a package changes its site-packages directory), the interpreter and the
bundle file; and every file a loaded module came from (site-packages and the standard library
included: an edit in place), through inotify at no cost per run (see watch.py).
"""

from __future__ import annotations

import os
import selectors
import sys
import sysconfig

from preloaded.server.watch import Watcher


def _mtime(path: str):
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


class Stamps:
    """Modification times taken after preloading, and the watched files of the loaded modules;
    ``changed()`` names the first difference."""

    def __init__(self, stamps: dict, watcher: Watcher | None = None) -> None:
        self.stamps = stamps
        self.watcher = watcher
        self.watched: set = set()  # module files given to the watcher

    @classmethod
    def collect(cls, bundle: str, python: str, site: tuple = (), files: tuple = (),
                own: tuple = (), log=None) -> "Stamps":
        """``site``: more directories stamped as a whole, like site-packages (the overlay);
        ``files``: more files to watch (the warm-up script).

        ``own``: directories on the server's path only to find py-preload itself (a source
        checkout): not on a child's path, so only the sources loaded from them count; a new file
        in a repository root (it changes all the time) is no change.

        ``log``: the server's; given, the loaded modules' files are watched (inotify), else
        only those outside site-packages and the standard library are stamped (the old way).
        """
        paths = {bundle, python, *files}
        dirs = [p for p in sys.path if p and os.path.isdir(p)]
        paths.update(d for d in dirs if d not in own or _is_site(d))
        stamps = cls({}, Watcher(log) if log is not None else None)
        if stamps.watcher is None:
            sites = [d for d in dirs if _is_site(d) or d in site]
            roots = tuple(os.path.join(d, "") for d in list(stdlib_dirs()) + sites)
            paths.update(f for f in _module_files() if not f.startswith(roots))
        stamps.stamps = {p: _mtime(p) for p in paths}
        stamps.watch_new()
        return stamps

    def watch_new(self) -> None:
        """Watch the files of modules loaded since (learned imports)."""
        if self.watcher is None:
            return
        new = _module_files() - self.watched
        self.watched |= new
        self.watcher.watch(sorted(new))

    def fds(self) -> list:
        """The watcher's inotify fd, if it has one: forks of the server must close it."""
        fd = self.watcher.fileno() if self.watcher is not None else None
        return [] if fd is None else [fd]

    def register(self, sel, log) -> None:
        """Read the watcher's events whenever they come (``sel``: the loop's selector), so that
        ``status`` names a changed file before the next run retires the server."""
        for fd in self.fds():
            sel.register(fd, selectors.EVENT_READ, lambda _fd: self._on_events(sel, fd, log))

    def _on_events(self, sel, fd: int, log) -> None:
        already = self.watcher.reason
        self.watcher.drain()
        if self.watcher.reason and not already:
            log(f"stale ({self.watcher.reason}): the next run starts a fresh server")
        if not self.fds():  # fell back to mtimes (a read error closed it): nothing to read
            sel.unregister(fd)

    def changed(self) -> str | None:
        for path, stamp in self.stamps.items():
            if _mtime(path) != stamp:
                return f"{path} changed"
        return self.watcher.changed() if self.watcher is not None else None


def _module_files() -> set:
    files = set()
    for module in list(sys.modules.values()):
        filename = getattr(module, "__file__", None)
        if isinstance(filename, str) and os.path.isabs(filename):
            files.add(filename)
    return files


def stdlib_dirs() -> set:
    """The standard library's directories (pure and platform-specific)."""
    return {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib")}


def _is_site(path: str) -> bool:
    base = os.path.basename(path.rstrip(os.sep))
    return base in ("site-packages", "dist-packages")

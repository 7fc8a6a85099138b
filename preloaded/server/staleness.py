"""Cheap checks that the server still matches its environment (the Spring problem).

Checked before every fork: a few ``stat`` calls on the directories of ``sys.path`` (installing,
upgrading or removing a package changes its site-packages directory), the sources of loaded
modules that live outside site-packages and the standard library (the user's own packages, an
editable install), the interpreter and the bundle file.
"""

from __future__ import annotations

import os
import sys
import sysconfig


def _mtime(path: str):
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


class Stamps:
    """Modification times taken after preloading; ``changed()`` names the first difference."""

    def __init__(self, stamps: dict) -> None:
        self.stamps = stamps

    @classmethod
    def collect(cls, bundle: str, python: str, site: tuple = (), files: tuple = (),
                own: tuple = ()) -> "Stamps":
        """``site``: more directories stamped as a whole, like site-packages (the overlay);
        ``files``: more files to watch (the warm-up script).

        ``own``: directories on the server's path only to find py-preload itself (a source
        checkout): not on a child's path, so only the sources loaded from them count; a new file
        in a repository root (it changes all the time) is no change.
        """
        paths = {bundle, python, *files}
        dirs = [p for p in sys.path if p and os.path.isdir(p)]
        paths.update(d for d in dirs if d not in own or _is_site(d))
        sites = [d for d in dirs if _is_site(d) or d in site]
        roots = tuple(os.path.join(d, "") for d in list(stdlib_dirs()) + sites)
        for module in list(sys.modules.values()):
            filename = getattr(module, "__file__", None)
            if filename and not filename.startswith(roots):
                paths.add(filename)
        return cls({p: _mtime(p) for p in paths})

    def changed(self) -> str | None:
        for path, stamp in self.stamps.items():
            if _mtime(path) != stamp:
                return f"{path} changed"
        return None


def stdlib_dirs() -> set:
    """The standard library's directories (pure and platform-specific)."""
    return {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib")}


def _is_site(path: str) -> bool:
    base = os.path.basename(path.rstrip(os.sep))
    return base in ("site-packages", "dist-packages")

"""A run's own directories against the server's modules: a local file that python would import
instead of a module the server holds sends the run cold.

Python puts the script's directory (the cwd for ``-m``, ``-c``, stdin and the REPL) and then the
``PYTHONPATH`` entries ahead of the standard library and site-packages. A project with its own
``secrets.py``, ``queue.py`` or ``yaml/`` imports that under python, while a warm child, which
holds the server's module in ``sys.modules``, would get the server's. Dropping the server's
module in the child cannot be made exact (the libraries that imported it keep references), so
such a run goes cold, with the reason in the log.

Python's own rules decide what a directory shadows (``FileFinder``): a regular package
(``name/__init__.*``), a module (``name`` + an extension-module suffix, ``.py``, or a sourceless
``.pyc``), in that order; a directory without ``__init__`` is only a namespace portion, which a
regular package found later still beats, but which changes a namespace package the server
holds. Built-in and frozen modules are found before any path entry; modules the interpreter
imported while starting (``os``, ``codecs``, ``site``, what ``.pth`` files import...) are there
before ``sys.path[0]`` is, so only ``PYTHONPATH`` (on the path at start-up) can shadow those.

Cost per run: one ``stat`` per directory; a directory is listed again only when its mtime
changed (or changed so recently that an entry made in the same clock tick could be missing).
"""

from __future__ import annotations

import os
import stat
import sys
import time
from importlib.machinery import BYTECODE_SUFFIXES, EXTENSION_SUFFIXES, SOURCE_SUFFIXES

# FileFinder's order within one directory: extension modules, then source, then bytecode.
SUFFIXES = tuple(EXTENSION_SUFFIXES) + tuple(SOURCE_SUFFIXES) + tuple(BYTECODE_SUFFIXES)
# Imported by site at start-up when found on the path: PYTHONPATH's own run there, not in a fork.
CUSTOMIZE = ("sitecustomize", "usercustomize")
RACY_NS = 2_000_000_000  # a listing younger than its directory's mtime + this is not trusted
MAX_CACHED = 256  # directories remembered (a busy server sees many projects)


class Held:
    """The server's top-level modules, each with where python found it: ("dir", entry) for a
    module or regular package (its file, or its package directory), ("ns", portions) for a
    namespace package, ("other", None) for one without a location (made by a library),
    ("absent", None) for site's customize modules the server has not. Built-in and frozen ones
    cannot be shadowed."""

    def __init__(self, modules: dict, startup: frozenset, bundle_path: tuple = ()) -> None:
        self.where: dict = {}
        for name, module in list(modules.items()):
            if "." not in name and name not in ("__main__", "__mp_main__"):
                where = _location(module)
                if where is not None:
                    self.where[name] = where
        for name in CUSTOMIZE:  # not held: any found on PYTHONPATH would have run at start-up
            self.where.setdefault(name, ("absent", None))
        # PYTHONPATH is searched at start-up already; sys.path[0] only after it.
        self.early = frozenset(self.where)
        self.late = frozenset(n for n in self.where if n not in startup and n not in CUSTOMIZE)
        self._real: dict = {}
        self._ids: dict = {}
        # Modules found only through a directory of the bundle-time path (the bundling caller's
        # cwd or PYTHONPATH, not a child's path): python finds them only through a run's own
        # directories. {name: that directory's real path}
        extra = {os.path.realpath(p) for p in bundle_path}
        self.needs: dict = {}
        for name, (kind, place) in self.where.items() if extra else ():
            # preloaded: py-preload's own machinery, in every child (found through pkg_root,
            # which a checkout's root on the bundle path names too).
            home = self.real(os.path.dirname(place)) if kind == "dir" else None
            if home in extra and name != "preloaded":
                self.needs[name] = home

    def identity(self, path: str) -> tuple | None:
        """(st_dev, st_ino) of a held module's file or package directory, taken once (if it
        changed, the server is stale anyway); None if it is gone."""
        if path not in self._ids:
            self._ids[path] = _identity(path)
        return self._ids[path]

    def real(self, path: str) -> str:
        """The real path of a held module's directory, resolved once (if one changed, the
        server is stale anyway)."""
        real = self._real.get(path)
        if real is None:
            real = self._real[path] = os.path.realpath(path)
        return real


def _location(module) -> tuple | None:
    """Where python found ``module`` (paths as found: resolved only when a run's directory
    provides the name, which is rare), or None for a built-in or frozen one."""
    spec = getattr(module, "__spec__", None)
    origin = getattr(spec, "origin", None)
    if origin in ("built-in", "frozen"):
        return None
    locations = getattr(spec, "submodule_search_locations", None)
    if spec is not None and origin in (None, "namespace") and locations is not None:
        return ("ns", tuple(locations))
    filename = origin if spec is not None and getattr(spec, "has_location", False) else None
    filename = filename or getattr(module, "__file__", None)
    if not isinstance(filename, str):
        return ("other", None)
    if locations is not None:  # a regular package: its directory is what a path entry holds
        return ("dir", os.path.dirname(filename))
    return ("dir", filename)


class Shadows:
    """Per-directory listings, cached by mtime, and the check of one run's directories."""

    def __init__(self, startup: frozenset | None, bundle_path: list | None = None) -> None:
        """``startup``: what python imports before sys.path[0]; ``bundle_path``: the directories
        the bundle-time caller's cwd or PYTHONPATH gave (the config's "path")."""
        # None: the server was not started by a starter that recorded its start-up modules
        # (an older one); then every module counts, which only sends more runs cold.
        self.startup = startup or frozenset()
        self.bundle_path = tuple(bundle_path or ())  # the config's "path"
        self.listings: dict = {}  # directory -> (mtime_ns, ({name: kind}, real path) or None)
        self._held: Held | None = None
        self._known = None

    def held(self, known) -> Held:
        """The held modules, computed again when the server's set of modules changed
        (``known`` is the child setup's ``frozenset(sys.modules)``, replaced after learning)."""
        if self._held is None or known is not self._known:
            self._held = Held(sys.modules, self.startup, self.bundle_path)
            self._known = known
        return self._held

    def reason(self, request: dict, known) -> str | None:
        """Why ``request`` must run cold because a directory of its own shadows a held module."""
        held = self.held(known)
        decided: set = set()
        for directory, early in run_directories(request):
            listing = self._listing(directory)
            if listing is None:
                continue
            names, real = listing
            for name in names.keys() & (held.early if early else held.late):
                if name in decided:
                    continue
                verdict = _verdict(directory, real, name, names[name], held)
                if verdict == "shadows":
                    return (f"{name!r} in {directory} shadows the server's module of that"
                            " name (python would import the local one)")
                if verdict == "same":
                    decided.add(name)
        return _unreachable(held.needs, decided)

    def sent_back_cold(self, conn, request: dict, known, log) -> bool:
        """If a local module shadows a held one, log why and tell the client to run cold."""
        try:
            reason = self.reason(request, known)
        except Exception as exc:  # a module or directory this code does not know: never warm
            reason = f"cannot check the run's directories for shadowing modules: {exc!r}"
        if reason:
            log(f"cold run: {reason}")
            conn.reply({"cold": reason})
        return bool(reason)

    def _listing(self, directory: str) -> tuple | None:
        """({name: kind}, the directory's real path), or None if it is not there (or empty)."""
        try:
            mtime = os.stat(directory).st_mtime_ns
        except OSError:
            return None
        cached = self.listings.get(directory)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        names = _list(directory)
        listing = (names, os.path.realpath(directory)) if names else None
        if time.time_ns() - mtime > RACY_NS:  # else an entry of the same tick may be missing
            if len(self.listings) >= MAX_CACHED:
                self.listings.clear()
            self.listings[directory] = (mtime, listing)
        return listing


def _unreachable(needs: dict, found: set) -> str | None:
    """Why a run cannot have a module the server found through the bundle-time path: python
    would raise ModuleNotFoundError (or import another one) where none of this run's
    directories gives the server's own file (``found``), while a warm child holds it."""
    for name, real in needs.items():
        if name not in found:
            return (f"{name!r} was imported from {real} (the bundle's path), which this run's"
                    " sys.path lacks (python would not import the server's module)")
    return None


def _verdict(directory: str, real: str, name: str, kind: str, held: Held) -> str:
    """What ``directory``'s entry ``name`` (of ``kind``; ``real``: the directory's real path)
    does to the held module: "shadows", "same" (python finds the server's very own file or
    package directory here: a PYTHONPATH naming site-packages, the cwd of an editable install's
    project, a symlink to it), or "portion" (a namespace portion python passes over for a
    regular module found later)."""
    held_kind, place = held.where[name]
    if kind == "dir":
        kind = "pkg" if _has_init(os.path.join(directory, name)) else "portion"
    if held_kind == "dir" and kind != "portion":
        if _same(_found(directory, name, kind), place, held):
            return "same"
    if held_kind == "ns":
        portion = os.path.join(real, name)
        if kind == "portion" and any(held.real(p) == portion for p in place):
            return "portion"
        return "shadows"
    if kind == "portion" and held_kind != "other":
        return "portion"
    return "shadows"


def _found(directory: str, name: str, kind: str) -> str:
    """The file or package directory FileFinder takes for ``name`` in ``directory`` (a package
    before a module; among modules, SUFFIXES' order)."""
    path = os.path.join(directory, name)
    if kind == "pkg" or _has_init(path):  # a listing of "mod" may hide a package beside it
        return path
    for suffix in SUFFIXES:
        if os.path.isfile(path + suffix):
            return path + suffix
    return path


def _same(found: str, place: str, held: Held) -> bool:
    """Whether python would load the server's own file or package directory from ``found``:
    the same inode, or (inside a zip archive, where there is none) the same real path."""
    identity = _identity(found)
    if identity is None:
        return os.path.realpath(found) == held.real(place)
    return identity == held.identity(place)


def _identity(path: str) -> tuple | None:
    """The file or directory ``path`` resolves to, as (st_dev, st_ino): the same module whatever
    link or path leads there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _has_init(path: str) -> bool:
    """A regular package (checked per run, not cached: adding ``__init__.py`` to a directory
    does not change its parent's mtime)."""
    try:
        entries = os.listdir(path)
    except OSError:
        return False
    return any(entry.startswith("__init__.") and entry[9:] in _SUFFIX_TAILS for entry in entries)


_SUFFIX_TAILS = frozenset(suffix[1:] for suffix in SUFFIXES)


def _list(directory: str) -> dict:
    """Top-level module names a path entry provides: "mod" (a module file), "pkg" (a regular
    package, zip archives only), "dir" (a directory: a package or a namespace portion)."""
    if not os.path.isdir(directory):
        return _list_zip(directory)
    names: dict = {}
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                _add_entry(names, entry)
    except OSError:
        return {}
    return names


def _add_entry(names: dict, entry) -> None:
    name = entry.name
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            if stem.isidentifier() and entry.is_file():
                names[stem] = "mod"  # beats a directory without __init__ of the same name
            return
    if name.isidentifier() and entry.is_dir():
        names.setdefault(name, "dir")


def _list_zip(path: str) -> dict:
    """A zip archive on the path (zipimport: source, bytecode, packages; no extensions)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return {}
    names: dict = {}
    for member in members:
        top, slash, rest = member.partition("/")
        if not slash:
            stem, dot, suffix = top.rpartition(".")
            if dot and "." + suffix in (".py", ".pyc") and stem.isidentifier():
                names[stem] = "mod"
        elif rest in ("__init__.py", "__init__.pyc") and top.isidentifier():
            names[top] = "pkg"  # a package beats a module of the same name, as in FileFinder
        elif top.isidentifier():
            names.setdefault(top, "dir")  # no __init__ in it (yet): a namespace portion
    return names


def run_directories(request: dict) -> list:
    """The directories python puts ahead of the server's path for ``request``, in order, each
    with whether it is on the path at start-up already (PYTHONPATH) or only after (sys.path[0]).
    Mirrors child._path0 and child._pythonpath, relative to the caller's cwd."""
    cwd = request["cwd"]
    dirs = [(_path0(request, cwd), False)]
    value = request["env"].get("PYTHONPATH", "")
    if value:
        dirs += [(os.path.normpath(os.path.join(cwd, p)), True) for p in value.split(os.pathsep)]
    return dirs


def _path0(request: dict, cwd: str) -> str:
    """The directory python lists for the script's own modules. Python takes the directory of
    the script's real path; without a symlink as the last component, the kernel resolves the
    script's given directory to that same directory: one lstat instead of one per component."""
    if request["mode"] != "script":
        return cwd
    target = request["target"]
    path = os.path.join(cwd, target) if target else cwd
    try:
        mode = os.lstat(path).st_mode
    except OSError:  # python cannot open it either: its error, whatever the directory holds
        return os.path.dirname(path)
    if stat.S_ISLNK(mode):
        if os.path.isdir(path) or not path.endswith((".py", ".pyw")) and _is_zip(path):
            return path
        return os.path.dirname(os.path.realpath(path))
    if stat.S_ISDIR(mode) or not path.endswith((".py", ".pyw")) and _is_zip(path):
        return path  # a directory or zip app: itself, as given
    return os.path.dirname(path)


def _is_zip(path: str) -> bool:
    import zipfile

    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False

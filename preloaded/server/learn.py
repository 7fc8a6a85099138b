"""Learned preloads: library modules that runs keep importing become part of the warm server.

Each child, as it ends, writes the names of the library modules it imported that the server
had not (a diff of ``sys.modules`` against the server's set, taken once before forking) into a
report file named by its pid. The server reads that file when it reaps the pid, counts the runs
that needed each module, and imports a module into itself, between runs and one per loop turn,
once ``after`` runs needed it. The same fork-safety checks as for the bundle's modules apply: a
module that starts threads, initialises CUDA, prints, warns or takes the server's signal
handlers is refused for good. The checks run first in a probe, a throw-away fork of the server
(``preloaded.server.probe``): only modules the probe found clean are imported into the server,
so an unsafe one is refused without restarting it. (Should a module the probe passed still be
unsafe in the server, the server retires and the next run gets a fresh one without it.) The
learned and refused sets are kept in the cache per bundle.

Only modules whose files live in the standard library or a site-packages directory (the
overlay included) are learned: never the user's own code (the script's directory, the cwd,
``PYTHONPATH``).
"""

from __future__ import annotations

import json
import os
import sys
import time

from preloaded.server import probe as probes

REPORT_LIMIT = 1 << 20  # bytes: a report larger than this is ignored
THREAD_GRACE = 0.3  # seconds a new thread gets to end before the import counts as unsafe
# Never learned (nor their submodules): importing readline changes input() on a terminal for
# every later run, and the interactive prompt (preloaded.server.repl) imports it in every REPL
# run; python 3.13's REPL decides at its first import whether it can drive the terminal. Nor
# pytest, coverage or a pytest plugin's modules (tools.never_learned): their presence changes
# how those tools start.
NEVER = frozenset({"readline", "rlcompleter", "_pyrepl"})
REFUSED_ENV = "PY_PRELOAD_REFUSED"  # names refused by the image that restarted this server


# -- the child's side (runs at the end of every run; keep it cheap) ------------------------------


def library_roots(base_path: list, overlay: str | None) -> tuple:
    """Directories (with a trailing separator) whose modules may be learned."""
    from preloaded.server.staleness import _is_site, stdlib_dirs

    roots = stdlib_dirs()
    roots.update(p for p in base_path if p and _is_site(p))
    if overlay:
        roots.add(overlay)
    return tuple(sorted({os.path.join(os.path.abspath(r), "") for r in roots}))


def remember_modules(setup) -> None:
    """In the server, before forking: the modules a child's report is the diff against, and
    the newest of them (see ``added_modules``)."""
    setup.known = frozenset(sys.modules)
    newest = next(reversed(sys.modules), None)
    setup.newest = (newest, id(sys.modules.get(newest)))


def added_modules(known, newest: tuple = (None, None)) -> list:
    """Names in ``sys.modules`` that are not in ``known``, walking only what was added.

    ``sys.modules`` keeps insertion order, so what a run imported follows the server's newest
    module: the walk goes from the end back to that entry (the same name and object). Walking
    every name wrote each one's reference count: ~700 pages of the server's memory copied,
    2.5 ms of every run of a torch server. (Should the run have removed that entry, the walk
    goes through all of them; had it put the very same object back, the walk stops there and
    the report misses what came before: a report is a hint.)
    """
    added = []
    for name in reversed(sys.modules):
        if name == newest[0] and id(sys.modules.get(name)) == newest[1]:
            break
        if name not in known:
            added.append(name)
    added.reverse()
    return added


def new_library_modules(known, roots: tuple, base_path: list, cwd: str,
                        newest: tuple = (None, None)) -> list:  # fmt: skip
    """Names in ``sys.modules`` that are not in ``known`` and were found in a library root.

    A file under both a library root and a user directory (a venv inside the project, say)
    belongs to the longer, more specific, of the two: a script's directory inside
    site-packages is still the user's code, the project's ``.venv`` is still a library.
    """
    base = {os.path.abspath(p) for p in base_path if p}
    user = {os.path.join(os.path.abspath(p or cwd), "") for p in sys.path
            if isinstance(p, str) and os.path.abspath(p or cwd) not in base}  # fmt: skip
    user.add(os.path.join(cwd, ""))
    found = []
    for name in added_modules(known, newest):
        module = sys.modules.get(name)
        filename = getattr(module, "__file__", None)
        spec = getattr(module, "__spec__", None)
        if name.startswith("__") or not isinstance(filename, str):
            continue  # __main__, __mp_main__, builtins and namespace packages
        if getattr(spec, "name", None) != name:
            continue  # an alias (os.path) or a module run as __main__
        if _longest(filename, roots) > _longest(filename, user):
            found.append(name)
    return found


def _longest(filename: str, dirs) -> int:
    return max((len(d) for d in dirs if filename.startswith(d)), default=-1)


def write_report(prefix: str, names: list) -> None:
    """``prefix + pid``, written atomically (the server may reap us before we finished)."""
    if not names:
        return
    path = f"{prefix}{os.getpid()}"
    tmp = path + ".tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(tmp, flags, 0o600)
    try:
        os.write(fd, "\n".join(names).encode("utf-8", "surrogateescape"))
    finally:
        os.close(fd)
    os.replace(tmp, path)


def report(setup, cwd: str) -> None:
    """At a child's end: tell the server which library modules this run imported. Never raises."""
    prefix = getattr(setup, "learn_prefix", None)
    if not prefix:
        return
    try:
        names = new_library_modules(setup.known, setup.roots, setup.base_path, cwd,
                                    setup.newest)  # fmt: skip
        write_report(prefix, names)
    except BaseException:  # a report is a hint: it must never change how the run ends
        pass


# -- the server's side ---------------------------------------------------------------------------


class Unsafe(Exception):
    """A learned import left the server unfit to fork children: refuse it and retire."""


def safe_import(name: str) -> float:
    """Import ``name`` with the fork-safety checks; return its cost in seconds.

    Raises ImportError when the import fails (nothing else changed: keep serving) and Unsafe
    when it succeeded but left threads, CUDA, output or changed signal handlers behind.
    """
    import contextlib
    import importlib
    import io
    import signal
    import warnings

    from preloaded.server import envdeps, tools
    from preloaded.server.preload import HANDLED, cuda_initialised, thread_count
    from preloaded.server.pytestserver import hook_installed

    handlers = [signal.getsignal(s) for s in HANDLED]
    listed = envdeps.RECORD.whole is not None
    before = set(sys.modules)
    threads = thread_count()
    out = io.StringIO()
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(out):  # fmt: skip
        # Every warning counts, even those the default filters hide: a run with -W error or
        # PYTHONWARNINGS would see them when it imports the module itself.
        warnings.simplefilter("always")
        try:
            with hook_installed():  # the pytest server's: through pytest's rewriting hook
                importlib.import_module(name)
        except BaseException as exc:
            raise ImportError(f"importing {name} failed: {type(exc).__name__}: {exc}") from exc
    cost = time.perf_counter() - start
    if cuda_initialised():
        raise Unsafe(f"importing {name} initialised CUDA")
    if _threads_left(threads):
        raise Unsafe(f"importing {name} started a thread")
    if caught:
        raise Unsafe(f"importing {name} warned: {caught[0].category.__name__}: {caught[0].message}")
    if out.getvalue():
        raise Unsafe(f"importing {name} printed {out.getvalue()[:80]!r}")
    if [signal.getsignal(s) for s in HANDLED] != handlers:
        raise Unsafe(f"importing {name} changed signal handlers")
    if not listed and envdeps.RECORD.whole is not None:  # e.g. dask's DASK_* config
        raise Unsafe(f"importing {name} listed the whole environment"
                     f" ({envdeps.RECORD.listers[-1]}): every run would depend on every variable")
    tool = sorted((set(sys.modules) - before) & tools.tool_modules())
    if tool:  # e.g. a library that imports a pytest plugin: pytest runs would all go cold
        raise Unsafe(f"importing {name} imported {tool[0]} (a pytest or coverage module)")
    return cost


def verdict(name: str) -> tuple:
    """``safe_import`` as a probe reports it: ("ok", ms), ("failed", why) or ("unsafe", why)."""
    try:
        return "ok", round(safe_import(name) * 1000, 1)
    except ImportError as exc:
        return "failed", str(exc)
    except Unsafe as exc:
        return "unsafe", str(exc)


def _threads_left(before: int) -> bool:
    from preloaded.server.preload import thread_count

    deadline = time.monotonic() + THREAD_GRACE
    while thread_count() > before:  # torch-style helper threads end on their own, soon
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.01)
    return False


class Learner:
    """Counts, learns and remembers the modules of one bundle's runs (in its server)."""

    def __init__(self, paths, after: int, enabled: bool, log) -> None:
        self.path = paths.learned
        self.prefix = paths.report_prefix
        self.after = max(1, int(after))
        self.enabled = enabled
        self.log = log
        self.counts: dict = {}  # name -> runs that needed it (not learned, not refused)
        self.pending: list = []  # names that reached ``after``, in the order runs imported them
        self.learned: dict = {}  # name -> import cost in ms (the names the server imports)
        self.refused: dict = {}  # name -> why
        self.probe: probes.Probe | None = None  # the probe importing candidates, while one runs
        self.cleared: list = []  # names a probe imported cleanly: imported here, in this order
        self.sel = None  # the loop's selector, watching the probe's pipe

    # -- the saved set ---------------------------------------------------------------------

    def load(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            learned, refused = dict(data.get("learned", {})), dict(data.get("refused", {}))
        except (OSError, ValueError, TypeError, AttributeError):
            pass
        else:
            self.learned = {str(k): float(v) for k, v in learned.items() if _valid_name(str(k))}
            self.refused = {str(k): str(v) for k, v in refused.items()}
        self._refused_by_predecessor()

    def _refused_by_predecessor(self) -> None:
        for name in filter(None, os.environ.pop(REFUSED_ENV, "").split(",")):
            self.refused.setdefault(name, "refused before this server restarted")
            self.learned.pop(name, None)

    def save(self) -> None:
        data = {"learned": self.learned, "refused": self.refused}
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f)
            os.replace(tmp, self.path)
        except OSError as exc:
            self.log(f"learn: cannot save {self.path}: {exc.strerror}")
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def forget(self) -> None:
        """Clear the learned and refused sets, in memory and on disk; learn nothing more here."""
        self.counts.clear()
        self.pending.clear()
        self.cleared.clear()
        self.learned.clear()
        self.refused.clear()
        self.enabled = False  # this server is retiring; its successor starts from nothing
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def clean_reports(self) -> None:
        """Reports left by children of a server that died before reaping them."""
        directory, base = os.path.split(self.prefix)
        try:
            names = os.listdir(directory)
        except OSError:
            return
        for name in names:
            if name.startswith(base):
                try:
                    os.unlink(os.path.join(directory, name))
                except OSError:
                    pass

    # -- start-up --------------------------------------------------------------------------

    def preload(self) -> None:
        """Import the saved set (a restarted server is warm at once).

        Raises Unsafe (after saving the refusal) when one of them is no longer fork-safe: the
        caller restarts the server without it.
        """
        if not self.enabled:
            return
        for name in list(self.learned):
            if name in sys.modules or name in self.refused:
                continue
            if never_learned(name):  # learned by an older py-preload: drop it
                self.log(f"learn: dropped {name}: never learned")
                del self.learned[name]
                self.save()
                continue
            try:
                self.learned[name] = round(safe_import(name) * 1000, 1)
            except ImportError as exc:  # uninstalled since: drop it (runs may teach it again)
                self.log(f"learn: dropped {name}: {exc}")
                del self.learned[name]
                self.save()
            except Unsafe as exc:
                self._refuse(name, str(exc))
                raise
        self.log(f"learn: preloaded {len(self.learned)} learned module(s)")

    # -- between runs ----------------------------------------------------------------------

    def collect(self, pid: int) -> None:
        """Read and remove the report of the reaped child ``pid``. Never raises."""
        path = f"{self.prefix}{pid}"
        try:
            with open(path, "rb") as f:
                data = f.read(REPORT_LIMIT + 1)
        except OSError:
            return
        try:
            os.unlink(path)
        except OSError:
            pass
        if not self.enabled or len(data) > REPORT_LIMIT:
            return
        for name in data.decode("utf-8", "replace").split("\n"):
            self._count(name)

    def _count(self, name: str) -> None:
        if name in sys.modules or name in self.refused or self._queued(name):
            return
        if not _valid_name(name) or never_learned(name):
            return
        self.counts[name] = self.counts.get(name, 0) + 1
        if self.counts[name] >= self.after:
            del self.counts[name]
            self.pending.append(name)

    def _queued(self, name: str) -> bool:
        probing = self.probe is not None and name in self.probe.names
        return probing or name in self.pending or name in self.cleared

    def busy(self) -> bool:
        """Modules on their way in: pending, being probed, or cleared and not yet imported."""
        return bool(self.pending or self.cleared or self.probe)

    def needs_turn(self) -> bool:
        """Work for the server itself: a cleared module to import, or a probe to start."""
        return bool(self.cleared) or (bool(self.pending) and self.probe is None)

    def step(self, server_fds=(), sel=None) -> str | None:
        """Import the next cleared module, or start a probe for the pending ones.

        Returns None when nothing was done, "probing" when a probe was started (``sel``
        watches its pipe), "learned" after a safe import, "failed" after a failed one
        (refused; the server keeps serving), "unsafe" when the server must retire (the module
        is refused and saved as such). ``server_fds``: what a probe must close; ``sel``: the
        loop's selector, which watches the probe's pipe.
        """
        if not self.cleared and self.probe is None:
            return self._start_probe(list(server_fds), sel)
        while self.cleared:
            name = self.cleared.pop(0)
            if name in sys.modules:
                continue  # came with an earlier one
            try:
                cost = safe_import(name)
            except ImportError as exc:
                self._refuse(name, str(exc))
                return "failed"
            except Unsafe as exc:
                self._refuse(name, str(exc))
                return "unsafe"
            self.learned[name] = round(cost * 1000, 1)
            self.log(f"learn: imported {name} in {cost * 1000:.1f} ms")
            self.save()
            return "learned"
        return None

    # -- the probe -------------------------------------------------------------------------

    def _start_probe(self, server_fds: list, sel) -> str | None:
        names = [name for name in self.pending if name not in sys.modules]
        self.pending.clear()
        names = [name for name in names if not self._refused_package(name)]
        if not names:
            return None
        try:
            self.probe = probes.start(names, server_fds, verdict)
        except OSError as exc:  # dropped: later runs count them again
            self.log(f"learn: cannot fork a probe ({exc.strerror}): not learning {len(names)}")
            return None
        self.sel = sel
        if sel is not None:
            import selectors

            sel.register(self.probe.fd, selectors.EVENT_READ, self._probe_readable)
        return "probing"

    def _probe_readable(self, _fileobj) -> None:
        """The probe's pipe is readable: take its verdicts; close it once the probe ended."""
        verdicts, ended = self.probe.read()
        for kind, name, detail in verdicts:
            if kind == "ok":
                self.cleared.append(name)
            else:
                self._refuse(name, str(detail))
        if ended:
            self._end_probe(overdue=False)

    def check_probe(self, now: float) -> None:
        """Kill a probe past its deadline; the module it is stuck in is refused."""
        if self.probe is not None and now >= self.probe.deadline:
            self._end_probe(overdue=True)

    def stop_probe(self) -> None:
        """The server stops: a running probe is killed, and what it said no longer matters."""
        if self.probe is not None:
            self._end_probe(overdue=True, judge=False)

    def deadlines(self) -> list:
        return [self.probe.deadline] if self.probe is not None else []

    def probe_fds(self) -> list:
        return [self.probe.fd] if self.probe is not None else []

    def _end_probe(self, overdue: bool, judge: bool = True) -> None:
        """Close the probe (killed when ``overdue``): the module it was stuck in is refused,
        the names it did not reach wait for the next probe."""
        probe, self.probe = self.probe, None
        if self.sel is not None:
            self.sel.unregister(probe.fd)
        probe.close(kill=overdue)
        if not judge:
            return
        if probe.current is not None:
            why = f"did not finish in {probes.timeout():g} s" if overdue else "ended the probe"
            self._refuse(probe.current, f"importing {probe.current} {why}")
        elif not probe.done and probe.last is None:  # died before its first import: no retry
            self.log(f"learn: the probe {probe.pid} ended before importing anything")
            return
        self.pending[0:0] = [name for name in probe.unreached() if name not in self.refused]

    def _refused_package(self, name: str) -> bool:
        """Refuse ``name`` at once if a package above it was refused: importing ``a.b`` imports
        ``a`` first, which would do again what got it refused (no probe needed for that)."""
        parts = name.split(".")
        for end in range(1, len(parts)):
            package = ".".join(parts[:end])
            if package in self.refused and package not in sys.modules:
                self._refuse(name, f"its package {package} was refused")
                return True
        return False

    def _refuse(self, name: str, reason: str) -> None:
        self.log(f"learn: refused {name}: {reason}")
        self.learned.pop(name, None)
        self.refused[name] = reason
        self.save()

    def status(self) -> dict:
        return {
            "enabled": self.enabled, "after": self.after, "learned": dict(self.learned),
            "refused": dict(self.refused), "pending": list(self.pending),
            "probing": list(self.probe.names) if self.probe else [],
            "probe": self.probe.pid if self.probe else None,
            "cleared": list(self.cleared),
            "counts": dict(self.counts), "file": self.path,
        }  # fmt: skip


def never_learned(name: str) -> bool:
    from preloaded.server import tools

    return name.partition(".")[0] in NEVER or tools.never_learned(name)


def _valid_name(name: str) -> bool:
    return bool(name) and all(part.isidentifier() for part in name.split("."))

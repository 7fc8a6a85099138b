"""A server's start: hold the bundle's lock, then build the warm state every child inherits (the
bundle's modules, what earlier servers learned, the warm-up) and what staleness is checked
against."""

from __future__ import annotations

import os
import sys
import time

from preloaded.server import child, envdeps, learn, preload
from preloaded.server.staleness import Stamps

LOCK_WAIT = 5.0  # a new server waits this long for a retiring one (lost socket) to let go


class Warm:
    """What preloading left behind: timings, warnings, and the state the loop drives."""

    def __init__(self) -> None:
        self.import_times: dict = {}
        self.warnings: list = []
        self.warmup_time: float | None = None
        self.child_setup: child.Setup | None = None
        self.learner: learn.Learner | None = None
        self.stamps: Stamps | None = None


def lock_bundle(path: str) -> int | None:
    """flock the bundle's server lock; its fd, or None when another server keeps it.

    flock(2) directly, not filelock: the bundle's interpreter may have nothing installed (its
    packages come from the overlay), and the server must still start there."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + LOCK_WAIT  # a retiring server's lock
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(0.05)


def warm_up(config: dict, paths, log) -> Warm:
    """Import the bundle's modules and learned ones, run the warm-up; raise on failure."""
    warm = Warm()
    overlay = config.get("overlay")
    if overlay:  # installed by the starter: first, before the interpreter's own site-packages
        sys.path.insert(1, overlay)
    base_path = [p for p in sys.path[1:] if p != config["pkg_root"]]
    # Directories the modules were found in at bundle time (the caller's cwd or PYTHONPATH):
    # needed to import them here, but not part of a child's sys.path, as under python.
    sys.path[0:0] = config.get("path", [])
    baseline = preload.thread_count()
    with envdeps.recording():  # what the warm state depends on: checked on every run
        hook = _pytest_hook() if config.get("flavour") else None
        warm.import_times, suspects = preload.import_modules(list(config["modules"]), log)
        warm.learner = _preload_learned(config, paths, log)
        if hook is not None:
            from preloaded.server import pytestserver

            pytestserver.finish(hook)
        script = config.get("warmup")
        if script:
            from preloaded.server import warmup

            before = preload.thread_count()
            warm.warmup_time = warmup.run(script, log)
            if preload.thread_count() > before:
                suspects.append((f"the warm-up {script}", preload.thread_count() - before))
    stdout = sys.__stdout__
    setup = warm.child_setup = child.Setup(base_path, stdout.encoding, stdout.errors)
    # What each child needs to report the library modules it imported.
    learn.remember_modules(setup)  # once here, not per fork: the diff's other side
    if warm.learner.enabled:
        setup.roots = learn.library_roots(base_path, overlay)
        setup.learn_prefix = paths.report_prefix
    site = (overlay,) if overlay else ()  # removed or replaced: the server retires
    files = (script,) if script else ()  # an edited warm-up makes the server stale
    own = (config["pkg_root"],)
    warm.stamps = Stamps.collect(config["bundle"], sys.executable, site, files, own, log)
    preload.settle()
    warm.warnings = preload.thread_warnings(suspects, baseline)
    for warning in warm.warnings:
        log("warning: " + warning)
    if warm.stamps.watcher is not None and warm.stamps.watcher.problem:  # logged already
        warm.warnings.append(warm.stamps.watcher.problem)
    return warm


def _pytest_hook():
    """The pytest server's state before the bundle's modules (see pytestserver)."""
    from preloaded.server import pytestserver

    try:
        return pytestserver.prepare()
    except Exception as exc:
        raise ImportError(f"preparing pytest's assertion rewriting failed: {exc!r}") from exc


def _preload_learned(config: dict, paths, log) -> learn.Learner:
    """Import what earlier servers of this bundle learned; restart without an unsafe one."""
    enabled = bool(config.get("learn", True))
    learner = learn.Learner(paths, config.get("learn_after", 2), enabled, log)
    if not enabled:
        return learner
    learner.clean_reports()
    learner.load()
    try:
        learner.preload()
    except learn.Unsafe:  # refused and saved: a fresh image of this server goes without it
        from preloaded.client.spawn import server_argv

        log("restarting without it")
        # Told by the environment too: if the refusal could not be saved (a read-only cache),
        # the fresh image would import it again, and restart again, forever.
        os.environ[learn.REFUSED_ENV] = ",".join(learner.refused)
        argv = server_argv(config, config["bundle"])  # sys.orig_argv is 3.10+
        os.execv(argv[0], argv)
    return learner

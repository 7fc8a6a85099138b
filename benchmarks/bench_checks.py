"""The per-run checks of issue 18 parts 2-5, timed in a process holding torch+transformers.

The shadowing check (the run's own directories against the held modules: a stat per directory,
a cached listing) and the staleness check (a few stats, then a non-blocking read of the inotify
queue of every imported file's directory), against the old staleness check (a stat per file
outside site-packages and the standard library). Usage:

    .venv/bin/python benchmarks/bench_checks.py [-n N] [--light]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import timeit

STARTUP = frozenset(sys.modules)  # before anything else: python's start-up modules
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def per_call_us(func, n: int) -> float:
    return min(timeit.repeat(func, number=n, repeat=5)) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--light", action="store_true", help="json only, not torch")
    args = parser.parse_args()
    if args.light:
        import json  # noqa: F401
    else:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        from transformers import AutoModel  # noqa: F401
    from preloaded.server.shadowing import Shadows
    from preloaded.server.staleness import Stamps

    project = tempfile.mkdtemp(prefix="bench-checks-")
    for i in range(30):  # a project: a script beside 30 modules, and a src/ on PYTHONPATH
        open(os.path.join(project, f"mod{i}.py"), "w").close()
    os.mkdir(os.path.join(project, "src"))
    open(os.path.join(project, "train.py"), "w").close()
    for path in (os.path.join(project, "src"), project):
        os.utime(path, (0, 0))  # listed long after its last change: the listing is cached
    script = {"mode": "script", "target": "train.py", "cwd": project,
              "env": {"PYTHONPATH": os.path.join(project, "src")}}  # fmt: skip
    code = {"mode": "code", "target": "pass", "cwd": project, "env": {}}
    shadows, known = Shadows(STARTUP), frozenset(sys.modules)
    assert shadows.reason(script, known) is None
    bundle = os.path.join(REPO, "README.md")
    new = Stamps.collect(bundle, sys.executable, own=(REPO,), log=print)
    old = Stamps.collect(bundle, sys.executable, own=(REPO,))
    n = args.n
    print(f"held top-level modules: {len(shadows.held(known).late)}; "
          f"watched: {len(new.watched)} files in {len(new.watcher.names)} directories")
    rows = [("shadowing, script + PYTHONPATH", lambda: shadows.reason(script, known), ""),
            ("shadowing, -c", lambda: shadows.reason(code, known), ""),
            ("staleness, stats + inotify", new.changed, f" ({len(new.stamps)} stats)"),
            ("staleness before (stats only)", old.changed, f" ({len(old.stamps)} stats)")]
    for label, func, note in rows:
        print(f"{label + ':':32} {per_call_us(func, n):6.1f} us{note}")
    _fds_and_flags(n)
    new.watcher.close()


def _fds_and_flags(n: int) -> None:
    """Issue 18 parts 4 and 5: the client's listing of the caller's fds (every run), and the
    child's sys.flags (every run: a comparison; a write only for -B/-i/-q) and -W filters (only
    with -W or PYTHONWARNINGS)."""
    from preloaded.client.run import caller_fds
    from preloaded.server import startflags

    flags = {"u": False, "B": False, "i": False, "q": False, "W": []}
    rows = [("caller's fds (client)", caller_fds),
            ("sys.flags, as the server's", lambda: startflags.set_flags(flags, {})),
            ("sys.flags, one written", lambda: startflags._set_flag("quiet", 1)),
            ("-W error behind the libraries'", lambda: startflags.install_warnoptions(["error"]))]
    for label, func in rows:
        print(f"{label + ':':32} {per_call_us(func, n):6.1f} us")

if __name__ == "__main__":
    main()

"""The interactive prompt of a warm child: python's REPL as ``code.InteractiveConsole`` shows it.

The C REPL would be closer still, but its ``exit()`` runs the full interpreter teardown (close
to a second with torch loaded); here ``SystemExit`` comes back to the child, which ends fast.
"""

from __future__ import annotations

import code
import os
import sys

BANNER = 'Type "help", "copyright", "credits" or "license" for more information.'


def interact(main, quiet: bool, startup: bool) -> None:
    """Read-eval-print in ``main``'s namespace until EOF; SystemExit propagates."""
    if os.isatty(0):
        try:
            import readline  # noqa: F401  (input() edits lines with it, as python's REPL does)
        except ImportError:
            pass
    if not quiet and startup:
        sys.stderr.write(f"Python {sys.version} on {sys.platform}\n{BANNER}\n")
        sys.stderr.flush()
    if startup:
        _run_startup_file(main)
    hook = getattr(sys, "__interactivehook__", None)
    if hook is not None:
        try:
            hook()
        except Exception:
            sys.excepthook(*sys.exc_info())
    console = code.InteractiveConsole(main.__dict__, filename="<stdin>")
    for name, default in (("ps1", ">>> "), ("ps2", "... ")):
        if not hasattr(sys, name):
            setattr(sys, name, default)
    console.interact(banner="", exitmsg="")


def _run_startup_file(main) -> None:
    path = os.environ.get("PYTHONSTARTUP")
    if not path:
        return
    try:
        with open(path, "rb") as f:
            source = f.read()
    except OSError as exc:
        sys.stderr.write(f"Could not open PYTHONSTARTUP\n{type(exc).__name__}: {exc}\n")
        return
    try:
        exec(compile(source, path, "exec"), main.__dict__)
    except SystemExit:
        raise
    except BaseException:
        sys.excepthook(*sys.exc_info())

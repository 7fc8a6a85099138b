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
    console = _Console(main.__dict__, filename="<stdin>")
    for name, default in (("ps1", ">>> "), ("ps2", "... ")):
        if not hasattr(sys, name):
            setattr(sys, name, default)
    console.interact(banner="", exitmsg="")


class _Console(code.InteractiveConsole):
    """``code.InteractiveConsole`` with the C REPL's rules for prompts and flushing."""

    def raw_input(self, prompt: str = "") -> str:
        if os.isatty(0) and os.isatty(1):
            return input(prompt)  # readline, prompt on stdout: python's PyOS_Readline()
        # Python's PyOS_StdioReadline(): without a terminal on both ends the prompt goes to
        # stderr (input() would put it on stdout).
        sys.stderr.write(prompt)
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line[:-1] if line.endswith("\n") else line

    def runcode(self, code) -> None:
        from preloaded.server.stdio import flush_io

        super().runcode(code)
        flush_io()  # as python's REPL does after each statement


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
        exec(compile(source, path, "exec", dont_inherit=True), main.__dict__)  # not our __future__
    except SystemExit:
        raise
    except BaseException:
        sys.excepthook(*sys.exc_info())

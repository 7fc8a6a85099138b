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
    if _use_pyrepl():
        from _pyrepl.main import interactive_console

        interactive_console(main)  # python 3.13's REPL on a terminal; SystemExit propagates
        return
    console = _Console(main.__dict__, filename="<stdin>")
    for name, default in (("ps1", ">>> "), ("ps2", "... ")):
        if not hasattr(sys, name):
            setattr(sys, name, default)
    console.interact(banner="", exitmsg="")


def _use_pyrepl() -> bool:
    """Python 3.13+ runs its new REPL (_pyrepl) when stdin is a terminal it can drive, unless
    PYTHON_BASIC_REPL is set; its fallback, the C REPL, would run the full teardown on exit()."""
    if sys.version_info < (3, 13) or os.environ.get("PYTHON_BASIC_REPL") or not os.isatty(0):
        return False
    try:
        from _pyrepl import main as pyrepl  # decided at its first import: in this child
    except ImportError:
        return False
    if not pyrepl.CAN_USE_PYREPL:  # TERM=dumb, say: python says why, then runs the basic REPL
        sys.stderr.write(pyrepl.FAIL_REASON + "\n")
        sys.stderr.flush()
    return pyrepl.CAN_USE_PYREPL


class _Console(code.InteractiveConsole):
    """``code.InteractiveConsole`` with the C REPL's rules for prompts, flushing and (3.13+)
    source lines in tracebacks."""

    statements = 0  # 3.13+: each statement is compiled as "<stdin>-N" and kept in linecache

    def runsource(self, source, filename="<input>", symbol="single") -> bool:
        if sys.version_info < (3, 13):
            return super().runsource(source, filename, symbol)
        try:
            code = self.compile(source, filename, symbol)  # errors name "<stdin>", as python's
        except (OverflowError, SyntaxError, ValueError):
            self.showsyntaxerror(filename)
            return False
        if code is None:
            return True  # more input needed
        import linecache

        name = f"<stdin>-{self.statements}"
        self.statements += 1
        linecache._register_code(name, source, "<stdin>")
        self.runcode(compile(source, name, symbol, self.compile.compiler.flags, True))
        return False

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

"""What a bundle FILE runs: parse python's command line, then run warm (through the server) or cold.

Stdlib only and as few imports as possible: this is paid on every run. A warm run must behave
exactly like ``python ARGS``; anything a forked child cannot reproduce runs cold, by exec of the
real interpreter with the same arguments.
"""

from __future__ import annotations

import os
import sys

# Flags python applies at start-up that a fork of a running interpreter cannot take on.
COLD_FLAGS = frozenset("bdEIOPsSvxXRhV?")
WARM_FLAGS = frozenset("uBiq")

# Environment variables that only act at interpreter start-up (a non-empty value makes the run
# cold). PYTHONPATH, PYTHONUNBUFFERED, PYTHONIOENCODING, PYTHONWARNINGS, PYTHONDONTWRITEBYTECODE,
# PYTHONINSPECT and PYTHONSTARTUP are applied in the child instead; the others that python reads
# later (PYTHONBREAKPOINT, PYTHONASYNCIODEBUG, ...) work because the child gets the caller's env.
COLD_ENV = (
    "PYTHONHASHSEED", "PYTHONOPTIMIZE", "PYTHONDEBUG", "PYTHONVERBOSE", "PYTHONNOUSERSITE",
    "PYTHONUTF8", "PYTHONDEVMODE", "PYTHONTRACEMALLOC", "PYTHONFAULTHANDLER", "PYTHONMALLOC",
    "PYTHONMALLOCSTATS", "PYTHONCOERCECLOCALE", "PYTHONHOME", "PYTHONPLATLIBDIR",
    "PYTHONSAFEPATH", "PYTHONINTMAXSTRDIGITS", "PYTHONPYCACHEPREFIX",
    "PYTHONWARNDEFAULTENCODING", "PYTHONNODEBUGRANGES", "PYTHONPROFILEIMPORTTIME",
    "PYTHONEXECUTABLE", "PYTHONUSERBASE", "PYTHONPERFSUPPORT", "PYTHON_GIL", "PYTHON_CPU_COUNT",
    "PYTHON_FROZEN_MODULES", "PYTHON_PERF_JIT_SUPPORT", "PYTHON_JIT", "PYTHONCASEOK",
)  # fmt: skip


class Command:
    """A parsed python command line.

    ``mode`` is one of script, module, code, stdin, repl; ``argv`` is what ``sys.argv`` becomes;
    ``cold`` names the reason this command must run cold (None when it can run warm).
    """

    def __init__(self) -> None:
        self.mode = ""
        self.target: str | None = None
        self.argv: list = []
        self.flags = {"u": False, "B": False, "i": False, "q": False, "W": []}
        self.cold: str | None = None


def parse_args(args: list, stdin_isatty=None) -> Command:
    """Parse ``args`` (python's command line without argv[0]) the way python does."""
    cmd = Command()
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if arg == "-" or not arg.startswith("-"):
            break
        if arg.startswith("--"):
            cmd.cold = f"option {arg}"
            return cmd
        j = 1
        while j < len(arg):
            ch = arg[j]
            if ch in "cm":
                value = arg[j + 1 :]
                if not value:
                    i += 1
                    if i >= len(args):
                        cmd.cold = f"-{ch} without argument"
                        return cmd
                    value = args[i]
                cmd.mode = "code" if ch == "c" else "module"
                cmd.target = value
                cmd.argv = ["-" + ch] + args[i + 1 :]
                return cmd
            if ch in "WX":
                value = arg[j + 1 :]
                if not value:
                    i += 1
                    if i >= len(args):
                        cmd.cold = f"-{ch} without argument"
                        return cmd
                    value = args[i]
                if ch == "X":
                    cmd.cold = f"-X {value}"
                    return cmd
                cmd.flags["W"].append(value)
                break
            if ch in WARM_FLAGS:
                cmd.flags[ch] = True
            else:
                cmd.cold = f"option -{ch}"  # start-up only, informational, or unknown
                return cmd
            j += 1
        i += 1
    if i < len(args):
        cmd.target = args[i]
        cmd.mode = "stdin" if cmd.target == "-" else "script"
        cmd.argv = args[i:]
    else:
        if stdin_isatty is None:
            stdin_isatty = os.isatty(0)
        # -i makes python read stdin interactively (prompts, banner) even from a pipe.
        cmd.mode = "repl" if stdin_isatty or cmd.flags["i"] else "stdin"
        cmd.argv = [""]
    return cmd


def env_cold_reason(env) -> str | None:
    """The first start-up-only variable set in ``env``, or ``PY_PRELOAD_COLD``."""
    if env.get("PY_PRELOAD_COLD", "") not in ("", "0"):
        return "PY_PRELOAD_COLD is set"
    for name in COLD_ENV:
        if env.get(name):  # PYTHONHASHSEED=random too: a fork keeps the server's hash secret
            return f"{name} is set"
    encoding = env.get("PYTHONIOENCODING", "").partition(":")[0]
    if encoding:
        import codecs  # already loaded by the interpreter's start-up: costs nothing

        try:
            codecs.lookup(encoding)
        except LookupError:  # python fails at start-up ("Fatal Python error"): let it
            return f"unknown PYTHONIOENCODING codec {encoding!r}"
    return None


def exec_cold(python: str, args: list, config=None) -> None:
    """Replace this process with the real interpreter running the same command."""
    if config and config.get("overlay"):
        from preloaded.client import overlay

        overlay.ensure(config)  # a cold run sees the same packages as a warm one
    try:
        os.execv(python, [python] + args)
    except OSError as exc:
        os.write(2, f"py-preload: cannot run {python}: {exc.strerror}\n".encode())
        os._exit(127)


def with_overlay(pythonpath: str, overlay: str) -> str:
    """``PYTHONPATH`` with the overlay appended (after the caller's entries, as in a child)."""
    if not pythonpath:
        return overlay
    if overlay in pythonpath.split(os.pathsep):
        return pythonpath
    return pythonpath + os.pathsep + overlay


def warn(message: str) -> None:
    os.write(2, f"py-preload: {message}\n".encode("utf-8", "backslashreplace"))


def follow_jupyter(jupyter: str) -> None:
    """A Jupyter kernel ends when the process that launched it dies: ipykernel polls getppid()
    against JPY_PARENT_PID. A warm kernel's parent is the server, so the starter (the process
    Jupyter launched) keeps that watch, on a pidfd of its parent (whatever Jupyter's signal
    dispositions: a SIGHUP-based watch did nothing under `nohup jupyter`): when it ends, so
    does the run (run.py). Only when JPY_PARENT_PID is our parent: a process a notebook starts
    inherits the variable but has another parent. A cold kernel is python's own (the pidfd is
    close-on-exec): its ipykernel watches for itself."""
    if jupyter != str(os.getppid()):
        return
    try:
        fd = os.pidfd_open(int(jupyter))
    except (OSError, AttributeError, ValueError):
        return  # no pidfd (Linux < 5.3): the kernel outlives Jupyter, as it did before
    if jupyter != str(os.getppid()):
        os._exit(1)  # gone before the watch was set: as ipykernel's poller would
    from preloaded.client import run

    run.PARENT_FD = fd


def main(config: dict) -> None:
    """Entry point of a bundle FILE; ``config`` is the dict written into it by ``bundle``."""
    if "JPY_PARENT_PID" in os.environ:
        follow_jupyter(os.environ["JPY_PARENT_PID"])
    args = sys.argv[1:]
    python = config["python"]
    cmd = parse_args(args)
    overlay = config.get("overlay")
    if overlay:  # installed packages: the child's and a cold run's PYTHONPATH (no stat here)
        os.environ["PYTHONPATH"] = with_overlay(os.environ.get("PYTHONPATH", ""), overlay)
    if cmd.cold or env_cold_reason(os.environ):
        exec_cold(python, args, config)
    if not sys.platform.startswith("linux"):
        # A starter is a drop-in python: where the server cannot work, python still can.
        warn(f"the server needs Linux, not {sys.platform}; running without it")
        exec_cold(python, args, config)
    from preloaded.client import run
    from preloaded.client.connection import Fallback

    try:
        status = run.run(config, sys.argv[0], cmd, args)
    except Fallback as exc:
        if exc.message:  # a traceback (a failed warm-up) goes after the one-line summary
            first, newline, rest = exc.message.partition("\n")
            warn(f"{first}; running without the server{newline}{rest}")
        exec_cold(python, args, config)
    run.exit_like(status)

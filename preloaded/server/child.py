"""Everything between fork and the end of a run: become ``python ARGS`` for the caller.

A child is forked ahead of its run and parked (a standby, see ``park``); the server hands it a
run over a socketpair. ``park`` never returns: whatever happens, the child ends with
``os._exit`` so that it neither falls back into the server's loop nor pays the interpreter's
teardown.
"""

from __future__ import annotations

import builtins
import importlib
import os
import signal
import socket
import sys
import types

import runpy  # noqa: F401  (preloaded for -m and directory/zip scripts)

from preloaded import wire
from preloaded.server import (
    become, envdeps, fastexit, learn, preload, proctitle, startflags, stdio,
)

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # preloaded/
GO = {"go": True}  # the server's last frame to a standby: the run may start
SIGINT_EXIT = -signal.SIGINT  # run status meaning "end by SIGINT", as python does


class Setup:
    """Server state the child needs: the base sys.path and the default stdio encodings."""

    def __init__(self, base_path: list, encoding: str, errors: str) -> None:
        self.base_path = base_path
        self.encoding = encoding
        self.errors = errors
        self.server_pid = os.getpid()  # built in the server: the parent every child must have
        # Learned preloads (see preloaded.learn): the server's modules, the library directories,
        # and where to report (None: learning is off).
        self.known: frozenset = frozenset()
        self.newest: tuple = (None, None)  # sys.modules' newest entry: (name, id of module)
        self.roots: tuple = ()
        self.learn_prefix: str | None = None
        # PY_PRELOAD_FASTEXIT=0 (server's environment): children tear their memory down
        # themselves, before their exit is reported (see fastexit.py).
        self.fast_exit = os.environ.get("PY_PRELOAD_FASTEXIT", "").strip() != "0"


def park(channel: int, server_fds: list, setup: Setup, sigmask=None) -> None:
    """Be a standby: set up what no request decides, then block until the server hands over a
    run on ``channel``; never returns.

    Parked, the process sits in ``recvmsg`` (no CPU). The hand-over is one frame (the request,
    with the caller's stdio fds by SCM_RIGHTS), then EOF once the client was told "started":
    nothing of the command runs before that EOF, as a client that loses the server before it
    runs the command cold. Everything the request decides (signals it ignores, stdio, the
    environment, cwd, umask, argv, RNG seeds) is applied after the hand-over, never at fork.
    ``sigmask``: the signal mask to restore once the server's handlers are gone (the server
    blocks its handled signals across fork).
    """
    status = 1
    handed_over = False
    try:
        preload.leave_server(server_fds)
        _reset_process(sigmask)
        if os.getppid() != setup.server_pid:  # died before PR_SET_PDEATHSIG was armed
            os._exit(1)
        preload.outlive_server()
        request, fds = _receive(channel, setup)
        handed_over = True
        status = _serve(request, fds, setup)
    except KeyboardInterrupt:  # a SIGINT before the command started: ends by SIGINT, as python
        status = SIGINT_EXIT
    except BaseException:  # a py-preload bug: say so on the caller's stderr
        try:
            import traceback

            os.write(2, ("py-preload: internal error\n" + traceback.format_exc()).encode())
        except BaseException:
            pass
    finally:
        # A Ctrl-C forwarded as the run ends must not raise in here (it would escape park and
        # end the child with the server's fallback status 70).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if handed_over and setup.fast_exit:
            fastexit.release_memory_later()
        if status == SIGINT_EXIT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
            status = 128 + signal.SIGINT
        os._exit(status & 0xFF)


def _serve(request: dict, fds: list, setup: Setup) -> int:
    """The run itself, once handed over: stdio, environment, the command, python's ending."""
    stdio.install_stdio(request, fds, setup)
    _apply_environment(request, setup)
    _look_like_python(request)
    status = _finalize(_execute(request))
    learn.report(setup, request["cwd"])
    return status


def _receive(channel: int, setup: Setup) -> tuple:
    """Block until the server hands over a run: (request, fds). Returns after the "go" (EOF).

    EOF before a whole request means the server discarded this standby (or died): exit quietly.
    """
    reader = wire.FrameReader()
    fds: list = []
    request = None
    while request is None:
        data, ancdata, flags, _ = _recvmsg(channel)
        fds.extend(wire.unpack_fds(ancdata, flags))
        if not data:
            os._exit(0)
        reader.feed(data)
        for request in reader.frames():
            break
    if request.get("fds"):  # before the caller's limits apply: the server's let them land
        fds, channel = stdio.place_fds(fds, request["fds"], channel)
    for signum in request["ignored"]:  # inherited "ignore" survives exec, and python leaves it so
        signal.signal(signum, signal.SIG_IGN)
    if "context" in request:  # the caller's limits, nice, cgroup, privilege...: before the go
        become.answer(channel, request.pop("context"))
    while GO not in reader.frames():  # the "go": the client was told "started"
        data = _recvmsg(channel)[0]
        if not data:  # the server died, or killed us: the client runs the command cold, if at all
            os._exit(1)
        reader.feed(data)
    os.close(channel)
    return request, fds


def _recvmsg(channel: int) -> tuple:
    sock = socket.socket(fileno=channel)
    try:
        return sock.recvmsg(1 << 16, wire.anc_space())
    finally:
        sock.detach()


def _reset_process(sigmask=None) -> None:
    """Undo the rest of what the server set up: its signal handling, its session."""
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGQUIT, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as python does at start-up
    if sigmask is not None:  # a signal sent since the fork acts now, as on a process starting
        signal.pthread_sigmask(signal.SIG_SETMASK, sigmask)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, preload.HANDLED)  # the server keeps them blocked
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.setsid()  # own session and process group: signals can reach the whole job


def _apply_environment(request: dict, setup: Setup) -> None:
    env = request["env"]
    os.environ.clear()
    os.environ.update(env)
    envdeps.follow_tz(env)
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    sys.argv = list(request["argv"])
    sys.orig_argv = list(request["orig_argv"])
    if "executable" in request:  # an xdist controller of the pytest server: warm workers
        sys.executable = request["executable"]
    sys.path[:] = [_path0(request)] + _dedupe(_pythonpath(env) + setup.base_path)
    flags = request["flags"]
    sys.dont_write_bytecode = flags["B"] or bool(env.get("PYTHONDONTWRITEBYTECODE"))
    startflags.set_flags(flags, env)
    warnoptions = [w for w in env.get("PYTHONWARNINGS", "").split(",") if w] + flags["W"]
    sys.warnoptions[:] = warnoptions
    if warnoptions:
        startflags.install_warnoptions(warnoptions)
    _reseed()


def _look_like_python(request: dict) -> None:
    """``ps``, ``top``, ``pgrep -f`` and /proc show python's command line, environment and
    name for this process, not the server's (see proctitle.py)."""
    try:
        proctitle.become(request["orig_argv"], request["env"])
    except Exception:  # cosmetic to the run itself: never a reason for it to fail
        pass


def _path0(request: dict) -> str:
    mode = request["mode"]
    if mode == "module":
        return os.getcwd()
    if mode != "script":
        return ""
    path = _abspath(request["target"])
    if os.path.isdir(path) or not path.endswith((".py", ".pyw")) and _is_zip(path):
        return path  # a directory or zip with __main__.py is itself sys.path[0], as given
    # Python takes the directory of the script's real path: symlinks (of the file and of its
    # directories) are resolved and ".." collapsed.
    return os.path.dirname(os.path.realpath(path))


def _abspath(path: str) -> str:
    """The script's path as python makes it absolute (``_Py_abspath``): the cwd joined to it,
    not normalised (``./sub/f.py`` gives ``/cwd/./sub/f.py``, which ``__file__`` shows)."""
    if path == "" or path == "." and sys.version_info >= (3, 11):  # 3.10 gives "/cwd/."
        return os.getcwd()
    if os.path.isabs(path):
        return path
    return os.path.join(os.getcwd(), path)


def _is_zip(path: str) -> bool:
    import zipfile

    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def _pythonpath(env) -> list:
    value = env.get("PYTHONPATH", "")
    # As python's getpath: every entry made absolute, an empty one (a "::") meaning the cwd.
    return [os.path.abspath(p) for p in value.split(os.pathsep)] if value else []


def _dedupe(paths: list) -> list:
    """site.removeduppaths(): python drops repeated entries before sys.path[0] is inserted."""
    seen: set = set()
    kept = []
    for path in paths:
        key = os.path.normcase(os.path.abspath(path))
        if key not in seen:
            seen.add(key)
            kept.append(path)
    return kept


def _reseed() -> None:
    """The fork copied the server's RNG states; give each run its own, as a new process has.

    At the hand-over, not at fork: a standby forked ahead must not carry a seed of its own."""
    py_random = sys.modules.get("random")
    if py_random is not None:  # it reseeds itself at fork; at fork is not enough here
        py_random.seed()
    np_random = sys.modules.get("numpy.random")
    if np_random is not None:
        np_random.seed()
    # Only the CPU generator: a fresh process seeds it randomly, while its CUDA generators start
    # from torch's fixed default seed (torch.seed() would change those, and costs a few ms).
    generator = getattr(sys.modules.get("torch.random"), "default_generator", None)
    if generator is not None:
        generator.seed()


def _fresh_main() -> types.ModuleType:
    main = types.ModuleType("__main__")
    main.__dict__.update(
        __builtins__=builtins,
        __loader__=importlib.machinery.BuiltinImporter,
        __spec__=None,
        __package__=None,
        __annotations__={},
    )
    sys.modules["__main__"] = main
    return main


def _execute(request: dict) -> int:
    """Run the user's code; return the exit status python would have (SIGINT_EXIT for ^C)."""
    main = _fresh_main()
    flags = request["flags"]
    if request["mode"] == "repl":
        return _interact(main, quiet=flags["q"], startup=True)
    # Python's config->inspect (-i, or PYTHONINSPECT at start-up): SystemExit does not exit then.
    inspect = flags["i"] or bool(os.environ.get("PYTHONINSPECT"))
    status = _run_main(main, request, inspect)
    # Python's pymain_repl(): PYTHONINSPECT may also have been set by the code itself, and
    # without -i the prompt comes only on a terminal.
    if (flags["i"] or os.environ.get("PYTHONINSPECT")) and (flags["i"] or os.isatty(0)):
        return _interact(main, quiet=True, startup=False)
    return status


def _interact(main: types.ModuleType, quiet: bool, startup: bool) -> int:
    from preloaded.server import repl

    try:
        repl.interact(main, quiet=quiet, startup=startup)
    except SystemExit as exc:
        return _system_exit_status(exc)
    return 0  # python's REPL ends with 0 at EOF, whatever failed before


def _run_main(main: types.ModuleType, request: dict, inspect: bool) -> int:
    mode, target = request["mode"], request["target"]
    file_run = False  # a script or stdin run by python's _PyRun_SimpleFileObject
    try:
        if mode == "code":  # dont_inherit: this module's __future__ imports are not theirs
            if sys.version_info >= (3, 13):  # python keeps -c's source for its tracebacks
                import linecache

                linecache._register_code("<string>", target, "<string>")
            exec(compile(target, "<string>", "exec", dont_inherit=True), main.__dict__)
        elif mode == "module":
            runpy._run_module_as_main(target, alter_argv=True)
        elif mode == "script" and sys.path[0] == _abspath(target):
            runpy._run_module_as_main("__main__", alter_argv=False)  # a directory or zip app
        else:
            filename, source = _read_file(main, mode, target)
            file_run = True
            try:
                exec(compile(source, filename, "exec", dont_inherit=True), main.__dict__)
            finally:
                stdio.flush_io()
        status = 0
    except SystemExit as exc:
        if inspect:  # python prints it like any other exception and goes on to the prompt
            status = _report(exc)
        else:
            file_run = False  # python exits from within the run: atexit still sees __file__
            status = _system_exit_status(exc)
    except BaseException as exc:
        status = _report(exc)
    if file_run:  # python deletes what it set for the run once the run is over
        main.__dict__.pop("__file__", None)
        main.__dict__.pop("__cached__", None)
    return status


def _read_file(main: types.ModuleType, mode: str, target: str) -> tuple:
    """(filename, source) of a script or of stdin, with ``__main__`` set up as python does."""
    if mode == "stdin":
        main.__file__ = "<stdin>"
        main.__cached__ = None
        return "<stdin>", sys.stdin.buffer.read() if sys.stdin else b""
    path = _abspath(target)
    try:
        with open(path, "rb") as f:
            source = f.read()
    except OSError as exc:  # python names its program_name: its argv[0], as a cold run gets it
        sys.stderr.write(f"{sys.orig_argv[0]}: can't open file {path!r}: [Errno {exc.errno}] "
                         f"{exc.strerror}\n")
        raise SystemExit(2) from None
    from importlib.machinery import SourceFileLoader

    main.__file__ = path
    main.__cached__ = None
    main.__loader__ = SourceFileLoader("__main__", path)
    return path, source


def _system_exit_status(exc: SystemExit) -> int:
    """What python's handle_system_exit() does with a SystemExit's code."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        if -(2**63) <= code < 2**63:
            return code & 0xFF
        if sys.version_info >= (3, 13):  # python reports the failed C long conversion late
            _write_stderr("Exception ignored on threading shutdown:\n")
        if sys.version_info >= (3, 12):
            _write_stderr("OverflowError: Python int too large to convert to C long\n")
        return 0xFF
    _write_stderr(f"{code}\n")
    return 1


def _write_stderr(text: str) -> None:
    stderr = sys.stderr
    if stderr is not None and not getattr(stderr, "closed", False):
        try:
            stderr.write(text)
        except Exception:
            pass


def _report(exc: BaseException) -> int:
    """Print an uncaught exception like python (without py-preload's frames)."""
    _strip_own_frames(exc, set())
    sys.last_type, sys.last_value, sys.last_traceback = type(exc), exc, exc.__traceback__
    try:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    except BaseException:
        pass
    if isinstance(exc, KeyboardInterrupt):
        return SIGINT_EXIT
    return 1


def _strip_own_frames(exc: BaseException, seen: set) -> None:
    if exc is None or id(exc) in seen:
        return
    seen.add(id(exc))
    tb = exc.__traceback__
    while tb is not None and _is_own(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    exc.__traceback__ = tb
    _strip_own_frames(exc.__cause__, seen)
    _strip_own_frames(exc.__context__, seen)


def _is_own(filename: str) -> bool:
    return filename.startswith(os.path.join(_PKG_DIR, ""))


def _finalize(status: int) -> int:
    """Python's Py_FinalizeEx, minus the teardown: threads, atexit, flush stdio."""
    import threading

    try:
        threading._shutdown()
    except BaseException:  # e.g. ^C while waiting: stop waiting and go on to atexit, as python
        pass
    import atexit

    atexit._run_exitfuncs()
    if not stdio.flush_std_files():
        status = 120
    return status



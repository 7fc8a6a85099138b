"""The client half of a warm run: reach (or start) the server, hand over the run, mirror its end.

Stdlib only, on the fast path. The slow first-run path (spawning the server) lives in
``preloaded.client.spawn`` and is imported only when no server answers.
"""

from __future__ import annotations

import _signal
import os

from preloaded import wire
from preloaded.client.cmdline import hide_arguments
from preloaded.client.connection import Fallback, Link, connect, hand_over
from preloaded.client.signals import Signals, ignored_signals, suspend
from preloaded.paths import Paths, UnsafeDirectory

# A pidfd of the process whose end ends the run, as ipykernel's poller ends python's kernel
# (starter.follow_jupyter); None when nothing is watched.
PARENT_FD: int | None = None
PARENT_GONE = ("exit", 1)  # ipykernel's os._exit(1); the server then ends the child


def build_request(cmd, args: list, python: str, stdio: list, ignored: list, fds: list) -> dict:
    """The run request for a parsed command line (see DESIGN.md, wire protocol)."""
    try:
        cwd = os.getcwd()
    except OSError as exc:
        raise Fallback() from exc  # python itself copes with a deleted cwd; let it
    umask = os.umask(0)
    os.umask(umask)
    return {
        "v": 1,
        "mode": cmd.mode,
        "target": cmd.target,
        "argv": cmd.argv,
        "orig_argv": [python] + args,
        "cwd": cwd,
        "env": dict(os.environ),
        "umask": umask,
        "flags": cmd.flags,
        "stdio": stdio,
        "ignored": ignored,
        "fds": fds,
    }


def caller_fds() -> list:
    """The caller's fds above 2, each to land at its own number in the child, as python would
    have them. Every fd an exec kept has close-on-exec cleared, and python opens its own fds
    with it set: what lacks it here is the caller's. (The listing's own directory fd is closed
    by the time it is looked at.) Must run before this process opens any fd of its own."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError as exc:
        raise Fallback() from exc  # they cannot be listed: python gets them all
    fds = []
    for name in names:
        fd = int(name)
        if fd > 2:
            try:
                if os.get_inheritable(fd):
                    fds.append(fd)
            except OSError:
                pass
    fds.sort()
    return fds


def stdio_kinds() -> list:
    """For fds 0, 1, 2: "tty", "pipe" (anything else that is open) or "closed"."""
    kinds = []
    for fd in (0, 1, 2):
        if os.isatty(fd):
            kinds.append("tty")
        else:
            try:
                os.fstat(fd)
                kinds.append("pipe")
            except OSError:
                kinds.append("closed")
    return kinds


def bundle_paths(bundle: str) -> Paths:
    try:
        return Paths(bundle)
    except (UnsafeDirectory, OSError) as exc:
        raise Fallback(f"runtime directory unusable: {exc}") from exc


def open_server(config: dict, bundle: str, paths: Paths | None = None):
    """Connect to this bundle's server, starting it first if none is running."""
    paths = paths or bundle_paths(bundle)
    sock = connect(paths.socket)
    if sock is None:
        from preloaded.client import spawn

        sock = spawn.start_and_connect(config, bundle, paths)
    return sock


def run(config: dict, bundle: str, cmd, args: list):
    """Run ``cmd`` warm; return ("exit", code) or ("signal", n). Raises Fallback to run cold."""
    kinds = stdio_kinds()
    ignored = ignored_signals()
    extra = caller_fds()
    if len(extra) > wire.MAX_FDS - 3:
        # One message carries at most MAX_FDS: so many fds is rare enough to run cold, which
        # passes them all, rather than split a request over several messages.
        raise Fallback()
    paths = bundle_paths(bundle)
    for _attempt in range(3):
        sock = open_server(config, bundle, paths)
        # Handlers go in before raw mode and before the child exists: a signal that comes while
        # the run starts is forwarded once it has started, and never leaves the terminal raw.
        signals = Signals(tty="tty" in kinds)
        started = False
        try:
            relay = None
            request = build_request(cmd, args, config["python"], _stdio(kinds), ignored, extra)
            if "tty" in kinds:
                from preloaded.client.ptyrelay import PtyRelay

                relay = PtyRelay(kinds, ignored)
                fds = relay.child_fds()
            else:
                fds = [fd if kind == "pipe" else _devnull() for fd, kind in zip((0, 1, 2), kinds)]
            reply, reader = hand_over(sock, fds + extra, request)
            if "started" in reply:
                started = True
                hide_arguments()  # pgrep -f / pkill -f must find the program's process only
                link = Link(sock, reader, reply, paths.socket)
                return _wait(link, relay, signals.rfd, ignored)
            sock.close()
            if relay:
                relay.close()
        except BaseException:
            if not started:  # going cold (or dying): never with the terminal left in raw mode
                sock.close()
                if relay:
                    relay.close()
            raise
        finally:
            signals.restore(redeliver=not started)
        if "cold" in reply:  # the server says python must run it (the reason is in its log)
            raise Fallback()
        if reply.get("error") != "stale":
            raise Fallback(f"the server refused the run: {reply.get('error')}")
        # The server noticed its environment changed and is retiring: start a fresh one.
    raise Fallback("the server kept restarting")


def _stdio(kinds: list) -> list:
    return ["pty" if kind == "tty" else kind for kind in kinds]


def _devnull() -> int:
    return os.open(os.devnull, os.O_RDWR)


def _wait(link: Link, relay, wakeup_fd, ignored: list):
    """Forward signals and (with a PTY) relay the terminal until the child's status arrives."""
    try:
        if relay:
            return relay.run(link, wakeup_fd, PARENT_FD)
        return _wait_pipes(link, wakeup_fd, ignored)
    finally:
        link.close()


def _wait_pipes(link: Link, wakeup_fd, ignored: list):
    import select

    parent = [PARENT_FD] if PARENT_FD is not None else []
    while True:
        run_fd = link.fileno()  # the server's socket; the program's pidfd once the server died
        ready, _, _ = select.select([run_fd, wakeup_fd] + parent, [], [])
        if PARENT_FD in ready:
            link.hang_up()
            return PARENT_GONE
        if wakeup_fd in ready:
            for signum in os.read(wakeup_fd, 64):
                if signum == _signal.SIGTSTP and signum not in ignored:
                    suspend(link, None)
                else:
                    link.send_signal(signum)
        if run_fd in ready:
            status = link.read_status()
            if status:
                return status


def exit_like(status) -> None:
    """End this process the way the child ended: same exit code, or death by the same signal."""
    kind, value = status
    if kind == "signal":
        try:
            _signal.signal(value, _signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # SIGKILL (and SIGSTOP) cannot be caught anyway: their action is the default
        try:
            os.kill(os.getpid(), value)
        except OSError:
            pass
        os._exit(128 + value)
    os._exit(value & 0xFF)

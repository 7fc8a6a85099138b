"""The client half of a warm run: reach (or start) the server, hand over the run, mirror its end.

Stdlib only, on the fast path. The slow first-run path (spawning the server) lives in
``preloaded.client.spawn`` and is imported only when no server answers.
"""

from __future__ import annotations

import _signal
import os

from preloaded.client.cmdline import hide_arguments
from preloaded.client.connection import Fallback, connect, hand_over, read_status, send_signal
from preloaded.client.signals import Signals, ignored_signals, suspend
from preloaded.paths import Paths, UnsafeDirectory

# A pidfd of the process whose end ends the run, as ipykernel's poller ends python's kernel
# (starter.follow_jupyter); None when nothing is watched.
PARENT_FD: int | None = None
PARENT_GONE = ("exit", 1)  # ipykernel's os._exit(1); the server then ends the child


def build_request(cmd, args: list, python: str, stdio: list, ignored: list) -> dict:
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
    }


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


def open_server(config: dict, bundle: str):
    """Connect to this bundle's server, starting it first if none is running."""
    try:
        paths = Paths(bundle)
    except (UnsafeDirectory, OSError) as exc:
        raise Fallback(f"runtime directory unusable: {exc}") from exc
    sock = connect(paths.socket)
    if sock is None:
        from preloaded.client import spawn

        sock = spawn.start_and_connect(config, bundle, paths)
    return sock


def run(config: dict, bundle: str, cmd, args: list):
    """Run ``cmd`` warm; return ("exit", code) or ("signal", n). Raises Fallback to run cold."""
    kinds = stdio_kinds()
    ignored = ignored_signals()
    for _attempt in range(3):
        sock = open_server(config, bundle)
        # Handlers go in before raw mode and before the child exists: a signal that comes while
        # the run starts is forwarded once it has started, and never leaves the terminal raw.
        signals = Signals(tty="tty" in kinds)
        started = False
        try:
            relay = None
            request = build_request(cmd, args, config["python"], _stdio(kinds), ignored)
            if "tty" in kinds:
                from preloaded.client.ptyrelay import PtyRelay

                relay = PtyRelay(kinds, ignored)
                fds = relay.child_fds()
            else:
                fds = [fd if kind == "pipe" else _devnull() for fd, kind in zip((0, 1, 2), kinds)]
            reply, reader = hand_over(sock, fds, request)
            if "started" in reply:
                started = True
                hide_arguments()  # pgrep -f / pkill -f must find the program's process only
                return _wait(sock, reader, relay, signals.rfd, reply["started"], ignored)
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


def _wait(sock, reader, relay, wakeup_fd, child_pid, ignored: list):
    """Forward signals and (with a PTY) relay the terminal until the child's status arrives."""
    try:
        if relay:
            return relay.run(sock, reader, wakeup_fd, child_pid, PARENT_FD)
        return _wait_pipes(sock, reader, wakeup_fd, ignored)
    finally:
        sock.close()


def _wait_pipes(sock, reader, wakeup_fd, ignored: list):
    import select

    sock_fd = sock.fileno()
    rlist = [sock_fd, wakeup_fd] + ([PARENT_FD] if PARENT_FD is not None else [])
    while True:
        ready, _, _ = select.select(rlist, [], [])
        if PARENT_FD in ready:
            return PARENT_GONE
        if wakeup_fd in ready:
            for signum in os.read(wakeup_fd, 64):
                if signum == _signal.SIGTSTP and signum not in ignored:
                    suspend(sock, None)
                else:
                    send_signal(sock, signum)
        if sock_fd in ready:
            status = read_status(sock, reader)
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

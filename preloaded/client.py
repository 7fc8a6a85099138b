"""The client half of a warm run: reach (or start) the server, hand over the run, mirror its end.

Stdlib only, on the fast path. The slow first-run path (spawning the server) lives in
``preloaded.spawn`` and is imported only when no server answers.
"""

from __future__ import annotations

import _signal
import _socket
import os

from preloaded import wire
from preloaded.paths import Paths, UnsafeDirectory

# Signals the client passes on to the child; the client itself keeps running until the child's
# status comes back, so that it can mirror it.
FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")


class Fallback(Exception):
    """The server cannot run this command; run it cold. ``message`` is warned about (if any)."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message


def connect(path: str):
    """A connected socket to the server at ``path``, or None when nothing listens there."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except OSError as exc:
        sock.close()
        raise Fallback(f"cannot connect to {path}: {exc.strerror}") from exc
    return sock


# Dispositions a child inherits from its caller when they are "ignore" (nohup ignores SIGHUP,
# a non-interactive shell's `cmd &` ignores SIGINT and SIGQUIT): python keeps them, so must we.
INHERITABLE = FORWARDED + ("SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGWINCH", "SIGCONT")


def ignored_signals() -> list:
    signums = [getattr(_signal, name) for name in INHERITABLE]
    return [s for s in signums if _signal.getsignal(s) == _signal.SIG_IGN]


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
        from preloaded import spawn

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
        signals = _Signals(tty="tty" in kinds, ignored=ignored)
        started = False
        try:
            relay = None
            request = build_request(cmd, args, config["python"], _stdio(kinds), ignored)
            if "tty" in kinds:
                from preloaded.ptyrelay import PtyRelay

                relay = PtyRelay(kinds)
                fds = relay.child_fds()
            else:
                fds = [fd if kind == "pipe" else _devnull() for fd, kind in zip((0, 1, 2), kinds)]
            reply, reader = _hand_over(sock, fds, request)
            if "started" in reply:
                started = True
                return _wait(sock, reader, relay, signals.rfd)
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
        if reply.get("error") != "stale":
            raise Fallback(f"the server refused the run: {reply.get('error')}")
        # The server noticed its environment changed and is retiring: start a fresh one.
    raise Fallback("the server kept restarting")


def _stdio(kinds: list) -> list:
    return ["pty" if kind == "tty" else kind for kind in kinds]


def _hand_over(sock, fds, request: dict):
    """Send the request with the child's fds; return the server's first reply and the reader."""
    try:
        try:
            wire.send(sock, request, fds)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before it read our request (another uid): its reply says why
        reader = wire.FrameReader()
        return wire.recv_frame(sock, reader), reader
    except (OSError, EOFError, wire.ProtocolError) as exc:
        raise Fallback(f"the server did not take the run ({exc})") from exc
    finally:
        for fd in set(fds) - {0, 1, 2}:  # the PTY slave or /dev/null: the child has them now
            os.close(fd)


def _devnull() -> int:
    return os.open(os.devnull, os.O_RDWR)


class _Signals:
    """The client's handlers during a run: they only write the signal number to a pipe."""

    def __init__(self, tty: bool, ignored: list) -> None:
        self.rfd, self.wfd = os.pipe()
        os.set_blocking(self.rfd, False)
        os.set_blocking(self.wfd, False)
        self.old_wakeup = _signal.set_wakeup_fd(self.wfd, warn_on_full_buffer=False)
        handled = [getattr(_signal, name) for name in FORWARDED]
        handled.append(_signal.SIGTSTP)
        if tty:
            handled += [_signal.SIGWINCH, _signal.SIGCONT]
        handled = [s for s in handled if s not in ignored]  # the child ignores them too
        self.previous = {signum: _signal.signal(signum, _noop) for signum in handled}

    def restore(self, redeliver: bool) -> None:
        """Put the old handlers back; with ``redeliver``, signals that came meanwhile act now."""
        pending = b""
        if redeliver:
            try:
                pending = os.read(self.rfd, 64)
            except OSError:
                pass
        for signum, handler in self.previous.items():
            _signal.signal(signum, handler)
        _signal.set_wakeup_fd(self.old_wakeup)
        os.close(self.rfd)
        os.close(self.wfd)
        forwarded = {getattr(_signal, name) for name in FORWARDED}
        for signum in pending:
            if signum in forwarded:
                os.kill(os.getpid(), signum)


def _wait(sock, reader, relay, wakeup_fd):
    """Forward signals and (with a PTY) relay the terminal until the child's status arrives."""
    try:
        if relay:
            return relay.run(sock, reader, wakeup_fd)
        return _wait_pipes(sock, reader, wakeup_fd)
    finally:
        sock.close()


def _noop(signum, frame) -> None:
    """Python-level handler: the C handler writes the number to the wakeup fd; that is all."""


def _wait_pipes(sock, reader, wakeup_fd):
    import select

    sock_fd = sock.fileno()
    while True:
        ready, _, _ = select.select([sock_fd, wakeup_fd], [], [])
        if wakeup_fd in ready:
            for signum in os.read(wakeup_fd, 64):
                if signum == _signal.SIGTSTP:
                    suspend(sock, None)
                else:
                    send_signal(sock, signum)
        if sock_fd in ready:
            status = read_status(sock, reader)
            if status:
                return status


def send_signal(sock, signum: int) -> None:
    try:
        wire.send(sock, {"signal": signum})
    except OSError:
        pass  # the server is gone; read_status reports it


def read_status(sock, reader):
    """Read what the server sent; return the final status once it is there, else None."""
    status = _buffered_status(reader)  # "started" and "exit" can arrive in one recv
    if status:
        return status
    try:
        data = sock.recv(65536)
    except OSError:
        data = b""
    if not data:
        os.write(2, b"py-preload: lost the server during the run\n")
        return ("exit", 1)
    reader.feed(data)
    return _buffered_status(reader)


def _buffered_status(reader):
    try:
        for frame in reader.frames():
            if "exit" in frame:
                return ("exit", frame["exit"])
            if "signal" in frame:
                return ("signal", frame["signal"])
            if "error" in frame:
                os.write(2, f"py-preload: {frame['error']}\n".encode())
                return ("exit", 1)
    except wire.ProtocolError as exc:
        os.write(2, f"py-preload: bad reply from the server: {exc}\n".encode())
        return ("exit", 1)
    return None


def suspend(sock, relay) -> None:
    """Ctrl-Z: stop the child, give the terminal back to the shell, and stop ourselves.

    The child's process group is orphaned (its parent, the server, is in another session), so
    the kernel discards SIGTSTP there: the child gets SIGSTOP instead. On SIGCONT (``fg``) the
    terminal goes back to raw mode and the child continues.
    """
    send_signal(sock, _signal.SIGSTOP)
    if relay:
        relay.restore()
    _signal.signal(_signal.SIGTSTP, _signal.SIG_DFL)
    os.kill(os.getpid(), _signal.SIGTSTP)
    # ... stopped here until the shell continues us ...
    _signal.signal(_signal.SIGTSTP, _noop)
    if relay:
        relay.resume()
    send_signal(sock, _signal.SIGCONT)


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

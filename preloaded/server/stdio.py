"""A child's standard streams: rebuilt from the caller's fds the way python builds them, and
flushed the way python flushes them (after a file ran, at exit)."""

from __future__ import annotations

import io
import os
import sys


NR_OPEN = 1 << 20  # the kernel's default ceiling on RLIMIT_NOFILE (/proc/sys/fs/nr_open)


def place_fds(received: list, targets: list, channel: int) -> tuple:
    """Put the caller's fds after the 3 of stdio (``received[3:]``) at their own numbers
    (``targets``) as python inherits them: without close-on-exec. The server checked that no
    target is an fd this child keeps from it (standby.py); the received fds and ``channel``
    may sit on one, so they move above the highest target first. Returns (the stdio fds,
    channel) at their new numbers."""
    import fcntl
    import resource

    floor = max(targets) + 1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = floor + len(received) + 2
    if need > soft:  # the caller may hold fds above the server's soft limit: python has them
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    try:

        def above(fd: int) -> int:
            if fd >= floor:
                return fd
            moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor)
            os.close(fd)
            return moved

        received = [above(fd) for fd in received]
        channel = above(channel)
        for fd, target in zip(received[3:], targets):
            os.dup2(fd, target)  # inheritable: an inherited fd has no close-on-exec
            os.close(fd)
    finally:
        if need > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return received[:3], channel


def install_stdio(request: dict, fds: list, setup) -> None:
    kinds = request["stdio"]
    for target, (fd, kind) in enumerate(zip(fds, kinds)):
        if kind == "pty" and target == kinds.index("pty"):
            import fcntl
            import termios

            fcntl.ioctl(fd, termios.TIOCSCTTY, 0)  # the PTY becomes our controlling terminal
        os.dup2(fd, target)
    for fd in set(fds) - {0, 1, 2}:
        os.close(fd)
    for target, kind in enumerate(kinds):
        if kind == "closed":
            os.close(target)
    env = request["env"]
    encoding, errors = _stdio_encoding(env.get("PYTHONIOENCODING", ""), setup)
    unbuffered = request["flags"]["u"] or bool(env.get("PYTHONUNBUFFERED"))
    names = ("stdin", "stdout", "stderr")
    for fd, name in enumerate(names):
        stream = None
        if kinds[fd] != "closed":
            errs = "backslashreplace" if fd == 2 else errors
            stream = _make_stdio(fd, name, encoding, errs, unbuffered)
        setattr(sys, name, stream)
        setattr(sys, "__%s__" % name, stream)


def _stdio_encoding(ioencoding: str, setup) -> tuple:
    """Python's config_init_stdio_encoding(): PYTHONIOENCODING=enc[:errors] over the defaults."""
    encoding, errors = setup.encoding, setup.errors
    enc, _, errs = ioencoding.partition(":")
    if enc:
        import codecs

        # Python reports the codec's own name ("latin-1" -> "iso8859-1"), and an encoding named
        # without an error handler means "strict". (An unknown codec makes the starter run cold.)
        encoding = codecs.lookup(enc).name
        errors = "strict"
    return encoding, errs or errors


def _make_stdio(fd: int, name: str, encoding: str, errors: str, unbuffered: bool):
    """One standard stream, built the way CPython's create_stdio() builds it."""
    write = fd != 0
    buffering = 0 if (unbuffered and write) else -1
    buf = io.open(fd, "wb" if write else "rb", buffering=buffering, closefd=False)
    raw = buf if buffering == 0 else buf.raw
    raw.name = f"<{name}>"
    line_buffering = not unbuffered and (raw.isatty() or fd == 2)
    stream = io.TextIOWrapper(
        buf, encoding, errors, newline="\n", line_buffering=line_buffering, write_through=unbuffered
    )
    stream.mode = "w" if write else "r"
    return stream


def flush_io() -> None:
    """Python's flush_io() after running a file (before any traceback): errors are ignored;
    a stdout that cannot be flushed fails again, loudly, at exit."""
    for stream in (sys.stderr, sys.stdout):
        try:
            stream.flush()
        except Exception:
            pass


def flush_std_files() -> bool:
    ok = True
    stdout, stderr = sys.stdout, sys.stderr
    if stdout is not None and not getattr(stdout, "closed", True):
        try:
            stdout.flush()
        except Exception as exc:
            _write_unraisable(stdout, exc, "on flushing sys.stdout")
            ok = False
    if stderr is not None and not getattr(stderr, "closed", True):
        try:
            stderr.flush()
        except Exception:
            ok = False
    return ok


def _write_unraisable(obj, exc: BaseException, where: str) -> None:
    """Python's "Exception ignored" report (3.13 says where, older versions name the object)."""
    if sys.version_info >= (3, 13):
        ignored = f"Exception ignored {where}:"
    else:
        ignored = f"Exception ignored in: {obj!r}"
    try:
        sys.stderr.write(f"{ignored}\n{type(exc).__name__}: {exc}\n")
        sys.stderr.flush()
    except Exception:
        pass

"""The process as ``ps``, ``top`` and ``pgrep -f`` see it: python's command line, not the server's.

A child is a fork of the server, whose command line is a long ``python -c "import sys; ...
from preloaded.server.loop import main..." <json>``. At the hand-over the child makes
``/proc/self/cmdline`` read what python's would (``orig_argv``: the interpreter's path as a
cold run gives it, then the caller's arguments), ``/proc/self/environ`` the caller's
environment (what python was started with), and ``/proc/self/comm`` the interpreter's name.

How: ``prctl(PR_SET_MM, PR_SET_MM_MAP)`` points the kernel's bounds of both areas at a buffer
of ours. Unlike ``PR_SET_MM_ARG_START`` (CAP_SYS_RESOURCE), the whole-map form needs no
privilege as long as the executable is left alone (it is made for unprivileged
checkpoint/restore). Where it is refused (a kernel without CONFIG_CHECKPOINT_RESTORE, a
seccomp filter), the command line is written over the server's own argv area instead, the way
setproctitle does: ``ps`` and ``pgrep`` read it the same (they drop trailing NULs), but it is
cut at that area's length (the server's argv holds its JSON config, so rarely), and
``/proc/PID/cmdline`` ends with NUL padding. Not a library: setproctitle would be a compiled
extension built for py-preload's venv, not necessarily for the bundle's interpreter, which may
have nothing installed.
"""

from __future__ import annotations

import ctypes
import os

PR_SET_NAME = 15  # <linux/prctl.h>
PR_SET_MM = 35
PR_SET_MM_MAP = 14
TASK_COMM_LEN = 16

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _prctl = _libc.prctl
    _sbrk = _libc.sbrk
    _sbrk.restype = ctypes.c_void_p
    _sbrk.argtypes = [ctypes.c_ssize_t]
except (OSError, AttributeError):  # not Linux (or not glibc-like): the server's title stays
    _prctl = None

_kept: list = []  # the buffers the kernel now reads the command line from: never freed


class _MmMap(ctypes.Structure):
    """struct prctl_mm_map (<linux/prctl.h>)."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "start_code", "end_code", "start_data", "end_data", "start_brk", "brk", "start_stack",
        "arg_start", "arg_end", "env_start", "env_end", "auxv")] + [
        ("auxv_size", ctypes.c_uint32), ("exe_fd", ctypes.c_uint32)]  # fmt: skip


def become(orig_argv: list, env: dict) -> str | None:
    """Show ``orig_argv`` and ``env`` as this process's command line and environment, and the
    interpreter's name as its comm. Returns how (for tests and the log), None if it could not."""
    if _prctl is None or not orig_argv:
        return None
    name = os.fsencode(os.path.basename(orig_argv[0]))[: TASK_COMM_LEN - 1]
    _prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)
    cmdline = b"".join(os.fsencode(arg) + b"\0" for arg in orig_argv)
    environ = b"".join(os.fsencode(k) + b"=" + os.fsencode(v) + b"\0" for k, v in env.items())
    try:
        layout = _layout()
    except (OSError, ValueError, IndexError):
        return None
    if _set_map(layout, cmdline, environ):
        return "map"
    return "overwrite" if _overwrite(layout, cmdline) else None


def _layout() -> dict:
    """The memory map fields of /proc/self/stat (proc(5): fields 26-28 and 45-51)."""
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2 :].split()  # fields[0] is field 3 (state)
    pick = {"start_code": 26, "end_code": 27, "start_stack": 28, "start_data": 45,
            "end_data": 46, "start_brk": 47, "arg_start": 48, "arg_end": 49, "env_start": 50,
            "env_end": 51}  # fmt: skip
    return {key: int(fields[number - 3]) for key, number in pick.items()}


def _set_map(layout: dict, cmdline: bytes, environ: bytes) -> bool:
    """Point arg_start..env_end at a buffer holding ``cmdline`` then ``environ``."""
    buf = ctypes.create_string_buffer(cmdline + environ, len(cmdline) + len(environ))
    start = ctypes.addressof(buf)
    mm = _MmMap(**layout)
    mm.brk = _sbrk(0) or 0
    mm.arg_start, mm.arg_end = start, start + len(cmdline)
    mm.env_start, mm.env_end = start + len(cmdline), start + len(cmdline) + len(environ)
    mm.auxv, mm.auxv_size, mm.exe_fd = 0, 0, 0xFFFFFFFF  # keep the auxv and /proc/self/exe
    if _prctl(PR_SET_MM, PR_SET_MM_MAP, ctypes.byref(mm), ctypes.sizeof(mm), 0) != 0:
        return False
    _kept.append(buf)
    return True


def _overwrite(layout: dict, cmdline: bytes) -> bool:
    """Write ``cmdline`` over the argv area, cut to its size, the rest NUL."""
    start, end = layout["arg_start"], layout["arg_end"]
    size = end - start
    if size <= 0:
        return False
    data = cmdline[: size - 1] + b"\0"
    ctypes.memmove(start, data.ljust(size, b"\0"), size)
    return True

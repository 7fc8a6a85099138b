"""In a child at hand-over: take on the caller's process context (see ``context.Planner``).

Applied before the "go", in the order the kernel needs: limits and nice while the child still
has the server's capabilities (raising a hard limit or lowering nice may need them), the
cgroup and groups next, capabilities last (bounding set, then capset, then ambient). Whatever
fails makes the child answer "cold" on its channel and exit: the server then tells the client
to run cold, never to run with the server's value.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys

from preloaded import wire

PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, PR_CAP_AMBIENT_CLEAR_ALL = 47, 2, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
LAST_CAP = 63


class Refused(Exception):
    """The kernel would not let this child take on the caller's value."""


def answer(channel: int, changes: dict) -> None:
    """Take on ``changes``, then tell the server on ``channel``; exit at once if refused."""
    import socket

    reason = take_on(changes)
    sock = socket.socket(fileno=channel)
    try:
        wire.send(sock, {"cold": reason} if reason else {"ready": True})
    finally:
        sock.detach()
    if reason:
        os._exit(0)  # the server tells the client to run cold; nothing of the run ran here


def take_on(changes: dict) -> str | None:
    """Apply ``changes`` to this process; return None, or why the run must go cold."""
    try:
        _limits(changes.get("limits", {}))
        if "nice" in changes:
            os.setpriority(os.PRIO_PROCESS, 0, changes["nice"])
        if "ioprio" in changes:
            _ioprio_set(changes["ioprio"])
        if "oom_score_adj" in changes:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write(str(changes["oom_score_adj"]))
        for procs in changes.get("cgroup", ()):
            with open(procs, "w") as f:
                f.write("0")  # "0": the writing process
        if "affinity" in changes:
            os.sched_setaffinity(0, changes["affinity"])
        _threads(changes.get("threads", {}))
        if "groups" in changes:
            os.setgroups(changes["groups"])
        if "caps" in changes:
            _capabilities(changes["caps"])
    except (OSError, Refused, ValueError) as exc:
        return f"the child could not take on the caller's context: {exc}"
    return None


def _limits(limits: dict) -> None:
    # Both at once: the kernel checks the new soft limit against the new hard one.
    for number, (soft, hard) in limits.items():
        resource.setrlimit(int(number), (soft, hard))


def _ioprio_set(value: int) -> None:
    from preloaded.server.peer import IOPRIO_SYSCALLS, IOPRIO_WHO_PROCESS

    number = IOPRIO_SYSCALLS[os.uname().machine][1]
    if _libc().syscall(number, IOPRIO_WHO_PROCESS, 0, value) != 0:
        raise Refused(f"ioprio_set: {os.strerror(ctypes.get_errno())}")


def _threads(counts: dict) -> None:
    if "torch" in counts:
        sys.modules["torch"].set_num_threads(counts["torch"])
    if "openblas" in counts:
        from preloaded.server.threads import openblas_functions

        get, put = openblas_functions()
        if put is None:
            raise Refused("OpenBLAS's thread count cannot be set")
        put(counts["openblas"])
        if get() != counts["openblas"]:
            raise Refused(f"OpenBLAS kept {get()} threads instead of {counts['openblas']}")


def _capabilities(caps: dict) -> None:
    for cap in range(LAST_CAP + 1):
        if not caps["bnd"] >> cap & 1:
            try:
                _prctl(PR_CAPBSET_DROP, cap)
            except Refused as exc:
                if exc.args and exc.args[0] == "EINVAL":  # past the kernel's last capability
                    break
                raise
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    _capset(caps["eff"], caps["prm"], caps["inh"])
    for cap in range(LAST_CAP + 1):
        if caps["amb"] >> cap & 1:
            _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]  # fmt: skip


def _capset(eff: int, prm: int, inh: int) -> None:
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    for i in range(2):
        shift = 32 * i
        data[i].effective = eff >> shift & 0xFFFFFFFF
        data[i].permitted = prm >> shift & 0xFFFFFFFF
        data[i].inheritable = inh >> shift & 0xFFFFFFFF
    if _libc().capset(ctypes.byref(header), data) != 0:
        raise Refused(f"capset: {os.strerror(ctypes.get_errno())}")


def _prctl(option: int, arg2: int, arg3: int = 0) -> None:
    result = _libc().prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(0),
                        ctypes.c_ulong(0))  # fmt: skip
    if result != 0:
        errno = ctypes.get_errno()
        raise Refused("EINVAL" if errno == 22 else f"prctl({option}): {os.strerror(errno)}")


def _libc():
    return ctypes.CDLL(None, use_errno=True)  # dlopen of the loaded libc: a cached handle

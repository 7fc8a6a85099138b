"""The caller's process context, read by the server from ``/proc/<pid>`` of the peer.

A warm run must be the caller's process: a cold ``python`` would be exec'd in the very process
that connected (the starter), with its resource limits, nice value, affinity, cgroup, groups,
capabilities and namespaces. The server reads them here, so that no client has to send them
(the native client stays small, and a client cannot lie about its own privilege).

The pid comes from SO_PEERCRED. A pidfd pins the process: SO_PEERPIDFD (Linux 6.5) gives the
one that connected, race-free; before that, pidfd_open at accept. ``Peer.still_there`` checks,
after everything was read, that this process is still alive (so its pid was not reused by
another process meanwhile) and still connected.
"""

from __future__ import annotations

import ctypes
import os
import select
import socket
import struct

# /proc/<pid>/limits lists the resources in their RLIMIT_* order (0..15 on Linux).
NAMESPACES = ("cgroup", "ipc", "mnt", "net", "pid", "pid_for_children", "time",
              "time_for_children", "user", "uts")  # fmt: skip
# (ioprio_get, ioprio_set) syscall numbers: the os module has no ioprio API.
IOPRIO_SYSCALLS = {"x86_64": (252, 251), "aarch64": (31, 30)}
IOPRIO_WHO_PROCESS = 1
SO_PEERPIDFD = 77  # <asm-generic/socket.h>; not in the socket module before Python 3.13
_STATUS_KEYS = {"Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
                "NoNewPrivs", "Seccomp", "Seccomp_filters", "VmSize", "VmData"}  # fmt: skip


class Cold(Exception):
    """This caller's run must go cold; the message says why (for the server's log)."""


class PeerGone(Cold):
    """The peer exited (or its pid could not be pinned) before its context was read."""


def credentials(sock: socket.socket) -> tuple:
    """(pid, uid, gid) of the process at the other end of ``sock`` (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)


class Peer:
    """The process at the other end of a connection, pinned by a pidfd from accept on."""

    def __init__(self, sock: socket.socket) -> None:
        try:
            self.pid, self.uid, self.gid = credentials(sock)
        except OSError:  # not a Unix socket's peer: nothing to pin, still_there says False
            self.pid, self.uid, self.gid = 0, -1, -1
        self.pidfd = _pidfd(sock, self.pid) if self.pid > 0 else None
        self.start = _start_time(self.pid)  # the fallback guard where there is no pidfd

    def still_there(self, sock: socket.socket) -> bool:
        """True when the process read is the one that connected, alive and connected now."""
        if self.pidfd is not None:
            alive = not select.select([self.pidfd], [], [], 0)[0]  # readable once it exited
        else:
            alive = self.start is not None and _start_time(self.pid) == self.start
        if not alive:
            return False
        # POLLHUP: its end is closed. Not POLLRDHUP: a caller that shut only its writing side
        # after the request (as HTTP clients do) is there and reads the reply.
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLHUP)
        return not any(ev & select.POLLHUP for _, ev in poller.poll(0))

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def _pidfd(sock: socket.socket, pid: int) -> int | None:
    """A pidfd of the process that connected: from the socket itself where the kernel keeps
    one (the pid may be another's by now), else opened by pid (None: gone, or before 5.3)."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, getattr(socket, "SO_PEERPIDFD", SO_PEERPIDFD))
    except OSError:
        pass
    try:
        return os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
    except OSError:
        return None


def read_context(pid, lsm: bool = True) -> dict:
    """Everything of process ``pid`` ("self" for the server) that a fork would not carry over
    from the caller. Raises PeerGone if the process is gone. ``lsm``: False where no LSM
    gives labels (the server's own is None): not read then."""
    base = f"/proc/{pid}"
    try:
        status = _read_status(base)
        limits = _read_limits(base)
        cgroup = _read(f"{base}/cgroup").splitlines()
        numeric = os.getpid() if pid == "self" else pid
        nice = os.getpriority(os.PRIO_PROCESS, numeric)
        affinity = sorted(os.sched_getaffinity(numeric))
        policy = os.sched_getscheduler(numeric)
        oom = int(_read(f"{base}/oom_score_adj"))
        personality = _personality(base)
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise PeerGone(f"the caller exited while read ({exc})") from exc
    return {
        "uids": status["Uid"], "gids": status["Gid"], "groups": sorted(status["Groups"]),
        "caps": {key: status["Cap" + key.capitalize()] for key in ("inh", "prm", "eff", "bnd",
                                                                   "amb")},
        "nnp": status.get("NoNewPrivs", 0), "seccomp": status.get("Seccomp", 0),
        "seccomp_filters": status.get("Seccomp_filters"),
        "vm": [status.get("VmSize"), status.get("VmData")],
        "limits": limits, "nice": nice, "affinity": affinity, "policy": policy,
        "cgroup": cgroup, "oom_score_adj": oom, "ns": _namespaces(base),
        "ioprio": ioprio_get(numeric), "personality": personality,
        "label": _label(base) if lsm else None,
    }  # fmt: skip


def _read(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # no io stack: ~10 us a file, not ~40
    try:
        return os.read(fd, 1 << 16).decode("ascii", "replace")
    finally:
        os.close(fd)


def _read_status(base: str) -> dict:
    fields: dict = {}
    for line in _read(f"{base}/status").splitlines():
        key, _, value = line.partition(":")
        if key not in _STATUS_KEYS:
            continue
        value = value.strip()
        if key.startswith("Cap"):
            fields[key] = int(value, 16)
        elif key in ("Uid", "Gid", "Groups"):
            fields[key] = [int(v) for v in value.split()]
        elif key.startswith("Vm"):
            fields[key] = int(value.split()[0]) * 1024  # "kB"
        else:
            fields[key] = int(value)
    return fields


def _read_limits(base: str) -> list:
    """[[soft, hard], ...] in RLIMIT_* order; RLIM_INFINITY as -1 (as the resource module)."""
    limits = []
    for line in _read(f"{base}/limits").splitlines()[1:]:
        soft, hard = line[26:].split()[:2]
        limits.append([_limit(soft), _limit(hard)])
    return limits


def _limit(text: str) -> int:
    return -1 if text == "unlimited" else int(text)


def _namespaces(base: str) -> dict:
    found = {}
    for name in NAMESPACES:
        try:
            found[name] = os.readlink(f"{base}/ns/{name}")
        except FileNotFoundError:  # a kernel without this namespace type
            continue
        except PermissionError:
            found[name] = None  # unreadable: compared as "unknown"
    return found


def _label(base: str) -> str | None:
    """The LSM label (SELinux, AppArmor, Smack), or None where no LSM provides one."""
    try:
        return _read(f"{base}/attr/current").rstrip("\0\n")
    except OSError:
        return None


def ioprio_get(pid: int) -> int | None:
    """The I/O priority (`ionice`) of ``pid``, or None where it cannot be read here."""
    numbers = IOPRIO_SYSCALLS.get(os.uname().machine)
    if numbers is None:
        return None
    value = _libc().syscall(numbers[0], IOPRIO_WHO_PROCESS, pid)
    return None if value < 0 else value


def _libc(cache: list = []):  # noqa: B006 (one handle for the server's life)
    if not cache:
        cache.append(ctypes.CDLL(None, use_errno=True))
    return cache[0]


def _personality(base: str) -> int | None:
    """The execution domain flags (`setarch -R`...), or None where ptrace rules hide them."""
    try:
        return int(_read(f"{base}/personality"), 16)
    except PermissionError:
        return None


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rpartition(b")")[2].split()[19].decode()  # field 22: starttime

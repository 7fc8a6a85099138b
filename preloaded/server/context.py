"""Decide, in the server, what a child must change to be the caller's process, or that it can't.

``Planner.plan`` compares the caller's context (``peer.read_context`` of the peer) with the
server's and returns the changes a child applies at hand-over (``become.take_on``), or the
reason the run must go cold. Privilege only goes down: a caller with anything the server lacks
(a capability, another uid, a seccomp filter, other namespaces, another LSM label) runs cold;
one with less gets a child dropped to its level. Whatever the child cannot take on (a higher
hard limit without CAP_SYS_RESOURCE, a lower nice without CAP_SYS_NICE) runs cold too: a warm
run never goes on with the server's value.
"""

from __future__ import annotations

import os

from preloaded.server import peer, threads
from preloaded.server.peer import Cold

CAP_SETGID, CAP_SETPCAP, CAP_SYS_RESOURCE, CAP_SYS_NICE = 6, 8, 24, 23
RLIMIT_NAMES = ("cpu", "fsize", "data", "stack", "core", "rss", "nproc", "nofile", "memlock",
                "as", "locks", "sigpending", "msgqueue", "nice", "rtprio", "rttime")  # fmt: skip
RLIMIT_DATA, RLIMIT_AS = 2, 9


class Planner:
    """The server's own context (read once: it does not change) and the plan for each caller."""

    def __init__(self) -> None:
        self.own = peer.read_context("self")
        self.cgroup_mounts = _cgroup_mounts()
        self.threads = threads.Model(self.own["affinity"])

    def plan(self, caller: dict, env: dict) -> dict:
        """The changes a child must make to be ``caller``'s process; raises Cold."""
        own = self.own
        _check_identity(caller, own)
        changes: dict = {}
        limits = self._limits(caller)
        if limits:
            changes["limits"] = limits
        if caller["nice"] != own["nice"]:
            if caller["nice"] < own["nice"] and not _has(own, CAP_SYS_NICE):
                floor = 20 - _effective_nice_limit(caller)
                if caller["nice"] < floor:
                    raise Cold(f"nice {caller['nice']} is below the server's {own['nice']}"
                               " and the server lacks CAP_SYS_NICE")  # fmt: skip
            changes["nice"] = caller["nice"]
        if caller["policy"] != own["policy"]:
            raise Cold(f"scheduling policy {caller['policy']} differs from the server's")
        if caller["oom_score_adj"] != own["oom_score_adj"]:
            changes["oom_score_adj"] = caller["oom_score_adj"]
        if None not in (caller["ioprio"], own["ioprio"]) and caller["ioprio"] != own["ioprio"]:
            changes["ioprio"] = caller["ioprio"]
        if caller["personality"] not in (None, own["personality"]):
            raise Cold(f"personality {caller['personality']:#x} differs from the server's"
                       f" {own['personality']:#x} (a fork keeps the server's address space)")
        if caller["affinity"] != own["affinity"]:
            changes["affinity"] = caller["affinity"]
        if caller["cgroup"] != own["cgroup"]:
            changes["cgroup"] = self._cgroup_dirs(caller["cgroup"])
        counts = self.threads.plan(env, caller["affinity"], own_env=os.environ)
        if counts:
            changes["threads"] = counts
        changes.update(_privilege(caller, own))
        return changes

    def _limits(self, caller: dict) -> dict:
        own = self.own
        changed = {}
        for number, (mine, theirs) in enumerate(zip(own["limits"], caller["limits"])):
            if mine == theirs:
                continue
            name = RLIMIT_NAMES[number] if number < len(RLIMIT_NAMES) else str(number)
            if _above(theirs[1], mine[1]) and not _has(own, CAP_SYS_RESOURCE):
                raise Cold(f"RLIMIT_{name.upper()} hard limit {_show(theirs[1])} is above the"
                           f" server's {_show(mine[1])}")  # fmt: skip
            if number in (RLIMIT_AS, RLIMIT_DATA):
                _check_room(number, theirs[0])
            changed[str(number)] = theirs
        return changed

    def _cgroup_dirs(self, lines: list) -> list:
        """The cgroup.procs files a child writes its pid to, one per hierarchy that differs."""
        own = set(self.own["cgroup"])
        files = []
        for line in lines:
            if line in own:
                continue
            _id, controllers, path = line.split(":", 2)
            mount = self.cgroup_mounts.get(controllers)
            if mount is None:
                raise Cold(f"cgroup {line!r}: its hierarchy is not mounted here")
            point, root = mount
            if not (path + "/").startswith(root.rstrip("/") + "/"):
                raise Cold(f"cgroup {line!r} is outside the mounted part of its hierarchy")
            relative = path[len(root.rstrip("/")):].lstrip("/")
            files.append(os.path.join(point, relative, "cgroup.procs"))
        return files


class Gate:
    """The server's check of each caller: read its context, pin it, plan the changes."""

    def __init__(self) -> None:
        self.planner: Planner | None = None  # made at the first run, after the preloads

    def sent_back_cold(self, conn, request: dict, log) -> bool:
        """Plan ``conn.changes``; if the run must go cold, log why and tell the client."""
        try:
            conn.changes = self.plan(conn.peer, conn.sock, request["env"])
        except Cold as exc:
            self.tell_cold(conn, str(exc), log)
            return True
        return False

    def tell_cold(self, conn, reason: str, log):
        """``{"cold": reason}`` (as tools.sent_back_cold): the client execs python silently."""
        log(f"run of pid {conn.peer.pid} goes cold: {reason}")
        conn.reply({"cold": reason})
        return conn

    def plan(self, pinned: peer.Peer, sock, env: dict) -> dict:
        """The changes for the caller pinned as ``pinned``; raises Cold."""
        try:
            if self.planner is None:
                self.planner = Planner()
            if not pinned.still_there(sock):
                raise peer.PeerGone("the caller exited before its context was read")
            caller = peer.read_context(pinned.pid, lsm=self.planner.own["label"] is not None)
            if not pinned.still_there(sock):  # what was read may be another process's
                raise peer.PeerGone("the caller exited (its pid may be reused) while read")
            return self.planner.plan(caller, env)
        except Cold:
            raise
        except Exception as exc:  # a /proc this code does not know: never the server's context
            raise Cold(f"cannot compare the caller's context: {exc!r}") from exc


def _check_identity(caller: dict, own: dict) -> None:
    """What a child can never change to the caller's: uids, gids, namespaces, seccomp, LSM."""
    if caller["uids"] != own["uids"]:
        raise Cold(f"uids {caller['uids']} differ from the server's {own['uids']}")
    if caller["gids"] != own["gids"]:
        raise Cold(f"gids {caller['gids']} differ from the server's {own['gids']}")
    for name, ino in caller["ns"].items():
        if ino is None or ino != own["ns"].get(name):
            raise Cold(f"{name} namespace {ino} differs from the server's {own['ns'].get(name)}")
    if (caller["seccomp"], caller["seccomp_filters"]) != (own["seccomp"], own["seccomp_filters"]):
        # Filters are inherited: the same count means the same filters from a common ancestor
        # (a container's); any more (or another mode) cannot be put on a child.
        raise Cold(f"seccomp mode {caller['seccomp']} with {caller['seccomp_filters']} filter(s)"
                   f" differs from the server's {own['seccomp']}/{own['seccomp_filters']}")
    if caller["label"] != own["label"]:
        raise Cold(f"LSM label {caller['label']!r} differs from the server's {own['label']!r}")


def _privilege(caller: dict, own: dict) -> dict:
    """Groups and capabilities: the child drops to the caller's (never up); no_new_privs and
    securebits it cannot match go cold."""
    changes: dict = {}
    if caller["groups"] != own["groups"]:
        if not _has(own, CAP_SETGID):
            raise Cold("supplementary groups differ and the server lacks CAP_SETGID")
        changes["groups"] = caller["groups"]
    theirs, mine = caller["caps"], own["caps"]
    if theirs != mine:
        for key in ("bnd", "prm", "eff", "inh", "amb"):
            extra = theirs[key] & ~mine[key]
            if extra and key != "inh":
                raise Cold(f"the caller has capabilities the server lacks ({key} {extra:#x})")
        if theirs["inh"] & ~(mine["inh"] | mine["prm"]):
            raise Cold("the caller's inheritable capabilities exceed what the server may set")
        if theirs["bnd"] != mine["bnd"] and not _has(own, CAP_SETPCAP):
            raise Cold("the bounding set differs and the server lacks CAP_SETPCAP")
        changes["caps"] = theirs
    if caller["nnp"] != own["nnp"]:
        # The kernel would let the child set it, but no_new_privs is what a sandbox sets before
        # a Landlock domain, and /proc shows no Landlock: the child could not be confined so.
        raise Cold(f"no_new_privs {caller['nnp']} differs from the server's {own['nnp']} (a"
                   " sandbox's Landlock domain, which /proc does not show, cannot be copied)")
    if 0 in caller["uids"] and theirs["prm"] != theirs["bnd"]:
        # A root process permitted less than its bounding set (after its exec) may run with
        # SECBIT_NOROOT, which /proc does not show: the child's own execs would regain it all.
        raise Cold("a root caller with a permitted set narrower than its bounding set (its"
                   " securebits cannot be read)")  # fmt: skip
    return changes


def _check_room(number: int, soft: int) -> None:
    """A child already maps the server's memory: under a lower RLIMIT_AS or RLIMIT_DATA than
    that, it would fail where python (which starts small) would run."""
    used = peer.read_context("self")["vm"][0 if number == RLIMIT_AS else 1]
    if soft != -1 and used is not None and soft < used:
        name = "AS" if number == RLIMIT_AS else "DATA"
        raise Cold(f"RLIMIT_{name} {soft} is below the {used} bytes the server already maps")


def _effective_nice_limit(caller: dict) -> int:
    return max(0, caller["limits"][13][0]) if len(caller["limits"]) > 13 else 0


def _has(context: dict, cap: int) -> bool:
    return bool(context["caps"]["eff"] >> cap & 1)


def _above(value: int, limit: int) -> bool:
    """Is rlimit ``value`` above ``limit`` (-1 is infinity)?"""
    if value == limit or limit == -1:
        return False
    return value == -1 or value > limit


def _show(value: int) -> str:
    return "unlimited" if value == -1 else str(value)


def _cgroup_mounts() -> dict:
    """controllers field of /proc/<pid>/cgroup ("" for cgroup2) -> (mount point, mount root)."""
    mounts: dict = {}
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return mounts
    for line in lines:
        fields, _, tail = line.partition(" - ")
        parts, extra = fields.split(), tail.split()
        if len(parts) < 5 or len(extra) < 3:
            continue
        fstype, options = extra[0], extra[2].split(",")
        root, point = _unescape(parts[3]), _unescape(parts[4])
        if fstype == "cgroup2":
            mounts.setdefault("", (point, root))
        elif fstype == "cgroup":
            names = [o for o in options if o not in ("rw", "ro") and "=" not in o
                     or o.startswith("name=")]  # fmt: skip
            names = [o for o in names if o in _KNOWN_V1 or o.startswith("name=")]
            mounts.setdefault(",".join(names), (point, root))
    return mounts


_KNOWN_V1 = {"cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "net_cls", "blkio",
             "perf_event", "net_prio", "hugetlb", "pids", "rdma", "misc"}  # fmt: skip


def _unescape(path: str) -> str:
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace(
        "\\134", "\\")

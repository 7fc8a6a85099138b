"""The memory budget: what this user's servers really hold, kept under a limit.

``PY_PRELOAD_MEMORY_BUDGET=SIZE`` (or ``"memory_budget"`` in ``$XDG_CONFIG_HOME/py-preload/
config.json``, for every bundle) bounds the summed PSS of the servers and their parked
standbys: shared pages are split among the processes that share them, so a standby, which
shares nearly all of its server's pages, adds only what it owns. A run's own child is the
user's program and does not count. When a server starts and the sum would pass the budget,
idle servers (no child running, no run waiting) are stopped, least recently used first. And when
the machine's available memory runs low (``MemAvailable`` under ``low_memory``), the least
recently used idle server retires, one at a time, checked from idle servers' loops.

All of it runs in servers (at start, between runs) and in the CLI, never on a warm run's path.
Servers find each other through the runtime directory's info files, and ask each other over
their sockets (``usage``, ``evict``): one user's servers only.
"""

from __future__ import annotations

import json
import os
import re
import time

from preloaded import servers

ENV = "PY_PRELOAD_MEMORY_BUDGET"
LOW_ENV = "PY_PRELOAD_LOW_MEMORY"
KEYS = {"memory_budget": ENV, "low_memory": LOW_ENV}
OFF = ("", "off", "none", "no")
LOW_CHECK_EVERY = 2.0  # seconds between two looks at MemAvailable from an idle server's loop
ASK_TIMEOUT = 2.0  # another server answers between two runs: its loop never blocks for long
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgtp]?)(i?b)?", re.IGNORECASE)


class BudgetError(Exception):
    """A budget setting that is not a size: one line that names where it came from."""


class Settings:
    """The budget in bytes (None: none), the low-memory threshold in bytes (None: the default,
    0: off), and where the budget came from."""

    def __init__(self, budget: int | None = None, low: int | None = None,
                 source: str = "") -> None:  # fmt: skip
        self.budget = budget
        self.low = low
        self.source = source
        self.text = ""  # the budget as written (8G), for messages


def parse_size(text: str) -> int:
    """``8G``, ``500M``, ``1.5GiB``, ``2048`` (bytes) -> bytes; units are powers of 1024."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a size (write e.g. 8G, 500M or 1.5G)")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError(f"{text!r} is not a size above zero")
    return size


def config_path() -> str:
    base = os.environ.get("XDG_CONFIG_HOME")
    if not (base and os.path.isabs(base)):
        base = os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "py-preload", "config.json")


def settings(environ=None) -> Settings:
    """The settings in force: the environment wins over the config file. Raise BudgetError."""
    environ = os.environ if environ is None else environ
    values, sources = _read_config(config_path())
    for key, var in KEYS.items():
        if var in environ:
            values[key], sources[key] = environ[var], var
    found = Settings()
    for key, attr in (("memory_budget", "budget"), ("low_memory", "low")):
        value = values.get(key)
        if value is None:
            continue
        if str(value).strip().lower() in OFF:
            if attr == "low":
                found.low = 0  # off: not even the default threshold
            continue
        try:
            setattr(found, attr, parse_size(str(value)))
        except ValueError as exc:
            raise BudgetError(f"{sources[key]}: {exc}") from None
    found.source = sources.get("memory_budget", "")
    if found.budget is not None:
        found.text = str(values["memory_budget"]).strip()
    return found


def _read_config(path: str) -> tuple:
    """({key: value}, {key: where}) from the config file; nothing if there is none."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}, {}
    except OSError as exc:
        raise BudgetError(f"{path}: cannot read it: {exc.strerror}") from None
    except ValueError as exc:
        raise BudgetError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BudgetError(f"{path}: expected a JSON object such as {{\"memory_budget\": \"8G\"}}")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise BudgetError(f"{path}: unknown setting {unknown[0]!r} (known: "
                          f"{', '.join(sorted(KEYS))})")  # fmt: skip
    for key, value in data.items():
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise BudgetError(f"{path}: {key} must be a size such as \"8G\", not {value!r}")
    return dict(data), {key: f"{path}: {key}" for key in data}


# -- measuring ----------------------------------------------------------------------------


def pss(pid: int) -> int | None:
    """Proportional set size of ``pid`` in bytes (smaps_rollup: one read, no page walk of ours);
    None if it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_available() -> tuple:
    """(MemAvailable, MemTotal) in bytes, from /proc/meminfo; (None, None) if unreadable."""
    found: dict = {}
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                key = line.split(b":", 1)[0]
                if key in (b"MemAvailable", b"MemTotal"):
                    found[key] = int(line.split()[1]) * 1024
                    if len(found) == 2:
                        break
    except (OSError, ValueError, IndexError):
        pass
    return found.get(b"MemAvailable"), found.get(b"MemTotal")


def default_low(total: int | None) -> int:
    """"Low" when no threshold is set: 5 % of the machine's memory, at most 1 GiB."""
    return min((total or 0) // 20, 1 << 30)


# -- the servers of this user ---------------------------------------------------------------


def survey(skip_pid: int | None = None, with_pss: bool = True) -> list:
    """``usage`` of every other live server: pid, socket, busy, last_used, pss."""
    found = []
    for info in servers.listed():
        if info.get("pid") == skip_pid or "socket" not in info:
            continue
        usage = servers.ask(info["socket"], {"cmd": "usage", "pss": with_pss}, ASK_TIMEOUT)
        if isinstance(usage, dict) and usage.get("pid") == info["pid"]:
            found.append({**usage, "socket": info["socket"], "bundle": info.get("bundle")})
    return found


def usage(pid: int, standbys: list, busy: bool, last_used: float, with_pss: bool) -> dict:
    """What a server says of itself to another server or to ``py-preload list``."""
    reply = {"pid": pid, "busy": busy, "last_used": last_used, "standbys": len(standbys)}
    if with_pss:
        sizes = [pss(p) for p in [pid, *standbys]]
        reply["pss"] = sum(s for s in sizes if s is not None)
    return reply


def make_room(own: dict, limits: Settings, log) -> None:
    """A server just started (``own``: its usage): stop idle servers, least recently used
    first, until the sum of all servers' PSS fits the budget."""
    budget = limits.budget
    others = survey(skip_pid=own["pid"])
    total = own["pss"] + sum(o.get("pss", 0) for o in others)
    if total <= budget:
        return
    for other in sorted((o for o in others if not o["busy"]), key=_lru_key):
        reply = servers.ask(other["socket"], {"cmd": "evict"}, ASK_TIMEOUT)
        if isinstance(reply, dict) and "stopping" in reply:
            total -= other.get("pss", 0)
            log(f"memory budget {limits.text}: stopped the idle server {other['pid']} of "
                f"{other['bundle']} ({_mb(other.get('pss', 0))}, least recently used)")
            if total <= budget:
                return
    log(f"memory budget {limits.text}: servers hold {_mb(total)}; "
        f"the others are busy (a server with a running child is never stopped)")  # fmt: skip


def is_least_recently_used(own: dict) -> bool:
    """Of the idle servers, is ``own`` the least recently used? (The one to retire.)"""
    idle = [o for o in survey(skip_pid=own["pid"], with_pss=False) if not o["busy"]]
    return all(_lru_key(own) < _lru_key(o) for o in idle)


def _lru_key(usage: dict) -> tuple:
    return (usage.get("last_used", 0.0), usage["pid"])


class LowMemoryWatch:
    """Looks at MemAvailable every LOW_CHECK_EVERY seconds of an idle server's loop."""

    def __init__(self, low: int | None) -> None:  # None: default_low; 0: never low
        self.low = low
        self.next_check = time.monotonic() + LOW_CHECK_EVERY

    def low_now(self, now: float) -> bool:
        if self.low == 0 or now < self.next_check:
            return False
        self.next_check = now + LOW_CHECK_EVERY
        available, total = memory_available()
        if available is None:
            return False
        threshold = self.low if self.low is not None else default_low(total)
        return available < threshold


class ServerBudget:
    """The budget's part in one server's loop (``server``: a ``loop.Server``): make room at
    start, answer ``usage`` and ``evict``, retire when idle and memory runs low."""

    def __init__(self, server, limits: Settings, log) -> None:
        self.server = server
        self.limits = limits
        self.log = log
        self.watch = LowMemoryWatch(limits.low)

    def start(self) -> None:
        """Just started and listening: stop idle servers until this one fits the budget."""
        if self.limits.budget is not None:
            make_room(self.usage(True), self.limits, self.log)

    def handle(self, conn, frame: dict) -> None:
        if frame["cmd"] == "usage":  # another server, or `py-preload list`, asks
            conn.reply(self.usage(bool(frame.get("pss")), asking=conn))
        elif self.server.stopping or not self.idle(conn):  # evict: only an idle server goes
            conn.reply({"busy": True})
        else:
            conn.reply({"stopping": os.getpid()})
            self.server._close(conn)  # answered: not a waiting run that begin_stop would retry
            self.log("stopped to keep this user's servers within the memory budget "
                     "(idle, least recently used)")  # fmt: skip
            self.server.begin_stop()

    def usage(self, with_pss: bool, asking=None) -> dict:
        return usage(os.getpid(), self.server.pool.pids(), not self.idle(asking),
                     self.server.last_used, with_pss)  # fmt: skip

    def idle(self, asking=None) -> bool:
        """No child running and no run waiting (a connection that has not yet sent its request
        may be one): ``asking`` is the connection asking, not a run."""
        server = self.server
        return not server.children and all(c is asking for c in server.conns.values())

    def check_memory(self) -> None:
        """Idle while the machine runs short of memory: the least recently used idle server
        retires (each idle server asks the others; they all agree on which one that is)."""
        if self.server.stopping or not self.idle():
            return
        if self.watch.low_now(time.monotonic()) and is_least_recently_used(self.usage(False)):
            self.log("the machine's available memory is low: retiring "
                     "(the least recently used idle server)")  # fmt: skip
            self.server.begin_stop()


def _mb(size: int) -> str:
    return f"{size / 1e6:.0f} MB"

"""The environment the server's warm state depends on, and each run's check against it.

Libraries read environment variables when imported (``HF_HOME``, ``HF_HUB_OFFLINE``,
``TORCH_LOGS``...) and keep what they saw in module globals. A fork inherits those globals, so a
run whose environment says otherwise would silently run with the server's settings. While the
server imports (preloading, learned imports, the warm-up) ``os.environ`` and ``os.environb``
record every name read (``[...]``, ``get``, ``in``, ``os.getenv``) with the value seen, absent
included; a run whose values differ goes cold, naming the variable in the log.

Covered: reads through ``os.environ``/``os.environb``; code that lists the whole environment
(``items()``, ``copy()``) depends on every variable, except known listers that only look for a
prefix (``LISTERS``). Not seen: C code calling ``getenv`` (OpenMP/MKL thread counts are matched
by ``threads.py``; ``TZ``, read by the C library, is re-read in the child, see ``follow_tz``).
Variables the imports set themselves are not carried into a child (none for torch and
transformers).
"""

from __future__ import annotations

import os
import sys

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # preloaded/
# Frames between the reading code and the recorder (os.getenv, Mapping.get/__contains__).
_PLUMBING = (__file__, os.__file__, sys.modules["_collections_abc"].__file__, "<frozen os>",
             "<frozen _collections_abc>")
# Set in the server by py-preload itself, on purpose (see spawn.server_env): not the caller's.
OWN = frozenset({"PYTORCH_NVML_BASED_CUDA_CHECK"})
ABSENT = None
# Code that lists the whole environment at import, and the names it looks for (read in its
# source): tqdm's ``envwrap`` takes every TQDM_* variable as a default of ``tqdm()``.
LISTERS = {os.path.join("tqdm", "utils.py"): ("TQDM_",)}


class Record:
    """Names read while importing -> the value seen (None: absent); names the imports set."""

    def __init__(self) -> None:
        self.seen: dict = {}
        self.written: set = set()
        self.prefixes: dict = {}  # a known lister's prefix -> the names and values it saw
        self.whole: dict | None = None  # listed by unknown code: every variable counts
        self.listers: list = []  # where unknown code listed the environment (file:line)
        self.items: tuple = ()  # ``seen`` as (name, value) pairs: what each run is checked on
        self.depth = 0

    def read(self, key, value) -> None:
        name = os.fsdecode(key) if isinstance(key, bytes) else key
        if name in self.seen or name in self.written or name in OWN:
            return
        where = _importer_frame()
        if where is None or _known_lister(where):  # a lister's reads: see ``listed``
            return
        self.seen[name] = os.fsdecode(value) if isinstance(value, bytes) else value

    def write(self, key) -> None:
        if _importer_frame() is not None:
            self.written.add(os.fsdecode(key) if isinstance(key, bytes) else key)

    def listed(self) -> None:
        where = _importer_frame()
        if where is None:
            return
        # os.environ._data, not through the recorder
        env = {os.fsdecode(k): os.fsdecode(v) for k, v in os.environ._data.items()}
        prefixes = _known_lister(where)
        for prefix in prefixes or ():
            self.prefixes.setdefault(prefix, _with_prefix(env, prefix))
        if not prefixes and self.whole is None:
            self.listers.append(f"{where.f_code.co_filename}:{where.f_lineno}")
            self.whole = {k: v for k, v in env.items() if k not in OWN}

    def freeze(self) -> None:
        # Fresh copies made together, hashes computed now: every run's check then touches a
        # few pages, not the many where the imports left these strings, each one copied on
        # write in the server while a standby shares it (a torch server's check after a fork:
        # 105 page faults, 67 with the copies).
        self.items = tuple((_fresh(name), _fresh(value)) for name, value in self.seen.items())
        for name, _value in self.items:
            hash(name)


def _fresh(value):
    """A new str equal to ``value`` (others as they are)."""
    if type(value) is not str:
        return value
    return value.encode("utf-8", "surrogatepass").decode("utf-8", "surrogatepass")


RECORD = Record()


class _Recording(os._Environ):  # type: ignore[name-defined]  # os.environ while importing
    def __getitem__(self, key):
        try:
            value = super().__getitem__(key)
        except KeyError:
            RECORD.read(key, ABSENT)
            raise
        RECORD.read(key, value)
        return value

    def __setitem__(self, key, value) -> None:
        RECORD.write(key)
        super().__setitem__(key, value)

    def __delitem__(self, key) -> None:
        RECORD.write(key)
        super().__delitem__(key)

    def __iter__(self):
        RECORD.listed()
        return super().__iter__()


def _importer_frame():
    """The frame of the code that reads, or None when it is py-preload's own."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PLUMBING):
        frame = frame.f_back
    if frame is None or frame.f_code.co_filename.startswith(_PKG_DIR):
        return None
    return frame


def _known_lister(frame) -> tuple:
    name = frame.f_code.co_filename
    return next((p for tail, p in LISTERS.items() if name.endswith(os.sep + tail)), ())


def _with_prefix(env, prefix: str) -> dict:
    return {k: v for k, v in env.items() if k.startswith(prefix)}


class recording:
    """``with recording():`` every read of the environment by imported code is recorded."""

    def __enter__(self) -> Record:
        RECORD.depth += 1
        if RECORD.depth == 1:
            os.environ.__class__ = _Recording
            if hasattr(os, "environb"):
                os.environb.__class__ = _Recording
        return RECORD

    def __exit__(self, *exc) -> None:
        RECORD.depth -= 1
        if RECORD.depth == 0:
            os.environ.__class__ = os._Environ  # type: ignore[attr-defined]
            if hasattr(os, "environb"):
                os.environb.__class__ = os._Environ  # type: ignore[attr-defined]
            RECORD.freeze()


def difference(env: dict) -> str | None:
    """The first variable whose value in the run's ``env`` differs from what the imports saw."""
    for name, value in RECORD.items:
        if env.get(name) != value:
            return (f"{name}={_show(env.get(name))} differs from the server's {_show(value)}"
                    " (read at import)")
    for prefix, seen in RECORD.prefixes.items():
        if _with_prefix(env, prefix) != seen:
            return f"{prefix}* variables differ from the server's (listed at import)"
    if RECORD.whole is not None:
        theirs = {k: v for k, v in env.items() if k not in OWN}
        if theirs != RECORD.whole:
            name = min(set(theirs.items()) ^ set(RECORD.whole.items()))[0]
            return (f"{name} differs from the server's; {RECORD.listers[0]} listed the whole"
                    " environment at import")
    return None


class Gate:
    """Each run's check. A run whose values differ goes cold: a sweep that sets ``HF_HOME`` per
    job pays python's own time per job, not a server start (and its memory) per job. Only when
    two runs in a row bring the same other values (the caller's shell changed) does the server
    retire, so that the next server is made with them."""

    def __init__(self) -> None:
        self.last: tuple | None = None  # the recorded names' values in the last run that differed

    def sent_back_cold(self, conn, request: dict, log, retire) -> bool:
        """Tell ``conn`` (a request.Conn) to run cold, or ``retire`` the server (the loop's
        ``begin_stop``: the run gets a retry, its client starts a fresh server)."""
        reason, repeated = self.verdict(request["env"])
        if repeated:
            log(f"environment changed ({reason}) for two runs in a row: retiring")
            retire(retry={"error": "stale", "reason": reason})
        elif reason:
            log(f"run of pid {conn.peer.pid} goes cold: {reason}")
            conn.reply({"cold": reason})
        return reason is not None

    def verdict(self, env: dict) -> tuple:
        """(reason, retire): reason None when ``env`` matches what the imports saw."""
        reason = difference(env)
        if reason is None:
            self.last = None
            return None, False
        values = (tuple(env.get(name) for name, _ in RECORD.items),
                  [_with_prefix(env, prefix) for prefix in RECORD.prefixes],
                  env if RECORD.whole is not None else None)  # fmt: skip
        repeated, self.last = values == self.last, values
        return reason, repeated


GATE = Gate()


def follow_tz(env: dict) -> None:
    """In a child: the C library read ``TZ`` when ``time`` was imported in the server; re-read
    it when the run's differs (python reads it at its own start)."""
    if env.get("TZ") != SERVER_TZ:
        import time

        time.tzset()


SERVER_TZ = os.environ.get("TZ")  # imported in the server before any child: the server's TZ


def summary() -> dict:
    """What ``py-preload status`` shows: the variables the server depends on."""
    return {"read": dict(RECORD.items), "prefixes": sorted(RECORD.prefixes),
            "whole": RECORD.listers}  # fmt: skip


def _show(value) -> str:
    return "(unset)" if value is None else repr(value)

"""Start-up-only state, in a child as python would have built it for the caller's command line:
``sys.flags`` and the warning filters.

Python fixes both before it imports anything: ``sys.flags`` from the options and the
environment, the ``-W``/``PYTHONWARNINGS`` filters in front of its default ones. Filters that
libraries install as they are imported then go in front of those (``filterwarnings`` inserts
at the front): under ``-W error``, python still ignores what a library silenced at import. A
child inherits the server's flags and the filters its imports left, and rebuilds both here.
"""

from __future__ import annotations

import ctypes
import sys

import _warnings

# The filters before any import (the C defaults: the server runs without -W). Kept alive, so
# that their ids stay theirs: a default still in place after the imports is the same object,
# while one a library removed and put back equal (``filterwarnings("ignore",
# category=DeprecationWarning)``) is a new one, in front.
DEFAULT_FILTERS = list(_warnings.filters)
_DEFAULT_IDS = frozenset(id(f) for f in DEFAULT_FILTERS)


def set_flags(flags: dict, env) -> None:
    """``sys.flags`` as python sets them from -B, -i, -q and the environment.

    sys.flags is a read-only struct sequence whose type cannot be instantiated: its items
    are written in place (this process's copy only: it is a fork), each checked to be where
    it is expected first, so that a layout this code does not know changes nothing."""
    wanted = {
        "dont_write_bytecode": int(flags["B"] or bool(env.get("PYTHONDONTWRITEBYTECODE"))),
        "inspect": int(flags["i"] or bool(env.get("PYTHONINSPECT"))),
        "interactive": int(flags["i"]),
        "quiet": int(flags["q"]),
    }
    for name, value in wanted.items():
        if getattr(sys.flags, name) != value:
            _set_flag(name, value)


def _set_flag(name: str, value: int) -> None:
    index = type(sys.flags).__match_args__.index(name)
    pointer = ctypes.sizeof(ctypes.c_void_p)
    slot = ctypes.c_void_p.from_address(id(sys.flags) + tuple.__basicsize__ + index * pointer)
    if slot.value != id(sys.flags[index]):  # not a tuple's item array as known: leave it
        raise RuntimeError(f"sys.flags.{name} is not where it was expected")
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(value))  # the old item's reference is leaked:
    slot.value = id(value)  # small ints, never freed


def install_warnoptions(options: list) -> None:
    """Put the filters of ``options`` (``sys.warnoptions``) where python would have them:
    behind the ones the server's imports installed, in front of the defaults."""
    if "warnings" not in sys.modules:
        import warnings  # noqa: F401  (its import processes sys.warnoptions, as at start-up)

        return
    import warnings

    filters = warnings.filters
    kept = [i for i, f in enumerate(filters) if id(f) in _DEFAULT_IDS]
    if not kept:  # resetwarnings() at import: it would have removed python's -W filters too
        return
    first, last = kept[0], kept[-1] + 1
    saved = filters[:]
    front = saved[:first]
    filters[:] = saved[first:last]  # python processed the options against the defaults...
    warnings._processoptions(options)  # (an invalid one is reported on stderr, as python does)
    block = [f for f in filters if f not in front]  # ...and an import's equal filter moved
    tail = [f for f in saved[last:] if f not in block]  # to the front; appended ones stay out
    filters[:] = front + block + tail
    warnings._filters_mutated()

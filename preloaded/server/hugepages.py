"""The server's large anonymous memory collapsed into transparent huge pages, between runs.

Every run pays for the server's page tables twice: its fork copies one entry per 4 KiB page of
anonymous memory (the standby's fork, in the server), and its exit tears them down again (a
fast-exit helper, still CPU of the machine). Measured on the 2-core machine, a torch server
holding 700 MB of tensors: fork 21.8 ms and exit 25.1 ms of CPU; with that memory in 2 MiB
pages 2.7 ms and 4.4 ms, as cheap as a server without the tensors.

MADV_COLLAPSE (Linux 6.1), not MADV_HUGEPAGE: it collapses what the server holds now and marks
nothing, so that memory a child allocates itself is allocated as under python (the kernel's THP
mode decides, ``madvise`` by default). Nor torch's THP_MEM_ALLOC_ENABLE: torch reads it once, so
every child's own tensors would be allocated differently from python's. A child writing into a
shared huge page gets a 4 KiB copy, as before (the kernel splits its mapping).

The collapse copies memory (~2.5 ms per 2 MiB here): it runs in steps of STEP_SECONDS while no
run waits, and not at all with PY_PRELOAD_HUGEPAGES=0 in the server's environment or with THP
set to ``never``.
"""

from __future__ import annotations

import ctypes
import os
import struct
import time

MADV_COLLAPSE = 25
PAGE = os.sysconf("SC_PAGE_SIZE")
PRESENT = 1 << 63  # /proc/self/pagemap: the page is in memory
# A unit is collapsed only when nearly all its pages are there: collapsing fills the holes, and
# memory reserved but never touched (a calloc'd buffer, an arena's tail) must stay unallocated.
MIN_PRESENT = 7 / 8
STEP_SECONDS = 0.01  # a run arriving waits at most about this (plus one 2 MiB copy)
THP_SYSFS = "/sys/kernel/mm/transparent_hugepage/"


def _huge_page_size() -> int:
    try:
        with open(THP_SYSFS + "enabled") as f:
            if "[never]" in f.read():
                return 0  # the administrator turned huge pages off: respect it
        with open(THP_SYSFS + "hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def _madvise():
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


class Collapser:
    """The huge-page-sized units of anonymous memory still to collapse; ``step`` does some."""

    def __init__(self, log) -> None:
        self.log = log
        self.enabled = os.environ.get("PY_PRELOAD_HUGEPAGES", "").strip() != "0"
        self.size = _huge_page_size() if self.enabled and _kernel_collapses() else 0
        self.madvise = _madvise() if self.size else None
        self.units: list | None = None  # start addresses still to do; None: not listed yet
        self.collapsed = 0

    def replan(self) -> None:
        """The server's memory changed (a learned import): list it again when next asked."""
        self.units = None

    def plan(self) -> None:
        """List the server's anonymous memory as it is now (after imports, warm-up, learning)."""
        self.units = []
        if self.madvise is None:
            return
        try:
            self.units = list(anonymous_units(self.size))
        except OSError:
            self.units = []
        self.units.reverse()  # popped from the end: lowest addresses first
        self.collapsed = 0

    def pending(self) -> bool:
        """Units left to collapse; listed at the first call (the server has preloaded then)."""
        if self.units is None:
            self.plan()
        return bool(self.units)

    def step(self) -> bool:
        """Collapse units for about STEP_SECONDS; True once the last one is done."""
        if not self.pending():
            return True
        deadline = time.monotonic() + STEP_SECONDS
        try:
            pagemap = open("/proc/self/pagemap", "rb", buffering=0)
        except OSError:  # without it, holes cannot be told from memory: collapse nothing
            self.units = []
            return True
        with pagemap:
            while self.units and time.monotonic() < deadline:
                start = self.units.pop()
                if not self._mostly_present(pagemap, start):
                    continue
                # A unit that cannot be collapsed (no huge page free, a mapping that refuses
                # it) stays as it is: only the cost of its runs changes.
                if self.madvise(start, self.size, MADV_COLLAPSE) == 0:
                    self.collapsed += 1
        if self.units:
            return False
        self.log(f"huge pages: {self.collapsed} x {self.size >> 20} MiB of the server's memory")
        return True

    def _mostly_present(self, pagemap, start: int) -> bool:
        count = self.size // PAGE
        pagemap.seek(start // PAGE * 8)
        entries = struct.unpack(f"{count}Q", pagemap.read(count * 8))
        return sum(1 for entry in entries if entry & PRESENT) >= count * MIN_PRESENT


def _kernel_collapses() -> bool:
    """MADV_COLLAPSE exists from Linux 6.1 (before, every call fails with EINVAL)."""
    release = os.uname().release.split(".")
    try:
        return (int(release[0]), int(release[1].split("-")[0])) >= (6, 1)
    except (ValueError, IndexError):
        return False


def anonymous_units(size: int):
    """Start addresses of the ``size``-aligned units inside private anonymous writable
    mappings (the heap included, stacks excluded)."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            name = fields[5] if len(fields) > 5 else ""
            if fields[1] != "rw-p" or name not in ("", "[heap]") or fields[4] != "0":
                continue
            low, high = (int(v, 16) for v in fields[0].split("-"))
            start = (low + size - 1) & ~(size - 1)
            while start + size <= high:
                yield start
                start += size

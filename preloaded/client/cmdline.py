"""The starter's own command line, once its run started warm: without the program's arguments.

The process that runs the program shows python's command line (``preloaded.server.proctitle``).
Had the starter kept ``script.py ARGS`` in its own, ``pgrep -f script.py`` would list two
processes where python has one, and ``pkill -f script.py`` would signal both: the program would
get the signal once directly and once forwarded by the starter. The starter's command line is
cut to ``python -SI ./FILE`` instead (``ps`` and ``pgrep`` drop the NULs written over the rest).

Stdlib only and cheap (no ctypes: its import alone costs milliseconds): the argv area's bounds
come from /proc/self/stat and the bytes are written through /proc/self/mem.
"""

from __future__ import annotations

import os
import sys


def hide_arguments() -> None:
    """NUL out the program's part of this process's argv area; never raises."""
    try:
        keep = len(sys.orig_argv) - len(sys.argv) + 1  # the interpreter, its flags, the FILE
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2 :].split()
        start, end = int(fields[48 - 3]), int(fields[49 - 3])  # proc(5): arg_start, arg_end
        with open("/proc/self/cmdline", "rb") as f:
            parts = f.read(end - start).split(b"\0")
        if keep < 1 or len(parts) <= keep:
            return
        kept = sum(len(part) + 1 for part in parts[:keep])
        if start <= 0 or not 0 < kept < end - start:
            return
        fd = os.open("/proc/self/mem", os.O_WRONLY)
        try:
            os.pwrite(fd, bytes(end - start - kept), start + kept)
        finally:
            os.close(fd)
    except (OSError, ValueError, IndexError, AttributeError):  # no /proc, or no orig_argv (3.9)
        pass

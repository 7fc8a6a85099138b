"""A benchmark's figures as JSON, with what they were measured on (for benchmarks/charts.py).

Every figure in the docs names its machine, date and load: ``save`` records them beside the
numbers, so that a chart drawn from the file can say them too.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys


def machine() -> dict:
    """The CPU model, CPU count, memory, Python and kernel of this machine."""
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)  # fmt: skip
    except OSError:
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "memory_gib": round(_mem_total() / 2**30, 1),
            "python": platform.python_version(), "kernel": platform.release()}  # fmt: skip


def _mem_total() -> int:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            return int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0


def save(path: str, benchmark: str, figures: dict, load_before: tuple) -> None:
    """Write ``figures`` (seconds unless a key says otherwise) with the machine, the date,
    the command line and the load average before and after the run."""
    record = {
        "benchmark": benchmark,
        "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="minutes"),
        "machine": machine(),
        "load": {"before": list(load_before), "after": list(os.getloadavg())},
        "figures": figures,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")

"""The server's memory in transparent huge pages (preloaded/server/hugepages.py): what it holds
is collapsed between runs, and memory it only reserved is not allocated. (What it saves per run
is measured in benchmarks/bench_cost.py.)
"""

from __future__ import annotations

import subprocess
import time

import pytest
from conftest import cli

from preloaded.server import hugepages

MB = 1 << 20
# 48 MB written (every page there), 256 MB mapped with one page written per 2 MiB.
WARMUP = ("import mmap\nHELD = bytearray(b'x' * (48 << 20))\n"
          "RESERVED = mmap.mmap(-1, 256 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n"
          "for i in range(0, 256 << 20, 1 << 20):\n    RESERVED[i] = 1\n")


def rollup(pid: int) -> dict:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if "kB" in line}


@pytest.fixture(scope="module")
def held(tmp_path_factory):
    """A json server whose warm-up holds 48 MB and reserves 256 MB (sparsely touched)."""
    if not hugepages.Collapser(print).size:
        pytest.skip("no MADV_COLLAPSE here (Linux < 6.1, or THP set to never)")
    tmp = tmp_path_factory.mktemp("huge")
    (tmp / "warm.py").write_text(WARMUP)
    bundle = str(tmp / "python-huge.bin")
    cli("bundle", "json", "--warmup", str(tmp / "warm.py"), "-o", bundle)
    proc = subprocess.run([bundle, "-c", "import os; print(os.getppid())"], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    yield bundle, int(proc.stdout)
    cli("stop", bundle)


def test_held_memory_collapsed_reserved_memory_left_alone(held):
    """Guards against a server whose runs each copy and tear down a page-table entry per 4 KiB
    of what it holds (21.8 ms to fork 700 MB of tensors in 4 KiB pages, 2.7 ms in 2 MiB ones),
    and against the collapse allocating memory the server only reserved."""
    _bundle, server = held
    deadline, last = time.monotonic() + 60, None
    while True:  # until the collapse is over: no change for a second
        huge = rollup(server).get("AnonHugePages", 0)
        if huge >= 40 * MB and huge == last:
            break
        assert time.monotonic() < deadline, f"not collapsed: {rollup(server)}"
        last = huge
        time.sleep(1.0)
    assert rollup(server)["Anonymous"] < 200 * MB, rollup(server)  # RESERVED stays untouched


"""The warm path stays fast: what the starter and the client import on a warm run.

Every module imported there is paid on every run (``json``, ``socket``, ``signal`` and
``struct`` together cost ~20 ms against a ~40 ms warm run). The interpreter running the starter
reports its imports with ``-X importtime``; the run itself is checked to be warm (its parent is
the server), with pipes and with a terminal (the PTY relay's path).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import PYTHON, cli

# Pure-Python stdlib modules that cost milliseconds (or pull in re/enum/typing): none of them may
# be imported on a warm run. The client uses the C halves (_socket, _json, _struct, _signal).
SLOW = {
    "socket", "json", "signal", "struct", "subprocess", "re", "typing", "enum", "selectors",
    "threading", "tempfile", "shutil", "logging", "inspect", "collections", "functools", "ast",
    "dataclasses", "hashlib", "random", "weakref", "contextlib", "locale", "warnings",
    "traceback", "linecache", "tokenize", "pathlib", "argparse", "string", "copy", "pty", "tty",
    "importlib.util", "importlib.metadata", "base64", "datetime", "uuid", "email", "ssl",
}  # fmt: skip
# The project's modules a warm run may import; spawn, overlay and install are first-run only.
FAST_PATH = {"preloaded", "preloaded.client", "preloaded.client.starter", "preloaded.client.run",
             "preloaded.client.connection", "preloaded.client.signals", "preloaded.client.cmdline",
             "preloaded.client.ptyrelay", "preloaded.client.jobcontrol", "preloaded.wire",
             "preloaded.paths"}  # fmt: skip


def imported(stderr: str) -> list:
    """Module names from ``-X importtime`` output (one "import time:" line per import)."""
    names = []
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.append(name)
    return names


def check(names: list) -> None:
    assert "preloaded.client.run" in names, names  # the warm path did run
    third_party = [n for n in names if n.split(".")[0] not in sys.stdlib_module_names
                   and n.split(".")[0] != "preloaded"]  # fmt: skip
    assert third_party == []
    assert sorted(SLOW.intersection(names)) == []
    assert sorted(n for n in names if n.startswith("preloaded") and n not in FAST_PATH) == []


@pytest.fixture(scope="module")
def warm_bundle(light_bundle):
    subprocess.run([light_bundle, "-c", "pass"], check=True, timeout=60)  # starts the server
    return light_bundle, json.loads(cli("status", light_bundle, "--json").stdout)["pid"]


CODE = "import os; print(os.getppid())"


@pytest.mark.skipif(not hasattr(sys, "stdlib_module_names"), reason="python >= 3.10")
def test_warm_run_over_pipes_imports_nothing_slow(warm_bundle):
    """Guards against a slow or third-party import creeping into the starter/client (e.g. a
    `import json` in wire.py, or spawn.py imported on every run): the interpreter that runs the
    starter lists what it imported."""
    bundle, server = warm_bundle
    proc = subprocess.run([PYTHON, "-SI", "-X", "importtime", bundle, "-c", CODE],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) == server  # warm: a fork of the server ran it
    check(imported(proc.stderr))


@pytest.mark.skipif(not hasattr(sys, "stdlib_module_names"), reason="python >= 3.10")
def test_warm_run_in_a_terminal_imports_nothing_slow(warm_bundle, tmp_path):
    """Guards against the PTY relay's path (stdin/stdout a terminal) importing pty, tty,
    selectors or signal: the same check with a real terminal as stdin and stdout."""
    bundle, server = warm_bundle
    master, slave = os.openpty()
    errors = tmp_path / "importtime.txt"
    with open(errors, "w") as err:
        proc = subprocess.Popen([PYTHON, "-SI", "-X", "importtime", bundle, "-c", CODE],
                                stdin=slave, stdout=slave, stderr=err,
                                start_new_session=True)  # fmt: skip
    os.close(slave)
    output = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the last holder of the slave closed it
            break
        if not chunk:
            break
        output += chunk
    os.close(master)
    assert proc.wait(timeout=10) == 0, errors.read_text()
    assert int(output.decode().split()[-1]) == server
    names = imported(errors.read_text())
    assert "preloaded.client.ptyrelay" in names
    check(names)

"""The run's place in the process tree: signals to its parent, signals to its process group.

A warm run is the server's child, in a session of its own. Python's program is the caller's
child, in the caller's process group. Differential: the same job under python (the oracle) and
under both starters, checked with the real processes (bash traps, ``timeout``, ``kill -PGID``,
``ps``). Every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import PYTHON, cli

TIMEOUT = 30

# A program that tells its parent "ready" (a common handshake with a supervising script).
SIGNAL_PARENT = """\
import os, signal, sys
os.kill(os.getppid(), getattr(signal, sys.argv[1]))
print("sent", flush=True)
"""

# A program that starts a helper and waits for it; prints the helper's pid.
WAITS_ON_SLEEP = """\
import subprocess
sleep = subprocess.Popen(["sleep", "37"])
print(sleep.pid, flush=True)
sleep.wait()
"""


@pytest.fixture(scope="module", params=["python", "native"])
def starter(request):
    """The Python starter, or the native one that cannot fall back to Python (conftest)."""
    name = "light_bundle" if request.param == "python" else "native_strict"
    return request.getfixturevalue(name)


def _server_pid(starter: str) -> int:
    return json.loads(cli("status", "--json", starter).stdout)["pid"]


def _script(tmp_path, name: str, code: str) -> str:
    path = tmp_path / name
    path.write_text(code)
    return str(path)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(pid: int, limit: float = 5.0) -> bool:
    deadline = time.monotonic() + limit
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


@pytest.mark.parametrize("name", ["SIGUSR1", "SIGTERM"])
def test_signal_to_parent_reaches_the_callers_parent(starter, tmp_path, name):
    """Guards a run's signal to its parent: python's goes to the shell that started it (which
    traps it); a warm run's went to the server, which died and took every run with it. It is
    relayed to the caller's parent; the server and a concurrent run are unaffected."""
    job = _script(tmp_path, "job.py", SIGNAL_PARENT)
    subprocess.run([starter, "-c", "pass"], check=True, timeout=TIMEOUT)  # the server is up
    other = subprocess.Popen([starter, "-c", "import time; time.sleep(1); print('other ok')"],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    server = _server_pid(starter)
    shell = ('trap "echo got USR1" USR1; trap "echo got TERM" TERM; '
             '"$0" "$1" "$2"; echo "status $?"')  # fmt: skip
    outcomes = [subprocess.run(["bash", "-c", shell, exe, job, name], capture_output=True,
                               text=True, timeout=TIMEOUT)  # fmt: skip
                for exe in (PYTHON, starter)]
    python, warm = [(p.returncode, p.stdout, p.stderr) for p in outcomes]
    assert python == (0, f"sent\ngot {name[3:]}\nstatus 0\n", "")
    assert warm == python
    assert other.communicate(timeout=TIMEOUT) == ("other ok\n", None) and other.returncode == 0
    assert _server_pid(starter) == server and _alive(server)


def test_sigterm_from_outside_still_stops_the_server(light_bundle, tmp_path):
    """Guards the other senders' meaning: SIGTERM from a process outside every run stops it."""
    subprocess.run([light_bundle, "-c", "pass"], check=True, timeout=TIMEOUT)
    pid = _server_pid(light_bundle)
    os.kill(pid, signal.SIGTERM)
    assert _wait_gone(pid, TIMEOUT)


def _helper_pid(proc) -> int:
    line = proc.stdout.readline()
    assert line.strip().isdigit(), (line, proc.stderr.read() if proc.poll() is not None else "")
    return int(line)


def test_timeout_ends_the_programs_subprocesses(starter, tmp_path):
    """Guards `timeout N cmd` (it signals its whole process group): python's helper `sleep`
    ends with it; a warm run's was left running, orphaned (it is in the run's own group).
    Python and the starter side by side."""
    job = _script(tmp_path, "job.py", WAITS_ON_SLEEP)
    procs = [subprocess.Popen(["timeout", "1.5", exe, job], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
             for exe in (PYTHON, starter)]
    sleeps = [_helper_pid(proc) for proc in procs]
    try:
        for proc in procs:
            proc.communicate(timeout=TIMEOUT)
        assert [proc.returncode for proc in procs] == [124, 124]
        assert [_wait_gone(sleep) for sleep in sleeps] == [True, True], "a sleep was left"
    finally:
        for proc, sleep in zip(procs, sleeps):
            _kill(sleep)
            proc.kill()


@pytest.mark.parametrize("exe", ["python", "starter"])
def test_kill_of_the_process_group_ends_the_programs_subprocesses(starter, tmp_path, exe):
    """Guards `kill -TERM -- -PGID` of a job started with setsid: everything in python's group
    ends, the helper too; and the job ends by SIGTERM."""
    job = _script(tmp_path, "job.py", WAITS_ON_SLEEP)
    proc = subprocess.Popen([PYTHON if exe == "python" else starter, job],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    sleep = _helper_pid(proc)
    try:
        subprocess.run(["kill", "-TERM", "--", f"-{proc.pid}"], check=True, timeout=TIMEOUT)
        proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == -signal.SIGTERM
        assert _wait_gone(sleep), "the program's sleep was left running"
        ps = subprocess.run(["ps", "-o", "stat=,pid=,args=", "-s", str(proc.pid)],
                            capture_output=True, text=True)  # fmt: skip
        assert [line for line in ps.stdout.splitlines() if not line.startswith("Z")] == []
    finally:
        _kill(sleep)
        proc.kill()


if sys.platform != "linux":  # pragma: no cover
    pytest.skip("Linux process tree", allow_module_level=True)

"""A running program outlives its server: killed (SIGKILL, as the OOM killer does), stopped
(``py-preload stop`` is graceful), or timed out while idle. Python is the oracle: each program
runs under the bundle's interpreter as well, and its caller sees the same exit status, stdout
and stderr (see preloaded/server/keeper.py for how the status travels once the server is gone).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import psutil
import pytest
from conftest import PYTHON, cli, make_bundle, native_only
from test_server import RUN_TIMEOUT, gone, wait_until

from preloaded.paths import Paths

# Each program says it is ready, waits for the test's go file, then ends its own way.
WAIT = ("import os, sys, time\nprint('ready', os.getpid(), flush=True)\n"
        "while not os.path.exists(sys.argv[1]):\n    time.sleep(0.01)\nprint('go', flush=True)\n")
ENDINGS = {
    "exit-0": "",
    "exit-5": "sys.stderr.write('five\\n'); sys.exit(5)\n",
    "exception": "raise ValueError('boom')\n",
    "sigterm": "time.sleep(60)\n",  # the test sends SIGTERM to the program
    "ctrl-c": "time.sleep(60)\n",  # the test sends SIGINT to the caller, who forwards it
}


@contextlib.contextmanager
def default_dispositions():
    """The runs' SIGINT and SIGTERM as a shell's foreground job has them, however the tests
    were started (nohup, a background job that ignores SIGINT)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def start(argv0: str, go: str) -> dict:
    """Every ending at once, each waiting for ``go``: {name: (process, program pid)}."""
    procs = {}
    with default_dispositions():
        for name, ending in ENDINGS.items():
            procs[name] = subprocess.Popen([argv0, "-c", WAIT + ending, go],
                                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    ready = {}
    for name, proc in procs.items():
        line = proc.stdout.readline()
        assert line.startswith("ready "), (name, line, proc.stderr.read() if proc.poll() else "")
        ready[name] = (proc, int(line.split()[1]))
    return ready


def finish(runs: dict, go: str) -> dict:
    """Let them go, signal the two that wait for one; {name: (status, stdout, stderr)}."""
    open(go, "w").close()
    for name, (proc, pid) in runs.items():
        if name == "sigterm":
            wait_output(proc, "go")
            os.kill(pid, signal.SIGTERM)  # the program itself: as python's would be
        elif name == "ctrl-c":
            wait_output(proc, "go")
            # In its sleep, python's and the warm one alike: a SIGINT that lands while the
            # print of "go" still runs names that line in the traceback (a race, not a
            # difference).
            wait_asleep(pid)
            proc.send_signal(signal.SIGINT)  # its caller: the starter forwards it
    results = {}
    for name, (proc, _pid) in runs.items():
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
        results[name] = (proc.returncode, out, err)
    return results


def wait_output(proc, line: str) -> None:
    assert proc.stdout.readline() == line + "\n"


def wait_asleep(pid: int, timeout: float = 10.0) -> None:
    """Until ``pid`` sleeps in the kernel (state S) on 5 reads in a row, 10 ms apart."""
    deadline = time.monotonic() + timeout
    seen = 0
    while seen < 5:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
        seen = seen + 1 if state == "S" else 0
        assert time.monotonic() < deadline, f"{pid} never slept"
        time.sleep(0.01)


def python_results(tmp_path) -> dict:
    go = str(tmp_path / "go-python")
    results = finish(start(PYTHON, go), go)
    return {name: normal(r) for name, r in results.items()}


def normal(result: tuple) -> tuple:
    """The "go" line the test read itself is not in the rest of stdout."""
    status, out, err = result
    return status, out.replace("go\n", "", 1), err


def exit_files(bundle: str) -> list:
    paths = Paths(bundle)
    prefix = os.path.basename(paths.socket).removesuffix(".sock") + ".exit."
    return [n for n in os.listdir(paths.runtime) if n.startswith(prefix)]


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    return python_results(tmp_path_factory.mktemp("oracle"))


@pytest.mark.parametrize("client", ["python", "native"])
def test_server_sigkilled_during_runs(tmp_path, oracle, client):
    """Guards against the server's death (SIGKILL, the OOM killer) ending the programs it was
    running: each runs to its end and its caller gets python's status and output (exit 0, 5,
    an exception's 1 and traceback, death by SIGTERM, Ctrl-C forwarded after the death); the
    keeper that reported them exits after the last, and the next run starts a fresh server."""
    path = tmp_path / f"python-outlive-{client}.bin"
    bundle = native_only(path, "json") if client == "native" else make_bundle(path, "json")
    go = str(tmp_path / "go")
    runs = start(bundle, go)
    server = psutil.Process(runs["exit-0"][1]).ppid()
    keeper = psutil.Process(server).ppid()
    os.kill(server, signal.SIGKILL)
    wait_until(lambda: gone(server), 10, "the server to die")
    results = {name: normal(r) for name, r in finish(runs, go).items()}
    assert results == oracle
    wait_until(lambda: gone(keeper), 10, "the keeper to exit after the last run")
    assert exit_files(bundle) == []
    if client == "python":
        again = subprocess.run([bundle, "-c", "import os; print(os.getppid())"],
                               capture_output=True, text=True, timeout=RUN_TIMEOUT)  # fmt: skip
        assert (again.returncode, again.stderr) == (0, "") and int(again.stdout) != server
        cli("stop", "--now", bundle)
    else:  # the killed server's info file would list it among the session's servers
        os.unlink(Paths(bundle).info)


def test_stop_lets_running_programs_finish(tmp_path):
    """Guards against ``py-preload stop`` ending a running program (SIGHUP, exit 129, output
    lost): the server stops taking runs (a new run starts a fresh server), the program
    finishes with python's output and status, and the server exits after it."""
    bundle = make_bundle(tmp_path / "python-stop.bin", "json")
    go = str(tmp_path / "go")
    code = WAIT + "print('finished'); sys.exit(3)\n"
    proc = subprocess.Popen([bundle, "-c", code, go], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    pid = int(proc.stdout.readline().split()[1])
    server = psutil.Process(pid).ppid()
    stopped = cli("stop", bundle)
    assert "exits after its 1 running program(s)" in stopped.stderr
    assert not gone(server)
    fresh = subprocess.run([bundle, "-c", "import os; print(os.getppid())"],
                           capture_output=True, text=True, timeout=RUN_TIMEOUT)  # fmt: skip
    assert (fresh.returncode, fresh.stderr) == (0, "") and int(fresh.stdout) != server
    open(go, "w").close()
    out, err = proc.communicate(timeout=RUN_TIMEOUT)
    assert (proc.returncode, out, err) == (3, "go\nfinished\n", "")
    wait_until(lambda: gone(server), 10, "the stopped server to exit after its run")
    # --now ends the programs, as `stop` did before.
    proc = subprocess.Popen([bundle, "-c", WAIT, go + "-never"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    pid = int(proc.stdout.readline().split()[1])
    server = psutil.Process(pid).ppid()
    cli("stop", "--now", bundle)
    assert proc.wait(RUN_TIMEOUT) == -signal.SIGHUP  # mirrored: the client dies by it too
    wait_until(lambda: gone(server) and gone(pid), 10, "the server and its run to end")


def test_idle_timeout_waits_for_a_long_run(tmp_path):
    """Guards against the idle timeout ending a run that lasts longer than it: the run ends
    normally, and the server exits after it."""
    bundle = make_bundle(tmp_path / "python-idle.bin", "json", idle_timeout=1)
    code = "import os, time; time.sleep(2.5); print(os.getppid())"
    first = subprocess.run([bundle, "-c", code], capture_output=True, text=True,
                           timeout=RUN_TIMEOUT)  # fmt: skip
    assert (first.returncode, first.stderr) == (0, "")
    server = int(first.stdout)
    wait_until(lambda: gone(server), 10, "the idle server to exit")


def test_server_sigterm_leaves_runs_to_the_keeper(tmp_path):
    """Guards against a SIGTERM to the server ending its running programs (it SIGHUPed them):
    the server exits at once, the program goes on, and a signal it then sends its parent (the
    keeper now) ends neither the keeper nor the status it keeps for the caller."""
    bundle = make_bundle(tmp_path / "python-term.bin", "json")
    go = str(tmp_path / "go")
    code = WAIT + ("import signal\nfor s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGHUP):\n"
                   "    os.kill(os.getppid(), s)\nprint('finished'); sys.exit(4)\n")  # fmt: skip
    proc = subprocess.Popen([bundle, "-c", code, go], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    pid = int(proc.stdout.readline().split()[1])
    server = psutil.Process(pid).ppid()
    keeper = psutil.Process(server).ppid()
    os.kill(server, signal.SIGTERM)
    wait_until(lambda: gone(server), 10, "the server to exit on SIGTERM")
    assert not gone(pid) and proc.poll() is None
    open(go, "w").close()
    out, err = proc.communicate(timeout=RUN_TIMEOUT)
    assert (proc.returncode, out, err) == (4, "go\nfinished\n", "")
    wait_until(lambda: gone(keeper), 10, "the keeper to exit after the run")
    assert exit_files(bundle) == []


def test_kernel_left_by_its_server_ends_with_jupyter(tmp_path):
    """Guards against a warm kernel living on after both its server and its Jupyter died: the
    client that watches Jupyter (JPY_PARENT_PID, see starter.follow_jupyter) hangs up on the
    program itself once the server is gone, as the server does when the client goes."""
    bundle = make_bundle(tmp_path / "python-kernel.bin", "json")
    code = "import os, time; print('ready', os.getpid(), flush=True); time.sleep(60)"
    jupyter = subprocess.Popen(["bash", "-c", 'JPY_PARENT_PID=$$ "$0" -c "$1"; exit 0', bundle,
                                code], stdout=subprocess.PIPE, text=True)  # fmt: skip
    pid = int(jupyter.stdout.readline().split()[1])
    server = psutil.Process(pid).ppid()
    os.kill(server, signal.SIGKILL)
    wait_until(lambda: gone(server), 10, "the server to die")
    assert not gone(pid)
    jupyter.kill()
    jupyter.wait(RUN_TIMEOUT)
    wait_until(lambda: gone(pid), 10, "the kernel to end with its Jupyter")
    os.unlink(Paths(bundle).info)  # the killed server's

"""The memory budget: real servers of small bundles, stopped least recently used first.

Each test has a runtime directory of its own: a budget counts every server of the user that
it can see, and must not stop the servers of other tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import psutil
import pytest
from conftest import cli

from preloaded.server.budget import parse_size

RUN_TIMEOUT = 60


@pytest.fixture
def env(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    config = tmp_path / "config"
    config.mkdir()
    environ = {**os.environ, "XDG_RUNTIME_DIR": str(run_dir), "XDG_CONFIG_HOME": str(config)}
    yield environ
    cli("stop", "--all", env=environ, check=False)


@pytest.fixture
def bundles(tmp_path):
    """Three small bundles that learn nothing: what each server holds stays as measured."""
    paths = [str(tmp_path / f"python-{i}.bin") for i in range(3)]
    for path in paths:
        cli("bundle", "json", "--no-learn", "-o", path)
    return paths


def served_by(bundle: str, env: dict, **extra) -> int:
    """Run once (a new server starts if none runs); the pid of the server that forked it."""
    proc = subprocess.run([bundle, "-c", "import os; print(os.getppid())"], capture_output=True,
                          text=True, env={**env, **extra}, stdin=subprocess.DEVNULL,
                          timeout=RUN_TIMEOUT, check=False)  # fmt: skip
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return int(proc.stdout)


def held(pid: int, running: int | None = None) -> int:
    """PSS of a server and its parked standby (the run ``running`` left out), by psutil."""
    server = psutil.Process(pid)
    total = server.memory_full_info().pss
    for child in server.children():
        try:
            if child.pid != running:
                total += child.memory_full_info().pss
        except psutil.NoSuchProcess:  # a run's fast-exit helper, gone between the two looks
            pass
    return total


def parked(pid: int) -> bool:
    """The server has forked its standby after the last run (and nothing else runs)."""
    return len(psutil.Process(pid).children()) == 1


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def start_blocked_run(bundle: str, env: dict, gate: str) -> tuple:
    """A run that waits for ``gate`` to exist (its server has a running child meanwhile); the
    run's process, its server's pid and its child's, once it runs."""
    started = gate + ".started"
    code = (f"import os, time\nopen({started!r} + '.tmp', 'w').write(f'{{os.getppid()}} {{os.getpid()}}')\n"
            f"os.rename({started!r} + '.tmp', {started!r})\n"
            f"while not os.path.exists({gate!r}): time.sleep(0.02)\nprint('done')")  # fmt: skip
    proc = subprocess.Popen([bundle, "-c", code], env=env, stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)  # fmt: skip
    wait_until(lambda: os.path.exists(started) or proc.poll() is not None, "the run to start")
    assert proc.poll() is None, "the blocked run ended"
    with open(started) as f:
        server, child = map(int, f.read().split())
    return proc, server, child


def test_a_new_server_stops_the_least_recently_used_idle_one(bundles, env):
    """Guards against servers piling up past the budget, and against the wrong one going: with
    a budget that fits two, the third server's start stops the least recently used."""
    first = served_by(bundles[0], env)
    second = served_by(bundles[1], env)
    served_by(bundles[0], env)  # the first is now the more recently used one
    wait_until(lambda: parked(first) and parked(second), "the standbys to be parked")
    two = held(first) + held(second)
    # Two servers and half of what a third adds: its own pages (USS; the shared ones are split
    # anew, not added). 1.25 x two was flaky: three small servers can hold that little.
    budget = two + psutil.Process(first).memory_full_info().uss // 2
    third = served_by(bundles[2], env, PY_PRELOAD_MEMORY_BUDGET=str(budget))
    log = lambda: cli("logs", bundles[2], env=env).stdout  # noqa: E731
    wait_until(lambda: not alive(second), f"the least recently used server to stop ({two} "
               f"bytes held by two):\n{log()}")  # fmt: skip
    assert alive(first) and alive(third)
    assert served_by(bundles[0], env) == first  # still serving, untouched
    assert f"stopped the idle server {second} of {bundles[1]}" in log()


def test_a_server_with_a_running_child_is_never_stopped(bundles, env, tmp_path):
    """Guards against a budget that kills a user's running program: over budget (set for all
    bundles in the config file), only the idle server goes; the busy one, least recently used
    though it is, keeps running, and so does its child."""
    config = os.path.join(env["XDG_CONFIG_HOME"], "py-preload")
    os.makedirs(config)
    gate = str(tmp_path / "gate")
    run, busy, _child = start_blocked_run(bundles[0], env, gate)
    try:
        idle = served_by(bundles[1], env)
        with open(os.path.join(config, "config.json"), "w") as f:
            json.dump({"memory_budget": "1M"}, f)  # fits none of them
        third = served_by(bundles[2], env)
        wait_until(lambda: not alive(idle), "the idle server to stop")
        assert alive(busy) and alive(third) and run.poll() is None
        assert "the others are busy" in cli("logs", bundles[2], env=env).stdout
    finally:
        open(gate, "w").close()
    out, _ = run.communicate(timeout=RUN_TIMEOUT)
    assert run.returncode == 0 and out == "done\n"


def test_list_shows_memory_and_last_use(bundles, env, tmp_path):
    """Guards against `list` hiding what each server holds and when it was last used (what the
    budget decides by), and a busy server shown as idle."""
    gate = str(tmp_path / "gate")
    idle = served_by(bundles[0], env)
    run, busy, child = start_blocked_run(bundles[1], env, gate)
    try:
        wait_until(lambda: parked(idle) and len(psutil.Process(busy).children()) == 2,
                   "the standbys to be parked")  # fmt: skip
        listing = cli("list", env={**env, "PY_PRELOAD_MEMORY_BUDGET": "2G"}).stdout
        measured = {pid: held(pid, running=child) for pid in (idle, busy)}
    finally:
        open(gate, "w").close()
        run.communicate(timeout=RUN_TIMEOUT)
    lines = {int(line.split()[0]): line for line in listing.splitlines()[1:-1]}
    assert set(lines) == {idle, busy}, listing
    for pid, line in lines.items():
        megabytes = int(line.split()[1])
        assert line.split()[2] == "MB", line
        assert abs(megabytes * 1e6 - measured[pid]) < max(2e6, measured[pid] / 4), line
    assert " s ago " in lines[idle] and " running " in lines[busy]
    assert listing.splitlines()[-1].startswith("memory budget 2G (PY_PRELOAD_MEMORY_BUDGET)")


@pytest.mark.parametrize(
    ("text", "size"),
    [("8G", 8 << 30), ("500M", 500 << 20), ("1.5g", 3 << 29), ("2048", 2048), ("64KiB", 65536),
     ("10 MB", 10 << 20)],
)
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["8X", "0", "-1G", "lots", "1e9", "G"])
def test_bad_budget_is_one_clear_line(text, bundles, env):
    """Guards against a mistyped budget being ignored in silence (or a traceback): `list`
    says what is wrong in one line (exit 2), and a run says it once and runs with python."""
    bad = {**env, "PY_PRELOAD_MEMORY_BUDGET": text}
    proc = cli("list", env=bad, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"Error: PY_PRELOAD_MEMORY_BUDGET: {text!r} is not a size"
        + (" above zero" if text == "0" else " (write e.g. 8G, 500M or 1.5G)")
    ]
    run = subprocess.run([bundles[0], "-c", "print('ran')"], capture_output=True, text=True,
                         env=bad, timeout=RUN_TIMEOUT, check=False)  # fmt: skip
    assert run.returncode == 0 and run.stdout == "ran\n"
    assert run.stderr.count("\n") == 1 and "PY_PRELOAD_MEMORY_BUDGET" in run.stderr
    assert "running without the server" in run.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "not valid JSON"), ('{"memory_budjet": "8G"}', "unknown setting 'memory_budjet'"),
     ('{"memory_budget": true}', "memory_budget must be a size"), ("[1]", "expected a JSON object"),
     ('{"memory_budget": "8 lots"}', "memory_budget: '8 lots' is not a size")],
)
def test_bad_config_file_is_one_clear_line(content, message, env):
    """Guards against a broken config file giving a traceback, or not naming the file."""
    path = os.path.join(env["XDG_CONFIG_HOME"], "py-preload", "config.json")
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write(content)
    proc = cli("list", env=env, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"Error: {path}: ") and message in proc.stderr


def test_low_memory_retires_idle_servers_least_recently_used_first(bundles, env, tmp_path):
    """Guards against idle servers holding memory the machine needs, against the wrong one
    retiring first, and against a busy server retiring: "low" here is any amount (a threshold
    above the machine's memory), so every idle server goes, one after the other."""
    gate = str(tmp_path / "gate")
    low = {**env, "PY_PRELOAD_LOW_MEMORY": "1P"}
    run, busy, _child = start_blocked_run(bundles[0], low, gate)
    try:
        older = served_by(bundles[1], low)
        newer = served_by(bundles[2], low)
        wait_until(lambda: not alive(older), "the least recently used idle server to retire")
        assert alive(newer), "the more recently used one retired first"
        wait_until(lambda: not alive(newer), "the other idle server to retire")
        assert alive(busy) and run.poll() is None
    finally:
        open(gate, "w").close()
    out, _ = run.communicate(timeout=RUN_TIMEOUT)
    assert run.returncode == 0 and out == "done\n"

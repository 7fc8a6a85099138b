"""The standby child: a child forked ahead of its run and parked until a run is handed to it.

Real servers, real forks; every wait has a deadline. Each test makes its own bundle, so that
killing a standby or making a server stale disturbs no other test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import textwrap
import time

import psutil
import pytest
from conftest import PYTHON, REPO, cli, make_bundle
from test_server import (GOOD, RUN_TIMEOUT, bundle_from, frame, gone, log_text, run, served_by,
                         status, stop, wait_until)  # fmt: skip

SHOW = "import os, sys; print(os.getpid(), os.getppid()); sys.exit(7)"


@pytest.fixture
def bundle(tmp_path):
    path = make_bundle(tmp_path / "python-standby.bin", "json", "decimal")
    served_by(path)  # starts the server
    yield path
    stop(path)


def parked(bundle: str) -> int:
    """The pid of the parked standby, once there is one."""
    return wait_until(lambda: status(bundle)["standby"], 10, "a parked standby")


def pid_and_parent(proc: subprocess.CompletedProcess) -> tuple:
    assert (proc.returncode, proc.stderr) == (7, ""), proc.stderr
    pid, ppid = proc.stdout.split()
    return int(pid), int(ppid)


def test_run_is_served_by_the_parked_standby(bundle):
    """Guards against a run that forks a fresh child while a standby sits parked (the fork back
    on the critical path), and against no standby being forked for the next run."""
    server = status(bundle)["pid"]
    for _ in range(3):
        standby = parked(bundle)
        assert psutil.Process(standby).ppid() == server
        assert pid_and_parent(run(bundle, "-c", SHOW)) == (standby, server)
        wait_until(lambda old=standby: status(bundle)["standby"] not in (None, old), 10,
                   "the next standby")  # fmt: skip
    st = status(bundle)
    assert st["runs"] == 4 and st["children"] == []


def test_status_shows_the_standby(bundle):
    standby = parked(bundle)
    assert f"standby:   pid {standby} parked" in cli("status", bundle).stdout


def test_parked_standby_costs_no_cpu_and_holds_no_server_fd(bundle):
    """Guards against a standby that polls (CPU while parked) or keeps the server's listener,
    wakeup pipe, lock or connections open (a client would never see EOF, the lock never go)."""
    standby = psutil.Process(parked(bundle))
    before = standby.cpu_times()
    time.sleep(1.0)
    after = standby.cpu_times()
    assert (after.user + after.system) - (before.user + before.system) < 0.02
    assert standby.status() == psutil.STATUS_SLEEPING
    server = psutil.Process(standby.ppid())
    (channel,) = _fd_numbers(standby.pid) - {0, 1, 2}  # its own channel, nothing else
    assert os.readlink(f"/proc/{standby.pid}/fd/{channel}").startswith("socket:")
    server_sockets = {os.readlink(f"/proc/{server.pid}/fd/{fd}") for fd in _fd_numbers(server.pid)}
    assert os.readlink(f"/proc/{standby.pid}/fd/{channel}") not in server_sockets


def _fd_numbers(pid: int) -> set:
    return {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}


def test_rng_reseeded_at_hand_over(tmp_path):
    """Guards against runs that repeat each other's random numbers: numpy's global RNG is not
    reseeded by fork, and a standby forked ahead must not carry the server's state into runs."""
    path = make_bundle(tmp_path / "python-rng.bin", "random", "numpy")
    code = "import random, numpy; print(random.random(), numpy.random.random())"
    try:
        outs = [run(path, "-c", code) for _ in range(3)]
        assert [p.returncode for p in outs] == [0, 0, 0], outs[0].stderr
        pairs = [p.stdout.split() for p in outs]
        assert len({p[0] for p in pairs}) == 3 and len({p[1] for p in pairs}) == 3, pairs
    finally:
        stop(path)


def test_environment_applied_at_hand_over(bundle, tmp_path):
    """Guards against a run seeing what the standby had at fork (the server's environment, cwd
    "/", umask) instead of its own caller's."""
    code = textwrap.dedent("""\
        import os, sys
        mask = os.umask(0); print(os.getcwd(), os.environ.get("STANDBY_X"), oct(mask), sys.argv)
    """)
    for i, mask in enumerate(("27", "77")):
        cwd = tmp_path / f"cwd{i}"
        cwd.mkdir()
        env = {**os.environ, "STANDBY_X": f"x{i}"}
        proc = subprocess.run(["sh", "-c", f'umask 0{mask}; exec "$0" "$@"', bundle, "-c", code,
                               f"arg{i}"], cwd=cwd, env=env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=RUN_TIMEOUT)  # fmt: skip
        assert proc.stdout == f"{cwd} x{i} 0o{mask} ['-c', 'arg{i}']\n", proc.stderr


def test_big_request_handed_over(bundle):
    """Guards against a hand-over that deadlocks or truncates when the request (environment)
    is larger than the socketpair's buffer."""
    env = {**os.environ, **{f"BIG{i}": "b" * (100 << 10) for i in range(6)}}  # 128 KiB each at most
    code = "import os; print(sum(len(os.environ[f'BIG{i}']) for i in range(6)))"
    proc = run(bundle, "-c", code, env=env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"{600 << 10}\n", "")


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_standby_killed_while_parked(bundle, signum):
    """Guards against a standby's death while parked being taken for a run (a bogus exit status
    sent to nobody, a run count) or breaking the next run (handed to a dead process)."""
    st = status(bundle)
    standby = parked(bundle)
    os.kill(standby, signum)
    wait_until(lambda: gone(standby), 10, "the killed standby to die")
    pid, ppid = pid_and_parent(run(bundle, "-c", SHOW))
    assert pid != standby and ppid == st["pid"]
    wait_until(lambda: not psutil.pid_exists(standby), 10, "the dead standby to be reaped")
    after = status(bundle)
    assert after["runs"] == st["runs"] + 1 and after["children"] == []
    assert after["pid"] == st["pid"]
    assert parked(bundle) not in (standby, pid)  # standbys are forked ahead again
    assert f"standby {standby} died while parked (signal {int(signum)})" in log_text(bundle)


def test_stale_server_does_not_use_its_standby(module_dir):
    """Guards against a run handed to a standby forked before a preloaded source changed: the
    stale server retires, its standby is killed, and the run gets the new code."""
    source = module_dir / "sbmod.py"
    source.write_text("VALUE = 1\n")
    path = bundle_from(module_dir, "sbmod")
    code = "import os, sbmod; print(sbmod.VALUE, os.getpid(), os.getppid())"
    # Python finds sbmod only through PYTHONPATH (a run without it goes cold: ModuleNotFound).
    env = {**os.environ, "PYTHONPATH": str(module_dir)}
    try:
        first = run(path, "-c", code, env=env)
        assert first.stdout.split()[0] == "1", first.stderr
        old_server = int(first.stdout.split()[2])
        old_standby = parked(path)
        source.write_text("VALUE = 222\n")  # another size: the .pyc cannot pass for it
        second = run(path, "-c", code, env=env)
        value, pid, ppid = second.stdout.split()
        assert (value, second.stderr) == ("222", "")
        assert int(pid) != old_standby and int(ppid) != old_server
        wait_until(lambda: gone(old_standby) and gone(old_server), 10, "the stale server to go")
        assert "sbmod.py changed" in log_text(path)
    finally:
        stop(path)


def test_standby_off(tmp_path):
    """Guards against PY_PRELOAD_STANDBY=0 (in the server's environment) being ignored, and
    against runs failing without a standby."""
    path = make_bundle(tmp_path / "python-nostandby.bin", "json")
    env = {**os.environ, "PY_PRELOAD_STANDBY": "0"}
    try:
        for _ in range(3):
            pid, ppid = pid_and_parent(run(path, "-c", SHOW, env=env))
            assert pid not in [c.pid for c in psutil.Process(ppid).children()]
        st = status(path)
        assert st["standby"] is None and st["runs"] == 3
        assert "standby:   none parked" in cli("status", path).stdout
    finally:
        stop(path)


DISCARD = textwrap.dedent("""\
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    from preloaded.server import child
    from preloaded.server import loop as server
    s = server.Server({"bundle": sys.argv[2], "modules": []})
    s.pool.setup = child.Setup(list(sys.path), "utf-8", "strict")
    s.pool.refill()
    first = s.pool.parked[0].pid
    s.pool.discard_all()
    try:
        os.waitpid(first, os.WNOHANG)
        reaped = False
    except ChildProcessError:
        reaped = True
    wanted = s._refill_in()
    s.pool.refill()
    second = s.pool.parked[0].pid
    s.pool.discard_all()
    print(json.dumps([first != second, reaped, s.pool.parked == [], wanted]))
""")


def test_discard_standby_kills_reaps_and_refills(tmp_path):
    """Guards against a standby forked before a change of the server's state (more modules
    imported) serving the next run: StandbyPool.discard_all() kills and reaps it, and the next idle
    moment forks a new one."""
    proc = subprocess.run([PYTHON, "-c", DISCARD, REPO, str(tmp_path / "python-x.bin")],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=tmp_path)  # fmt: skip
    assert json.loads(proc.stdout) == [True, True, True, 0.0], proc.stderr


def test_fast_exit_helpers_are_reaped(bundle):
    """Guards against the fast exit's helpers (tasks that keep a finished run's memory alive so
    that its exit is reported before the teardown) piling up as zombies or strays of the
    server, and against a run's status or output being lost when its fds close before exit."""
    server = status(bundle)["pid"]
    for i in range(20):
        proc = run(bundle, "-c", f"import sys; print('x' * {i}); sys.exit({i})")
        assert (proc.returncode, proc.stdout, proc.stderr) == (i, "x" * i + "\n", "")

    def only_the_standby() -> bool:
        standby = status(bundle)["standby"]
        return [c.pid for c in psutil.Process(server).children()] == [standby]

    wait_until(only_the_standby, 10, "the server's only child to be the parked standby")


def test_fast_exit_off(tmp_path):
    """Guards against PY_PRELOAD_FASTEXIT=0 (runs tear their memory down themselves) breaking
    runs: the switch that rules the helper out if a system refuses it."""
    path = make_bundle(tmp_path / "python-noexit.bin", "json")
    env = {**os.environ, "PY_PRELOAD_FASTEXIT": "0"}
    try:
        for i in range(3):
            proc = run(path, "-c", f"print({i}); raise SystemExit({i})", env=env)
            assert (proc.returncode, proc.stdout, proc.stderr) == (i, f"{i}\n", "")
    finally:
        stop(path)


HAND_OVER = textwrap.dedent("""\
    import json, os, socket, sys, time
    sys.path.insert(0, sys.argv[1])
    from preloaded.server import child
    from preloaded import wire
    marker, end = sys.argv[2], sys.argv[3]
    ours, theirs = socket.socketpair()
    setup = child.Setup(list(sys.path), "utf-8", "strict")
    setup.fast_exit = False
    pid = os.fork()
    if pid == 0:
        ours.close()
        child.park(theirs.fileno(), [], setup)
    theirs.close()
    request = {"v": 1, "mode": "code", "target": f"open({marker!r}, 'w').close()", "argv": ["-c"],
               "orig_argv": [sys.executable], "cwd": "/", "env": {}, "umask": 0o22,
               "stdio": ["pipe", "pipe", "pipe"], "ignored": [],
               "flags": {"u": False, "B": False, "i": False, "q": False, "W": []}}
    null = os.open(os.devnull, os.O_RDWR)
    wire.send(ours, request, [null, null, null])
    time.sleep(0.5)  # handed over, no "go" yet: the command must not have run
    print(json.dumps(os.path.exists(marker)), flush=True)
    if end == "go":
        wire.send(ours, child.GO)
        ours.close()
    elif end == "close":  # EOF alone, as when a dying server's fds close before reparenting
        ours.close()
    else:
        os._exit(0)  # the server dies before the "go": the run must never start
    print(json.dumps(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])))
""")


@pytest.mark.parametrize("end", ["go", "close", "die"])
def test_nothing_runs_before_the_go(tmp_path, end):
    """Guards against a standby that starts the command as soon as it is handed the request,
    before the server told the client "started": a client that then loses the server runs the
    command cold, a second time. The channel's EOF alone is no go: a dying server's fds close
    before its children are reparented (seen under load: the run started)."""
    marker = tmp_path / "ran"
    proc = subprocess.run([PYTHON, "-c", HAND_OVER, REPO, str(marker), end],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)  # fmt: skip
    lines = [json.loads(line) for line in proc.stdout.split()]
    assert lines[0] is False, proc.stderr
    if end == "go":
        assert lines[1:] == [0] and marker.exists(), proc.stderr
    elif end == "close":
        assert lines[1:] == [1] and not marker.exists(), proc.stderr
    else:
        time.sleep(0.5)  # the orphaned standby had time to run it, if it were going to
        assert not marker.exists()


def test_client_reset_before_reading_started_ends_the_run(bundle):
    """Guards against a run left running when its client dies before reading "started" (the
    standby starts runs so fast that this happens under load): the server reads ECONNRESET, not
    EOF, and must end the run as for a client gone, not only refuse the connection."""
    request = {**GOOD, "target": "import os, time; print(os.getpid(), flush=True); time.sleep(60)"}
    out_r, out_w = os.pipe()
    null = os.open(os.devnull, os.O_RDWR)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(status(bundle)["socket"])
        fds = struct.pack("3i", null, out_w, null)
        sock.sendmsg([frame(request)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        os.close(out_w)
        with os.fdopen(out_r, closefd=False) as out:
            pid = int(out.readline())
        time.sleep(0.2)  # "started" sits unread in our receive queue
        sock.close()  # a reset for the server
        wait_until(lambda: gone(pid), 10, "the run of the reset client to end")
        assert os.read(out_r, 1) == b""  # and nothing else holds its output open
    finally:
        sock.close()
        os.close(null)
        os.close(out_r)


def test_run_whose_client_cannot_be_told_started_never_runs(bundle, tmp_path):
    """Guards against starting a run whose client could not be sent "started" (it shut its
    reading side, or died): such a client may run the command cold, so the run must not run it
    too. The server kills the standby before the go; the next run is served as usual."""
    marker = tmp_path / "ran"
    request = {**GOOD, "target": f"open({str(marker)!r}, 'w').close()"}
    null = os.open(os.devnull, os.O_RDWR)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(status(bundle)["socket"])
        sock.shutdown(socket.SHUT_RD)  # the server's replies now fail (EPIPE); we stay connected
        fds = struct.pack("3i", null, null, null)
        sock.sendmsg([frame(request)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        wait_until(lambda: status(bundle)["runs"] >= 2 and not status(bundle)["children"], 10,
                   "the run to be handed over and ended")  # fmt: skip
        time.sleep(0.3)
        assert not marker.exists()
    finally:
        sock.close()
        os.close(null)
    assert run(bundle, "-c", "print('next')").stdout == "next\n"


def test_pool_of_standbys(tmp_path):
    """Guards `bundle --standby N`: N children parked at once (a burst of runs finds them
    forked ahead), each run served by one of them, and no parked standby holding a sibling's
    channel (the server must not see EOF-less channels, a standby must not keep another's)."""
    path = str(tmp_path / "python-pool.bin")
    cli("bundle", "json", "--standby", "3", "--no-learn", "-o", path)  # learning discards them
    try:
        served_by(path)
        pool = wait_until(lambda: len(status(path)["standbys"]) == 3 and status(path)["standbys"],
                          10, "three parked standbys")  # fmt: skip
        for pid in pool:
            assert len(_fd_numbers(pid) - {0, 1, 2}) == 1  # its own channel only
        procs = [subprocess.Popen([path, "-c", SHOW], stdout=subprocess.PIPE, text=True)
                 for _ in range(3)]  # fmt: skip
        served = {int(p.communicate(timeout=RUN_TIMEOUT)[0].split()[0]) for p in procs}
        assert served == set(pool)
        assert "3 parked" in wait_until(lambda: "3 parked" in cli("status", path).stdout
                                        and cli("status", path).stdout, 10, "the pool refilled")
    finally:
        stop(path)

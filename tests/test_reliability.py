"""Reliability and security: load, faults, hostile input, other users, terminal safety.

Real servers, real forks, real PTYs, real users (via setpriv); every wait has a deadline. Each
test that kills, breaks or counts servers uses its own bundle (or its own runtime directory),
so that it never disturbs the servers other tests use. Figures in docs/reliability.md come from
these tests (``-s`` prints them).

What is already covered elsewhere and not repeated here: 20 concurrent first runs, malformed
frames of most kinds, a failing import, a thread-starting or CUDA-initialising preload
(tests/test_server.py); death by signal mirrored, a SIGKILLed client ending its child
(tests/test_signals.py); terminal restore after a crash, SIGTERM/SIGHUP of the client, SIGKILL
of the child (tests/test_pty.py); edited preloaded sources and new packages (staleness).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from conftest import PYTHON, REPO, cli, make_bundle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_pty import RAW_SCRIPT, _finish, _script, spawn  # noqa: F401  (spawn: a fixture)
from test_server import (GOOD, RUN_TIMEOUT, connect, frame, gone, read_all, send_with_fds,
                         served_by, socket_path, status, stop, wait_until)  # fmt: skip

OTHER_UID = 60000 + os.getpid() % 5000  # an unused uid: its processes are only ours
# Switch to OTHER_UID but keep CAP_DAC_READ_SEARCH (read and traverse only, no write): the
# interpreter lives under /root (0700) on the development machines.
AS_OTHER = ["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]  # fmt: skip


def run(bundle: str, *args: str, env=None, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run([bundle, *args], capture_output=True, text=True, timeout=RUN_TIMEOUT,
                          env=env, **kw)  # fmt: skip


def plain(*args: str, env=None, prefix=()) -> subprocess.CompletedProcess:
    """The same command under the real interpreter: what every run must match."""
    return subprocess.run([*prefix, PYTHON, *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=RUN_TIMEOUT, env=env)  # fmt: skip


def assert_cold_like_python(via, python, *fragments) -> None:
    """``via`` warned once (naming ``fragments``), then gave exactly python's result."""
    warning, _, rest = via.stderr.partition("\n")
    assert warning.startswith("py-preload: "), via.stderr
    assert warning.endswith("; running without the server"), via.stderr
    for fragment in fragments:
        assert fragment in warning, warning
    assert (via.returncode, via.stdout, rest) == (python.returncode, python.stdout, python.stderr)


def running(pid: int) -> bool:
    return not gone(pid)


def server_fds_and_rss(pid: int) -> tuple:
    """The server's fd count and RSS once idle (it closes a connection just after its reply,
    so a client can be gone a moment before its fd is)."""
    wait_idle(pid)
    proc = psutil.Process(pid)
    counts = [proc.num_fds()]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (len(counts) < 3 or len(set(counts[-3:])) > 1):
        time.sleep(0.05)
        counts.append(proc.num_fds())
    return counts[-1], proc.memory_info().rss


def live_children(pid: int) -> list:
    """The server's children, zombies included (an unreaped child is a bug too), except its
    parked standby (a child forked ahead for the next run)."""
    standby = standby_of(pid)
    found = []
    for c in psutil.Process(pid).children():
        try:
            if c.pid != standby:
                found.append((c.pid, c.status()))
        except psutil.NoSuchProcess:  # reaped between the listing and the look: not live
            pass
    return found


def standby_of(pid: int):
    """The pid of server ``pid``'s parked standby (from its status), or None."""
    directory = os.path.join(os.environ["XDG_RUNTIME_DIR"], "py-preload")
    for name in os.listdir(directory):
        if name.endswith(".json"):
            try:
                with open(os.path.join(directory, name)) as f:
                    info = json.load(f)
            except (OSError, ValueError):
                continue
            if info.get("pid") == pid:
                with connect(info["socket"]) as sock:
                    sock.sendall(frame({"v": 1, "cmd": "status"}))
                    reply = read_all(sock)
                return json.loads(reply[4:])["standby"]
    return None


def wait_learned(bundle: str) -> None:
    """Until the server has imported every module its runs taught it (they add to its RSS)."""

    def settled():
        st = json.loads(cli("status", "--json", bundle).stdout)
        return not st["learn"]["pending"]

    wait_until(settled, 30, "the server to finish learning")


def wait_idle(pid: int) -> None:
    wait_until(lambda: not live_children(pid), 15, "the server's children to be reaped")


@pytest.fixture
def own_bundle(tmp_path):
    path = make_bundle(tmp_path / "python-own.bin", "json", "decimal")
    yield path
    stop(path)


@pytest.fixture
def private_env(tmp_path):
    """An environment with its own runtime and cache directories (not the session's)."""
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path / "run"),
           "XDG_CACHE_HOME": str(tmp_path / "cache")}  # fmt: skip
    os.makedirs(env["XDG_RUNTIME_DIR"], mode=0o700)
    yield env
    cli("stop", "--all", check=False, env=env)


def paths_in(env: dict, bundle: str):
    """The Paths of ``bundle`` under ``env``'s runtime and cache directories."""
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); from preloaded.paths import Paths;"
            "p = Paths(sys.argv[2]); print(json.dumps(p.__dict__))")  # fmt: skip
    out = subprocess.run([PYTHON, "-c", code, REPO, bundle], capture_output=True, text=True,
                         env=env, timeout=RUN_TIMEOUT, check=True).stdout  # fmt: skip
    return json.loads(out)


# -- 1. load -----------------------------------------------------------------------------------

LOAD_SCRIPT = """\
import sys
i = int(sys.argv[1])
print("run", i, "x" * (i % 97))
print("err", i, file=sys.stderr)
sys.exit(i % 5)
"""


def expected(i: int) -> tuple:
    return i % 5, f"run {i} {'x' * (i % 97)}\n", f"err {i}\n"


@pytest.fixture(scope="module")
def load_bundle(tmp_path_factory):
    directory = tmp_path_factory.mktemp("load")
    path = make_bundle(directory / "python-load.bin", "json", "decimal")
    script = directory / "load.py"
    script.write_text(LOAD_SCRIPT)
    for i in range(20):  # warm up: first runs fill the server's free lists and caches
        run(path, str(script), str(i))
    yield path, str(script), served_by(path)
    stop(path)


def assert_back_to_baseline(server: int, before: tuple, runs: int) -> None:
    fds, rss = server_fds_and_rss(server)
    print(f"\n{runs} runs: server fds {before[0]} -> {fds}, RSS {before[1] >> 10} -> "
          f"{rss >> 10} KiB")  # fmt: skip
    assert fds == before[0]
    # Slack of 1 MiB: a long-lived CPython process keeps what it once allocated (pymalloc arenas
    # stay mapped while any object in them lives, the selector's and dicts' tables keep their
    # largest size). A leak of one fd, socket or buffer per run would be 500 x 4 KiB at least.
    assert rss - before[1] < 1 << 20


@pytest.mark.stress
def test_500_sequential_warm_runs(load_bundle):
    """Guards against leaks per run (fds, memory, children) and any lost or mixed-up output or
    exit status over many runs of one server."""
    bundle, script, server = load_bundle
    before = server_fds_and_rss(server)
    runs_before = status(bundle)["runs"]
    started = time.monotonic()
    for i in range(500):
        proc = run(bundle, script, str(i))
        assert (proc.returncode, proc.stdout, proc.stderr) == expected(i)
    print(f"\n500 sequential runs in {time.monotonic() - started:.1f} s")
    assert status(bundle)["runs"] == runs_before + 500 and served_by(bundle) == server
    assert_back_to_baseline(server, before, 500)


@pytest.mark.stress
def test_64_concurrent_warm_runs(load_bundle):
    """Guards against races in the server loop (replies sent to the wrong connection, a child's
    status mirrored by another client, accept backlog drops) and leaks under concurrency."""
    bundle, script, server = load_bundle
    before = server_fds_and_rss(server)
    for _round in range(2):
        procs = [subprocess.Popen([bundle, script, str(i)], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(64)]  # fmt: skip
        for i, proc in enumerate(procs):
            out, err = proc.communicate(timeout=RUN_TIMEOUT)
            assert (proc.returncode, out, err) == expected(i)
    assert served_by(bundle) == server
    assert_back_to_baseline(server, before, 128)


BIG_WRITER = """\
import hashlib, sys
i = int(sys.argv[1])
block = hashlib.sha256(str(i).encode()).digest() * 2048  # 64 KiB, different for every run
out = sys.stdout.buffer
for _ in range(160):  # 10 MiB
    out.write(block)
sys.exit(i)
"""


@pytest.mark.stress
def test_16_concurrent_runs_writing_10mb_each(load_bundle, tmp_path):
    """Guards against lost, truncated or interleaved output when many children fill pipes at
    once (the stdout fd is the caller's own pipe, passed by SCM_RIGHTS, never relayed)."""
    import hashlib

    bundle, _script, server = load_bundle
    script = tmp_path / "big.py"
    script.write_text(BIG_WRITER)
    for i in range(2):  # the server learns what the script imports (hashlib): let it, first
        proc = subprocess.run([bundle, str(script), str(i)], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, timeout=RUN_TIMEOUT)  # fmt: skip
        assert proc.returncode == i
    wait_learned(bundle)
    before = server_fds_and_rss(server)
    procs = [subprocess.Popen([bundle, str(script), str(i)], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(16)]  # fmt: skip
    with ThreadPoolExecutor(16) as pool:  # drain all pipes at once: the runs really overlap
        results = list(pool.map(lambda p: p.communicate(timeout=RUN_TIMEOUT), procs))
    for i, (proc, (out, err)) in enumerate(zip(procs, results)):
        block = hashlib.sha256(str(i).encode()).digest() * 2048
        assert (proc.returncode, err, len(out)) == (i, b"", 10 << 20)
        assert out == block * 160
    assert_back_to_baseline(server, before, 16)


# -- 2. faults ---------------------------------------------------------------------------------

SLEEPER = "import os, time; print('pid', os.getpid(), flush=True); time.sleep(60)"


def start_sleeper(bundle: str, env=None) -> tuple:
    proc = subprocess.Popen([bundle, "-c", SLEEPER], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip
    line = proc.stdout.readline()
    assert line.startswith("pid "), (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, int(line.split()[1])


def kill_and_wait(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: gone(pid), 10, f"process {pid} to die")


def test_server_sigkilled_before_a_run(own_bundle):
    """Guards against a stale socket file of a dead server making runs fail, hang or go cold:
    the next run must start a new server and give a normal result."""
    first = served_by(own_bundle)
    sock_path = status(own_bundle)["socket"]
    kill_and_wait(first)
    assert os.path.exists(sock_path)  # left behind: nobody removed it
    proc = run(own_bundle, "-c", "import os; print(os.getppid())")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert int(proc.stdout) != first and running(int(proc.stdout))


def test_server_sigkilled_during_a_run(own_bundle):
    """Guards against a client hanging when its server dies, and against the run dying with it
    (PR_SET_PDEATHSIG did that): the run goes on, its client follows it, and reports its end
    (here a SIGKILL from outside) at once. (tests/test_outlive.py compares exits with python.)"""
    proc, child = start_sleeper(own_bundle)
    server = psutil.Process(child).ppid()
    os.kill(server, signal.SIGKILL)
    wait_until(lambda: gone(server), 10, "the server to die")
    time.sleep(0.2)
    assert running(child) and proc.poll() is None
    os.kill(child, signal.SIGKILL)
    killed = time.monotonic()
    try:
        out, err = proc.communicate(timeout=10)  # a hang fails here
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("client still running after its run was killed") from None
    client_took = time.monotonic() - killed
    assert (proc.returncode, out, err) == (-signal.SIGKILL, "", "")
    print(f"\nserver SIGKILLed, then its run: client exited {client_took * 1000:.0f} ms after "
          f"the run")  # fmt: skip
    again = run(own_bundle, "-c", "import os; print(os.getppid())")
    assert (again.returncode, again.stderr) == (0, "") and int(again.stdout) != server


def test_socket_file_deleted(own_bundle):
    """Guards against a live server whose socket file was deleted (tmp cleaners, rm -rf of the
    runtime directory): it held its lock, so the next run's new server could not start and that
    run waited for minutes. The old server must retire and the next run get a new one."""
    first = served_by(own_bundle)
    os.unlink(socket_path(own_bundle))
    proc = run(own_bundle, "-c", "import os; print(os.getppid())")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert int(proc.stdout) != first
    wait_until(lambda: gone(first), 10, "the server without a socket to retire")


def test_runtime_dir_removed_under_a_running_server(private_env, tmp_path):
    """Guards against the same after the whole runtime directory is removed: the next run makes
    a new private directory and a new server; a run in progress is not disturbed."""
    bundle = make_bundle(tmp_path / "python-rm.bin", "json")
    first = int(run(bundle, "-c", "import os; print(os.getppid())", env=private_env).stdout)
    proc, child = start_sleeper(bundle, env=private_env)
    shutil.rmtree(os.path.join(private_env["XDG_RUNTIME_DIR"], "py-preload"))
    again = run(bundle, "-c", "import os; print(os.getppid())", env=private_env)
    assert (again.returncode, again.stderr) == (0, "") and int(again.stdout) != first
    assert running(child) and proc.poll() is None  # the old server lets its child finish
    proc.kill()
    proc.communicate(timeout=RUN_TIMEOUT)
    wait_until(lambda: gone(first), 10, "the old server to retire")
    runtime = os.path.join(private_env["XDG_RUNTIME_DIR"], "py-preload")
    assert os.stat(runtime).st_mode & 0o777 == 0o700
    # The retiring server removes only its own files: its successor stays listed (and stoppable).
    infos = [name for name in os.listdir(runtime) if name.endswith(".json")]
    assert len(infos) == 1, infos
    with open(os.path.join(runtime, infos[0])) as f:
        assert json.load(f)["pid"] == int(again.stdout)


CODE = "import sys; print('out', sys.argv[1:]); print('err', file=sys.stderr); sys.exit(4)"


def test_runtime_dir_missing(private_env, tmp_path):
    """Guards against a crash or a hang when XDG_RUNTIME_DIR does not exist: one warning, then
    python's own result."""
    bundle = make_bundle(tmp_path / "python-missing.bin", "json")
    private_env["XDG_RUNTIME_DIR"] = str(tmp_path / "no" / "such" / "dir")
    via = run(bundle, "-c", CODE, "a", env=private_env)
    assert_cold_like_python(via, plain("-c", CODE, "a"), "runtime directory unusable")
    assert not os.path.exists(private_env["XDG_RUNTIME_DIR"])


@pytest.mark.parametrize("how", ["other-owner", "symlink", "not-a-directory"])
def test_runtime_dir_not_ours_is_refused(private_env, tmp_path, how):
    """Guards against using (or following) a runtime directory another user could control: a
    directory of another uid, a symlink (even to a directory of ours), a plain file. The run
    goes cold with one warning and nothing is created in or through it."""
    bundle = make_bundle(tmp_path / "python-refuse.bin", "json")
    runtime = os.path.join(private_env["XDG_RUNTIME_DIR"], "py-preload")
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    if how == "other-owner":
        os.mkdir(runtime, 0o700)
        os.chown(runtime, OTHER_UID, OTHER_UID)
        target = runtime
    elif how == "symlink":
        os.symlink(target, runtime)
    else:
        open(runtime, "w").close()
    via = run(bundle, "-c", CODE, "b", env=private_env)
    assert_cold_like_python(via, plain("-c", CODE, "b"), "runtime directory unusable", runtime)
    if how != "not-a-directory":
        assert os.listdir(target) == []


def test_runtime_dir_unwritable():
    """Guards against a traceback (PermissionError creating the spawn lock) when the runtime
    directory exists but cannot be written: the run must go cold like python."""
    other = OtherUser()
    os.chmod(os.path.join(other.runtime, "py-preload"), 0o500)
    via = other.run("-c", CODE, "c")
    assert_cold_like_python(via, other.plain("-c", CODE, "c"), "Permission denied")
    assert other.processes() == []


def test_fork_refused_by_the_server():
    """Guards against a server that dies (or a run that fails) when fork() fails with EAGAIN
    (RLIMIT_NPROC, a pids cgroup): that run is refused with a clear reason and runs cold, and
    the server keeps serving."""
    other = OtherUser()
    prlimit = ["prlimit", f"--nproc={other.tasks() + 2}"]  # the client and the server, no child
    via = other.run("-c", CODE, "d", prefix=prlimit)
    assert_cold_like_python(via, other.plain("-c", CODE, "d"), "cannot fork")
    (server,) = other.processes()
    # The server inherited the limit; this caller's hard limit is above it, which a child
    # without CAP_SYS_RESOURCE cannot take on: cold, silently, the reason in the server's log.
    again = other.run("-c", CODE, "d2")
    python = other.plain("-c", CODE, "d2")
    assert (again.returncode, again.stdout, again.stderr) == (
        python.returncode, python.stdout, python.stderr)
    st = json.loads(subprocess.run(
        [*AS_OTHER, PYTHON, "-m", "preloaded.cli", "status", "--json", other.bundle],
        capture_output=True, text=True, cwd=REPO, env=other.env, timeout=RUN_TIMEOUT,
        check=True).stdout)  # fmt: skip
    assert (st["pid"], st["runs"], st["children"]) == (server, 0, [])


def test_fork_refused_to_the_client():
    """Guards against a traceback when the client cannot even start the server (fork refused):
    the run must go cold like python."""
    other = OtherUser()
    prlimit = ["prlimit", f"--nproc={other.tasks() + 1}"]
    via = other.run("-c", CODE, "e", prefix=prlimit)
    assert_cold_like_python(via, other.plain("-c", CODE, "e"), "cannot start the server")
    assert other.processes() == []


@pytest.fixture
def module_dir_local(tmp_path, own_bundle):
    directory = tmp_path / "scriptmods"
    directory.mkdir()
    return own_bundle, directory


def test_script_importing_a_broken_module_fails_like_python(module_dir_local):
    """Guards against a module's import error inside the script being mistaken for a server
    failure (warning, cold retry, or a traceback with py-preload frames): same as python."""
    bundle, directory = module_dir_local
    (directory / "mine.py").write_text("raise ImportError('mine is broken')\n")
    script = directory / "use.py"
    script.write_text("print('before')\nimport mine\n")
    env = {**os.environ, "PYTHONPATH": str(directory)}
    via = run(bundle, str(script), env=env)
    python = plain(str(script), env=env)
    assert via.returncode == 1 and "mine is broken" in via.stderr
    assert (via.returncode, via.stdout, via.stderr) == (python.returncode, python.stdout,
                                                        python.stderr)  # fmt: skip


@pytest.mark.parametrize("how", ["disk-full", "logs-dir-is-a-file"])
def test_unusable_log_keeps_the_server_serving(private_env, tmp_path, how):
    """Guards against a server that crashes on its first log line when the log cannot be
    written (disk full: ENOSPC from /dev/full) or opened (a file where the logs directory
    should be), and against that going unreported: status shows it as a warning."""
    bundle = make_bundle(tmp_path / "python-log.bin", "json")
    log_path = paths_in(private_env, bundle)["log"]
    logs = os.path.dirname(log_path)
    os.makedirs(os.path.dirname(logs), exist_ok=True)
    if how == "disk-full":
        os.makedirs(logs)
        os.symlink("/dev/full", log_path)
    else:
        open(logs, "w").close()
    proc = run(bundle, "-c", CODE, "f", env=private_env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (4, "out ['f']\n", "err\n")
    st = json.loads(cli("status", "--json", bundle, env=private_env).stdout)
    expected_warning = "cannot write the log" if how == "disk-full" else "cannot open the log"
    warning = next(w for w in st["warnings"] if expected_warning in w)
    assert "Runs are not affected" in warning and "py-preload stop FILE" in warning
    assert expected_warning in cli("status", bundle, env=private_env).stdout
    with connect(st["socket"]) as sock:  # a bad request makes the server log once more
        send_with_fds(sock, struct.pack(">I", 5) + b"{bad}", 3)
        assert b"invalid JSON" in read_all(sock)
    again = run(bundle, "-c", "import os; print(os.getppid())", env=private_env)
    assert (again.returncode, again.stderr, int(again.stdout)) == (0, "", st["pid"])


# -- other users ---------------------------------------------------------------------------------


class OtherUser:
    """A bundle and private directories usable by OTHER_UID, which runs commands via setpriv."""

    def __init__(self) -> None:
        if os.getuid() != 0 or not shutil.which("setpriv") or not shutil.which("prlimit"):
            pytest.skip("needs root, setpriv and prlimit to act as another user")
        self.base = tempfile.mkdtemp(prefix="py-preload-other-")
        os.chmod(self.base, 0o755)
        OtherUser.made.append(self)
        self.bundle = make_bundle(os.path.join(self.base, "python-other.bin"), "json")
        self.runtime = os.path.join(self.base, "run")
        self.env = {**os.environ, "XDG_RUNTIME_DIR": self.runtime, "HOME": self.base,
                    "XDG_CACHE_HOME": os.path.join(self.base, "cache")}  # fmt: skip
        for path in (self.runtime, os.path.join(self.runtime, "py-preload")):
            os.mkdir(path, 0o700)
            os.chown(path, OTHER_UID, OTHER_UID)
        probe = subprocess.run([*AS_OTHER, PYTHON, "-c", "pass"], capture_output=True,
                               timeout=RUN_TIMEOUT)  # fmt: skip
        if probe.returncode != 0:
            pytest.skip(f"cannot run python as uid {OTHER_UID}: {probe.stderr[-200:]!r}")

    made: list = []

    def run(self, *args: str, prefix=()) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, *AS_OTHER, self.bundle, *args], capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, env=self.env,
                              timeout=RUN_TIMEOUT)  # fmt: skip

    def plain(self, *args: str) -> subprocess.CompletedProcess:
        return plain(*args, env=self.env, prefix=AS_OTHER)

    def processes(self) -> list:
        """Live (not zombie) processes of OTHER_UID."""
        return [p.pid for p in psutil.process_iter(["uids"])
                if p.info["uids"] and p.info["uids"].real == OTHER_UID and running(p.pid)]

    def tasks(self) -> int:
        """Tasks (threads, zombies) counted against OTHER_UID's RLIMIT_NPROC."""
        count = 0
        for proc in psutil.process_iter(["uids", "num_threads"]):
            if proc.info["uids"] and proc.info["uids"].real == OTHER_UID:
                count += proc.info["num_threads"] or 1
        return count

    def cleanup(self) -> None:
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(autouse=True)
def _cleanup_other_users():
    yield
    while OtherUser.made:
        OtherUser.made.pop().cleanup()


def test_client_of_another_uid_is_refused():
    """Guards against a server that runs code for any local user who can reach its socket
    (Nailgun's hole): a real client running as another uid, given a path to the socket, is
    refused (SO_PEERCRED), runs cold as itself, and no child of the server runs for it."""
    other = OtherUser()
    env = {**os.environ, "XDG_RUNTIME_DIR": os.path.join(other.base, "rootrun")}
    os.mkdir(env["XDG_RUNTIME_DIR"], 0o700)
    try:
        proc = subprocess.run([other.bundle, "-c", "pass"], env=env, timeout=RUN_TIMEOUT)
        assert proc.returncode == 0
        st = json.loads(cli("status", "--json", other.bundle, env=env).stdout)
        # Make root's socket reachable, for this test only: traversable dirs, a 0666 socket,
        # and a link to it where the other user's client looks for its own server.
        os.chmod(env["XDG_RUNTIME_DIR"], 0o711)
        os.chmod(os.path.dirname(st["socket"]), 0o711)
        os.chmod(st["socket"], 0o666)
        os.symlink(st["socket"], os.path.join(other.runtime, "py-preload",
                                              os.path.basename(st["socket"])))  # fmt: skip
        code = "import os; print(os.getuid(), os.getppid() != %d)" % st["pid"]
        via = other.run("-c", code)
        assert_cold_like_python(via, other.plain("-c", code), "another user refused")
        assert via.stdout == f"{OTHER_UID} True\n"
        after = json.loads(cli("status", "--json", other.bundle, env=env).stdout)
        assert after["runs"] == st["runs"] and after["pid"] == st["pid"]
        assert "refused a connection from another user" in cli(
            "logs", other.bundle, env=env).stdout  # fmt: skip
    finally:
        cli("stop", other.bundle, check=False, env=env)


def test_peer_check_unit():
    """Guards the SO_PEERCRED check itself: our own uid passes, another uid does not."""
    from preloaded.server.loop import _peer_is_us

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert _peer_is_us(a)
    if os.getuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to connect as another user")
    directory = tempfile.mkdtemp(prefix="py-preload-peer-")
    try:
        os.chmod(directory, 0o777)
        path = os.path.join(directory, "s")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(path)
            os.chmod(path, 0o666)
            listener.listen(1)
            connect_code = ("import socket, sys; s = socket.socket(socket.AF_UNIX); "
                            "s.connect(sys.argv[1]); s.recv(1)")  # fmt: skip
            proc = subprocess.Popen([*AS_OTHER, PYTHON, "-c", connect_code, path])
            try:
                listener.settimeout(RUN_TIMEOUT)
                conn, _ = listener.accept()
                with conn:
                    assert not _peer_is_us(conn)
            finally:
                proc.kill()
                proc.wait(RUN_TIMEOUT)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- 3. hostile input on the socket --------------------------------------------------------------


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A server to attack, and a check that it is unharmed: same pid, same fds, correct runs."""
    path = make_bundle(tmp_path_factory.mktemp("target") / "python-target.bin", "json")
    pid = served_by(path)
    # Counted once settled: the server closes the run's connection just after its reply, so a
    # count taken at once can include it (seen under load: every case then "leaked" one fd).
    baseline = server_fds_and_rss(pid)[0]

    def unharmed() -> None:
        wait_until(lambda: psutil.Process(pid).num_fds() == baseline, 15,
                   "the server's fd count to return to its baseline")  # fmt: skip
        proc = run(path, "-c", CODE, "ok")
        assert (proc.returncode, proc.stdout, proc.stderr) == (4, "out ['ok']\n", "err\n")
        assert served_by(path) == pid
        wait_idle(pid)

    yield path, status(path)["socket"], unharmed
    stop(path)


HOSTILE = {
    "one fd": (frame(GOOD), 1, "got 1"),
    "two fds": (frame(GOOD), 2, "got 2"),
    "oversized frame with its body": (struct.pack(">I", (1 << 20) + 1) + b"x" * 65536, 3,
                                      "exceeds"),
    "deeply nested JSON": (struct.pack(">I", 200000) + b"[" * 100000 + b"]" * 100000, 0,
                           "invalid JSON"),
    "huge environment": (frame({**GOOD, "env": {"X": "y" * 900000}}), 3, None),
    "NUL in argv": (frame({**GOOD, "argv": ["-c\0"]}), 3, "NUL"),
    "umask out of range": (frame({**GOOD, "umask": 4096}), 3, "umask"),
    "bool as umask": (frame({**GOOD, "umask": True}), 3, "umask"),
    "signal number 999 ignored": (frame({**GOOD, "ignored": [999]}), 3, "ignored"),
    "frame after the request": (frame(GOOD)[:-1] + b"}" + frame({"signal": 9}), 3, None),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_frame(target, case):
    """Guards against a server that dies, leaks the fds it was sent, or stops serving after a
    malformed request (beyond the cases in test_server.py)."""
    bundle, sock_path, unharmed = target
    data, nfds, message = HOSTILE[case]
    with connect(sock_path) as sock:
        try:
            send_with_fds(sock, data[:60000], nfds)
            sock.sendall(data[60000:])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and hang up before it read everything
        reply = read_all(sock)
    frames = []
    while len(reply) >= 4:
        (size,) = struct.unpack(">I", reply[:4])
        frames.append(json.loads(reply[4 : 4 + size]))
        reply = reply[4 + size :]
    if message is None:  # a valid run: started, then its exit status (fds were /dev/null)
        assert "started" in frames[0] and frames[-1] == {"exit": 0}, frames
    else:
        assert len(frames) == 1 and message in frames[0]["error"], frames
    unharmed()


def test_truncated_frames_holding_fds(target):
    """Guards against fds that arrived with a frame that never completes staying open in the
    server after the client hangs up (one leaked fd per such connection)."""
    _bundle, sock_path, unharmed = target
    for cut in (1, 3, 4, 50, len(frame(GOOD)) - 1):
        with connect(sock_path) as sock:
            send_with_fds(sock, frame(GOOD)[:cut], 3)
            sock.shutdown(socket.SHUT_WR)
            assert read_all(sock) == b""
    unharmed()


def test_silent_client_is_dropped(target):
    """Guards against a client that connects and never sends holding a server fd forever (a
    few thousand of them would exhaust the server's descriptors)."""
    from preloaded.server.request import FIRST_FRAME_TIMEOUT

    _bundle, sock_path, unharmed = target
    started = time.monotonic()
    with connect(sock_path) as silent:
        silent.settimeout(FIRST_FRAME_TIMEOUT + 10)
        assert silent.recv(1) == b""  # the server hung up on us
    assert time.monotonic() - started >= FIRST_FRAME_TIMEOUT - 1
    unharmed()


def test_1000_connections_opened_and_dropped(target):
    """Guards against fd or memory leaks and a wedged accept loop when many clients connect and
    vanish (some after a partial frame, some with fds attached)."""
    _bundle, sock_path, unharmed = target
    for batch in range(10):
        socks = []
        for i in range(100):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            # Blocking, as the real client is (a full backlog makes it wait, not fail), but
            # with a deadline: SO_SNDTIMEO bounds the wait of connect(2) on a Unix socket.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 15, 0))
            sock.connect(sock_path)
            if i % 3 == 1:
                sock.sendall(frame(GOOD)[:7])
            elif i % 3 == 2:
                send_with_fds(sock, frame(GOOD)[:30], 3)
            socks.append(sock)
        for sock in socks:
            sock.close()
    unharmed()


def _mutations():
    scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.text(max_size=20),
                       st.floats(allow_nan=False))  # fmt: skip
    value = st.recursive(scalar, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
        max_leaves=10)  # fmt: skip
    keys = st.sampled_from(sorted(GOOD) + ["extra", "cmd", "signal"])
    changed = st.fixed_dictionaries({}, optional={k: value for k in sorted(GOOD)})
    mutated = st.builds(lambda drop, change, add: {
        **{k: v for k, v in GOOD.items() if k not in drop}, **change, **add},
        st.sets(keys, max_size=3), changed, st.dictionaries(keys, value, max_size=2))
    # {"cmd": "stop"} is a legitimate command of the server's own user: not an attack.
    as_frame = mutated.filter(lambda d: d.get("cmd") != "stop").map(frame)
    raw = st.binary(max_size=200)
    framed_raw = raw.map(lambda b: struct.pack(">I", len(b)) + b)
    return st.tuples(st.one_of(as_frame, raw, framed_raw), st.integers(0, 5))


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])  # fmt: skip
@given(case=_mutations())
def test_fuzz_request_frames(target, case):
    """Guards against any request frame (mutated valid requests, random bytes, random fd
    counts) killing the server, hanging it, or leaving fds behind; whatever it sent, the client
    gets either an error frame or a real run with an exit status."""
    data, nfds = case
    _bundle, sock_path, _unharmed = target
    with connect(sock_path) as sock:
        if data:
            send_with_fds(sock, data, nfds)
        sock.shutdown(socket.SHUT_WR)
        reply = read_all(sock)
    while len(reply) >= 4:
        (size,) = struct.unpack(">I", reply[:4])
        body = json.loads(reply[4 : 4 + size])
        assert isinstance(body, dict) and set(body) & {"error", "started", "exit", "signal",
                                                       "pid", "stopping"}, body  # fmt: skip
        assert "stopping" not in body
        reply = reply[4 + size :]
    assert reply == b""


def test_fuzz_left_the_server_unharmed(target):
    """Runs after the fuzz test: the same server, its fds back to their count, a correct run."""
    target[2]()


# -- 4. terminal safety --------------------------------------------------------------------------

@pytest.mark.parametrize("how, status", [
    ("SIGTERM-child", 128 + 15), ("SIGHUP-child", 128 + 1), ("SIGKILL-server", 128 + 15),
])  # fmt: skip
def test_terminal_unchanged_after_a_killed_run(spawn, tmp_path, how, status):
    """Guards against a terminal left in raw mode (Zeus's "screws up my terminal") when the
    run's child is killed by SIGTERM or SIGHUP from outside, or its server is SIGKILLed while
    the relay holds the terminal raw. (Crash, SIGKILL of the child and signals to the client
    are in test_pty.py.)"""
    bundle = make_bundle(tmp_path / "python-tty.bin", "json")
    script = _script(tmp_path, "raw.py", RAW_SCRIPT)
    shell = f"stty -g; echo START; {bundle} {script} x; echo rc=$?; stty -g"
    try:
        child = spawn("bash", ["--norc", "--noprofile", "-c", shell])
        child.expect(r"(\S+)\r\nSTART\r\n")
        before = child.match.group(1)
        child.expect(r"pid (\d+) raw")
        pid = int(child.match.group(1))
        if how == "SIGKILL-server":  # the run outlives it, then is killed: restored after
            server = psutil.Process(pid).ppid()
            os.kill(server, signal.SIGKILL)
            wait_until(lambda: gone(server), 10, "the server to die")
            os.kill(pid, signal.SIGTERM)
        else:
            os.kill(pid, getattr(signal, how.split("-")[0]))
        child.expect(r"rc=(\d+)\r\n(\S+)\r\n")
        assert int(child.match.group(1)) == status
        assert child.match.group(2) == before
        assert _finish(child) == (0, None)
        wait_until(lambda: gone(pid), 10, "the run's child to end")
    finally:
        stop(bundle)


# -- 5. never worse than python ------------------------------------------------------------------


def test_server_killed_while_starting_runs_cold_like_python(private_env, tmp_path):
    """Guards against a run that fails or hangs where python works when the server dies while
    it starts (here: SIGKILLed while importing, as the OOM killer would), leaving no failure
    note behind. Other ways a server cannot start (a failing preload, an unusable runtime
    directory, fork refused) are tested above and in test_server.py."""
    directory = tmp_path / "mods"
    directory.mkdir()
    (directory / "killme.py").write_text("import os, signal\nos.kill(os.getpid(), 9)\n")
    out = str(tmp_path / "python-killme.bin")
    cli("bundle", "killme", "-o", out, env={**private_env, "PYTHONPATH": str(directory)})
    via = run(out, "-c", CODE, "g", env=private_env)
    assert_cold_like_python(via, plain("-c", CODE, "g"), "the server failed to start")

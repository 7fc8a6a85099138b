"""The server as a process: one per bundle, status/stop/list/logs, staleness, bad input, failures.

Real servers, real sockets, every wait with a deadline. Each test that counts or stops servers
makes its own bundle, so that tests do not see each other's servers.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import subprocess
import sys
import time

import psutil
import pytest

from conftest import PYTHON, cli, make_bundle

RUN_TIMEOUT = 60
PRINT_PPID = "import os; print(os.getppid())"


def run(bundle: str, *args: str, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run([bundle, *args], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, **kw)  # fmt: skip


def served_by(bundle: str) -> int:
    """Run once; return the pid of the process that forked the child (the server)."""
    proc = run(bundle, "-c", PRINT_PPID)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return int(proc.stdout)


def status(bundle: str) -> dict:
    proc = cli("status", "--json", bundle)
    return json.loads(proc.stdout)


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def server_processes(bundle: str) -> list:
    """Live server processes of ``bundle``, found by their command line (their children, the
    parked standby among them, and their parent, the keeper, have the same one: they are left
    out)."""
    found = {}
    for proc in psutil.process_iter(["cmdline", "ppid", "name"]):
        cmdline = proc.info["cmdline"] or []
        if (any("preloaded.server." in a for a in cmdline) and any(bundle in a for a in cmdline)
                and proc.info["name"] != "py-preload-keep"):
            found[proc.pid] = proc.info["ppid"]
    return sorted(pid for pid, ppid in found.items() if ppid not in found)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def log_text(bundle: str) -> str:
    return cli("logs", "-n", "10000", bundle).stdout


def stop(bundle: str) -> None:
    cli("stop", bundle, check=False)


@pytest.fixture
def fresh_bundle(tmp_path):
    path = make_bundle(tmp_path / "python-fresh.bin", "json", "decimal")
    yield path
    stop(path)


def bundle_from(directory, *modules, idle_timeout=600) -> str:
    """A bundle of modules that are importable only through PYTHONPATH at bundle time."""
    out = os.path.join(os.path.dirname(directory), f"python-{modules[0]}.bin")
    env = {**os.environ, "PYTHONPATH": str(directory)}
    cli("bundle", *modules, "-o", out, "--idle-timeout", str(idle_timeout), env=env)
    return out


# -- one server per bundle ---------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 20])
def test_concurrent_first_runs_start_one_server(fresh_bundle, n):
    procs = [subprocess.Popen([fresh_bundle, "-c", PRINT_PPID], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(n)]  # fmt: skip
    outputs = [p.communicate(timeout=RUN_TIMEOUT) for p in procs]
    assert [p.returncode for p in procs] == [0] * n, outputs
    assert all(err == "" for _, err in outputs), outputs
    parents = {int(out) for out, _ in outputs}
    assert len(parents) == 1
    assert server_processes(fresh_bundle) == list(parents)
    assert log_text(fresh_bundle).count(": importing json, decimal") == 1


def test_status_json(fresh_bundle, tmp_path):
    server = served_by(fresh_bundle)
    script = tmp_path / "wait.py"
    script.write_text("import os, sys\nprint(os.getpid(), flush=True)\nsys.stdin.readline()\n")
    child = subprocess.Popen([fresh_bundle, str(script)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        child_pid = int(child.stdout.readline())
        st = status(fresh_bundle)
    finally:
        child.communicate("\n", timeout=RUN_TIMEOUT)
    assert st["pid"] == server
    assert st["modules"] == ["json", "decimal"]
    assert st["runs"] == 2 and st["children"] == [child_pid]
    assert 0 <= st["uptime"] < 600
    assert st["warnings"] == [] and st["stale"] is None
    mem = st["memory"]["server"]
    assert mem["rss"] > 1 << 20 and 0 < mem["pss"] <= mem["rss"]
    assert os.path.samefile(st["bundle"], fresh_bundle)
    assert stat.S_ISSOCK(os.stat(st["socket"]).st_mode)


def test_status_text(fresh_bundle):
    server = served_by(fresh_bundle)
    text = cli("status", fresh_bundle).stdout
    assert f"pid:       {server}" in text
    assert "json" in text and "decimal" in text and "RSS" in text and "PSS" in text
    assert "stale:     no" in text and "warning" not in text


def test_status_without_server(tmp_path):
    bundle = make_bundle(tmp_path / "python-idle.bin", "json")
    proc = cli("status", bundle, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "no server is running" in proc.stderr
    proc = cli("status", "--json", bundle, check=False)
    assert proc.returncode == 1 and "no server is running" in proc.stderr


def test_stop_then_next_run_starts_a_new_server(fresh_bundle):
    first = served_by(fresh_bundle)
    proc = cli("stop", fresh_bundle)
    assert "stopped 1 server(s)" in proc.stderr
    wait_until(lambda: gone(first), 10, "the stopped server to exit")
    assert cli("status", fresh_bundle, check=False).returncode == 1
    second = served_by(fresh_bundle)
    assert second != first
    assert cli("stop", fresh_bundle).returncode == 0
    assert cli("stop", fresh_bundle, check=False).returncode == 1  # nothing left to stop


def test_stop_all_and_list(tmp_path):
    bundles = [make_bundle(tmp_path / f"python-{i}.bin", "json") for i in range(2)]
    pids = [served_by(b) for b in bundles]
    listing = cli("list").stdout
    for bundle, pid in zip(bundles, pids):
        assert any(str(pid) in line and bundle in line for line in listing.splitlines())
    cli("stop", "--all")
    for pid in pids:
        wait_until(lambda: gone(pid), 10, f"server {pid} to exit")
    assert all(not server_processes(b) for b in bundles)
    assert "no servers running" in cli("list").stdout
    assert cli("stop", check=False).returncode == 2  # neither FILE nor --all: usage error


def test_logs(fresh_bundle):
    pid = served_by(fresh_bundle)
    text = log_text(fresh_bundle)
    assert f"server {pid} for" in text and "serving on" in text
    assert cli("logs", "-n", "1", fresh_bundle).stdout.count("\n") == 1


# -- staleness ---------------------------------------------------------------------------------


def test_edited_preloaded_module_makes_a_new_server(module_dir):
    source = module_dir / "ppmod.py"
    source.write_text("VALUE = 1\n")
    bundle = bundle_from(module_dir, "ppmod")
    code = "import os, ppmod; print(ppmod.VALUE, os.getppid())"
    # Python finds ppmod only through PYTHONPATH (a run without it goes cold: ModuleNotFound).
    env = {**os.environ, "PYTHONPATH": str(module_dir)}
    try:
        first = run(bundle, "-c", code, env=env)
        assert first.stdout.split()[0] == "1", first.stderr
        source.write_text("VALUE = 222\n")  # another size: the .pyc cannot pass for it
        second = run(bundle, "-c", code, env=env)
        assert second.stderr == ""
        assert second.stdout.split()[0] == "222"
        assert second.stdout.split()[1] != first.stdout.split()[1]
        assert "ppmod.py changed" in log_text(bundle)
        # A new file in a directory of the server's sys.path (an installed package) also counts.
        (module_dir / "newpkg.py").write_text("")
        third = run(bundle, "-c", code, env=env)
        assert third.stderr == "" and third.stdout.split()[1] != second.stdout.split()[1]
        fourth = run(bundle, "-c", code, env=env)
        assert fourth.stdout == third.stdout
    finally:
        stop(bundle)


def test_new_file_in_py_preloads_own_checkout_is_no_change(tmp_path, monkeypatch):
    """Guards against every server going stale when a file appears in the directory that only
    serves to find py-preload itself (a source checkout's root, where editors and tools write
    files all the time), while a directory of the path that a child also sees still counts."""
    from preloaded.server.staleness import Stamps

    own, other = tmp_path / "checkout", tmp_path / "site"
    own.mkdir()
    other.mkdir()
    monkeypatch.setattr(sys, "path", [str(own), str(other), *sys.path])
    stamps = Stamps.collect(__file__, sys.executable, own=(str(own),))
    (own / "notes.txt").write_text("")
    assert stamps.changed() is None
    (other / "newpkg.py").write_text("")
    assert stamps.changed() == f"{other} changed"


# -- bad input on the socket -------------------------------------------------------------------


GOOD = {"v": 1, "mode": "code", "target": "print(1)", "argv": ["-c"], "orig_argv": [PYTHON],
        "cwd": "/", "env": {}, "umask": 0o22, "stdio": ["pipe", "pipe", "pipe"], "ignored": [],
        "flags": {"u": False, "B": False, "i": False, "q": False, "W": []}}  # fmt: skip


def frame(obj) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


def send_with_fds(sock, data: bytes, nfds: int) -> None:
    fds = [os.open(os.devnull, os.O_RDWR) for _ in range(nfds)]
    try:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{nfds}i", *fds))]
        sock.sendmsg([data], anc if fds else [])
    finally:
        for fd in fds:
            os.close(fd)


def read_all(sock) -> bytes:
    """Everything until the server closes (a reset counts as closed)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def connect(path: str):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(15)  # the server drops a silent client after 10 s; no test waits that long
    sock.connect(path)
    return sock


BAD = {
    "invalid JSON": (struct.pack(">I", 5) + b"{bad}", 3, "invalid JSON"),
    "oversized length": (struct.pack(">I", 1 << 30), 3, "exceeds"),
    "wrong version": (frame({**GOOD, "v": 2}), 3, "version"),
    "unknown field": (frame({**GOOD, "extra": 1}), 3, "unknown field"),
    "missing field": (frame({k: v for k, v in GOOD.items() if k != "env"}), 3, "missing"),
    "wrong type": (frame({**GOOD, "argv": "-c"}), 3, "argv"),
    "not an object": (frame([1, 2]), 3, "not an object"),
    "not UTF-8": (struct.pack(">I", 2) + b"\xff\xfe", 3, "UTF-8"),
    "four fds": (frame(GOOD), 4, "got 4"),
    "too many fds": (frame(GOOD), 6, "expected 3 file descriptors, got 6"),
    "fds not listed": (frame({**GOOD, "fds": [3, 4]}), 4, "expected 5 file descriptors, got 4"),
    "fds at stdio": (frame({**GOOD, "fds": [2]}), 4, "fds must list descriptor numbers above 2"),
    "fds twice": (frame({**GOOD, "fds": [7, 7]}), 5, "fds lists a descriptor twice"),
    "zero fds": (frame(GOOD), 0, "got 0"),
}


@pytest.fixture(scope="module")
def probe_bundle(tmp_path_factory):
    path = make_bundle(tmp_path_factory.mktemp("probe") / "python-probe.bin", "json")
    served_by(path)
    yield path
    stop(path)


def server_fds(pid: int, expected=None) -> int:
    """The server's open fds once the connection of the last command is closed: the client
    can get its reply a moment before the server closes its end (a loaded machine shows it)."""
    proc = psutil.Process(pid)
    if expected is None:  # connections only close meanwhile: the lowest count is the settled one
        counts = []
        for _ in range(5):
            counts.append(proc.num_fds())
            time.sleep(0.02)
        return min(counts)
    deadline = time.monotonic() + 5
    while proc.num_fds() != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return proc.num_fds()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_gets_an_error_and_the_server_lives(probe_bundle, case):
    data, nfds, message = BAD[case]
    st = status(probe_bundle)
    fds_before = server_fds(st["pid"])
    with connect(st["socket"]) as sock:
        send_with_fds(sock, data, nfds)
        reply = read_all(sock)
    (size,) = struct.unpack(">I", reply[:4])
    assert len(reply) == 4 + size
    assert message in json.loads(reply[4:])["error"]
    assert served_by(probe_bundle) == st["pid"]
    assert server_fds(st["pid"], fds_before) == fds_before  # received fds were closed


def test_truncated_frames_then_close(probe_bundle):
    st = status(probe_bundle)
    fds_before = server_fds(st["pid"])
    for data in (frame(GOOD)[:10], b"\x00\x00", b""):
        with connect(st["socket"]) as sock:
            send_with_fds(sock, data, 3 if data else 0)
            sock.shutdown(socket.SHUT_WR)
            assert read_all(sock) == b""  # nothing to answer: the connection just closes
    assert served_by(probe_bundle) == st["pid"]
    assert server_fds(st["pid"], fds_before) == fds_before


def test_silent_clients_do_not_block_runs(probe_bundle):
    st = status(probe_bundle)
    silent = connect(st["socket"])
    partial = connect(st["socket"])
    partial.sendall(frame(GOOD)[:20])
    try:
        started = time.monotonic()
        assert served_by(probe_bundle) == st["pid"]
        assert served_by(probe_bundle) == st["pid"]
        assert time.monotonic() - started < 5
    finally:
        silent.close()
        partial.close()


def test_control_frame_unknown_command(probe_bundle):
    st = status(probe_bundle)
    with connect(st["socket"]) as sock:
        sock.sendall(frame({"v": 1, "cmd": "explode"}))
        reply = read_all(sock)
    assert "unknown command" in json.loads(reply[4:])["error"]
    assert served_by(probe_bundle) == st["pid"]


# -- lifetime and failures ---------------------------------------------------------------------


def test_idle_timeout(tmp_path):
    bundle = make_bundle(tmp_path / "python-idle.bin", "json", idle_timeout=2)
    pid = served_by(bundle)
    started = time.monotonic()
    wait_until(lambda: gone(pid), 10, "the idle server to exit")
    assert 1.5 <= time.monotonic() - started <= 6
    assert "idle for 2 s: exiting" in log_text(bundle)
    assert not os.path.exists(socket_path(bundle))


def socket_path(bundle: str) -> str:
    from preloaded.paths import Paths

    return Paths(bundle).socket


def cold_equivalent(bundle: str, code: str, python_env=None):
    """(warm-or-fallback run, plain python run) of ``-c code``."""
    via = run(bundle, "-c", code)
    plain = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True,
                           timeout=RUN_TIMEOUT, env=python_env)  # fmt: skip
    return via, plain


def assert_fell_back(via, plain, *fragments) -> None:
    warning, _, rest = via.stderr.partition("\n")
    assert warning.startswith("py-preload: ") and warning.endswith("running without the server")
    for fragment in fragments:
        assert fragment in warning
    assert (via.returncode, via.stdout, rest) == (plain.returncode, plain.stdout, plain.stderr)


def test_failing_import_falls_back_cold(module_dir):
    (module_dir / "brokenmod.py").write_text("raise RuntimeError('broken at import')\n")
    bundle = bundle_from(module_dir, "brokenmod")
    code = "import sys; print('hello', sys.argv); sys.exit(3)"
    via, plain = cold_equivalent(bundle, code)
    assert_fell_back(via, plain, "brokenmod", "RuntimeError: broken at import")
    assert plain.returncode == 3 and not server_processes(bundle)
    again = run(bundle, "-c", code)  # within the back-off: cold at once, same warning
    assert again.stderr == via.stderr and again.stdout == via.stdout


def test_module_starting_a_thread_is_warned_about(module_dir):
    (module_dir / "threadmod.py").write_text(
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n"
    )
    bundle = bundle_from(module_dir, "threadmod")
    try:
        assert served_by(bundle)
        st = status(bundle)
        assert len(st["warnings"]) == 1 and "threadmod started 1 thread" in st["warnings"][0]
        assert "warning:   importing threadmod" in cli("status", bundle).stdout
    finally:
        stop(bundle)


def test_module_initialising_cuda_is_refused(module_dir):
    # Only this server imports it, and that server refuses to serve: the fake torch (whose
    # CUDA claims to be initialised) never reaches a process that could use the real one.
    (module_dir / "fakecuda.py").write_text(
        "import sys, types\n"
        "torch = types.ModuleType('torch')\n"
        "torch.cuda = types.SimpleNamespace(is_initialized=lambda: True)\n"
        "sys.modules['torch'] = torch\n"
    )
    bundle = bundle_from(module_dir, "fakecuda")
    via, plain = cold_equivalent(bundle, "print('cold is fine')")
    assert_fell_back(via, plain, "importing fakecuda initialised CUDA")
    assert not server_processes(bundle)


# -- bundle ------------------------------------------------------------------------------------


def test_bundle_missing_module(tmp_path):
    out = tmp_path / "python-missing.bin"
    proc = cli("bundle", "json", "no_such_module_xyz", "-o", str(out), check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "no_such_module_xyz" in proc.stderr
    assert not out.exists() and os.listdir(tmp_path) == []


def test_bundle_file(tmp_path):
    bundle = make_bundle(tmp_path / "python-b.bin", "json", client="python")
    mode = os.stat(bundle).st_mode
    assert mode & stat.S_IXUSR and mode & stat.S_IRUSR
    with open(bundle, encoding="utf-8") as f:
        shebang = f.readline().rstrip("\n")
    assert shebang.startswith("#!/") and shebang.endswith(" -SI")
    interpreter = shebang[2:].split()[0]
    with open(os.path.realpath(interpreter), "rb") as f:
        assert f.read(4) == b"\x7fELF"  # a real binary, not a shim script
    assert os.path.samefile(interpreter, sys.executable)

"""A warm run is the caller's process: limits, nice, affinity, cgroup, privilege, thread counts.

Each case runs the same probe with the bundle's python and with the starter, under the same
wrapper (prlimit, nice, taskset, setpriv, capsh, unshare, a cgroup, a seccomp filter), the
server having been started by a plain caller first, and compares what the probe prints. A case
the issue lets go cold must be cold (the server's run count unchanged) with its reason in the
server's log; every other case must be warm (served by the server) and print the same.
Run as root: the wrappers need it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid

import pytest

from conftest import PYTHON, REPO, cli, make_bundle

TIMEOUT = 120
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the wrappers need root")

PROBE = r'''
import os, resource, sys
out = {}
for name in sorted(n for n in dir(resource) if n.startswith("RLIMIT_")):
    out[name] = resource.getrlimit(getattr(resource, name))
out["nice"] = os.nice(0)
out["affinity"] = sorted(os.sched_getaffinity(0))
out["policy"] = os.sched_getscheduler(0)
with open("/proc/self/status") as f:
    for line in f:
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
                   "NoNewPrivs", "Seccomp", "Seccomp_filters"):
            out[key] = value.strip()
out["cgroup"] = open("/proc/self/cgroup").read().split()
out["oom_score_adj"] = open("/proc/self/oom_score_adj").read().strip()
out["personality"] = open("/proc/self/personality").read().strip()
if os.uname().machine in ("x86_64", "aarch64"):
    import ctypes
    number = 252 if os.uname().machine == "x86_64" else 31
    out["ioprio"] = hex(ctypes.CDLL(None).syscall(number, 1, os.getpid()))
if "ns" in sys.argv[1:]:  # a wrapper that makes new namespaces makes new ones for each run
    out["ns"] = {n: os.readlink("/proc/self/ns/" + n) for n in sorted(os.listdir("/proc/self/ns"))}
if "torch" in sys.argv[1:]:
    import torch
    out["torch"] = (torch.get_num_threads(), torch.get_num_interop_threads())
if "numpy" in sys.argv[1:]:
    import ctypes, glob, numpy
    root = os.path.join(os.path.dirname(numpy.__file__), os.pardir, "numpy.libs")
    for lib in glob.glob(os.path.join(root, "*openblas*")):
        out["openblas"] = ctypes.CDLL(lib).scipy_openblas_get_num_threads64_()
for key, value in out.items():
    print(key, value)
'''

SECCOMP = r'''
"""Install an allow-everything seccomp filter (mode 2), then exec argv[1:]."""
import ctypes, os, struct, sys
insn = ctypes.create_string_buffer(struct.pack("HBBI", 0x06, 0, 0, 0x7FFF0000))  # RET ALLOW
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(22, 2, ctypes.byref(Prog(1, ctypes.addressof(insn))), 0, 0) != 0:
    sys.exit("seccomp: " + os.strerror(ctypes.get_errno()))
os.execvp(sys.argv[1], sys.argv[1:])
'''


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    path = tmp_path_factory.mktemp("probe") / "probe.py"
    path.write_text(PROBE)
    return str(path)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A light starter whose server a plain caller started (the widest context)."""
    path = make_bundle(tmp_path_factory.mktemp("ctx") / "python-ctx.bin", "json")
    assert run([path, "-c", "pass"]).returncode == 0
    yield path
    cli("stop", path, check=False)


def run(argv: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL, **kw)  # fmt: skip


def status(bundle: str) -> dict:
    return json.loads(cli("status", "--json", bundle).stdout)


def log_text(bundle: str) -> str:
    with open(status(bundle)["log"], encoding="utf-8", errors="replace") as f:
        return f.read()


def compare(bundle: str, probe: str, wrapper: list, *probe_args: str, warm=True,
            env=None) -> str:  # fmt: skip
    """Run the probe under ``wrapper`` with python and with the starter; both must print the
    same, and the starter's run must be warm (``warm``), cold, or either (None). Returns the
    output."""
    cold = run([*wrapper, PYTHON, probe, *probe_args], env=env)
    assert cold.returncode == 0, cold.stderr
    runs = status(bundle)["runs"]
    warm_run = run([*wrapper, bundle, probe, *probe_args], env=env)
    assert warm_run.returncode == 0, warm_run.stderr
    assert warm_run.stderr == ""  # a run that goes cold says nothing on the user's stderr
    assert warm_run.stdout == cold.stdout
    if warm is not None:
        assert status(bundle)["runs"] == runs + (1 if warm else 0), "warm" if warm else "cold"
    return cold.stdout


def narrow_server(tmp_path, name: str, wrapper: list) -> str:
    """A light starter whose server was started under ``wrapper`` (a narrower context)."""
    path = make_bundle(tmp_path / f"python-{name}.bin", "json")
    started = run([*wrapper, path, "-c", "pass"])
    assert started.returncode == 0, started.stderr
    return path


def needs(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


def test_resource_limits(bundle, probe):
    needs("prlimit")
    out = compare(bundle, probe, ["prlimit", "--nofile=100:200", "--core=1000:2000",
                                  f"--as={64 << 30}", "--stack=4000000:9000000"])  # fmt: skip
    assert "RLIMIT_NOFILE (100, 200)" in out and "RLIMIT_CORE (1000, 2000)" in out


def test_ulimit_n(bundle, probe):
    out = compare(bundle, probe, ["bash", "-c", 'ulimit -n 100; exec "$@"', "-"])
    assert "RLIMIT_NOFILE (100, 100)" in out


def test_nice(bundle, probe):
    assert "nice 10" in compare(bundle, probe, ["nice", "-n", "10"])


def test_affinity(bundle, probe):
    needs("taskset")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: taskset changes nothing")
    assert "affinity [0]" in compare(bundle, probe, ["taskset", "-c", "0"])


def test_oom_score_adj(bundle, probe):
    needs("choom")
    assert "oom_score_adj 500" in compare(bundle, probe, ["choom", "-n", "500", "--"])


@pytest.mark.parametrize("klass", ["3", "2 -n 7"])
def test_io_priority(bundle, probe, klass):
    needs("ionice")
    compare(bundle, probe, ["ionice", "-c", *klass.split()])


def test_personality_goes_cold(bundle, probe):
    """setarch -R (no ASLR): a fork keeps the server's address-space layout."""
    needs("setarch")
    out = compare(bundle, probe, ["setarch", "-R"], warm=False)
    assert "personality 00040000" in out
    assert "goes cold: personality 0x40000 differs" in log_text(bundle)


def test_supplementary_groups(bundle, probe):
    needs("setpriv")
    assert "Groups 5 6" in compare(bundle, probe, ["setpriv", "--groups", "5,6"])


def test_bounding_set_dropped_by_setpriv(bundle, probe):
    needs("setpriv")
    out = compare(bundle, probe, ["setpriv", "--bounding-set", "-net_raw,-sys_admin"])
    assert status_caps(out)["CapBnd"] & (1 << 13 | 1 << 21) == 0


def test_capabilities_dropped_by_capsh(bundle, probe):
    needs("capsh")
    # capsh runs its --shell with the arguments after "--"; the shell here is the interpreter.
    wrapper_py = ["capsh", "--drop=cap_net_raw,cap_sys_admin", f"--shell={PYTHON}", "--"]
    wrapper_st = ["capsh", "--drop=cap_net_raw,cap_sys_admin", f"--shell={bundle}", "--"]
    cold = run([*wrapper_py, probe])
    runs = status(bundle)["runs"]
    warm = run([*wrapper_st, probe])
    assert warm.returncode == 0 and warm.stderr == "", warm.stderr
    assert warm.stdout == cold.stdout
    assert status(bundle)["runs"] == runs + 1
    assert status_caps(cold.stdout)["CapBnd"] & (1 << 13) == 0


def test_no_new_privs_goes_cold(bundle, probe):
    """The child could set it, but not the Landlock domain a sandbox sets with it (not in /proc)."""
    needs("setpriv")
    assert "NoNewPrivs 1" in compare(bundle, probe, ["setpriv", "--no-new-privs"], warm=False)
    assert "goes cold: no_new_privs 1 differs from the server's 0" in log_text(bundle)


def test_root_with_less_than_its_bounding_set_goes_cold(bundle, probe):
    """SECBIT_NOROOT: root without capabilities after exec. Securebits are not in /proc: a warm
    child dropped to no capabilities would still regain them all in its own execs as root."""
    needs("capsh")
    out = compare(bundle, probe, ["capsh", "--secbits=1", "--shell=/usr/bin/env", "--"],
                  warm=False)  # fmt: skip
    assert "CapEff 0000000000000000" in out
    assert "a root caller with a permitted set narrower than its bounding set" in log_text(bundle)


def test_everything_at_once(bundle, probe):
    needs("setpriv", "prlimit", "taskset")
    wrapper = ["setpriv", "--groups", "5,6", "--bounding-set", "-net_raw", "--", "nice", "-n",
               "5", "taskset", "-c", "1", "prlimit", "--nofile=50:60", "choom", "-n", "300", "--"]
    out = compare(bundle, probe, wrapper)
    assert "nice 5" in out and "Groups 5 6" in out


def test_seccomp_filter_goes_cold(bundle, probe, tmp_path):
    helper = tmp_path / "seccomp_exec.py"
    helper.write_text(SECCOMP)
    out = compare(bundle, probe, [PYTHON, str(helper)], warm=False)
    assert "Seccomp 2" in out
    assert "goes cold: seccomp mode 2" in log_text(bundle)


@pytest.mark.parametrize("kind", ["--mount", "--net", "--user"])
def test_new_namespace_goes_cold(bundle, probe, kind):
    needs("unshare")
    wrapper = ["unshare", kind] + (["--map-root-user"] if kind == "--user" else [])
    if run([*wrapper, "true"]).returncode != 0:
        pytest.skip(f"unshare {kind} is not permitted here")
    compare(bundle, probe, wrapper, warm=False)
    name = kind.lstrip("-").replace("mount", "mnt")
    assert f"goes cold: {name} namespace" in log_text(bundle)


def test_higher_hard_limit_than_the_server(probe, tmp_path):
    """Warm only where the server may raise its hard limit (CAP_SYS_RESOURCE), else cold."""
    needs("prlimit")
    path = narrow_server(tmp_path, "limits", ["prlimit", "--nofile=100:200"])
    try:
        runs = status(path)["runs"]
        out = compare(path, probe, [], warm=None)
        assert "RLIMIT_NOFILE (100, 200)" not in out
        if status(path)["runs"] == runs:
            assert "goes cold: RLIMIT_NOFILE hard limit" in log_text(path)
    finally:
        cli("stop", path, check=False)


def test_lower_nice_than_the_server_without_cap_sys_nice(probe, tmp_path):
    needs("setpriv")
    narrow = ["setpriv", "--bounding-set", "-sys_nice", "--"]
    path = narrow_server(tmp_path, "nice", ["nice", "-n", "10", *narrow])
    try:
        assert "nice 0" in compare(path, probe, narrow, warm=False)
        assert "goes cold: nice 0 is below the server's 10" in log_text(path)
    finally:
        cli("stop", path, check=False)


def test_caller_with_more_privilege_than_the_server_goes_cold(probe, tmp_path):
    """A server started by a caller without cap_net_raw cannot serve a caller that has it."""
    needs("setpriv")
    path = narrow_server(tmp_path, "narrow", ["setpriv", "--bounding-set", "-net_raw"])
    try:
        compare(path, probe, [], warm=False)
        assert "the caller has capabilities the server lacks" in log_text(path)
    finally:
        cli("stop", path, check=False)


def test_what_only_the_child_finds_out_goes_cold(probe, tmp_path):
    """A cgroup the child may not join: the caller joined it while it could (cgroup.procs is
    0444, written with CAP_DAC_OVERRIDE), then dropped CAP_DAC_OVERRIDE, as had the server's
    first caller. The server does not predict file permissions; the child's write fails, it
    answers "cold" before the go, and the run goes cold instead of staying in the server's."""
    needs("setpriv")
    made = make_cgroups()
    if not made:
        pytest.skip("no writable cgroup hierarchy (cgroup2 or v1 pids) here")
    path = make_bundle(tmp_path / "python-cg.bin", "json")
    narrow = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    try:
        started = run([*narrow, path, "-c", "pass"])
        assert started.returncode == 0, started.stderr
        for directory in made:
            os.chmod(os.path.join(directory, "cgroup.procs"), 0o444)
        out = compare(path, probe, [incg_script(tmp_path), *narrow], warm=False,
                      env=dict(os.environ, CGDIRS=" ".join(made)))  # fmt: skip
        assert "/" + os.path.basename(made[0]) in out
        assert "the child could not take on the caller's context" in log_text(path)
    finally:
        cli("stop", path, check=False)
        remove_cgroups(made)


def incg_script(tmp_path) -> str:
    """A wrapper that moves itself into the cgroups named by $CGDIRS, then execs its args."""
    script = tmp_path / "incg.sh"
    script.write_text('#!/bin/sh\nfor d in $CGDIRS; do echo $$ > "$d/cgroup.procs" || exit 9\n'
                      'done\nexec "$@"\n')  # fmt: skip
    script.chmod(0o755)
    return str(script)


def remove_cgroups(made: list) -> None:
    for directory in made:
        for _attempt in range(50):  # the probe's processes leave it as they exit
            try:
                os.rmdir(directory)
                break
            except OSError:
                time.sleep(0.1)


HAND_OFF = r"""
import json, os, socket, sys, time
sys.path.insert(0, sys.argv[1])
from preloaded import wire
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[2])  # SO_PEERCRED: this process
connected = os.getpid()
if os.fork():
    os._exit(0)  # the process that connected is gone before its request comes
deadline = time.monotonic() + 30
while os.path.exists(f"/proc/{connected}") and time.monotonic() < deadline:
    time.sleep(0.01)  # until its parent reaped it: its pid is free for another process
request = {"v": 1, "mode": "code", "target": f"open({sys.argv[3]!r}, 'w').close()",
           "argv": ["-c"], "orig_argv": [sys.executable], "cwd": "/", "env": {}, "umask": 0o22,
           "flags": {"u": False, "B": False, "i": False, "q": False, "W": []},
           "stdio": ["pipe", "pipe", "pipe"], "ignored": []}
null = os.open(os.devnull, os.O_RDWR)
wire.send(sock, request, [null, null, null])
print(json.dumps(wire.recv_frame(sock, wire.FrameReader())), flush=True)
"""


def test_a_request_from_another_process_than_the_one_that_connected(bundle, tmp_path):
    """The process that connected exits; its child, which inherited the socket, sends the
    request. The context read must never be that of whatever process holds the pid by then:
    the pidfd says the caller is gone, the run goes cold, and nothing runs warm."""
    marker = tmp_path / "ran"
    proc = subprocess.Popen([PYTHON, "-c", HAND_OFF, REPO, status(bundle)["socket"],
                             str(marker)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    proc.wait(TIMEOUT)  # the process that connected
    reply = json.loads(proc.stdout.readline())  # its child's (it holds the pipe)
    assert "cold" in reply and "exited" in reply["cold"], reply
    assert not marker.exists()
    assert "goes cold: the caller exited before its context was read" in log_text(bundle)


def test_cgroup(bundle, probe, tmp_path):
    made = make_cgroups()
    if not made:
        pytest.skip("no writable cgroup hierarchy (cgroup2 or v1 pids) here")
    env = dict(os.environ, CGDIRS=" ".join(made))
    try:
        out = compare(bundle, probe, [incg_script(tmp_path)], env=env)
        assert "/" + os.path.basename(made[0]) in out
    finally:
        remove_cgroups(made)


def make_cgroups() -> list:
    """A child cgroup with a limit in each writable hierarchy that limits something."""
    name = f"py-preload-test-{uuid.uuid4().hex[:8]}"
    made = []
    for parent, limit, value in (("/sys/fs/cgroup/unified", "pids.max", "300"),
                                 ("/sys/fs/cgroup", "pids.max", "300"),
                                 ("/sys/fs/cgroup/pids", "pids.max", "300")):  # fmt: skip
        if not os.path.exists(os.path.join(parent, "cgroup.procs")):
            continue
        directory = os.path.join(parent, name)
        try:
            os.mkdir(directory)
        except OSError:
            continue
        made.append(directory)
        try:
            with open(os.path.join(directory, limit), "w") as f:
                f.write(value)
        except OSError:
            pass  # the controller is not enabled there: the move is still checked
    return made


def status_caps(out: str) -> dict:
    caps = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        if key.startswith("Cap"):
            caps[key] = int(value, 16)
    return caps


# -- thread counts fixed at import -----------------------------------------------------------

THREAD_CASES = {  # "plain" only where the server's counts differ (a control elsewhere)
    "plain": ([], {}),
    "omp1": ([], {"OMP_NUM_THREADS": "1"}),
    "mkl1": ([], {"MKL_NUM_THREADS": "1"}),
    "taskset0": (["taskset", "-c", "0"], {}),
    "omp3_mkl1": ([], {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "1"}),
    "omp1_mkl3": ([], {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "3"}),
    "taskset0_omp3": (["taskset", "-c", "0"], {"OMP_NUM_THREADS": "3"}),
    "openblas1": ([], {"OPENBLAS_NUM_THREADS": "1"}),
}


def torch_bundle(tmp_path_factory, name: str, wrapper: list, env: dict) -> str:
    pytest.importorskip("torch")
    pytest.importorskip("numpy")
    path = make_bundle(tmp_path_factory.mktemp(name) / f"python-{name}.bin", "torch", "numpy")
    started = run([*wrapper, path, "-c", "pass"], env=thread_env(env))
    assert started.returncode == 0, started.stderr
    return path


def thread_env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}  # fmt: skip
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def plain_torch(tmp_path_factory):
    path = torch_bundle(tmp_path_factory, "torch-plain", [], {})
    yield path
    cli("stop", path, check=False)


@pytest.fixture(scope="module")
def narrow_torch(tmp_path_factory):
    """Started by a caller with OMP_NUM_THREADS=1 on one CPU: its counts must not stick."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU")
    path = torch_bundle(tmp_path_factory, "torch-narrow", ["taskset", "-c", "0"],
                        {"OMP_NUM_THREADS": "1"})  # fmt: skip
    yield path
    cli("stop", path, check=False)


@pytest.mark.torch
@pytest.mark.parametrize("case", sorted(set(THREAD_CASES) - {"plain"}))
def test_thread_counts(plain_torch, probe, case):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: every count is 1")
    wrapper, extra = THREAD_CASES[case]
    out = compare(plain_torch, probe, wrapper, "torch", "numpy", env=thread_env(extra))
    assert "torch (" in out and "openblas" in out


@pytest.mark.torch
@pytest.mark.parametrize("case", ["plain", "mkl1", "omp1_mkl3"])
def test_thread_counts_do_not_stick_from_the_first_run(narrow_torch, probe, case):
    wrapper, extra = THREAD_CASES[case]
    compare(narrow_torch, probe, wrapper, "torch", "numpy", env=thread_env(extra))


@pytest.mark.torch
def test_thread_count_not_understood_goes_cold(plain_torch, probe):
    env = thread_env({"OMP_NUM_THREADS": "2,1"})
    compare(plain_torch, probe, [], "torch", "numpy", env=env, warm=False)
    assert "thread count for this caller is unknown (OMP_NUM_THREADS=2,1" in log_text(plain_torch)


def test_a_caller_that_half_closed_is_still_there():
    """A caller that shut its writing side after its request (test_reliability's fuzz client
    does) is alive and reads the reply: not "the caller exited" (which sent such runs cold
    whenever the server read the request after the shutdown); a closed end is gone."""
    import socket

    from preloaded.server.peer import Peer

    server_end, caller_end = socket.socketpair()
    with server_end, caller_end:
        peer = Peer(server_end)
        try:
            caller_end.shutdown(socket.SHUT_WR)
            assert peer.still_there(server_end)
            caller_end.close()
            assert not peer.still_there(server_end)
        finally:
            peer.close()

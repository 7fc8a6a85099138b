"""The native client (preloaded/client/native.c): the same request as the Python client, the
same ends on every error path, the same build under AddressSanitizer and UBSan.

The differential and signal suites run against both starters already (test_differential.py,
test_signals.py); this module adds what only the C client can get wrong: the request frame
byte for byte (JSON escapes, bytes that are not UTF-8, the overlay's PYTHONPATH), a server that
refuses, retires, vanishes or answers garbage, and the build and the tools around the binary.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest
from conftest import PYTHON, cli, disable_fallback, make_bundle, native_only, need_native
from test_differential import CASES, _explain, native_takes, run_both

from preloaded import wire
from preloaded.client import native
from preloaded.install import nativebuild
from preloaded.install.installer import starter_config
from preloaded.paths import Paths

TIMEOUT = 30
HEADER = struct.Struct(">I")


def frame(obj) -> bytes:
    return wire.pack(obj)


class FakeServer:
    """Listens on a bundle's socket like its server; records each request body and answers
    every connection with ``answer`` (raw bytes), then hangs up."""

    def __init__(self, bundle: str, answer: bytes, env=None, trickle=False) -> None:
        self.answer = answer
        self.trickle = trickle  # one byte at a time: the client reads frames in pieces
        self.requests: list = []
        self.path = socket_of(bundle, env) if env else Paths(bundle).socket
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.done = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.done:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(TIMEOUT)
                try:
                    self.requests.append(self._read(conn))
                    if not self.trickle:
                        conn.sendall(self.answer)
                    for i in range(len(self.answer) if self.trickle else 0):
                        conn.sendall(self.answer[i : i + 1])
                        time.sleep(0.002)
                except OSError:  # the client hung up (it went cold)
                    pass

    @staticmethod
    def _read(conn) -> bytes:
        data, anc, flags, _ = conn.recvmsg(1 << 16, wire.anc_space())
        wire.close_all(wire.unpack_fds(anc, flags))
        while len(data) < 4 or len(data) < 4 + HEADER.unpack_from(data)[0]:
            more = conn.recv(1 << 16)
            if not more:
                break
            data += more
        return data

    def close(self) -> None:
        self.done = True
        self.thread.join(TIMEOUT)
        self.sock.close()
        os.unlink(self.path)


def socket_of(bundle: str, env) -> str:
    """The bundle's socket as a client with ``env`` finds it (the locale is part of the key)."""
    from conftest import REPO

    code = "import sys; sys.path.append(sys.argv[1]); from preloaded.paths import Paths; " \
           "print(Paths(sys.argv[2]).socket)"
    proc = subprocess.run([PYTHON, "-SI", "-c", code, REPO, bundle], env=env,
                          capture_output=True, text=True, check=True)  # fmt: skip
    return proc.stdout.strip()


@pytest.fixture
def starters(tmp_path, light_bundle):
    """A Python and a native starter of the light bundle's config, at one path each (both are
    rewritten from the same config, so only the kind of starter differs)."""
    from preloaded import cli as cli_module

    need_native()
    config = starter_config(light_bundle)

    def write(kind: str, path=None, strict=False, **changes) -> str:
        path = str(path or tmp_path / f"fake-{kind}.bin")
        conf = {**config, **changes}
        cli_module.write_starter(path, conf, kind)
        if kind == "native" and strict:
            disable_fallback(path)  # what the C client does not take itself fails
        return path

    return write


def run(exe, args, **kw):
    kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run([exe, *args], capture_output=True, timeout=TIMEOUT, **kw)


def both(starters, answer: bytes, args: list, config=None, strict=True, **kw) -> dict:
    """Run ``args`` through each kind of starter against a FakeServer answering ``answer``;
    {kind: (completed process, request bodies the server got)}. With ``strict``, the native
    starter cannot fall back to Python."""
    results = {}
    for kind in ("python", "native"):
        bundle = starters(kind, strict=strict, **(config or {}))
        server = FakeServer(bundle, answer, kw.get("env"))
        try:
            results[kind] = (run(bundle, args, **kw), server.requests)
        finally:
            server.close()
    return results


OK = frame({"started": 4242}) + frame({"exit": 7})
ENV = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}


def _ignore_hup_and_tstp() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTSTP, signal.SIG_IGN)


REQUESTS = {
    "code": (["-c", "print(1)", "a", "-b", ""], {}),
    "script-flags": (["-u", "-B", "-q", "-W", "error", "-Wdefault", "s.py", "x"], {}),
    "module": (["-um", "pkg.mod", "--flag"], {}),
    "stdin-dash": (["-", "a"], {}),
    "stdin-none": (["--"], {}),
    "repl-pipe": (["-i"], {}),
    "unicode-args": (["-c", "caf\u00e9 \u20ac \U0001f600 \"q\" \\ \t\n\x01\x7f/"], {}),
    "env-escapes": (["-c", "pass"], {b"PY_NATIVE_ESC": b"\"\\\t\n\r\x08\x0c\x01\x1f\x7f /",
                                     b"PY_NATIVE_UNI": "\u00e9\u20ac\U0001f600".encode()}),
    "env-not-utf8": (["-c", "pass"], {b"PY_NATIVE_BAD\xff": b"\xff\xfe\xc3(\xed\xa0\x80\xf4\x90"
                                      b"\x80\x80\xe2\x82\xc0\x80\xf0\x9f\x98"}),
    "env-empty-and-eq": (["-c", "pass"], {b"PY_NATIVE_EMPTY": b"", b"PY_NATIVE_EQ": b"a=b=c"}),
    "argv-not-utf8": (["-c", "pass", b"\xff\xfe"], {}),  # the C client leaves it to Python
    "pythonpath": (["-c", "pass"], {b"PYTHONPATH": b"/a::b"}),
    # python coerces the C locale: LC_CTYPE=C.UTF-8 is appended to its environment (or set in
    # place); with LC_ALL=C it runs in UTF-8 mode instead, with another locale encoding
    "locale-coerced": (["-c", "pass"], {b"LANG": None, b"LC_ALL": None, b"LC_CTYPE": None}),
    "locale-coerced-in-place": (["-c", "pass"], {b"LANG": None, b"LC_ALL": None,
                                                 b"LC_CTYPE": b"POSIX", b"ZZ_AFTER": b"1"}),
    "locale-lc-all-c": (["-c", "pass"], {b"LC_ALL": b"C"}),
    # a request of ~480 kB, more than a socket buffer holds: written and read in pieces
    "env-big": (["-c", "pass"], {b"PY_NATIVE_BIG": b"\xc3\xa9\xff" * 40000}),
}


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_request_is_the_python_clients(starters, tmp_path, name):
    """The server gets the same bytes from both clients (one wire protocol, one request)."""
    args, extra = REQUESTS[name]
    env = {**{k.encode(): v.encode() for k, v in ENV.items()}, **extra}
    env = {k: v for k, v in env.items() if v is not None and not (
        extra.get(b"LANG", b"") is None and k.startswith(b"LC_") and k not in extra)}
    results = both(starters, OK, args, env=env, cwd=tmp_path, umask=0o027,
                   preexec_fn=_ignore_hup_and_tstp, strict=name != "argv-not-utf8")  # fmt: skip
    (py, py_requests), (nat, nat_requests) = results["python"], results["native"]
    assert py.returncode == nat.returncode == 7, (py.stderr, nat.stderr)
    assert nat.stderr == py.stderr == b""
    assert len(py_requests) == len(nat_requests) == 1
    assert nat_requests == py_requests
    request = json.loads(py_requests[0][4:])
    assert request["umask"] == 0o027 and request["ignored"] == [signal.SIGHUP, signal.SIGTSTP]


@pytest.mark.parametrize("pythonpath", [None, "", "/a:/b", "/a:{overlay}:/b", "{overlay}"])
def test_overlay_pythonpath_is_the_python_clients(starters, tmp_path, pythonpath):
    overlay = str(tmp_path / "overlay")
    config = {"overlay": overlay, "requirements": ["x"], "installer": PYTHON}
    env = dict(ENV)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath.format(overlay=overlay)
    results = both(starters, OK, ["-c", "pass"], config=config, env=env)
    (py, py_requests), (nat, nat_requests) = results["python"], results["native"]
    assert py.returncode == nat.returncode == 7
    assert nat_requests == py_requests and len(py_requests) == 1
    assert overlay in json.loads(py_requests[0][4:])["env"]["PYTHONPATH"]


def test_non_utf8_cwd_is_the_python_clients(starters, tmp_path):
    directory = os.path.join(os.fsencode(tmp_path), b"d\xff\xc3(")
    os.mkdir(directory)
    results = both(starters, OK, ["-c", "pass"], env=ENV, cwd=directory)
    assert results["native"][1] == results["python"][1]
    assert len(results["python"][1]) == 1


def test_key_of_a_symlinked_non_utf8_path(starters, tmp_path):
    """The C client names its server as paths.py does (the real path's bytes, the locale): run
    through a symlink, from a directory whose name is not UTF-8, it still finds the server."""
    directory = os.path.join(os.fsencode(tmp_path), b"bin\xff dir")
    os.mkdir(directory)
    bundle = starters("native", path=os.fsdecode(os.path.join(directory, b"real.bin")),
                      strict=True)  # fmt: skip
    link = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"link.bin"))
    os.symlink(bundle, link)
    server = FakeServer(bundle, OK)
    try:
        proc = run(link, ["-c", "pass"], env=ENV)
    finally:
        server.close()
    assert proc.returncode == 7, proc.stderr
    assert len(server.requests) == 1


ENDS = {
    # answer: what both clients must print (and exit with)
    "truncated-frame": frame({"started": 1}) + b"\x00\x00\x00\x20{\"ex",
    "vanishes": frame({"started": 1}),
    "huge-frame": frame({"started": 1}) + b"\x7f\xff\xff\xff",
    "not-utf8": frame({"started": 1}) + b"\x00\x00\x00\x01\xff",
    "not-json": frame({"started": 1}) + b"\x00\x00\x00\x01x",
    "error-frame": frame({"started": 1}) + frame({"error": "child lost \u00e9"}),
    "signal": frame({"started": 1}) + frame({"note": [1, {"a": None}]}) + frame({"signal": 15}),
    "exit-in-one-recv": frame({"started": 1}) + frame({"exit": 300}),
}


@pytest.mark.parametrize("name", sorted(ENDS))
def test_ends_like_the_python_client(starters, name):
    """A server that sends a bad frame, an error or nothing more: both clients end alike."""
    results = both(starters, ENDS[name], ["-c", "pass"], env=ENV)
    (py, _), (nat, nat_requests) = results["python"], results["native"]
    assert len(nat_requests) == 1  # the C client took it; it never fell back mid-run
    assert (nat.returncode, nat.stdout, nat.stderr) == (py.returncode, py.stdout, py.stderr)
    if name in ("truncated-frame", "vanishes"):
        assert py.stderr == b"py-preload: lost the server during the run\n"


def test_request_too_big_runs_cold_like_the_python_client(starters):
    """Arguments that make the frame pass 1 MiB: the Python client warns and runs cold; the
    native one leaves it to the Python starter, which does the same."""
    args = ["-c", "import sys; print(sum(map(len, sys.argv[1:])))"] + ["x" * 120000] * 5
    results = both(starters, OK, args, env=ENV, strict=False)
    (py, _), (nat, _) = results["python"], results["native"]
    assert (nat.returncode, nat.stdout, nat.stderr) == (py.returncode, py.stdout, py.stderr)
    assert py.stdout == b"600000\n" and b"exceeds 1048576" in py.stderr


def test_lost_server_with_stderr_closed(starters):
    """The last line goes to a pipe nobody reads: the write fails (a SIGPIPE would kill the C
    client; python ignores SIGPIPE) and the Python client exits 120, failing to flush."""
    codes = {}
    for kind in ("python", "native"):
        bundle = starters(kind, strict=True)
        server = FakeServer(bundle, ENDS["vanishes"])
        read, write = os.pipe()
        os.close(read)
        try:
            proc = subprocess.run([bundle, "-c", "pass"], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=write, env=ENV,
                                  timeout=TIMEOUT)  # fmt: skip
        finally:
            os.close(write)
            server.close()
        codes[kind] = proc.returncode
    assert codes["native"] == codes["python"] == 120


@pytest.mark.parametrize("name", ["exit-in-one-recv", "signal", "truncated-frame"])
def test_replies_in_pieces(starters, name):
    """Every byte of the replies in its own segment: frames are put together across reads."""
    results = {}
    for kind in ("python", "native"):
        bundle = starters(kind, strict=True)
        server = FakeServer(bundle, ENDS[name], trickle=True)
        try:
            results[kind] = run(bundle, ["-c", "pass"], env=ENV)
        finally:
            server.close()
    py, nat = results["python"], results["native"]
    assert (nat.returncode, nat.stdout, nat.stderr) == (py.returncode, py.stdout, py.stderr)


@pytest.mark.parametrize("answer", ["refused", "stale"])
def test_refused_or_stale_goes_through_the_python_starter(starters, answer):
    """Refused: the Python client warns and runs cold; stale: it retries, then runs cold. The
    C client hands both to the Python starter, which asks the server again."""
    error = frame({"error": "nope" if answer == "refused" else "stale"})
    results = both(starters, error, ["-c", "print('cold')"], env=ENV, strict=False)
    (py, py_requests), (nat, nat_requests) = results["python"], results["native"]
    assert (nat.returncode, nat.stdout, nat.stderr) == (py.returncode, py.stdout, py.stderr)
    assert py.returncode == 0 and py.stdout == b"cold\n"
    assert len(nat_requests) == len(py_requests) + 1


@pytest.mark.parametrize("overlay", [False, True], ids=["plain", "overlay"])
def test_cold_reply_runs_python(starters, tmp_path, overlay):
    """{"cold": why}: python runs the command itself. Without an overlay the C client execs it
    directly (strict: no Python starter involved); with one it leaves the overlay check to the
    Python starter."""
    config = {}
    if overlay:
        directory = tmp_path / "overlay"
        directory.mkdir()
        (directory / ".py-preload-complete").write_text("")
        config = {"overlay": str(directory), "requirements": ["x"], "installer": PYTHON}
    code = "import os, sys; print('cold', sys.argv, os.environ.get('PYTHONPATH'))"
    results = both(starters, frame({"cold": "a tool that must see a fresh interpreter"}),
                   ["-c", code, "a"], config=config, env=ENV, strict=not overlay)  # fmt: skip
    (py, py_requests), (nat, nat_requests) = results["python"], results["native"]
    assert (nat.returncode, nat.stdout, nat.stderr) == (py.returncode, py.stdout, py.stderr)
    assert py.returncode == 0 and py.stdout.startswith(b"cold ['-c', 'a']")
    assert len(nat_requests) == len(py_requests) + overlay


def _ready(proc) -> int:
    line = proc.stdout.readline()
    assert line.startswith(b"ready "), (line, proc.stderr.read() if proc.poll() else b"")
    return int(line.split()[1])


def test_terminal_runs_go_through_the_python_starter(native_bundle):
    pexpect = pytest.importorskip("pexpect")
    from test_differential import server_runs

    run(native_bundle, ["-c", "pass"], check=True)
    before = server_runs(native_bundle)
    child = pexpect.spawn(native_bundle, ["-c", "import sys; print(sys.stdin.isatty(), 'tty')"],
                          timeout=TIMEOUT)  # fmt: skip
    child.expect("True tty")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert server_runs(native_bundle) == before + 1  # warm, through the PTY relay


# ---- the build, and the tools that read a starter -----------------------------------------


def _c_array(source: str, name: str) -> list:
    """The items of the C array ``name`` in native.c (identifiers or string literals)."""
    body = re.search(name + r"\[\] = \{(.*?)\};", source, re.S).group(1)
    return [item.strip().strip('"') for item in body.split(",") if item.strip()]


def test_native_mirrors_the_python_starters_lists():
    """The C client's copies of the Python starter's decisions must not drift from them."""
    from preloaded.client import signals, starter

    with open(nativebuild.SOURCE, encoding="utf-8") as f:
        source = f.read()
    assert _c_array(source, "COLD_ENV") == list(starter.COLD_ENV)
    assert _c_array(source, "FORWARDED") == list(signals.FORWARDED)
    assert _c_array(source, "INHERITABLE") == list(signals.INHERITABLE)
    assert _c_array(source, "CAUGHT") == list(signals.FORWARDED) + ["SIGTSTP", "SIGCONT"]
    assert set(starter.WARM_FLAGS) == set("uBiq")  # parse_args in native.c knows these four


def test_bundle_writes_a_native_starter_by_default(tmp_path):
    need_native()
    out = tmp_path / "default.bin"
    proc = cli("bundle", "json", "-o", str(out))
    with open(out, "rb") as f:
        assert native.is_native(f.read(4))
    assert "Python starter" not in proc.stderr
    config = starter_config(str(out))
    assert config["modules"] == ["json"] and config["python"] == PYTHON
    assert os.access(out, os.X_OK)


def test_no_compiler_writes_the_python_starter(tmp_path):
    out = tmp_path / "nocc.bin"
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc")}
    proc = cli("bundle", "json", "-o", str(out), env=env)
    with open(out, "rb") as f:
        assert f.read(2) == b"#!"
    notes = [line for line in proc.stderr.splitlines() if "Python starter" in line]
    assert len(notes) == 1 and "no-such-cc" in notes[0]
    refused = cli("bundle", "json", "-o", str(tmp_path / "x.bin"), "--client", "native",
                  env=env, check=False)  # fmt: skip
    assert refused.returncode == 1 and "cannot build the native client" in refused.stderr
    assert not os.path.exists(tmp_path / "x.bin")


def test_the_build_is_cached_by_source_hash():
    need_native()
    first = nativebuild.build()
    mtime = os.stat(first).st_mtime_ns
    assert nativebuild.build() == first and os.stat(first).st_mtime_ns == mtime
    with open(nativebuild.SOURCE, "rb") as f:
        assert os.path.basename(first).startswith("py-preload-native-")
        assert f.read()  # the source ships with the package


def test_tools_read_a_native_starter(native_bundle):
    from preloaded import bench
    from preloaded.pool.executor import Executor

    run(native_bundle, ["-c", "pass"], check=True)
    status = json.loads(cli("status", "--json", native_bundle).stdout)
    assert status["modules"] == ["json", "decimal"]
    assert native_bundle in cli("list").stdout
    assert "needs nothing installed" in cli("install", native_bundle).stderr
    assert bench.load_bundle(native_bundle)["modules"] == ["json", "decimal"]
    with Executor(native_bundle, max_workers=1) as ex:
        assert ex.submit(pow, 2, 5).result(timeout=TIMEOUT) == 32


def test_a_damaged_native_starter_says_so(tmp_path, native_bundle):
    broken = tmp_path / "broken.bin"
    with open(native_bundle, "rb") as f:
        data = f.read()
    broken.write_bytes(data[: -native.TRAILER])
    broken.chmod(0o755)
    proc = run(str(broken), ["-c", "pass"])
    assert proc.returncode == 127
    assert proc.stderr.startswith(b"py-preload: ") and b"configuration" in proc.stderr
    assert native.read_config(str(broken)) is None


# ---- the same client built with AddressSanitizer and UBSan --------------------------------


@pytest.fixture(scope="module")
def sanitized(bundle_dir):
    """A native starter built with -fsanitize=address,undefined that cannot fall back."""
    try:
        binary = nativebuild.build(nativebuild.SANITIZE)
    except nativebuild.BuildError as exc:
        pytest.skip(f"no sanitizer build here: {exc}")
    return native_only(os.path.join(bundle_dir, "python-asan.bin"), "json", "decimal",
                       binary=binary)  # fmt: skip


SANITIZED_CASES = [c for c in CASES if native_takes(c)]


@pytest.mark.parametrize("case", SANITIZED_CASES, ids=[c.name for c in SANITIZED_CASES])
def test_sanitized_client_differential(sanitized, tmp_path, case):
    """Every differential case the C client takes, again under ASan/UBSan: a report lands on
    stderr (and changes the status), which then differs from python's."""
    expected, actual = run_both(sanitized, case, str(tmp_path / "w"))
    assert actual == expected, _explain(expected, actual)


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM", "SIGUSR1", "SIGTSTP"])
def test_sanitized_client_signals(sanitized, name):
    code = ("import os, signal, sys, time\n"
            "signal.signal(signal.SIGCONT, lambda *a: print('continued', flush=True))\n"
            "print('ready', os.getpid(), flush=True)\ntime.sleep(20)\n")  # fmt: skip
    # Its own process group in this session: a stop signal to an orphaned group is discarded.
    proc = subprocess.Popen([sanitized, "-c", code], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=os.setpgrp)  # fmt: skip
    try:
        _ready(proc)
        proc.send_signal(getattr(signal, name))
        if name == "SIGTSTP":  # the client stops itself (and the child); continue both
            deadline = time.monotonic() + TIMEOUT
            while _state(proc.pid) != "T" and time.monotonic() < deadline:
                time.sleep(0.01)
            assert _state(proc.pid) == "T"
            proc.send_signal(signal.SIGCONT)
            assert select.select([proc.stdout], [], [], TIMEOUT)[0], "SIGCONT not forwarded"
            assert proc.stdout.readline() == b"continued\n"
            proc.send_signal(signal.SIGTERM)
            name = "SIGTERM"
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
        proc.wait()
    assert b"Sanitizer" not in err and b"runtime error" not in err, err
    assert proc.returncode == -getattr(signal, name), err


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.parametrize("name", sorted(ENDS))
def test_sanitized_client_ends(tmp_path, sanitized, name):
    """The error paths under the sanitizers: the same ends, and no report."""
    bundle = str(tmp_path / "asan-fake.bin")
    with open(sanitized, "rb") as f:
        data = f.read()
    with open(bundle, "wb") as f:
        f.write(data)
    os.chmod(bundle, 0o755)
    server = FakeServer(bundle, ENDS[name])
    try:
        proc = run(bundle, ["-c", "pass"], env=ENV)
    finally:
        server.close()
    assert b"Sanitizer" not in proc.stderr and b"runtime error" not in proc.stderr, proc.stderr
    assert len(server.requests) == 1
    assert proc.returncode in (1, -15, 300 & 0xFF), proc.stderr

"""Job control and signals as under python: background runs, Ctrl-Z, bg, fg, reads and writes
from the background, and signals sent to the starter (issue 11, parts 1 and 4).

Every case runs twice, with the bundle's python and with the starter, and the two transcripts
are compared. The shell is a real interactive bash on a PTY (pexpect); every wait has a deadline.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import termios
import time

import pexpect
import psutil
import pytest
from conftest import PYTHON

TIMEOUT = 15  # seconds, for every single expect
PROMPT = "PROMPT$ "


def _env() -> dict:
    dropped = ("PYTHONUNBUFFERED", "PYTHONSTARTUP", "PYTHONINSPECT", "PROMPT_COMMAND")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(TERM="dumb", PS1=PROMPT, INPUTRC="/dev/null")
    return env


@pytest.fixture
def shell():
    """An interactive bash on a 24x80 PTY; whatever it left running is killed after."""
    shells = []

    def _open():
        sh = pexpect.spawn("bash", ["--norc", "--noprofile", "-i"], env=_env(), timeout=TIMEOUT,
                           dimensions=(24, 80), encoding="utf-8")  # fmt: skip
        sh.expect_exact(PROMPT)
        shells.append(sh)
        return sh

    yield _open
    for sh in shells:
        try:
            leftovers = psutil.Process(sh.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            leftovers = []
        for proc in leftovers:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        sh.close(force=True)


def _script(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _command(sh, line: str) -> str:
    """Run ``line`` in the foreground; return what it printed (without the echoed line)."""
    sh.sendline(line)
    sh.expect_exact(PROMPT)
    return sh.before.split("\r\n", 1)[1] if "\r\n" in sh.before else ""


def _status(sh) -> int:
    return int(_command(sh, "echo status=$?").split("status=")[1].split()[0])


def _stty(sh) -> str:
    return _command(sh, "stty -a")


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _wait_state(pid: int, states: str) -> str:
    """Wait (with a deadline) until process ``pid`` is in one of ``states``; return its state."""
    deadline = time.monotonic() + TIMEOUT
    while _state(pid) not in states and time.monotonic() < deadline:
        time.sleep(0.02)
    return _state(pid)


def _wait_owned(sh, warm: bool) -> None:
    """Wait until the job in the foreground has the terminal; a warm run's relay in raw mode.

    Keys typed before that would be echoed by the terminal and again by the run's PTY.
    """
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        lflag = termios.tcgetattr(sh.child_fd)[3]
        if os.tcgetpgrp(sh.child_fd) != sh.pid and not (warm and lflag & termios.ICANON):
            return
        time.sleep(0.02)
    raise AssertionError("the foreground job never took the terminal")


@pytest.fixture(scope="module", params=["python", "native"])
def starter(request):
    """The Python starter, or the native one (which hands terminal runs to the Python one)."""
    return request.getfixturevalue("light_bundle" if request.param == "python" else "native_bundle")


@pytest.fixture(scope="module", params=["python", "native"])
def pipe_starter(request):
    """The Python starter, or the native one that cannot fall back to Python (conftest)."""
    return request.getfixturevalue("light_bundle" if request.param == "python" else "native_strict")


def _exes(starter) -> list:
    return [(PYTHON, False), (starter, True)]


# -- background runs in an interactive shell --------------------------------------------------

PRINTS = """\
import sys, time
for i in range(3):
    print("line", i, flush=True)
    time.sleep(0.1)
sys.exit(3)
"""


def _background_prints(sh, exe: str, script: str) -> tuple:
    before = _stty(sh)
    sh.sendline(f"{exe} {script} &")
    sh.expect(r"line 2\r*\n")  # runs in the background: never "Stopped (tty output)"
    lines = re.findall(r"line \d\r*\n", sh.before + sh.after)
    sh.sendline("wait $!; echo status=$?")
    sh.expect(r"status=(\d+)")
    status = int(sh.match.group(1))
    sh.expect_exact(PROMPT)
    return lines, status, _stty(sh) == before


def test_background_run_prints_and_exits(shell, starter, tmp_path):
    script = _script(tmp_path, "prints.py", PRINTS)
    results = [_background_prints(shell(), exe, script) for exe, _warm in _exes(starter)]
    assert results[0] == (["line 0\r\n", "line 1\r\n", "line 2\r\n"], 3, True)
    assert results[1] == results[0]


COUNTER = """\
import os, time
print("pid", os.getpid(), flush=True)
for i in range(1000):
    print(f"n={i}", flush=True)
    time.sleep(0.05)
"""


def _numbers(text: str) -> list:
    return [int(n) for n in re.findall(r"n=(\d+)", text)]


def _ctrl_z_bg_fg(sh, exe: str, script: str) -> tuple:
    before = _stty(sh)
    sh.sendline(f"{exe} {script}")
    sh.expect(r"pid (\d+)\r\n")
    pid = int(sh.match.group(1))
    sh.expect_exact("n=2\r\n")
    sh.send("\x1a")
    sh.expect(r"Stopped.*\r\n")
    sh.expect_exact(PROMPT)
    stopped = _wait_state(pid, "T")
    last = max(_numbers(sh.before) + [2])
    sh.sendline("bg")  # python goes on printing in the background
    sh.expect(r"n=(\d+)\r\n")
    sh.expect(r"n=(\d+)\r\n")
    running_bg = _state(pid) in "SR" and int(sh.match.group(1)) > last
    sh.sendline("fg")
    sh.expect(r"n=\d+\r\n")
    _wait_owned(sh, exe != PYTHON)
    sh.expect(r"n=\d+\r\n")
    sh.sendintr()
    sh.expect_exact("KeyboardInterrupt")
    sh.expect_exact(PROMPT)
    return stopped, running_bg, _status(sh), _stty(sh) == before


def test_ctrl_z_then_bg_keeps_running_then_fg(shell, starter, tmp_path):
    script = _script(tmp_path, "counter.py", COUNTER)
    results = [_ctrl_z_bg_fg(shell(), exe, script) for exe, _warm in _exes(starter)]
    assert results[0] == ("T", True, 130, True)
    assert results[1] == results[0]


READS_LATER = """\
import os, sys, time
print("ready", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.02)
print("reading", tuple(os.get_terminal_size()), flush=True)
print("got", input())
"""


def _background_then_fg_input(sh, exe: str, warm: bool, script: str, flag) -> tuple:
    before = _stty(sh)
    sh.sendline(f"{exe} {script} {flag} &")
    sh.expect_exact("ready")
    sh.setwinsize(30, 100)  # resized while it runs in the background: it sees the new size
    sh.sendline("fg")
    sh.expect_exact(f"{script} {flag}\r\n")  # bash names the job it brings to the foreground
    _wait_owned(sh, warm)
    flag.write_text("")
    sh.expect_exact("reading (100, 30)\r\n")
    sh.sendline("hello")
    sh.expect_exact("got hello\r\n")
    echoed = sh.before
    sh.expect_exact(PROMPT)
    status = _status(sh)
    _command(sh, "stty rows 24 cols 80")  # as it was (resizing the PTY would make bash redraw)
    return echoed, status, _stty(sh) == before


def test_background_then_fg_then_typing(shell, starter, tmp_path):
    script = _script(tmp_path, "reads_later.py", READS_LATER)
    results = []
    for i, (exe, warm) in enumerate(_exes(starter)):
        results.append(_background_then_fg_input(shell(), exe, warm, script, tmp_path / f"go{i}"))
    assert results[0] == ("hello\r\n", 0, True)
    assert results[1] == results[0]


READS_AT_ONCE = """\
import os, sys, termios, tty
if sys.argv[1:] == ["readline"]:
    import readline  # input() sets the terminal's modes first
print("pid", os.getpid(), flush=True)
if sys.argv[1:] == ["subprocess"]:  # the kernel stops the reader's whole process group
    import subprocess
    sys.exit(subprocess.run([sys.executable, "-c", "print('got', input())"]).returncode)
if sys.argv[1:] == ["raw"]:  # setting the terminal's modes: SIGTTOU in the background
    saved = termios.tcgetattr(0)
    tty.setraw(0)
print("got", input())
if sys.argv[1:] == ["raw"]:
    termios.tcsetattr(0, termios.TCSADRAIN, saved)
"""


def _jobs_until_stopped(sh) -> str:
    """What `jobs -l` says once the job shows as stopped, with the reason, without the pid."""
    deadline = time.monotonic() + TIMEOUT
    jobs = ""
    while "Stopped" not in jobs and time.monotonic() < deadline:
        jobs = _command(sh, "jobs -l")
    return re.sub(r"\s+", " ", re.sub(r"\+\s+\d+\s", "+ ", jobs)).strip()


def _background_read_stops(sh, exe: str, warm: bool, script: str) -> tuple:
    before = _stty(sh)
    sh.sendline(f"{exe} {script} &")
    sh.expect(r"pid (\d+)\r+\n")  # (a warm run may show CR CR LF: raw mode came right after)
    pid = int(sh.match.group(1))
    stopped = _wait_state(pid, "T")  # python's read of the terminal got SIGTTIN
    jobs = _jobs_until_stopped(sh)
    sh.sendline("fg")
    sh.expect_exact(f"{script}\r\n")
    _wait_owned(sh, warm)
    sh.send("hi\n")  # LF: in raw mode (the set-modes case) CR would not end the line
    sh.expect_exact("got hi")
    sh.expect_exact(PROMPT)
    return stopped, jobs, _status(sh), _stty(sh) == before


@pytest.mark.parametrize("how, reason", [
    ("", "tty input"), ("raw", "tty output"), ("readline", "tty output"),
    ("subprocess", "tty input"),
], ids=["read", "set-modes", "readline", "subprocess"])  # fmt: skip
def test_background_read_stops_the_run_until_fg(shell, starter, tmp_path, how, reason):
    script = _script(tmp_path, "reads.py", READS_AT_ONCE) + (f" {how}" if how else "")
    results = [_background_read_stops(shell(), exe, warm, script)
               for exe, warm in _exes(starter)]  # fmt: skip
    assert results[0][:1] == ("T",) and f"Stopped ({reason})" in results[0][1]
    assert results[0][2:] == (0, True)
    assert results[1][0] == "T" and results[1][2:] == results[0][2:]
    assert results[1][1] == results[0][1].replace(PYTHON, starter)


# Ends only once the test says so: a warm run is stopped just after its first write reached
# the PTY, not inside it (see docs/differences.md), so it must not be done by then.
TOSTOP = """\
import os, sys, time
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
print("hello from the background", flush=True)
while not os.path.exists(sys.argv[1] + ".end"):
    time.sleep(0.02)
"""


def _tostop(sh, exe: str, script: str, pidfile) -> tuple:
    _command(sh, "stty tostop")
    before = _stty(sh)
    sh.sendline(f"{exe} {script} {pidfile} &")
    sh.expect_exact(PROMPT)
    deadline = time.monotonic() + TIMEOUT
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    pid = int(pidfile.read_text())
    stopped = _wait_state(pid, "T")  # python's write got SIGTTOU
    jobs = _jobs_until_stopped(sh)
    shown_early = "hello" in sh.before + jobs
    sh.sendline("fg")
    sh.expect_exact("hello from the background\r\n")
    pidfile.with_name(pidfile.name + ".end").write_text("")
    sh.expect_exact(PROMPT)
    status = _status(sh)
    same = _stty(sh) == before
    _command(sh, "stty -tostop")
    return stopped, "Stopped (tty output)" in jobs, shown_early, status, same


def test_background_write_under_tostop_stops_the_run(shell, starter, tmp_path):
    script = _script(tmp_path, "tostop.py", TOSTOP)
    results = [_tostop(shell(), exe, script, tmp_path / f"pid{i}")
               for i, (exe, _warm) in enumerate(_exes(starter))]  # fmt: skip
    assert results[0] == ("T", True, False, 0, True)
    assert results[1] == results[0]


QUIET = """\
import sys
for i in range(3):
    print("line", i)
print("to stderr", file=sys.stderr)
sys.exit(4)
"""


@pytest.mark.parametrize("redirect", ["> {log} 2>&1", "| tee {log}"], ids=["to-file", "tee"])
def test_background_run_with_stdin_on_the_terminal(shell, starter, tmp_path, redirect):
    """`train.py > log 2>&1 &`, `train.py | tee log &`: only stdin is the terminal; it runs."""
    script = _script(tmp_path, "quiet.py", QUIET)
    results = []
    for i, (exe, _warm) in enumerate(_exes(starter)):
        sh = shell()
        log = tmp_path / f"log{i}"
        before = _stty(sh)
        sh.sendline(f"{exe} {script} {redirect.format(log=log)} &")
        sh.expect_exact(PROMPT)
        sh.sendline("wait $!; echo status=$?")
        sh.expect(r"status=(\d+)")
        status = int(sh.match.group(1))
        sh.expect_exact(PROMPT)
        results.append((status, log.read_text(), _stty(sh) == before))
    assert "line 0\nline 1\nline 2\n" in results[0][1] and results[0][2]
    assert results[1] == results[0]


# -- signals sent to the starter --------------------------------------------------------------

HANDLES = """\
import os, signal, sys, time
def handler(signum, frame):
    print("got", signal.Signals(signum).name, flush=True)
    sys.exit(0)
signal.signal(getattr(signal, sys.argv[2]), handler)
with open(sys.argv[1], "w") as f:
    f.write("ready")
for _ in range(200):
    time.sleep(0.05)
print("not signalled", flush=True)
sys.exit(1)
"""

SCRIPT = """\
{prefix} "$EXE" "$@" > "$OUT" 2>&1 &
pid=$!
while [ ! -s "$READY" ]; do sleep 0.02; done
kill -{signal} $pid
wait $pid
echo status=$?
"""


def _script_run(exe: str, args: list, ready, out, signame: str, prefix: str = "") -> tuple:
    """A non-interactive shell script runs ``exe args &``, then kills it; (stdout, output)."""
    env = _env()
    env.update(EXE=exe, READY=str(ready), OUT=str(out))
    text = SCRIPT.format(prefix=prefix, signal=signame)
    proc = subprocess.run(["bash", "-c", text, "script", *args], env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=TIMEOUT * 2)  # fmt: skip
    return proc.stdout, out.read_text()


@pytest.mark.parametrize("signame, prefix", [("INT", ""), ("QUIT", ""), ("HUP", "nohup")])
def test_signal_the_caller_ignored_reaches_a_handler(pipe_starter, tmp_path, signame, prefix):
    """A script's `cmd &` starts with SIGINT and SIGQUIT ignored, nohup's with SIGHUP: the
    program starts with them ignored (as python), and a handler it installs then gets them."""
    script = _script(tmp_path, "handles.py", HANDLES)
    results = []
    for i, (exe, _warm) in enumerate(_exes(pipe_starter)):
        ready, out = tmp_path / f"ready{i}", tmp_path / f"out{i}"
        results.append(_script_run(exe, [script, str(ready), f"SIG{signame}"], ready, out,
                                   signame, prefix))  # fmt: skip
    assert results[0] == ("status=0\n", f"got SIG{signame}\n")
    assert results[1] == results[0]


UVICORN_APP = """\
async def app(scope, receive, send):
    pass
"""


def test_uvicorn_in_a_script_stops_on_sigint(pipe_starter, tmp_path):
    """`STARTER -m uvicorn app:app & ... kill -INT $!`: uvicorn shuts down, `wait` returns."""
    pytest.importorskip("uvicorn")
    _script(tmp_path, "app.py", UVICORN_APP)
    results = []
    for i, (exe, _warm) in enumerate(_exes(pipe_starter)):
        out = tmp_path / f"out{i}"
        ready = tmp_path / f"ready{i}"  # the log's "startup complete" line, copied by a watcher
        wait_log = (f'until grep -q "startup complete" {out} 2>/dev/null; do sleep 0.05; done; '
                    f"echo ok > {ready}")  # fmt: skip
        watcher = subprocess.Popen(["bash", "-c", wait_log])
        args = ["-m", "uvicorn", "--app-dir", str(tmp_path), "--uds", str(tmp_path / f"s{i}"),
                "app:app"]  # fmt: skip
        try:
            stdout, log = _script_run(exe, args, ready, out, "INT")
        finally:
            watcher.kill()
            watcher.wait()
        results.append((stdout, "Finished server process" in log))
    assert results[0] == ("status=0\n", True)
    assert results[1] == results[0]


STOPPABLE = """\
import os, signal, sys, time
signal.signal(signal.SIGCONT, lambda s, f: os.write(1, b"got SIGCONT\\n"))
print("pid", os.getpid(), flush=True)
for _ in range(400):
    time.sleep(0.05)
"""


def _stop_cont(exe: str, script: str) -> tuple:
    proc = subprocess.Popen([exe, script], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())  # fmt: skip
    try:
        pid = int(proc.stdout.readline().split()[1])
        running = _wait_state(pid, "SR")
        proc.send_signal(signal.SIGCONT)  # alone: the program's handler runs, as under python
        alone = proc.stdout.readline()
        proc.send_signal(signal.SIGSTOP)
        stopped = _wait_state(pid, "T")
        proc.send_signal(signal.SIGCONT)
        resumed = _wait_state(pid, "SR")
        line = proc.stdout.readline()  # the program's SIGCONT handler ran
        proc.send_signal(signal.SIGTERM)
        proc.wait(TIMEOUT)
        assert proc.returncode == -signal.SIGTERM, proc.stderr.read()
        running, resumed = ("run" if s in "SR" else s for s in (running, resumed))
        return running, alone, stopped, resumed, line, proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_stop_and_cont_sent_to_the_starter_pause_the_program(pipe_starter, tmp_path):
    script = _script(tmp_path, "stoppable.py", STOPPABLE)
    results = [_stop_cont(exe, script) for exe, _warm in _exes(pipe_starter)]
    assert results[0] == ("run", "got SIGCONT\n", "T", "run", "got SIGCONT\n", -signal.SIGTERM)
    assert results[1] == results[0]

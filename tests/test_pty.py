"""Warm runs on a terminal: the PTY relay, readline, window size, job control, terminal restore.

Real processes under pexpect (a PTY this test controls, 24x80), every wait with a deadline.
Where it is cheap the same case also runs under the real interpreter and the two are compared.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import termios
import time

import pexpect
import psutil
import pytest
from conftest import PYTHON

TIMEOUT = 15  # seconds, for every single expect
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)|\x1b[=>]")


def _env(term: str = "dumb") -> dict:
    """The session's environment, without this machine's PYTHONUNBUFFERED and friends."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONUNBUFFERED", "PYTHONSTARTUP", "PYTHONINSPECT")}  # fmt: skip
    env["TERM"] = term
    return env


@pytest.fixture
def spawn():
    """pexpect.spawn with fixed dimensions and deadline; whatever is left is killed after."""
    children = []

    def _spawn(cmd, args=(), env=None, **kw):
        child = pexpect.spawn(cmd, list(args), dimensions=(24, 80), timeout=TIMEOUT,
                              encoding="utf-8", env=env or _env(), **kw)  # fmt: skip
        children.append(child)
        return child

    yield _spawn
    for child in children:
        if child.isalive():
            child.terminate(force=True)
        child.close(force=True)


def _finish(child) -> tuple:
    """Wait for the end of ``child``; return (exitstatus, signalstatus)."""
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus, child.signalstatus


def _script(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# -- the REPL --------------------------------------------------------------------------------


def _banner(spawn, exe: str) -> str:
    child = spawn(exe)
    child.expect_exact(">>> ")
    banner = child.before
    child.sendeof()
    assert _finish(child) == (0, None)
    return banner


def test_repl_banner_like_python(spawn, light_bundle):
    # The server must be up: a first run in a terminal shows (then erases) the warming line.
    # An earlier test module may have stopped every server of the session.
    subprocess.run([light_bundle, "-c", "pass"], check=True, timeout=60)
    warm = _banner(spawn, light_bundle)
    assert warm.startswith("Python ") and 'Type "help", "copyright"' in warm
    assert warm == _banner(spawn, PYTHON)


def _pyrepl_session(spawn, exe: str) -> tuple:
    """A short session on a terminal that python 3.13's new REPL can drive: its raw output."""
    child = spawn(exe, env=_env("xterm"))
    child.expect_exact(">>> ")
    for line in ("1+1", "def f():", "return 1/0", "", "f()"):
        child.send(line + "\r")
        time.sleep(0.3)  # the new REPL redraws per key: same pace for both
    child.expect_exact("ZeroDivisionError")
    child.send("exit()\r")
    child.expect(pexpect.EOF)
    child.close()
    return child.before, child.exitstatus


@pytest.mark.skipif(sys.version_info < (3, 13), reason="python 3.13's new REPL")
def test_new_repl_like_python(spawn, light_bundle):
    """Guards against the basic prompt where python 3.13 runs its new REPL (colours, redraws)."""
    warm = _pyrepl_session(spawn, light_bundle)
    assert "\x1b[" in warm[0] and warm[1] == 0
    assert warm == _pyrepl_session(spawn, PYTHON)


@pytest.mark.parametrize("ending, status", [("\x04", 0), ("exit()\r", 0), ("quit(3)\r", 3)])
def test_repl_exit_status(spawn, light_bundle, ending, status):
    child = spawn(light_bundle)
    child.expect_exact(">>> ")
    child.send(ending)
    assert _finish(child) == (status, None)


def test_repl_evaluates_multiline_and_tracebacks(spawn, light_bundle):
    child = spawn(light_bundle)
    child.expect_exact(">>> ")
    child.sendline("1+1")
    child.expect_exact("\r\n2\r\n>>> ")
    child.sendline("for i in range(2):")
    child.expect_exact("... ")
    child.sendline("    print('item', i * 10)")
    child.expect_exact("... ")
    child.sendline("")
    child.expect_exact("item 0\r\nitem 10\r\n>>> ")
    child.sendline("undefined_name")
    child.expect_exact('Traceback (most recent call last):\r\n')
    child.expect_exact('  File "<stdin>", line 1, in <module>\r\n')
    child.expect_exact("NameError: name 'undefined_name' is not defined")
    child.expect_exact(">>> ")
    assert "preloaded" not in child.before
    child.sendeof()
    assert _finish(child) == (0, None)


def test_readline_editing_and_history(spawn, light_bundle):
    child = spawn(light_bundle)
    child.expect_exact(">>> ")
    child.send("print(2)\x1b[D\x1b[D1\r")  # two Left-arrows, then insert: print(12)
    child.expect_exact("\r\n12\r\n>>> ")
    child.send("7)\x01print(6\x05\r")  # Ctrl-A to the start, Ctrl-E to the end: print(67)
    child.expect_exact("\r\n67\r\n>>> ")
    child.send("\x1b[A\x1b[A\r")  # Up-arrow twice: the line before the last one
    child.expect_exact("\r\n12\r\n>>> ")
    child.sendeof()
    assert _finish(child) == (0, None)


def test_type_ahead_is_not_lost(spawn, light_bundle):
    """Keys typed before the relay starts reach the child, as they reach python."""
    child = spawn(light_bundle, ["-c", "print('got', input())"])
    child.delaybeforesend = None
    child.sendline("typed ahead")  # at once: most likely before the client is in raw mode
    child.expect_exact("got typed ahead\r\n")
    assert _finish(child) == (0, None)


def test_ctrl_c_in_repl_interrupts_the_statement(spawn, light_bundle):
    child = spawn(light_bundle)
    child.expect_exact(">>> ")
    child.sendline("import time; print('sleeping'); time.sleep(30)")
    child.expect_exact("sleeping\r\n")
    started = time.monotonic()
    child.sendintr()
    child.expect_exact("KeyboardInterrupt\r\n>>> ", timeout=5)
    assert time.monotonic() - started < 5
    child.sendline("'still alive'")
    child.expect_exact("'still alive'\r\n>>> ")
    child.sendline("exit()")
    assert _finish(child) == (0, None)


def test_inspect_flag_enters_repl_with_script_globals(spawn, light_bundle, tmp_path):
    script = _script(tmp_path, "g.py", "answer = 41 + 1\ndef helper():\n    return 'helped'\n")
    child = spawn(light_bundle, ["-i", script])
    child.expect_exact(">>> ")
    assert "Type \"help\"" not in child.before  # -i after a script shows no banner
    child.sendline("answer, helper(), __name__")
    child.expect_exact("(42, 'helped', '__main__')\r\n>>> ")
    child.sendline("exit()")
    assert _finish(child) == (0, None)


def test_terminal_facts_in_the_child(spawn, light_bundle):
    child = spawn(light_bundle, ["-c", (
        "import os, sys\n"
        "print('tty', sys.stdin.isatty(), sys.stdout.isatty(), sys.stderr.isatty())\n"
        "print('size', tuple(os.get_terminal_size()))\n"
        "fd = os.open('/dev/tty', os.O_RDWR)\n"
        "os.write(fd, b'via dev tty\\n')\n"
        "print('fg', os.tcgetpgrp(fd) == os.getpgrp(), os.getsid(0) == os.getpid())\n"
        "print('line buffered', sys.stdout.line_buffering)\n"
    )])  # fmt: skip
    child.expect_exact("tty True True True\r\n")
    child.expect_exact("size (80, 24)\r\n")
    child.expect_exact("via dev tty\r\n")
    child.expect_exact("fg True True\r\n")
    child.expect_exact("line buffered True\r\n")
    assert _finish(child) == (0, None)


def test_window_size_follows_sigwinch(spawn, light_bundle, tmp_path):
    script = _script(tmp_path, "winch.py", (
        "import os, signal, time\n"
        "got = []\n"
        "signal.signal(signal.SIGWINCH, lambda s, f: got.append(s))\n"
        "size = os.get_terminal_size()\n"
        "print(f'before {size.columns}x{size.lines}', flush=True)\n"
        "deadline = time.monotonic() + 10\n"
        "while not got and time.monotonic() < deadline:\n"
        "    time.sleep(0.01)\n"
        "size = os.get_terminal_size()\n"
        "print(f'after {size.columns}x{size.lines} winch={bool(got)}', flush=True)\n"
    ))  # fmt: skip
    child = spawn(light_bundle, [script])
    child.expect_exact("before 80x24\r\n")
    child.setwinsize(40, 100)
    child.expect_exact("after 100x40 winch=True\r\n")
    assert _finish(child) == (0, None)


def test_getpass_reads_without_echo(spawn, light_bundle, tmp_path):
    script = _script(tmp_path, "pw.py", (
        "import getpass\n"
        "secret = getpass.getpass('Password: ')\n"
        "print('reversed', secret[::-1])\n"
    ))  # fmt: skip
    child = spawn(light_bundle, [script])
    child.expect_exact("Password: ")
    child.sendline("hunter2")
    child.expect_exact("reversed 2retnuh\r\n")
    assert "hunter2" not in child.before
    assert _finish(child) == (0, None)


def test_ipython(spawn, light_bundle):
    child = spawn(light_bundle, ["-m", "IPython", "--no-banner", "--colors=NoColor"],
                  env=_env("xterm"))  # fmt: skip
    child.expect(r"In \[1\]:", timeout=30)
    child.send("6*7\r")
    child.expect(r"In \[2\]:")
    assert re.search(r"Out\[1\]: 42", ANSI.sub("", child.before))
    child.send("exit\r")
    assert _finish(child) == (0, None)


def test_pdb(spawn, light_bundle, tmp_path):
    script = _script(tmp_path, "dbg.py", "a = 1\nb = a + 10\nprint('b is', b)\n")
    child = spawn(light_bundle, ["-m", "pdb", script])
    child.expect_exact("-> a = 1\r\n(Pdb) ")
    child.sendline("n")
    child.expect_exact("-> b = a + 10\r\n(Pdb) ")
    child.sendline("p a * 5")
    child.expect_exact("\r\n5\r\n(Pdb) ")
    child.sendline("c")
    child.expect_exact("b is 11\r\n")
    child.expect_exact("The program finished and will be restarted")
    child.expect_exact("(Pdb) ")
    child.sendline("q")
    assert _finish(child) == (0, None)


# -- the caller's terminal is restored on every way out ----------------------------------------

RAW_SCRIPT = """\
import os, sys, tty
tty.setraw(0)
print("pid", os.getpid(), "raw", flush=True)
os.read(0, 1)
if sys.argv[1] == "crash":
    raise RuntimeError("boom")
import time
time.sleep(30)
"""


@pytest.mark.parametrize("how, status", [
    ("crash", 1), ("SIGTERM", 128 + 15), ("SIGHUP", 128 + 1), ("SIGKILL-child", 128 + 9),
])  # fmt: skip
def test_terminal_restored(spawn, light_bundle, tmp_path, how, status):
    script = _script(tmp_path, "raw.py", RAW_SCRIPT)
    shell = f"stty -g; echo START; {light_bundle} {script} {how}; echo rc=$?; stty -g"
    child = spawn("bash", ["--norc", "--noprofile", "-c", shell])
    child.expect(r"(\S+)\r\nSTART\r\n")
    before = child.match.group(1)
    child.expect(r"pid (\d+) raw")
    pid = int(child.match.group(1))
    lflag = termios.tcgetattr(child.child_fd)[3]  # the terminal the client runs on
    assert not lflag & (termios.ECHO | termios.ICANON | termios.ISIG), "relay not in raw mode"
    (client,) = psutil.Process(child.pid).children()
    if how == "crash":
        child.send("x")
    elif how == "SIGKILL-child":
        os.kill(pid, signal.SIGKILL)
    else:
        client.send_signal(getattr(signal, how))
    child.expect(r"rc=(\d+)\r\n(\S+)\r\n")
    assert int(child.match.group(1)) == status
    assert child.match.group(2) == before
    assert _finish(child) == (0, None)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_terminal_restored_when_the_run_goes_cold(spawn, light_bundle, tmp_path):
    """A deleted cwd makes the client fall back to python after it set up the PTY."""
    gone = tmp_path / "gone"
    shell = (f"stty -g; mkdir {gone}; cd {gone}; rmdir {gone}; "
             f"{light_bundle} -c 'import sys; print(\"cold\", sys.stdin.isatty())'; "
             "echo rc=$?; stty -g")  # fmt: skip
    child = spawn("bash", ["--norc", "--noprofile", "-c", shell])
    child.expect(r"(\S+)\r\n")
    before = child.match.group(1)
    child.expect(r"cold True\r\nrc=0\r\n(\S+)\r\n")
    assert child.match.group(1) == before
    assert _finish(child) == (0, None)


def test_crash_in_raw_mode_shows_traceback(spawn, light_bundle, tmp_path):
    script = _script(tmp_path, "raw.py", RAW_SCRIPT)
    child = spawn(light_bundle, [script, "crash"])
    child.expect(r"pid \d+ raw")
    child.send("x")
    child.expect_exact("RuntimeError: boom")
    assert _finish(child) == (1, None)


def test_client_killed_ends_the_child(spawn, light_bundle):
    child = spawn(light_bundle, ["-c", "import os, time; print('pid', os.getpid(), flush=True); "
                                 "time.sleep(30)"])  # fmt: skip
    child.expect(r"pid (\d+)")
    pid = int(child.match.group(1))
    os.kill(child.pid, signal.SIGKILL)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline and _running(pid):
        time.sleep(0.02)
    assert not _running(pid)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- mixed: some streams a terminal, some not --------------------------------------------------

MIXED_SCRIPT = """\
import os, sys
print("line one")
size = os.path.getsize(sys.argv[1])
sys.stderr.write(f"stdin={sys.stdin.isatty()} stdout={sys.stdout.isatty()} "
                 f"stderr={sys.stderr.isatty()} lb={sys.stdout.line_buffering} size={size}\\n")
name = input()
print("hello", name)
"""


def _mixed(spawn, exe: str, tmp_path, tag: str) -> tuple:
    script = _script(tmp_path, "mixed.py", MIXED_SCRIPT)
    out = tmp_path / f"out-{tag}.txt"
    child = spawn("bash", ["--norc", "--noprofile", "-c", f"{exe} {script} {out} > {out}"])
    child.expect(r"stdin=.*?\r\n")
    report = child.after
    child.sendline("bob")
    status = _finish(child)
    return report, status, out.read_text()


def test_stdout_to_file_while_stdin_stderr_are_terminal(spawn, light_bundle, tmp_path):
    warm = _mixed(spawn, light_bundle, tmp_path, "warm")
    assert warm == ("stdin=True stdout=False stderr=True lb=False size=0\r\n", (0, None),
                    "line one\nhello bob\n")  # fmt: skip
    assert warm == _mixed(spawn, PYTHON, tmp_path, "cold")


# -- job control -------------------------------------------------------------------------------


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_ctrl_z_fg_and_ctrl_c(spawn, light_bundle):
    env = _env()
    env["PS1"] = "PROMPT$ "
    shell = spawn("bash", ["--norc", "--noprofile", "-i"], env=env)
    shell.expect_exact("PROMPT$ ")
    code = ("import os, time; print('pid', os.getpid(), flush=True); "
            "[print(i, flush=True) or time.sleep(0.2) for i in range(100)]")  # fmt: skip
    shell.sendline(f'{light_bundle} -c "{code}"')
    shell.expect(r"pid (\d+)\r\n")
    pid = int(shell.match.group(1))
    shell.expect_exact("\r\n2\r\n")
    shell.send("\x1a")
    shell.expect(r"Stopped.*\r\nPROMPT\$ ")
    deadline = time.monotonic() + 5
    while _state(pid) != "T" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _state(pid) == "T"
    last = max([2] + [int(n) for n in re.findall(r"(?m)^(\d+)\r$", shell.before)])
    # Stopped: nothing more comes for a while (it prints every 0.2 s when running).
    assert shell.expect([r"\r\n\d+\r\n", pexpect.TIMEOUT], timeout=0.8) == 1
    shell.sendline("fg")
    shell.expect_exact(f"\r\n{last + 1}\r\n{last + 2}\r\n")
    assert _state(pid) in "SR"
    shell.sendintr()
    shell.expect_exact("KeyboardInterrupt")
    shell.expect_exact("PROMPT$ ")
    shell.sendline("echo status=$?")
    shell.expect_exact("status=130")
    shell.expect_exact("PROMPT$ ")
    shell.sendline("exit")
    _finish(shell)
    assert not _running(pid)

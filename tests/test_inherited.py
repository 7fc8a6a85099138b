"""What a process takes from how it was started, warm as under python (issue 18, parts 4-6): the
caller's fds at their own numbers, ``sys.flags``, the -W/PYTHONWARNINGS filters behind the ones
libraries install at import, UTF-8 mode under the C locale, the interpreter's path.

Differential like test_differential.py (python is the oracle, both clients), and every warm
case checks that the server ran it; the cases that must go cold check that it did not.
"""

from __future__ import annotations

import os
import pty
import subprocess
import time

import pytest

from conftest import PYTHON, cli, disable_fallback
from test_differential import (  # noqa: F401  (client, general, warm: fixtures)
    Case,
    _env,
    _explain,
    client,
    general,
    run_both,
    server_runs,
    warm,
)
from test_native import sanitized, socket_of  # noqa: F401  (sanitized: a fixture)

TIMEOUT = 30

# -- fds --------------------------------------------------------------------------------------

FDS = r"""
import os, sys
os.write(3, b"to three\n")
with open(sys.argv[1]) as f:
    print(repr(f.read()), sys.argv[1])
for fd in (10, 255):
    print(fd, os.read(fd, 4), os.get_inheritable(fd), os.get_blocking(fd))
print(sorted(int(n) for n in os.listdir("/proc/self/fd")))
"""
SHELL = '"$EXE" -c "$CODE" <(echo substituted) 3>"$D/out" 10<"$D/in" 255<"$D/in"'


def _shell(exe: str, directory) -> tuple:
    """``EXE -c FDS <(cmd) 3>out 10<in 255<in`` in bash; what it printed and wrote to fd 3."""
    out = directory / "out"
    if out.exists():
        out.unlink()
    env = {**_env(Case("", []), str(directory)), "EXE": exe, "CODE": FDS, "D": str(directory)}
    proc = subprocess.run(["bash", "-c", SHELL], env=env, capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=TIMEOUT)  # fmt: skip
    return proc.returncode, proc.stdout, proc.stderr, out.read_bytes()


def test_fds_at_their_numbers(warm, tmp_path):
    """``3>file``, ``<(cmd)`` (/dev/fd/63, a pipe) and fds at 10 and 255, as inherited."""
    (tmp_path / "in").write_bytes(b"data")
    expected = _shell(PYTHON, tmp_path)
    before = server_runs(warm)
    actual = _shell(warm, tmp_path)
    assert server_runs(warm) == before + 1, "the starter did not run warm"
    assert actual == expected
    assert expected[0] == 0 and expected[3] == b"to three\n"


def test_fds_under_sanitizers(sanitized, tmp_path):
    """The C client's listing and sending of fds, under ASan and UBSan (a report would land on
    stderr)."""
    (tmp_path / "in").write_bytes(b"data")
    expected = _shell(PYTHON, tmp_path)
    before = server_runs(sanitized)
    assert _shell(sanitized, tmp_path) == expected
    assert server_runs(sanitized) == before + 1


def test_no_fd_of_another_run(warm):
    """A standby forked while another run goes must not hold that run's fds (its pidfd was)."""
    code = "import os; print(sorted(int(n) for n in os.listdir('/proc/self/fd')))"
    other = subprocess.Popen([warm, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        time.sleep(0.5)  # the next standby is forked while it runs
        runs = [subprocess.run([exe, "-c", code], capture_output=True, stdin=subprocess.DEVNULL,
                               timeout=TIMEOUT) for exe in (PYTHON, warm)]  # fmt: skip
    finally:
        other.communicate(timeout=TIMEOUT)
    assert runs[1].stdout == runs[0].stdout == b"[0, 1, 2, 3]\n"


def _with_fds(exe: str, count: int, directory) -> tuple:
    code = ("import os; fds = sorted(int(n) for n in os.listdir('/proc/self/fd'));"
            " print(len(fds), fds[:5], fds[-3:], os.fstat(fds[-2]).st_ino)")  # fmt: skip
    fds = [os.open(directory / "in", os.O_RDONLY) for _ in range(count)]
    try:
        proc = subprocess.run([exe, "-c", code], capture_output=True, pass_fds=fds,
                              stdin=subprocess.DEVNULL, timeout=TIMEOUT)  # fmt: skip
    finally:
        for fd in fds:
            os.close(fd)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("count", [200, 300])
def test_many_fds(warm, general, tmp_path, count):
    """Up to 250 besides stdio go in the request's one message; more run cold (python)."""
    (tmp_path / "in").write_bytes(b"data")
    starter = warm if count <= 250 else general  # the native client hands more to Python
    expected = _with_fds(PYTHON, count, tmp_path)
    before = server_runs(starter)
    actual = _with_fds(starter, count, tmp_path)
    assert server_runs(starter) == before + (count <= 250)
    assert actual == expected


def test_fds_with_a_terminal(general, tmp_path):
    """Terminal stdio (a PTY relay) and an fd beyond it."""
    code = "import os, sys; os.write(5, b'five'); print(sys.stdin.isatty(), os.get_inheritable(5))"

    def go(exe: str) -> tuple:
        master, slave = pty.openpty()
        env = {**_env(Case("", []), str(tmp_path)), "EXE": exe, "CODE": code, "D": str(tmp_path)}
        try:
            proc = subprocess.Popen(["bash", "-c", 'exec "$EXE" -c "$CODE" 5>"$D/out5"'],
                                    stdin=slave, stdout=slave, stderr=slave, env=env)
            os.close(slave)
            status = proc.wait(TIMEOUT)
            output = b""
            while True:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the slave side is closed
                    break
                if not chunk:
                    break
                output += chunk
        finally:
            os.close(master)
        return status, output, (tmp_path / "out5").read_bytes()

    expected = go(PYTHON)
    before = server_runs(general)
    actual = go(general)
    assert server_runs(general) == before + 1
    assert actual == expected == (0, b"True True\r\n", b"five")


# -- a library that silences a warning, and keeps an fd open, at import --------------------------

QUIETLIB = """
import os, warnings
warnings.filterwarnings("ignore", message="quietlib: silenced")
warnings.filterwarnings("ignore", category=DeprecationWarning)  # equal to a default filter
HELD = os.open(os.devnull, os.O_RDONLY)  # a library that keeps an fd
"""
WARN = """
import sys, warnings, quietlib
warnings.warn("quietlib: silenced at import")
print(sys.warnoptions, warnings.filters[:4])
warnings.warn("not silenced")
print("not reached under -W error")
"""


@pytest.fixture(scope="module")
def quiet(client, tmp_path_factory):
    """A bundle of ``quietlib`` (on PYTHONPATH) with its server running: (starter, env)."""
    directory = tmp_path_factory.mktemp(f"quiet-{client}")
    (directory / "mods").mkdir()
    (directory / "mods" / "quietlib.py").write_text(QUIETLIB)
    env = {"PYTHONPATH": str(directory / "mods")}
    path = str(directory / "python-quiet.bin")
    cli("bundle", "quietlib", "-o", path, "--idle-timeout", "600", "--client", client,
        env={**os.environ, **env})  # fmt: skip
    subprocess.run([path, "-c", "pass"], check=True, timeout=120, capture_output=True,
                   stdin=subprocess.DEVNULL)  # fmt: skip
    if client == "native":
        disable_fallback(path)  # warm or cold by the C client itself, never through Python
    yield path, env
    cli("stop", path, check=False)


@pytest.mark.parametrize("args, env", [
    (["-W", "error"], {}),
    (["-W", "ignore::DeprecationWarning", "-Werror"], {}),
    ([], {"PYTHONWARNINGS": "error"}),
], ids=["W-error", "W-equal-to-a-default", "PYTHONWARNINGS"])  # fmt: skip
def test_warning_filters_behind_the_libraries(quiet, tmp_path, args, env):
    starter, base = quiet
    case = Case("w", [*args, "{d}/s.py"], {"s.py": WARN}, env={**base, **env})
    expected, actual = run_both(starter, case, str(tmp_path / "w"))
    assert actual == expected, _explain(expected, actual)
    assert expected[0] == 1 and b"UserWarning: not silenced" in expected[2]


def test_fd_held_by_the_server_runs_cold(quiet, tmp_path):
    """A caller's fd at a number a library holds open in the server: a fork cannot have both."""
    starter, env_mods = quiet
    held = subprocess.run([starter, "-c", "import quietlib; print(quietlib.HELD)"], env={
        **os.environ, **env_mods}, capture_output=True, check=True, stdin=subprocess.DEVNULL,
        timeout=TIMEOUT).stdout  # fmt: skip
    fd = int(held)
    code = f"import os, quietlib; print(os.read({fd}, 4), quietlib.HELD != {fd})"
    (tmp_path / "in").write_bytes(b"data")

    def go(exe: str) -> tuple:
        env = {**os.environ, **env_mods, "EXE": exe, "CODE": code, "D": str(tmp_path)}
        proc = subprocess.run(["bash", "-c", f'exec "$EXE" -c "$CODE" {fd}<"$D/in"'], env=env,
                              capture_output=True, stdin=subprocess.DEVNULL, timeout=TIMEOUT)
        return proc.returncode, proc.stdout, proc.stderr

    expected = go(PYTHON)
    before = server_runs(starter)
    actual = go(starter)
    assert server_runs(starter) == before  # cold: python ran it
    assert actual == expected == (0, b"b'data' True\n", b"")


# -- sys.flags, the locale's UTF-8 mode, the interpreter --------------------------------------

FLAGS = ("import subprocess, sys; print(sys.flags); "
         "print(subprocess._args_from_interpreter_flags())")  # fmt: skip
SPAWN_B = """
import multiprocessing as mp, os, helper

def where(_):
    return os.path.exists(os.path.join(os.path.dirname(helper.__file__), '__pycache__'))

if __name__ == '__main__':
    with mp.get_context('spawn').Pool(1) as pool:
        print(pool.map(where, [0]), where(0))
"""
LOCALE = ("import locale, os, sys; print(sys.flags.utf8_mode, sys.getfilesystemencoding(), "
          "locale.getpreferredencoding(False), sys.stdout.encoding, os.environ.get('LC_CTYPE'))")
FLAG_CASES = [
    Case("flags-B", ["-B", "-c", FLAGS]),
    Case("flags-q", ["-q", "-c", FLAGS]),
    Case("flags-i", ["-i", "-c", FLAGS]),
    Case("flags-env", ["-c", FLAGS], env={"PYTHONDONTWRITEBYTECODE": "1", "PYTHONINSPECT": "1"}),
    Case("flags-Bq-W", ["-Bq", "-W", "error::DeprecationWarning", "-c", FLAGS]),
    Case("spawn-child-of-B", ["-B", "{d}/s.py"], {"s.py": SPAWN_B, "helper.py": ""}),
    Case("interpreter", ["-c", "import sys; print(sys.executable, sys.orig_argv[0], "
                               "open('/proc/self/comm').read())"]),
]  # fmt: skip


@pytest.mark.parametrize("case", FLAG_CASES, ids=[c.name for c in FLAG_CASES])
def test_flags_as_python(warm, tmp_path, case):
    expected, actual = run_both(warm, case, str(tmp_path / "w"))
    assert actual == expected, _explain(expected, actual)


def test_c_locale_is_utf8_mode(general, tmp_path):
    """LANG=C: python runs in UTF-8 mode (PEP 540) after coercing LC_CTYPE to C.UTF-8 (PEP
    538), the locale of other callers: such runs get a server of their own, in that mode."""
    env = {"LANG": "C", "LC_ALL": None, "LC_CTYPE": None}
    case = Case("locale", ["-c", LOCALE], env=env)
    run_env = _env(case, str(tmp_path))
    subprocess.run([general, "-c", "pass"], env=run_env, check=True, timeout=120,
                   stdin=subprocess.DEVNULL)  # its server, started if need be # fmt: skip
    socket = socket_of(general, run_env)
    runs = _runs_at(socket)
    expected, actual = run_both_unchecked(general, case, str(tmp_path / "w"))
    assert _runs_at(socket) == runs + 1, "the starter did not run warm"
    assert actual == expected, _explain(expected, actual)
    assert expected[1].startswith(b"1 utf-8 ")  # UTF-8 mode (3.10 names the encoding UTF-8)


def _runs_at(path: str) -> int:
    import socket

    from preloaded import wire

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        wire.send(sock, {"v": 1, "cmd": "status"})
        return wire.recv_frame(sock, wire.FrameReader())["runs"]


def run_both_unchecked(starter: str, case: Case, directory: str) -> tuple:
    from test_differential import _run

    return _run(PYTHON, case, directory), _run(starter, case, directory)


@pytest.mark.torch  # numpy: in the 3.11 venv only
def test_W_error_against_numpys_filters(tmp_path):
    """numpy ignores "numpy.dtype size changed" from its import on: under -W error python
    still ignores it."""
    from conftest import make_bundle

    starter = make_bundle(tmp_path / "python-np.bin", "numpy", client="python")
    code = ("import warnings, numpy; warnings.warn('numpy.dtype size changed, may indicate "
            "binary incompatibility', RuntimeWarning); print('ignored')")  # fmt: skip
    try:
        subprocess.run([starter, "-c", "pass"], check=True, timeout=120, capture_output=True)
        expected, actual = run_both(starter, Case("np", ["-W", "error", "-c", code]),
                                    str(tmp_path / "w"))  # fmt: skip
    finally:
        cli("stop", starter, check=False)
    assert actual == expected == (0, b"ignored\n", b"")

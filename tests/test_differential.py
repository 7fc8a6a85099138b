"""Differential tests: every case runs under the real interpreter and under the starter.

Exit status, stdout and stderr must match byte for byte (DESIGN.md, "Fidelity rules"). Both runs
get pipes (no terminal), the same environment and the same working directory, rebuilt from
scratch between the two runs so that neither sees what the other wrote (``__pycache__``, ...).
Each starter run is checked to have been served warm by the server, so that a silent cold
fallback cannot make a case pass.

Left out on purpose (a forked child cannot match them; see the module's report in the PR):
``sys.flags`` (the server's), ``sys.modules`` (the preloaded modules are there),
``os.getppid()`` (the server), start-up-only variables (they make the run cold instead).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field

import pytest

from conftest import PYTHON
from preloaded import wire
from preloaded.paths import Paths

TIMEOUT = 30


class Link(str):
    """A file entry that is a symlink to the given (relative) target."""


@dataclass
class Case:
    name: str
    args: list  # after the interpreter; "{d}" is the case's directory
    files: dict = field(default_factory=dict)  # relative path -> str, bytes or Link
    stdin: bytes = b""
    env: dict = field(default_factory=dict)  # additions; None removes; "{d}" is formatted
    cwd: str = ""  # relative to the case's directory
    merge: bool = False  # stderr into the same pipe as stdout
    umask: int = -1
    close_fds: tuple = ()  # fds closed in the child before it runs the interpreter


def script(source: str) -> dict:
    return {"s.py": textwrap.dedent(source).lstrip()}


S = "{d}/s.py"
SHOW_MAIN = """
    import sys
    print(sys.argv, repr(sys.path[0]), __name__)
    print(sorted(k for k in globals() if k.startswith('__')))
    print(repr(globals().get('__file__')), repr(globals().get('__cached__')))
    print(__spec__, __package__, type(__loader__).__name__, getattr(__loader__, 'name', '-'))
"""
STREAMS = """
    import sys
    for s in (sys.stdin, sys.stdout, sys.stderr):
        b = s.buffer
        print(repr(s), s.encoding, s.errors, s.line_buffering, s.write_through,
              type(b).__name__, repr(getattr(b, 'raw', b)), s.fileno(), s.isatty(),
              s is getattr(sys, '__%s__' % s.name.strip('<>')))
"""
INTERLEAVE = """
    import sys
    print('out 1')
    print('err 1', file=sys.stderr)
    sys.stdout.write('out 2 no newline ')
    sys.stderr.write('err 2 no newline ')
    print('out 3')
    print('err 3', file=sys.stderr)
"""
NON_ASCII = """
    import sys
    print('caf\\u00e9 \\u20ac', sys.stdout.encoding, sys.stdout.errors)
    print('err caf\\u00e9 \\u20ac', sys.stderr.encoding, sys.stderr.errors, file=sys.stderr)
    sys.stdout.flush()
    print('\\u20ac only')
"""
FLUSH_ORDER = """
    import atexit, sys
    atexit.register(sys.stderr.write, 'atexit\\n')
    print('main')
    if sys.argv[1:] == ['1']:
        sys.exit('exit message')
    if sys.argv[1:] == ['2']:
        1 / 0
"""
REPL_INPUT = b"print(x)\nx + 1\n1 / 0\nif x:\n  print('y')\n\nimport sys; sys.exit(5)\n"
MP = """
    import multiprocessing as mp
    import sys

    def square(x):
        return x * x

    if __name__ == '__main__':
        with mp.get_context(sys.argv[1]).Pool(2) as pool:
            print(pool.map(square, range(10)))
"""

CASES = [
    # sys.argv, sys.path[0], __main__ for each way of naming the code
    Case("argv-script", [S, "a", "b c", ""], script(SHOW_MAIN)),
    Case("argv-script-relative", ["s.py", "-x"], script(SHOW_MAIN), cwd="."),
    Case("argv-script-symlink", ["{d}/link/s.py", "1"],
         {"real/s.py": textwrap.dedent(SHOW_MAIN).lstrip(), "link/s.py": Link("../real/s.py")}),
    Case("argv-code", ["-c", "import sys; print(sys.argv, repr(sys.path[0]))", "a", "-b"]),
    Case("future-not-inherited-code", ["-c", "def f(x: int): pass\nprint(f.__annotations__)"]),
    Case("future-not-inherited-stdin", [], stdin=b"def f(x: int): pass\nprint(f.__annotations__)\n"),
    Case("dir-code", ["-c", "print(sorted(dir()), __name__, __spec__, __loader__)"]),
    Case("argv-stdin-dash", ["-", "a", "b"], stdin=SHOW_MAIN.replace("\n    ", "\n").encode()),
    Case("argv-stdin-noargs", [], stdin=SHOW_MAIN.replace("\n    ", "\n").encode()),
    Case("module-in-package", ["-m", "pkg.mod", "a"], {
        "pkg/__init__.py": "print('init', __name__)\n",
        "pkg/mod.py": "import sys\nprint(sys.argv, repr(sys.path[0]), __name__, __file__)\n"
                      "print(__spec__.name, __spec__.origin, __package__, __cached__)\n",
    }, cwd="."),
    Case("module-package-main", ["-m", "pkg", "x", "y"], {
        "pkg/__init__.py": "",
        "pkg/__main__.py": "import sys\nprint(sys.argv, __name__, __spec__.name, __package__)\n"
                           "print(repr(sys.path[0]), __file__)\n",
    }, cwd="."),
    Case("module-missing", ["-m", "no_such_module_here"]),
    Case("script-missing", ["{d}/missing.py", "a"]),
    Case("script-missing-relative", ["missing.py"], cwd="."),
    # process state
    Case("cwd", ["-c", "import os; print(os.getcwd())"], {"sub/x": ""}, cwd="sub"),
    Case("environ-equal", ["-c", "import os; print(sorted(os.environ.items()))"],
         env={"PY_DIFF_CUSTOM": "v\u00e9 1", "PY_DIFF_EMPTY": ""}),
    Case("pythonpath", [S], {**script("""
            import sys, libmod
            print(libmod.__file__, [p for p in sys.path if 'pp-' in p])
            print(sys.path == [sys.path[0]] + sys.path[1:])
         """), "pp-a/libmod.py": "", "pp-b/x.py": ""},
         env={"PYTHONPATH": "{d}/pp-a:{d}/pp-b"}),
    Case("pythonpath-relative", ["-c", "import sys, libmod; print(libmod.__file__, sys.path[:3])"],
         {"pp-a/libmod.py": ""}, env={"PYTHONPATH": "pp-a::nonexistent"}, cwd="."),
    Case("umask", ["-c", "import os; m = os.umask(0); print(oct(m)); os.umask(m); "
                         "open('f', 'w').close(); print(oct(os.stat('f').st_mode & 0o777))"],
         cwd=".", umask=0o027),
    # stdio
    Case("interleave-merged", [S], script(INTERLEAVE), merge=True),
    Case("interleave-merged-u", ["-u", S], script(INTERLEAVE), merge=True),
    Case("interleave-merged-unbuffered-env", [S], script(INTERLEAVE), merge=True,
         env={"PYTHONUNBUFFERED": "1"}),
    Case("streams", [S], script(STREAMS)),
    Case("streams-u", ["-u", S], script(STREAMS)),
    Case("streams-ioencoding", [S], script(STREAMS), env={"PYTHONIOENCODING": "latin-1"}),
    Case("ioencoding-latin1", [S], script(NON_ASCII), env={"PYTHONIOENCODING": "latin-1"}),
    Case("ioencoding-ascii-replace", [S], script(NON_ASCII),
         env={"PYTHONIOENCODING": "ascii:replace"}),
    Case("ioencoding-errors-only", [S], script(NON_ASCII), env={"PYTHONIOENCODING": ":strict"}),
    Case("code-unicode", ["-c", "print('h\u00e9llo \u20ac', ascii('\u00e9'))"]),
    Case("encoding-cookie", [S], {"s.py": b"# -*- coding: latin-1 -*-\n"
                                          b"s = 'caf\xe9'\nprint(s, len(s))\n"}),
    Case("input", [S], script("""
            print(repr(input('prompt> ')))
            print(repr(input()))
            input()
         """), stdin=b"first line\nsecond\n"),
    Case("stdin-read", ["-c", "import sys; d = sys.stdin.read(); print(len(d), repr(d[-9:]))"],
         stdin="x\u00e9\n".encode() * 5000),
    Case("stdin-closed", ["-c", "import os, sys; print(sys.stdin, sys.__stdin__); "
                                "print(os.open(os.devnull, os.O_RDONLY))"], close_fds=(0,)),
    Case("stdout-closed", ["-c", "import sys; print('lost'); "
                                 "print(sys.stdout, 'ok', file=sys.stderr)"], close_fds=(1,)),
    # -i after the code, on a stdin that is no terminal
    Case("inspect-pipe", ["-i", "-c", "x = 41"], stdin=REPL_INPUT),
    Case("inspect-pipe-merged", ["-i", "-c", "x = 41"], stdin=REPL_INPUT, merge=True),
    Case("inspect-pipe-eof", ["-i", "-c", "x = 41"], stdin=b"x\n"),
    Case("inspect-after-error", ["-i", "-c", "1 / 0"], stdin=b"print('in repl')\n"),
    Case("inspect-after-exit", ["-i", "-c", "import sys; sys.exit(3)"], stdin=b"print('r')\n"),
    Case("inspect-script-file", ["-i", S], script("print(__file__)"), stdin=b"print(dir())\n"),
    Case("inspect-env", [S], script("y = 2"), stdin=b"print(y)\n", env={"PYTHONINSPECT": "1"}),
    Case("inspect-env-exit", ["-c", "import sys; sys.exit(3)"], env={"PYTHONINSPECT": "1"}),
    Case("inspect-set-by-code", ["-c", "import os; os.environ['PYTHONINSPECT'] = '1'"],
         stdin=b"print('no prompt without a terminal')\n"),
    Case("repl-pipe-i", ["-i"], stdin=REPL_INPUT),
    Case("repl-pipe-iq", ["-q", "-i"], stdin=b"1 + 1\n"),
    Case("repl-pipe-i-startup", ["-i"], {"st.py": "print('startup')\n"}, stdin=b"2\n",
         env={"PYTHONSTARTUP": "{d}/st.py"}),
    # exit status
    Case("exit-3", ["-c", "import sys; print('o'); sys.exit(3)"]),
    Case("exit-msg", ["-c", "import sys; sys.exit('bye \u00e9')"]),
    Case("exit-none", ["-c", "import sys; sys.exit(None)"]),
    Case("exit-256", ["-c", "import sys; sys.exit(256)"]),
    Case("exit-minus-1", ["-c", "raise SystemExit(-1)"]),
    Case("exit-true", ["-c", "raise SystemExit(True)"]),
    Case("exit-list", ["-c", "raise SystemExit([1, 'a'])"]),
    Case("exit-huge", ["-c", "raise SystemExit(2 ** 70)"]),
    Case("exception-chained", [S], script("""
            def inner():
                raise KeyError('k')
            try:
                inner()
            except KeyError as e:
                raise ValueError('outer') from e
         """)),
    Case("exception-during-handling", [S], script("""
            try:
                1 / 0
            except ZeroDivisionError:
                {}['missing']
         """)),
    Case("exception-in-code", ["-c", "def f():\n    raise RuntimeError('x')\nf()"]),
    Case("syntax-error-script", [S], {"s.py": "print('never')\nx = (1,\n"}),
    Case("syntax-error-code", ["-c", "x = = 1"]),
    Case("keyboard-interrupt", [S], script("""
            print('before')
            raise KeyboardInterrupt
         """)),
    Case("flush-fails-at-exit", ["-c", "import os; print('pending'); os.close(1)"]),
    Case("flush-fails-at-exit-script", [S], script("""
            import os
            print('pending')
            os.close(1)
         """)),
    Case("flush-order-script", [S, "0"], script(FLUSH_ORDER), merge=True),
    Case("flush-order-script-exit", [S, "1"], script(FLUSH_ORDER), merge=True),
    Case("flush-order-script-exception", [S, "2"], script(FLUSH_ORDER), merge=True),
    Case("flush-order-stdin", [], stdin=textwrap.dedent(FLUSH_ORDER).encode(), merge=True),
    Case("flush-order-code", ["-c", textwrap.dedent(FLUSH_ORDER), "2"], merge=True),
    Case("flush-order-module", ["-m", "s", "1"], script(FLUSH_ORDER), cwd=".", merge=True),
    Case("stderr-closed-by-script", ["-c", "import os; os.close(2); print('out'); 1/0"]),
    Case("os-exit", ["-c", "import os; print('buffered, lost'); os._exit(7)"]),
    Case("atexit-order", [S], script("""
            import atexit, sys
            class Boom:
                def __call__(self):
                    raise ValueError('in atexit')
                def __repr__(self):
                    return '<Boom>'
            atexit.register(print, 'registered first')
            atexit.register(Boom())
            atexit.register(print, 'registered last')
            print('main end')
            sys.exit(4)
         """), merge=True),
    Case("atexit-after-traceback", ["-c", "import atexit; atexit.register(print, 'bye'); 1/0"],
         merge=True),
    Case("thread-non-daemon", [S], script("""
            import threading, time
            def work():
                time.sleep(0.2)
                print('thread done')
            threading.Thread(target=work).start()
            print('main done')
         """)),
    Case("thread-daemon", [S], script("""
            import threading
            threading.Thread(target=threading.Event().wait, daemon=True).start()
            print('main done', threading.active_count())
         """)),
    Case("thread-exception", [S], script("""
            import threading
            def work():
                raise ValueError('in thread')
            t = threading.Thread(target=work, name='worker')
            t.start(); t.join()
            print('after')
         """)),
    # the script as a module
    Case("pickle-main-class", [S], script("""
            import pickle
            class Point:
                def __init__(self, x):
                    self.x = x
            data = pickle.dumps(Point(3))
            p = pickle.loads(data)
            print(type(p), p.x, data)
         """)),
    Case("inspect-getsource", [S], script("""
            import inspect
            def f(a):
                return a + 1  # here
            print(inspect.getsource(f), inspect.getsourcefile(f))
         """)),
    Case("multiprocessing-fork", [S, "fork"], script(MP)),
    Case("multiprocessing-spawn", [S, "spawn"], script(MP)),
    Case("subprocess", [S], script("""
            import subprocess, sys
            print('parent', flush=True)
            subprocess.run([sys.executable, '-c', 'import sys; print(sys.argv)', 'z'], check=True)
            print(subprocess.check_output(['sh', '-c', 'echo "$PY_DIFF_SUB"']))
         """), env={"PY_DIFF_SUB": "from env"}),
    # warnings and bytecode
    Case("warnings-format", [S], script("""
            import warnings
            warnings.warn('hello')
            warnings.warn('deprecated here', DeprecationWarning)
            warnings.warn('pending', PendingDeprecationWarning)
            print('end')
         """)),
    Case("W-error-deprecation", ["-W", "error::DeprecationWarning", S], script("""
            import warnings, sys
            print(sys.warnoptions)
            warnings.warn('user warning only shown')
            warnings.warn('now an error', DeprecationWarning)
         """)),
    Case("PYTHONWARNINGS", [S], script("""
            import warnings, sys
            print(sys.warnoptions)
            warnings.warn('ignored', UserWarning)
            warnings.warn('error', RuntimeWarning)
         """), env={"PYTHONWARNINGS": "ignore::UserWarning,error::RuntimeWarning"}),
    Case("W-and-PYTHONWARNINGS", ["-Wdefault", "-W", "ignore::RuntimeWarning", "-c",
                                  "import sys, warnings; print(sys.warnoptions); "
                                  "print(warnings.filters[:3])"],
         env={"PYTHONWARNINGS": "error"}),
    Case("B-flag", ["-B", S], {**script("""
            import os, sys, helper
            print(sys.dont_write_bytecode, os.path.exists(os.path.join(os.path.dirname(__file__),
                  '__pycache__')))
         """), "helper.py": ""}),
    Case("bytecode-written", [S], {**script("""
            import os, sys, helper
            print(sys.dont_write_bytecode, sorted(os.listdir(os.path.join(
                  os.path.dirname(__file__), '__pycache__'))))
         """), "helper.py": ""}),
]


def _build(directory: str, case: Case) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    for rel, content in case.files.items():
        path = os.path.join(directory, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if isinstance(content, Link):
            os.symlink(content, path)
        elif isinstance(content, bytes):
            with open(path, "wb") as f:
                f.write(content)
        else:
            with open(path, "w") as f:
                f.write(content)


def _env(case: Case, directory: str) -> dict:
    # The caller's PYTHON* variables (PYTHONUNBUFFERED, PYTHONDONTWRITEBYTECODE, ...) would
    # change what the cases test: each case sets the ones it is about.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    for name, value in case.env.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value.format(d=directory)
    return env


def _run(exe: str, case: Case, directory: str) -> tuple:
    _build(directory, case)

    def preexec():
        for fd in case.close_fds:
            os.close(fd)

    proc = subprocess.run(
        [exe] + [a.format(d=directory) for a in case.args],
        input=None if 0 in case.close_fds else case.stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if case.merge else subprocess.PIPE,
        cwd=os.path.join(directory, case.cwd),
        env=_env(case, directory),
        umask=case.umask,
        preexec_fn=preexec if case.close_fds else None,
        timeout=TIMEOUT,
    )
    return proc.returncode, proc.stdout, proc.stderr


def server_runs(bundle: str) -> int:
    """How many runs this bundle's server has forked (it must be running)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(Paths(bundle).socket)
        wire.send(sock, {"v": 1, "cmd": "status"})
        return wire.recv_frame(sock, wire.FrameReader())["runs"]


@pytest.fixture(scope="module", params=["python", "native"])
def client(request):
    return request.param


@pytest.fixture(scope="module")
def warm(client, request):
    """The light bundle with its server started: the Python starter, or the native one that
    cannot fall back to Python (every run it does not take itself fails)."""
    if client == "native":
        return request.getfixturevalue("native_strict")
    light_bundle = request.getfixturevalue("light_bundle")
    proc = subprocess.run([light_bundle, "-c", "pass"], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return light_bundle


@pytest.fixture(scope="module")
def general(client, warm, request):
    """The starter for runs the native client hands to the Python starter (closed stdio, a
    codec to look up): the native one that can fall back, or the Python one."""
    if client == "python":
        return warm
    bundle = request.getfixturevalue("native_bundle")
    proc = subprocess.run([bundle, "-c", "pass"], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return bundle


def native_takes(case: Case) -> bool:
    """Whether the C client runs ``case`` itself (else it execs the Python starter)."""
    codec = (case.env.get("PYTHONIOENCODING") or "").partition(":")[0]
    return not case.close_fds and not codec


def run_both(starter: str, case: Case, directory: str) -> tuple:
    expected = _run(PYTHON, case, directory)
    before = server_runs(starter)
    actual = _run(starter, case, directory)
    assert server_runs(starter) == before + 1, "the starter did not run warm"
    return expected, actual


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_same_as_python(warm, general, tmp_path, case):
    directory = str(tmp_path / "w")
    expected, actual = run_both(warm if native_takes(case) else general, case, directory)
    assert actual == expected, _explain(expected, actual)


def _explain(expected: tuple, actual: tuple) -> str:
    lines = []
    for what, exp, act in zip(("status", "stdout", "stderr"), expected, actual):
        if exp != act:
            lines += [f"{what} differs:", f"  python:  {exp!r}", f"  starter: {act!r}"]
    return "\n".join(lines)


def test_case_count():
    assert len(CASES) >= 30


BROKEN_PIPE = "for i in range(100000): print(i)"


def _first_line_then_close(exe: str, directory: str) -> tuple:
    """``exe -c BROKEN_PIPE | head -1``: read one line, close the pipe, collect the rest."""
    err_path = os.path.join(directory, "stderr")
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([exe, "-c", BROKEN_PIPE], stdout=subprocess.PIPE, stderr=err,
                                cwd=directory)  # fmt: skip
        try:
            first = proc.stdout.readline()
            proc.stdout.close()
            status = proc.wait(TIMEOUT)
        finally:
            proc.kill()
            proc.wait(TIMEOUT)
    with open(err_path, "rb") as f:
        return status, first, f.read()


def test_broken_pipe(warm, tmp_path):
    directory = str(tmp_path)
    expected = _first_line_then_close(PYTHON, directory)
    before = server_runs(warm)
    actual = _first_line_then_close(warm, directory)
    assert server_runs(warm) == before + 1
    assert actual == expected
    assert expected[0] == 1 and expected[2].endswith(b"BrokenPipeError: [Errno 32] Broken pipe\n")


def test_unknown_ioencoding_runs_cold(general, tmp_path):
    """Python dies at start-up; the message names a thread id, hence the masking."""
    case = Case("bogus", ["-c", "print(1)"], env={"PYTHONIOENCODING": "no-such-codec"})
    directory = str(tmp_path / "w")
    expected = _run(PYTHON, case, directory)
    before = server_runs(general)
    actual = _run(general, case, directory)
    assert server_runs(general) == before  # not warm: the starter ran python itself

    def mask(result):
        return result[0], result[1], re.sub(rb"0x[0-9a-f]+", b"0x?", result[2])

    assert mask(actual) == mask(expected)
    assert expected[0] == 1 and b"LookupError: unknown encoding: no-such-codec" in expected[2]


def test_keyboard_interrupt_is_death_by_sigint(warm, tmp_path):
    case = Case("ki", ["-c", "raise KeyboardInterrupt"])
    expected, actual = run_both(warm, case, str(tmp_path / "w"))
    assert expected[0] == actual[0] == -signal.SIGINT
    assert actual == expected


def test_random_differs_between_warm_runs(warm):
    code = "import random; print(random.random())"
    before = server_runs(warm)
    outs = [subprocess.run([warm, "-c", code], capture_output=True, timeout=TIMEOUT).stdout
            for _ in range(2)]  # fmt: skip
    assert server_runs(warm) == before + 2
    assert outs[0] != outs[1] and all(outs)


def test_interpreter_is_the_shebangs(warm, client):
    from preloaded.install.installer import starter_config

    if client == "python":
        with open(warm) as f:
            assert f.readline().split()[0] == "#!" + PYTHON
    assert starter_config(warm)["python"] == sys.executable == PYTHON

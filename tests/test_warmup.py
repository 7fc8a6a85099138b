"""The warm-up hook: warm.py runs once in the server; children get its globals as preloaded.warm.

Real servers and children. CUDA is faked by a ``torch`` module that warm.py itself puts into
``sys.modules`` (as tests/test_server.py does for a preloaded module): only that server sees
it, and it refuses to serve.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from conftest import PYTHON, cli

RUN_TIMEOUT = 120


def run(bundle: str, *args: str, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run([bundle, *args], capture_output=True, text=True, timeout=RUN_TIMEOUT,
                          **kw)  # fmt: skip


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return proc.stdout


def bundle_with(tmp_path, warm_source: str, *modules: str, name: str = "warm.py") -> tuple:
    warm = tmp_path / name
    warm.write_text(warm_source)
    out = str(tmp_path / "python-warm.bin")
    cli("bundle", *(modules or ("json",)), "--warmup", str(warm), "-o", out,
        "--idle-timeout", "600")  # fmt: skip
    return out, warm


def plain(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-c", code], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL)  # fmt: skip


@pytest.fixture
def stop_after():
    started: list = []
    yield started
    for path in started:
        cli("stop", path, check=False)


SHOW = ("import os\n"
        "from preloaded import warm\n"
        "import preloaded.warm as again\n"
        "print(warm is again, warm.table, warm.double(21), id(warm.table),"
        " os.getppid())\n")  # fmt: skip


def test_warmup_globals_are_preloaded_warm(tmp_path, stop_after):
    """Guards the hook: warm.py runs once, in the server, and every child sees its globals
    (the same objects, inherited by fork, not rebuilt per run)."""
    counter = tmp_path / "ran"
    source = (f"with open({str(counter)!r}, 'a') as f:\n    f.write('x')\n"
              "table = {'a': 1}\n"
              "def double(x):\n    return 2 * x\n")  # fmt: skip
    bundle, _ = bundle_with(tmp_path, source)
    stop_after.append(bundle)
    first = ok(run(bundle, "-c", SHOW)).split()
    second = ok(run(bundle, "-c", SHOW)).split()
    assert first[:4] == ["True", "{'a':", "1}", "42"]
    assert first == second  # same object address and same server in both runs
    assert counter.read_text() == "x"  # ran once, in the server
    st = json.loads(cli("status", "--json", bundle).stdout)
    assert st["warmup"] == str(tmp_path / "warm.py") and st["warmup_time"] > 0
    assert "warm-up:   " in cli("status", bundle).stdout


def assert_fell_back(via, code: str, *fragments) -> str:
    """``via`` ran cold after a one-line warning naming ``fragments``; returns the rest of its
    stderr beyond python's own."""
    cold = plain(code)
    warning, _, rest = via.stderr.partition("\n")
    assert warning.startswith("py-preload: ") and warning.endswith("running without the server")
    for fragment in fragments:
        assert fragment in warning, warning
    assert (via.returncode, via.stdout) == (cold.returncode, cold.stdout)
    assert rest.endswith(cold.stderr)
    return rest[: len(rest) - len(cold.stderr)]


FAKE_CUDA = """\
import sys, types
state = {"on": False}
torch = types.ModuleType("torch")
torch.cuda = types.SimpleNamespace(is_initialized=lambda: state["on"])
sys.modules["torch"] = torch
ready = 1
state["on"] = True  # what torch.cuda.init() or torch.zeros(1, device="cuda") would do
after = 2
"""


def test_warmup_initialising_cuda_is_refused_naming_the_line(tmp_path):
    """Guards the CUDA check: a server with CUDA initialised would break every child's GPU;
    the error must say which line of warm.py did it."""
    bundle, warm = bundle_with(tmp_path, FAKE_CUDA)
    code = "import sys; print('cold is fine', sys.argv)"
    via = run(bundle, "-c", code)
    assert_fell_back(via, code, f"warm-up {warm} initialised CUDA at line 7",
                     'state["on"] = True', "Build on the CPU in warm-up")  # fmt: skip


def test_warmup_initialising_cuda_in_a_function(tmp_path):
    """Guards the tracer across calls: CUDA touched inside a function of warm.py (or of a
    library it calls) names the line that did it, not a line after."""
    source = FAKE_CUDA.replace('state["on"] = True', "pass").replace(
        "after = 2\n", 'def build():\n    state["on"] = True\n    return 3\nmodel = build()\n')
    bundle, _warm = bundle_with(tmp_path, source)
    via = run(bundle, "-c", "pass")
    assert_fell_back(via, "pass", "initialised CUDA at line 9", 'state["on"] = True')


def test_warmup_initialising_cuda_in_a_library_call(tmp_path):
    """Guards the tracer outside warm.py: code of another file (torch's, here a function
    compiled under another name) is not traced; the line of warm.py that called it is named."""
    library = ('torch.cuda.init = eval(compile("lambda: state.update(on=True)", "<torch>",'
               ' "eval"))\n')
    source = FAKE_CUDA.replace('state["on"] = True', "torch.cuda.init()").replace(
        "ready = 1\n", library)
    bundle, _warm = bundle_with(tmp_path, source)
    via = run(bundle, "-c", "pass")
    assert_fell_back(via, "pass", "initialised CUDA at line 7 (torch.cuda.init()  #")


RAISES = """\
table = {}
def load():
    raise ValueError("no such checkpoint")
model = load()
"""


def test_raising_warmup_falls_back_cold_with_its_traceback(tmp_path):
    """Guards a broken warm.py: a clear error with warm.py's traceback, the run goes cold
    with python's exact result, and fixing warm.py is picked up at once (no back-off)."""
    bundle, warm = bundle_with(tmp_path, RAISES)
    code = "import sys; print('still runs'); sys.exit(4)"
    via = run(bundle, "-c", code)
    extra = assert_fell_back(via, code, f"warm-up {warm} raised ValueError: no such checkpoint")
    assert extra.startswith("Traceback (most recent call last):\n")
    assert f'File "{warm}", line 4, in <module>' in extra and "line 3, in load" in extra
    assert extra.rstrip().endswith("ValueError: no such checkpoint") and "preloaded" not in extra
    try:
        time.sleep(0.02)
        warm.write_text(RAISES.replace("raise ValueError", "return 'ok'  #"))
        out = ok(run(bundle, "-c", "from preloaded import warm; print(warm.model)"))
        assert out == "ok\n"
    finally:
        cli("stop", bundle, check=False)


def test_editing_warmup_restarts_the_server(tmp_path, stop_after):
    """Guards staleness: an edited warm.py must not leave children with the old globals."""
    bundle, warm = bundle_with(tmp_path, "value = 1\n")
    stop_after.append(bundle)
    code = "import os; from preloaded import warm; print(warm.value, os.getppid())"
    value, pid = ok(run(bundle, "-c", code)).split()
    assert value == "1"
    warm.write_text("value = 2\n")
    st = os.stat(warm)
    os.utime(warm, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    value, new_pid = ok(run(bundle, "-c", code)).split()
    assert value == "2" and new_pid != pid


def test_warmup_thread_is_warned_about(tmp_path, stop_after):
    """Guards the thread rule: threads started by warm.py do not survive fork; status says so,
    what it means for the runs and what to do."""
    source = ("import threading, time\n"
              "threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n")
    bundle, warm = bundle_with(tmp_path, source)
    stop_after.append(bundle)
    ok(run(bundle, "-c", "pass"))
    st = json.loads(cli("status", "--json", bundle).stdout)
    warning = next(w for w in st["warnings"] if f"the warm-up {warm} started 1 thread" in w)
    assert "Warm runs do not have them" in warning  # what it means
    assert "PY_PRELOAD_COLD=1 and end the thread before the warm-up returns" in warning  # to do
    assert "warning:   importing the warm-up" in cli("status", bundle).stdout


def test_bundle_rejects_a_bad_warmup(tmp_path):
    """Guards `bundle --warmup`: a missing or non-compiling file is one clear line, no FILE."""
    out = tmp_path / "python-bad.bin"
    missing = cli("bundle", "json", "--warmup", str(tmp_path / "nope.py"), "-o", str(out),
                  check=False)  # fmt: skip
    assert missing.returncode == 2 and not out.exists()
    (tmp_path / "broken.py").write_text("def f(:\n")
    broken = cli("bundle", "json", "--warmup", str(tmp_path / "broken.py"), "-o", str(out),
                 check=False)  # fmt: skip
    assert broken.returncode == 1 and "does not compile" in broken.stderr and not out.exists()
    assert broken.stderr.count("\n") == 1


TORCH_WARM = """\
import torch
torch.manual_seed(0)
weights = torch.nn.Linear(4, 2)  # built on the CPU, once
"""

TORCH_CHILD = """\
import os, torch
from preloaded import warm
model = warm.weights.to("cuda" if torch.cuda.is_available() else "cpu")
print(tuple(model(torch.ones(1, 4)).shape),
      torch.cuda.is_initialized() == torch.cuda.is_available())
"""


@pytest.mark.torch
def test_torch_model_built_in_warmup(tmp_path, stop_after):
    """Guards the documented idiom with real torch: build on the CPU in warm-up (the tracer
    must not disturb it, nor find CUDA), move to the device in the child."""
    pytest.importorskip("torch")  # else the bundle would install it (a CUDA build, 5 GB)
    bundle, _ = bundle_with(tmp_path, TORCH_WARM, "torch")
    stop_after.append(bundle)
    assert ok(run(bundle, "-c", TORCH_CHILD)) == "(1, 2) True\n"
    st = json.loads(cli("status", "--json", bundle).stdout)
    assert not any("CUDA" in w for w in st["warnings"])

"""First-run installs: requirements in bundles, uv into a shared overlay, `install` and `run`.

Everything is offline: the tests write their own small wheels (a package depending on another)
and serve them from a directory (UV_FIND_LINKS, UV_NO_INDEX) or from a local HTTP index. The
bundles use a plain venv of the base interpreter with nothing installed, so that the packages
can only come from the overlay.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
from conftest import PYTHON, REPO, cli
from wheels import write_failing_sdist, write_wheel

from preloaded.install.installer import starter_config
from preloaded.client.overlay import MARKER

PKG = {"ovl_pkg/__init__.py": "from ovl_dep import VALUE\n\ndef answer():\n    return VALUE\n"}
DEP = {"ovl_dep/__init__.py": "VALUE = 42\n"}
USE = "import ovl_pkg\nprint('answer', ovl_pkg.answer())\n"


@pytest.fixture(scope="module")
def plain_python(tmp_path_factory):
    """A venv of the base interpreter with no packages at all (not even pip)."""
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    base = os.path.join(sys.base_prefix, "bin", f"python{version}")
    venv = str(tmp_path_factory.mktemp("plain") / "venv")
    subprocess.run([base, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    return os.path.join(venv, "bin", "python")


@pytest.fixture
def wheelhouse(tmp_path):
    house = tmp_path / "wheels"
    house.mkdir()
    write_wheel(house, "ovl-dep", "1.0", DEP)
    write_wheel(house, "ovl-pkg", "1.0", PKG, requires=["ovl-dep>=1"])
    write_failing_sdist(house, "ovl-broken", "1.0")
    return house


@pytest.fixture
def env(tmp_path, wheelhouse):
    """The caller's environment: a cache of this test's own, uv offline on the wheelhouse."""
    e = dict(os.environ)
    for name in list(e):
        if name.startswith(("UV_", "PIP_")):
            del e[name]
    e.update(XDG_CACHE_HOME=str(tmp_path / "cache"), UV_CACHE_DIR=str(tmp_path / "uv-cache"),
             UV_NO_CONFIG="1", UV_NO_INDEX="1", UV_FIND_LINKS=str(wheelhouse),
             UV_HTTP_RETRIES="0", UV_PYTHON_DOWNLOADS="never")  # fmt: skip
    return e


def bundle(env, out, *args, check=True):
    return cli("bundle", *args, "-o", str(out), check=check, env=env)


def run(starter, *args, env, timeout=120, cwd=None):
    return subprocess.run([str(starter), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=cwd)  # fmt: skip


def runs_served(starter, env) -> int:
    return json.loads(cli("status", str(starter), "--json", env=env).stdout)["runs"]


def overlays(env) -> list:
    directory = os.path.join(env["XDG_CACHE_HOME"], "py-preload", "overlays")
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def test_first_run_installs_then_warm(tmp_path, env, plain_python):
    """The done-when case: an interpreter without the package; the first run installs it (with
    its dependency), starts the server and runs; the second run is a warm fork that installs
    nothing. Guards against installs that miss dependencies, overlays the server does not see,
    and reinstalling on every run."""
    starter = tmp_path / "f.bin"
    bundle(env, starter, "ovl_pkg", "-p", "ovl-pkg", "--python", plain_python)
    config = starter_config(str(starter))
    assert config["requirements"] == ["ovl-pkg"] and config["python"] == plain_python
    assert config["overlay"].startswith(os.path.join(env["XDG_CACHE_HOME"], "py-preload", ""))
    script = tmp_path / "use.py"
    script.write_text(USE)
    first = run(starter, str(script), env=env)
    assert (first.returncode, first.stdout) == (0, "answer 42\n"), first.stderr
    lines = first.stderr.splitlines()
    assert lines[0].startswith("py-preload: installing ovl-pkg")
    assert lines[1].startswith("py-preload: installed 2 package(s)")
    names = set(os.listdir(config["overlay"]))
    assert {"ovl_pkg", "ovl_dep", MARKER} <= names
    second = run(starter, str(script), env=env)
    assert (second.returncode, second.stdout, second.stderr) == (0, "answer 42\n", "")
    assert runs_served(starter, env) == 2
    hello = run(starter, os.path.join(REPO, "examples", "hello.py"), env=env)
    assert hello.returncode == 0 and hello.stdout.startswith("hello from python")
    assert overlays(env) == [os.path.basename(config["overlay"]),
                             os.path.basename(config["overlay"]) + ".lock"]  # fmt: skip


def test_same_requirement_set_shares_overlay(tmp_path, env, plain_python):
    """A second bundle with the same requirement set (spelled differently, from a requirements
    file) uses the installed overlay: its first run installs nothing. Guards against keys that
    depend on spelling or on the bundle, which would install every bundle's packages again."""
    first, second = tmp_path / "a.bin", tmp_path / "b.bin"
    bundle(env, first, "ovl_pkg", "-p", "ovl-pkg", "--python", plain_python)
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("# what b needs\nOVL_Pkg   # same distribution\n\n")
    bundle(env, second, "json", "ovl_pkg", "-r", str(reqs), "--python", plain_python)
    overlay = starter_config(str(first))["overlay"]
    assert starter_config(str(second))["overlay"] == overlay
    assert run(first, "-c", "pass", env=env).returncode == 0
    ino = os.stat(overlay).st_ino
    proc = run(second, "-c", "import ovl_pkg; print(ovl_pkg.answer())", env=env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "42\n", "")
    assert os.stat(overlay).st_ino == ino


def test_concurrent_first_runs_install_once(tmp_path, env, plain_python):
    """Many first runs of two bundles sharing an overlay, all at once: uv runs once and every
    run succeeds. Guards against a missing install lock (uv twice into one overlay, a rename
    over a complete overlay, runs importing a half-installed one)."""
    starters = [tmp_path / "a.bin", tmp_path / "b.bin"]
    for starter in starters:
        bundle(env, starter, "ovl_pkg", "-p", "ovl-pkg", "--python", plain_python)
    code = "import ovl_pkg; print(ovl_pkg.answer())"
    procs = [subprocess.Popen([str(starters[i % 2]), "-c", code],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(8)]  # fmt: skip
    results = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, results
    assert all(out == "42\n" for out, _ in results)
    installs = sum(err.count("py-preload: installing") for _, err in results)
    assert installs == 1, results


class Index:
    """A local PEP 503 index over HTTP whose wheel downloads can be made to hang half-way."""

    def __init__(self, house) -> None:
        self.house = str(house)
        self.stall = threading.Event()
        self.stalled = threading.Event()  # a download is hanging now
        self.release = threading.Event()
        self.delay = 0.0  # seconds each wheel download waits before it is sent
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                index.get(self)

            def do_HEAD(self):  # uv asks first whether range requests work: they don't here
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/simple"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def get(self, handler) -> None:
        parts = handler.path.strip("/").split("/")
        if parts[0] == "simple" and len(parts) == 2:
            prefix = parts[1].replace("-", "_") + "-"
            links = "".join(f'<a href="/files/{n}">{n}</a>' for n in os.listdir(self.house)
                            if n.startswith(prefix) and n.endswith(".whl"))  # fmt: skip
            return self.send(handler, f"<html><body>{links}</body></html>".encode(), "text/html")
        if parts[0] == "files" and len(parts) == 2:
            with open(os.path.join(self.house, parts[1]), "rb") as f:
                data = f.read()
            return self.send(handler, data, "application/octet-stream")
        handler.send_error(404)

    def send(self, handler, data: bytes, kind: str) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", kind)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if kind != "text/html":
            time.sleep(self.delay)
        if kind == "text/html" or not self.stall.is_set():
            handler.wfile.write(data)
            return
        handler.wfile.write(data[: len(data) // 2])
        handler.wfile.flush()
        self.stalled.set()
        self.release.wait(60)

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def index(wheelhouse):
    idx = Index(wheelhouse)
    yield idx
    idx.close()


def online(env, index) -> dict:
    e = {k: v for k, v in env.items() if k not in ("UV_NO_INDEX", "UV_FIND_LINKS")}
    e["UV_INDEX_URL"] = index.url
    return e


def leftovers(env) -> list:
    return [n for n in overlays(env) if not n.endswith(".lock")]


@pytest.mark.parametrize("victim", ["uv", "everything"])
def test_interrupted_install_leaves_nothing(tmp_path, env, plain_python, index, victim):
    """uv killed in the middle of a download (alone, or with the starter and installer: kill -9
    of the whole group) leaves no overlay; the next run installs and runs. Guards against a
    half-installed overlay that later runs would trust (no rename-into-place, a marker written
    early) and against leftovers that block the next install."""
    e = online(env, index)
    starter = tmp_path / "f.bin"
    bundle(e, starter, "ovl_pkg", "-p", "ovl-pkg", "--python", plain_python)
    index.stall.set()
    proc = subprocess.Popen([str(starter), "-c", "pass"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=e, start_new_session=True)  # fmt: skip
    assert index.stalled.wait(60), "uv never downloaded the wheel"
    tree = psutil.Process(proc.pid).children(recursive=True)
    uv = [p for p in tree if os.path.basename(p.exe()) == "uv"]
    assert len(uv) == 1
    if victim == "uv":
        uv[0].kill()
    else:
        os.killpg(proc.pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    index.stall.clear()
    index.release.set()
    overlay = starter_config(str(starter))["overlay"]
    assert not os.path.exists(overlay)
    if victim == "uv":  # the installer saw uv fail: it cleaned up and said so
        assert proc.returncode == 1 and b"cannot install ovl-pkg" in err
        assert leftovers(e) == []
    again = run(starter, "-c", "import ovl_pkg; print(ovl_pkg.answer())", env=e)
    assert (again.returncode, again.stdout) == (0, "42\n"), again.stderr
    assert leftovers(e) == [os.path.basename(overlay)]  # the killed install's temp dir is gone


def one_paragraph_error(proc, name: str) -> str:
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith(f"py-preload: cannot install {name}") and "\n\n" not in proc.stderr
    return last


@pytest.mark.parametrize("spec,says", [
    ("ovl-nosuch", "no package ovl-nosuch was found"),
    ("ovl-pkg==9.9", "no version of ovl-pkg==9.9 matches"),
    ("ovl-broken", "building ovl-broken failed"),
])  # fmt: skip
def test_install_errors_then_retry(tmp_path, env, wheelhouse, plain_python, spec, says):
    """Unknown package, missing version, a wheel that fails to build: exit 1 with one
    paragraph naming the requirement and the cause, no overlay left (no poisoned cache); once
    the package is fixed (published) the next run installs it. Guards against a failed install
    being cached as done, and against raw tracebacks instead of a message."""
    starter = tmp_path / "f.bin"
    bundle(env, starter, "json", "-p", spec, "--python", plain_python)
    proc = run(starter, "-c", "print('ran')", env=env)
    assert says in one_paragraph_error(proc, spec) and proc.stdout == ""
    assert leftovers(env) == []
    name = spec.split("=")[0]
    if name == "ovl-broken":
        os.unlink(wheelhouse / "ovl-broken-1.0.tar.gz")
    write_wheel(wheelhouse, name, "9.9" if "9.9" in spec else "1.0", {f"{name}.py": ""})
    again = run(starter, "-c", "print('ran')", env=env)
    assert (again.returncode, again.stdout) == (0, "ran\n"), again.stderr
    assert len(leftovers(env)) == 1


def test_no_network_error(tmp_path, env, plain_python):
    """An index that cannot be reached: exit 1, one paragraph saying the index could not be
    reached for the requirement; nothing installed. Guards against hangs and vague errors."""
    e = {k: v for k, v in env.items() if k not in ("UV_NO_INDEX", "UV_FIND_LINKS")}
    e["UV_INDEX_URL"] = "http://127.0.0.1:9/simple"  # the discard port: nothing listens
    starter = tmp_path / "f.bin"
    bundle(e, starter, "json", "-p", "ovl-pkg", "--python", plain_python)
    proc = run(starter, "-c", "pass", env=e)
    assert "the package index could not be reached" in one_paragraph_error(proc, "ovl-pkg")
    assert leftovers(e) == []


DIFF_SCRIPT = """\
import os, subprocess, sys
import ovl_pkg
print(ovl_pkg.answer(), os.path.relpath(ovl_pkg.__file__, os.environ["XDG_CACHE_HOME"]))
print([os.path.relpath(p, os.environ["XDG_CACHE_HOME"]) for p in sys.path[:2]])
print(os.environ.get("PYTHONPATH", "").count(os.pathsep))
sub = subprocess.run([sys.executable, "-c", "import ovl_pkg; print(ovl_pkg.answer())"],
                     capture_output=True, text=True)
print("subprocess:", sub.stdout.strip(), sub.returncode)
import missing_module_xyz
"""


@pytest.mark.parametrize("pythonpath", [None, "extra"])
def test_warm_and_cold_see_the_same_overlay(tmp_path, env, plain_python, pythonpath):
    """A script importing an overlay-only package behaves the same warm and cold
    (PY_PRELOAD_COLD=1): same module file, same sys.path order, same PYTHONPATH, a subprocess
    of sys.executable finds it too; exit status, stdout and stderr byte for byte. Guards against
    a cold fallback that cannot import what the warm run can."""
    starter = tmp_path / "f.bin"
    bundle(env, starter, "ovl_pkg", "-p", "ovl-pkg", "--python", plain_python)
    script = tmp_path / "diff.py"
    script.write_text(DIFF_SCRIPT)
    if pythonpath:
        env = {**env, "PYTHONPATH": str(tmp_path / pythonpath)}
    run(starter, "-c", "pass", env=env)  # installs and starts the server
    warm = run(starter, str(script), env=env)
    cold = run(starter, str(script), env={**env, "PY_PRELOAD_COLD": "1"})
    assert warm.returncode == 1 and "answer" not in warm.stdout
    assert "subprocess: 42 0" in warm.stdout and "missing_module_xyz" in warm.stderr
    assert (warm.returncode, warm.stdout, warm.stderr) == (
        cold.returncode, cold.stdout, cold.stderr)
    assert runs_served(starter, env) == 2  # the warm one was warm


def test_overlay_removed_under_a_running_server(tmp_path, env, plain_python):
    """Deleting the overlay (a cleaned cache) while its server runs: the next run notices
    (staleness), installs again and runs. Guards against a server that keeps serving modules
    whose files are gone, and against a starter that trusts an overlay that no longer exists."""
    starter = tmp_path / "f.bin"
    bundle(env, starter, "ovl_pkg", "-p", "ovl-pkg", "--python", plain_python)
    assert run(starter, "-c", "pass", env=env).returncode == 0
    shutil.rmtree(starter_config(str(starter))["overlay"])
    proc = run(starter, "-c", "import ovl_dep; print(ovl_dep.VALUE)", env=env)
    assert (proc.returncode, proc.stdout) == (0, "42\n"), proc.stderr
    assert "py-preload: installing ovl-pkg" in proc.stderr


def test_install_command_ahead_of_time(tmp_path, env, plain_python):
    """`py-preload install FILE` installs at build time; the first run then installs nothing;
    installing again says it is already there. Guards against an install command that does not
    use the overlay the starter will look for."""
    starter = tmp_path / "f.bin"
    bundle(env, starter, "ovl_pkg", "-p", "ovl-pkg", "--python", plain_python)
    first = cli("install", str(starter), env=env)
    assert "installed: ovl-pkg" in first.stderr
    assert "already installed" in cli("install", str(starter), env=env).stderr
    proc = run(starter, "-c", "import ovl_pkg; print(ovl_pkg.answer())", env=env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "42\n", "")
    nothing = tmp_path / "n.bin"
    bundle(env, nothing, "json")
    assert "needs nothing installed" in cli("install", str(nothing), env=env).stderr
    bad = cli("install", str(tmp_path / "n.bin") + "x", env=env, check=False)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1


SCRIPT_723 = """\
# /// script
# requires-python = ">=3.8"
# dependencies = [
#   "ovl-pkg>=1.0",
# ]
# ///
import json
import sys
import ovl_pkg
import local_helper_xyz
print(ovl_pkg.answer(), sys.argv[1:])
"""


def test_script_metadata_and_run(tmp_path, env, plain_python):
    """`bundle --script` takes the PEP 723 dependencies and the script's non-stdlib imports
    (a local module nothing provides is left out); `py-preload run` installs on first use, runs
    with the script's arguments, and is warm from the second run on. Guards against ignoring
    the script block, preloading the standard library or local modules, and rebuilding the
    bundle on every run."""
    script = tmp_path / "job.py"
    script.write_text(SCRIPT_723)
    (tmp_path / "local_helper_xyz.py").write_text("")
    starter = tmp_path / "s.bin"
    bundle(env, starter, "--script", str(script), "--python", plain_python)
    config = starter_config(str(starter))
    assert config["modules"] == ["ovl_pkg"] and config["requirements"] == ["ovl-pkg>=1.0"]
    args = ("run", "--python", plain_python, str(script), "a", "-p", "b")
    first = cli(*args, env=env)
    assert first.stdout == "42 ['a', '-p', 'b']\n" and "installed" in first.stderr
    second = cli(*args, env=env)
    assert (second.stdout, second.stderr) == ("42 ['a', '-p', 'b']\n", "")
    cached = os.listdir(os.path.join(env["XDG_CACHE_HOME"], "py-preload", "run"))
    assert len(cached) == 1
    assert runs_served(os.path.join(env["XDG_CACHE_HOME"], "py-preload", "run", cached[0]),
                       env) == 2  # fmt: skip


def test_inferred_distributions(tmp_path, env, plain_python):
    """An unimportable module with a well-known distribution gets it inferred (cv2 is
    opencv-python-headless, yaml is pyyaml); an unknown one is a one-line error telling to pass
    -p, and no file is written. Guards against silently preloading nothing and against
    installing a guessed package under the wrong name."""
    starter = tmp_path / "i.bin"
    bundle(env, starter, "yaml", "cv2", "--python", plain_python)
    assert starter_config(str(starter))["requirements"] == ["opencv-python-headless", "pyyaml"]
    bad = bundle(env, tmp_path / "x.bin", "no_such_module_xyz", "--python", plain_python,
                 check=False)  # fmt: skip
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1
    assert "no_such_module_xyz" in bad.stderr and "-p" in bad.stderr
    assert not (tmp_path / "x.bin").exists()


def test_satisfied_requirements_need_no_overlay(tmp_path, env):
    """Requirements the interpreter already satisfies install nothing: no overlay at all
    (psutil is in the test venv); a version it does not satisfy does need one. Guards against
    reinstalling (and shadowing) what the environment already has."""
    starter = tmp_path / "s.bin"
    bundle(env, starter, "json", "-p", "psutil>=1", "-p", "click", "--python", PYTHON)
    assert "overlay" not in starter_config(str(starter))
    bundle(env, starter, "json", "-p", "psutil<1", "--python", PYTHON)
    assert starter_config(str(starter))["requirements"] == ["psutil<1"]


@pytest.mark.parametrize("args,says", [
    (["-p", "not a requirement!"], "not a valid requirement"),
    (["-r", "/nonexistent/requirements.txt"], "cannot read requirements file"),
    (["--script", "/nonexistent/script.py"], "cannot read script"),
])  # fmt: skip
def test_bad_requirement_input(tmp_path, env, args, says):
    """Malformed requirements, missing files: a one-line error, exit 1, no starter written.
    Guards against tracebacks and half-written bundles."""
    proc = bundle(env, tmp_path / "b.bin", "json", *args, check=False)
    assert proc.returncode == 1 and says in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "b.bin").exists()


def test_requirements_file_option_lines_refused(tmp_path, env):
    """Option lines in a requirements file (--index-url ...) are refused with the line number
    and what to use instead. Guards against silently ignoring where packages come from."""
    reqs = tmp_path / "r.txt"
    reqs.write_text("ovl-pkg\n--index-url http://example.invalid/simple\n")
    proc = bundle(env, tmp_path / "b.bin", "json", "-r", str(reqs), check=False)
    assert proc.returncode == 1 and f"{reqs}:2" in proc.stderr and "UV_INDEX_URL" in proc.stderr


def test_starter_path_stays_stdlib(tmp_path, env, plain_python):
    """A warm run of a bundle with an overlay imports neither the installer nor filelock/uv, and
    a bundle interpreter with nothing installed can host the server. Guards against slowing
    every run with the install machinery."""
    starter = tmp_path / "f.bin"
    bundle(env, starter, "ovl_pkg", "-p", "ovl-pkg", "--python", plain_python,
           "--client", "python")  # the script that -X importtime can run
    run(starter, "-c", "pass", env=env)
    proc = subprocess.run([plain_python, "-SI", "-X", "importtime", str(starter), "-c", "pass"],
                          capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert proc.returncode == 0
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "preloaded.client.run" in imported
    assert not imported & {"preloaded.install", "preloaded.install.installer", "filelock", "uv",
                           "subprocess", "preloaded.client.spawn"}


def test_terminal_progress_and_ctrl_c(tmp_path, env, plain_python, index):
    """On a terminal the install shows a progress line; Ctrl-C during the download stops uv,
    removes the temporary directory and ends the run by SIGINT; the next run on the terminal
    installs (progress line, then "installed") and runs. Guards against an install that
    cannot be interrupted, leaves its half-downloaded files, or leaves the terminal waiting."""
    import pexpect

    e = online(env, index)
    starter = tmp_path / "f.bin"
    bundle(e, starter, "ovl_pkg", "-p", "ovl-pkg", "--python", plain_python)
    index.stall.set()
    child = pexpect.spawn(str(starter), ["-c", USE], env=e, timeout=60,
                          dimensions=(24, 80))
    try:
        child.expect("installing ovl-pkg")
        assert index.stalled.wait(60)
        child.sendintr()
        child.expect(pexpect.EOF)
        child.close()
        assert child.signalstatus == signal.SIGINT
        assert leftovers(e) == []
        index.stall.clear()
        index.release.set()
        child = pexpect.spawn(str(starter), ["-c", USE], env=e, timeout=60,
                              dimensions=(24, 80))
        child.expect(r"installed 2 package\(s\)")
        child.expect("answer 42")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        child.close(force=True)


def test_terminal_progress_is_drawn_only_when_it_changes(tmp_path, env, plain_python, index):
    """On a terminal the install line is redrawn when its text changes, never the same text
    again, and its seconds are whole seconds elapsed. Guards against a line rewritten every
    tick with the same text (35 writes in 2 s were recorded) and "1 s" shown before
    "in 0.7 s"."""
    import io

    import pexpect

    e = online(env, index)
    starter = tmp_path / "p.bin"
    bundle(e, starter, "ovl_pkg", "-p", "ovl-pkg", "--python", plain_python)
    index.delay = 0.6  # each of the two wheels: the install takes more than a second
    screen = io.BytesIO()
    child = pexpect.spawn(str(starter), ["-c", USE], env=e, timeout=60, dimensions=(24, 80))
    child.logfile_read = screen
    try:
        child.expect(r"installed 2 package\(s\), \d+ MB, in ([\d.]+) s")
        took = float(child.match.group(1))
        child.expect("answer 42")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    draws = [d.split(b"\r\n")[0] for d in screen.getvalue().split(b"\r\x1b[K")[1:]]
    draws = [d.decode() for d in draws if d]
    installing = [d for d in draws if d.startswith("py-preload: installing ovl-pkg:")]
    assert len(installing) >= 2, draws  # 0 s, 1 s, ... while uv works
    assert all(a != b for a, b in zip(draws, draws[1:])), draws
    seconds = [int(d.rsplit(", ", 1)[1].removesuffix(" s")) for d in installing]
    assert seconds == sorted(seconds) and seconds[-1] <= took, (seconds, took)


def test_progress_counts_what_uv_reports_as_it_comes(tmp_path):
    """The line follows uv's own report as uv writes it (read with pread, as uv shares the
    file's offset): resolving, then packages to fetch with the MB of large downloads, then
    the packages in place. Guards against a line stuck at "0 package(s), 0 MB" until the end.
    The report is uv 0.13's, as it writes it when stderr is a file."""
    from preloaded.install.installer import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    report_lines = ["Using CPython 3.11.7 interpreter at: /venv/bin/python",
                    "Resolved 9 packages in 352ms", "Downloading pygments (1.2MiB)",
                    "Downloading torch (180.5MiB)", " Downloaded pygments",
                    " Downloaded torch", "Prepared 9 packages in 1.00s"]  # fmt: skip
    target = tmp_path / "target"
    target.mkdir()
    screen = Terminal()
    progress = Progress(screen, ["torch", "rich"])
    shown = []
    with open(tmp_path / "uv.err", "w+") as report:
        progress.start(report.fileno())
        for line in [None, *report_lines]:
            if line is not None:
                report.write(line + "\n")
                report.flush()
            if line and line.startswith("Prepared"):
                (target / "rich-15.0.0.dist-info").mkdir()
                (target / "rich.py").write_bytes(b"x" * 3_000_000)
                progress.last_walk = 0.0  # the walk is rate-limited to every 0.5 s
            progress.tick(str(target))
            shown.append(progress.shown.split(": ", 2)[2].rsplit(", ", 1)[0])
        assert report.tell() == sum(len(line) + 1 for line in report_lines)  # offset untouched
    assert shown == [
        "resolving", "resolving", "9 package(s) to fetch",
        "9 package(s) to fetch, downloaded 0 of 1 MB in large files (0 of 1)",
        "9 package(s) to fetch, downloaded 0 of 191 MB in large files (0 of 2)",
        "9 package(s) to fetch, downloaded 1 of 191 MB in large files (1 of 2)",
        "9 package(s) to fetch, downloaded 191 of 191 MB in large files (2 of 2)",
        "1 of 9 package(s) in place, 3 MB",
    ]


def test_requirement_parsing_units(tmp_path):
    """Pure parts: spellings of one requirement set normalize (and hash) alike, a script's
    imports are its top-level absolute ones (not relative, not inside functions, not
    __future__), and the PEP 723 block is read as TOML. Guards against overlays keyed by
    spelling and preloading imports a script only makes lazily."""
    from preloaded.install import installer as install

    info = {"tag": ["cpython-311", "linux-x86_64", ""], "dists": {}, "env": {}}
    a = [install.parse_requirement(s, "-p") for s in ("Ovl_Pkg[B,a] >=1.0,<2", "x.y")]
    b = [install.parse_requirement(s, "-p") for s in ("x-y", "ovl-pkg[a,b]<2,>=1.0")]
    assert install.to_install(a, info) == install.to_install(b, info)
    assert install.overlay_path(install.to_install(a, info), info) == install.overlay_path(
        install.to_install(b, info), info)
    source = ("from __future__ import annotations\nimport a.b, c\nfrom . import local\n"
              "try:\n    import d\nexcept ImportError:\n    import e\n"
              "def f():\n    import lazy\nfrom g.h import i\n")  # fmt: skip
    assert install.script_imports(source, "s.py") == ["a.b", "c", "d", "e", "g.h"]
    script = tmp_path / "s.py"
    script.write_text('# /// script\n# dependencies = ["a>=1", "b"]\n# ///\nimport a\n')
    assert install.script_metadata(str(script))[1]["dependencies"] == ["a>=1", "b"]
    text = install.explain(["ovl-pkg==9.9"], "error: Because there is no version of "
                           "ovl-pkg==9.9 and you require it...", 1)  # fmt: skip
    assert text.count("\n") == 0 and "no version of ovl-pkg==9.9 matches" in text

"""Learned preloads: real servers learn the library modules their runs keep importing.

Each test makes its own bundle (its own server and learned set). Fake library packages live in
the site-packages of a throw-away venv (``python -m venv --without-pip``, a few ms): that is a
real library directory to the server, unlike a directory on PYTHONPATH, which is user code.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import psutil
import pytest

import test_server
from conftest import PYTHON, bare_venv, cli
from preloaded.paths import Paths

RUN_TIMEOUT = 60
LEARN_TIMEOUT = 30


def run(bundle: str, *args: str, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("stdin", subprocess.DEVNULL)
    proc = subprocess.run([bundle, *args], capture_output=True, text=True, timeout=RUN_TIMEOUT,
                          **kw)  # fmt: skip
    return proc


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return proc.stdout


def status(bundle: str) -> dict:
    return json.loads(cli("status", "--json", bundle).stdout)


def wait_until(predicate, what: str, timeout: float = LEARN_TIMEOUT):
    return test_server.wait_until(predicate, timeout, what)


def learn_colorsys(bundle: str) -> int:
    """Two runs import colorsys; once the server learned it, return the server's pid."""
    for _ in range(2):
        ok(run(bundle, "-c", "import colorsys"))
    wait_until(lambda: "colorsys" in learned(bundle), "colorsys to be learned")
    return server_pid(bundle)


def in_server(bundle: str, name: str) -> bool:
    """Did the forked child find ``name`` already imported (i.e. does the server have it)?"""
    out = ok(run(bundle, "-c", f"import os, sys; print({name!r} in sys.modules, os.getppid())"))
    return out.split()[0] == "True"


def server_pid(bundle: str) -> int:
    return int(ok(run(bundle, "-c", "import os; print(os.getppid())")))


def learned(bundle: str) -> dict:
    return status(bundle)["learn"]["learned"]


def saved(bundle: str) -> dict:
    """The learned set the bundle's servers keep in the cache."""
    from preloaded.paths import Paths

    try:
        with open(Paths(bundle).learned, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def bundle(path, *options, python=PYTHON) -> str:
    cli("bundle", "json", "-o", str(path), "--python", python, "--idle-timeout", "600", *options)
    return str(path)


def install(venv, name: str, source: str) -> None:
    """Put module ``name`` into the venv's site-packages, byte-compiled: a __pycache__ created
    later by a run would change the directory and make the server stale."""
    python, site = venv
    with open(os.path.join(site, name + ".py"), "w", encoding="utf-8") as f:
        f.write(source)
    subprocess.run([python, "-m", "compileall", "-q", site], check=True, timeout=60)


@pytest.fixture
def light(tmp_path):
    path = bundle(tmp_path / "python-learn.bin")
    yield path
    cli("stop", path, check=False)


@pytest.fixture
def venv(tmp_path):
    """(interpreter, site-packages) of a fresh venv holding nothing but the standard library."""
    directory = tmp_path / "venv"
    python, site = bare_venv(directory)
    return python, site


def test_stdlib_module_learned_after_two_runs(light):
    """Guards the whole loop: child report at exit, counting in _reap, import between runs."""
    ok(run(light, "-c", "import colorsys"))
    first = status(light)
    assert first["learn"]["counts"].get("colorsys") == 1
    assert "colorsys" not in first["learn"]["learned"] and not in_server(light, "colorsys")
    pid = server_pid(light)
    ok(run(light, "-c", "import colorsys"))
    wait_until(lambda: "colorsys" in learned(light), "colorsys to be learned")
    assert in_server(light, "colorsys") and server_pid(light) == pid  # learned in place
    assert learned(light)["colorsys"] > 0
    text = cli("status", light).stdout
    assert "learned:" in text and "  colorsys (" in text and " ms)" in text
    assert "colorsys" in saved(light)["learned"]


def test_readline_is_never_learned(light):
    """Guards against the REPL (which imports readline in every interactive run) teaching the
    server readline: loaded in every child, it makes input() on a terminal go through GNU
    readline (line editing, bracketed-paste escapes), which plain python does not do."""
    for _ in range(3):
        ok(run(light, "-c", "import readline, rlcompleter, colorsys"))
    wait_until(lambda: "colorsys" in learned(light), "colorsys (the control) to be learned")
    learn = status(light)["learn"]
    for name in ("readline", "rlcompleter"):
        assert name not in learn["learned"] and name not in learn["counts"]
        assert not in_server(light, name)


def test_learn_after_is_configurable(tmp_path):
    """Guards --learn-after: a module is not imported before N runs needed it."""
    path = bundle(tmp_path / "python-after3.bin", "--learn-after", "3")
    try:
        for _ in range(2):
            ok(run(path, "-c", "import colorsys"))
        assert status(path)["learn"]["counts"].get("colorsys") == 2
        assert not in_server(path, "colorsys")
        ok(run(path, "-c", "import colorsys"))
        wait_until(lambda: "colorsys" in learned(path), "colorsys after 3 runs")
    finally:
        cli("stop", path, check=False)


def test_user_code_is_never_learned(light, tmp_path):
    """Guards against preloading the user's own modules (script dir, cwd, PYTHONPATH), which
    would freeze a stale copy of code the user is editing into the server."""
    project, extra = tmp_path / "project", tmp_path / "extra"
    project.mkdir()
    extra.mkdir()
    (project / "helper.py").write_text("X = 1\n")
    (project / "cwdmod.py").write_text("Y = 2\n")
    (extra / "ppmod.py").write_text("Z = 3\n")
    script = project / "main.py"
    script.write_text("import helper, ppmod, colorsys\nprint(helper.X + ppmod.Z)\n")
    env = {**os.environ, "PYTHONPATH": str(extra)}
    for _ in range(3):
        assert ok(run(light, str(script), env=env)) == "4\n"
        assert ok(run(light, "-c", "import cwdmod", cwd=str(project))) == ""
    wait_until(lambda: "colorsys" in learned(light), "colorsys (the control) to be learned")
    learn = status(light)["learn"]
    for name in ("helper", "ppmod", "cwdmod", "main"):
        assert name not in learn["learned"] and name not in learn["counts"]
        assert name not in learn["pending"] and not in_server(light, name)


def test_module_from_a_venv_site_packages_is_learned(tmp_path, venv):
    """Guards learning from site-packages (not only the standard library), and that the
    learned module's file is watched: edited in place, the next run gets the edit."""
    python, site = venv
    install(venv, "libpkg", "VALUE = 42\n")
    path = bundle(tmp_path / "python-venv.bin", python=python)
    try:
        for _ in range(2):
            assert ok(run(path, "-c", "import libpkg; print(libpkg.VALUE)")) == "42\n"
        wait_until(lambda: "libpkg" in learned(path), "libpkg to be learned")
        assert in_server(path, "libpkg")
        with open(os.path.join(site, "libpkg.py"), "w", encoding="utf-8") as f:
            f.write("VALUE = 4242\n")  # in place: site-packages' own mtime stays
        assert ok(run(path, "-c", "import libpkg; print(libpkg.VALUE)")) == "4242\n"
    finally:
        cli("stop", path, check=False)


UNSAFE = {
    "thread": "import threading, time\n"
              "threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n",
    "warning": "import warnings\nwarnings.warn('deprecated thing', UserWarning)\n",
    # hidden by the default filters, but a run with -W error would fail on it
    "hidden": "import warnings\nwarnings.warn('old', DeprecationWarning)\n",
    "print": "print('hello from an import')\n",
    # the server's handler (it wakes the loop) would be gone: SIGHUP would no longer stop it
    "signal": "import signal\nsignal.signal(signal.SIGHUP, signal.SIG_IGN)\n",
    # as dask's config does: the server would depend on every variable (PWD, _, ...), so
    # nearly every later run would go cold
    "environ": "import os\nOWN = {k: v for k, v in os.environ.items() if k.startswith('BADPKG_')}\n",
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(UNSAFE))
def test_unsafe_learned_module_is_refused_for_good(tmp_path, venv, kind):
    """Guards fork safety of learning: a library module that starts a thread (dead in every
    child), warns or prints (the warning would vanish from the runs) or takes a signal handler
    of the server is refused for good, by a probe: the server never imports it, keeps serving
    (same pid, still one thread), learns the clean module imported along with it, and later
    runs that import the refused one still work."""
    python, _site = venv
    install(venv, "badpkg", UNSAFE[kind])
    path = bundle(tmp_path / "python-unsafe.bin", python=python)
    try:
        old = server_pid(path)
        for _ in range(2):
            assert run(path, "-c", "import colorsys, badpkg").returncode == 0
        wait_until(lambda: "badpkg" in saved(path).get("refused", {}), "badpkg to be refused")
        wait_until(lambda: "colorsys" in learned(path), "colorsys (clean) to be learned")
        reason = saved(path)["refused"]["badpkg"]
        assert {"thread": "started a thread", "warning": "warned: UserWarning",
                "hidden": "warned: DeprecationWarning", "print": "printed",
                "signal": "changed signal handlers",
                "environ": "listed the whole environment"}[kind] in reason
        assert server_pid(path) == old and not gone(old)  # refused without restarting
        assert psutil.Process(old).num_threads() == 1
        assert "retiring" not in cli("logs", "-n", "1000", path).stdout
        for _ in range(3):  # needed again and again: still never learned
            assert run(path, "-c", "import badpkg").returncode == 0
        time.sleep(0.3)
        learn = status(path)["learn"]
        assert "badpkg" in learn["refused"] and "badpkg" not in learn["learned"]
        assert "badpkg" not in learn["counts"] and not in_server(path, "badpkg")
        assert in_server(path, "colorsys") and server_pid(path) == old
        assert "refused:   badpkg" in cli("status", path).stdout
    finally:
        cli("stop", path, check=False)


def test_probe_that_hangs_is_killed_and_its_module_refused(tmp_path, venv):
    """Guards the probe's deadline: a module whose import hangs in the server (not in the runs)
    is refused once its probe overran PY_PRELOAD_PROBE_TIMEOUT, the probe is killed, and the
    server went on serving runs meanwhile (its loop never waits for a probe)."""
    python, _site = venv
    install(venv, "stuck", "import os, time\nif os.getcwd() == '/':\n    time.sleep(3600)\n")
    path = bundle(tmp_path / "python-stuck.bin", python=python)
    env = {**os.environ, "PY_PRELOAD_PROBE_TIMEOUT": "3"}  # the first run starts the server
    try:
        old = int(ok(run(path, "-c", "import os; print(os.getppid())", env=env)))
        for _ in range(2):
            ok(run(path, "-c", "import colorsys, stuck", cwd=str(tmp_path)))
        wait_until(lambda: "stuck" in status(path)["learn"]["probing"], "the probe to start")
        probe = status(path)["learn"]["probe"]
        assert ok(run(path, "-c", "print(6 * 7)")) == "42\n"  # served while the probe hangs
        wait_until(lambda: "stuck" in status(path)["learn"]["refused"], "stuck to be refused")
        assert "importing stuck did not finish in 3 s" in status(path)["learn"]["refused"]["stuck"]
        wait_until(lambda: gone(probe), "the probe to be killed")
        wait_until(lambda: "colorsys" in learned(path), "colorsys (clean) to be learned")
        assert server_pid(path) == old and not in_server(path, "stuck")
    finally:
        cli("stop", path, check=False)


def test_failing_learned_import_does_not_kill_the_server(tmp_path, venv):
    """Guards the server against a module that imports in the runs but not in the server."""
    python, _site = venv
    source = "import os\nif os.getcwd() == '/':\n    raise RuntimeError('not from /')\n"
    install(venv, "picky", source)
    path = bundle(tmp_path / "python-picky.bin", python=python)
    try:
        pid = server_pid(path)
        for _ in range(2):
            ok(run(path, "-c", "import picky", cwd=str(tmp_path)))
        wait_until(lambda: "picky" in status(path)["learn"]["refused"], "picky to be refused")
        assert "RuntimeError: not from /" in status(path)["learn"]["refused"]["picky"]
        assert server_pid(path) == pid and not in_server(path, "picky")
    finally:
        cli("stop", path, check=False)


def test_learned_module_unsafe_at_start_restarts_the_server_without_it(tmp_path, venv):
    """Guards the start-up path: a learned module that became unsafe (upgraded to one that
    starts a thread) is refused and the server restarts itself without it; the run is warm."""
    python, _site = venv
    install(venv, "laterbad", "VALUE = 1\n")
    path = bundle(tmp_path / "python-later.bin", python=python)
    try:
        for _ in range(2):
            ok(run(path, "-c", "import colorsys, laterbad"))
        wait_until(lambda: "laterbad" in learned(path), "laterbad to be learned")
        cli("stop", path)
        install(venv, "laterbad", UNSAFE["thread"])
        pid = server_pid(path)  # a fresh server: it refuses laterbad and execs itself
        assert not in_server(path, "laterbad") and in_server(path, "colorsys")
        assert server_pid(path) == pid  # the same process, re-executed
        learn = status(path)["learn"]
        assert "started a thread" in learn["refused"]["laterbad"]
        assert "laterbad" not in learn["learned"] and "colorsys" in learn["learned"]
        assert "restarting without it" in cli("logs", "-n", "1000", path).stdout
    finally:
        cli("stop", path, check=False)


def test_learned_set_survives_a_restart(light):
    """Guards the saved set: a restarted server is warm with the learned modules at once."""
    old = learn_colorsys(light)
    cli("stop", light)
    assert in_server(light, "colorsys")  # the first run of the new server
    assert server_pid(light) != old
    assert learned(light)["colorsys"] > 0


def test_no_learn(tmp_path):
    """Guards --no-learn: nothing is reported, counted or imported."""
    path = bundle(tmp_path / "python-nolearn.bin", "--no-learn")
    try:
        for _ in range(3):
            ok(run(path, "-c", "import colorsys"))
        time.sleep(0.5)  # learning would have happened by now (see the test above)
        learn = status(path)["learn"]
        assert not learn["enabled"] and not learn["counts"] and not learn["learned"]
        assert not in_server(path, "colorsys") and saved(path) == {}
        assert "learned:   off" in cli("status", path).stdout
        prefix = os.path.basename(Paths(path, create=False).report_prefix)  # other servers' aside
        runtime = os.path.join(os.environ["XDG_RUNTIME_DIR"], "py-preload")
        assert not [n for n in os.listdir(runtime) if n.startswith(prefix)]
    finally:
        cli("stop", path, check=False)


def test_forget(light):
    """Guards `forget`: the learned set is cleared and the server restarts without it."""
    old = learn_colorsys(light)
    proc = cli("forget", light)
    assert "forgot" in proc.stderr
    wait_until(lambda: gone(old), "the old server to retire")
    assert saved(light) == {}
    assert not in_server(light, "colorsys")
    assert status(light)["learn"]["learned"] == {}


def test_forget_without_a_server(tmp_path):
    """Guards `forget` when no server runs: the saved set goes, the command succeeds."""
    path = bundle(tmp_path / "python-forget.bin")
    proc = cli("forget", path)
    assert proc.returncode == 0 and "no server was running" in proc.stderr
    # A missing file is a usage error, as for status, stop and logs: one line, status 2.
    bad = cli("forget", str(tmp_path / "nope.bin"), check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no such file" in bad.stderr


def test_refusal_reaches_the_restarted_server_without_the_saved_file(tmp_path, monkeypatch):
    """Guards against a restart loop: a learned module found unsafe at start is refused and the
    server re-executes itself; if the refusal could not be saved (read-only cache, full disk),
    the new image must still know it from its environment, or it imports it again, forever."""
    from types import SimpleNamespace

    from preloaded.server import learn

    saved = tmp_path / "learned.json"
    saved.write_text(json.dumps({"learned": {"laterbad": 1.0, "colorsys": 0.5}, "refused": {}}))
    paths = SimpleNamespace(learned=str(saved), report_prefix=str(tmp_path / "r."))
    monkeypatch.setenv(learn.REFUSED_ENV, "laterbad")
    learner = learn.Learner(paths, 2, True, lambda message: None)
    learner.load()
    assert "laterbad" in learner.refused and "laterbad" not in learner.learned
    assert "colorsys" in learner.learned
    assert learn.REFUSED_ENV not in os.environ  # not passed on to runs


def test_submodule_of_a_refused_package_is_refused_without_a_probe(tmp_path, venv):
    """Guards the shortcut for packages: importing ``a.b`` imports ``a`` first, so once the
    probe refused ``a`` its submodules are refused at once (a Jupyter kernel's ~50 submodules
    of refused packages each cost a probe before)."""
    python, site = venv
    package = os.path.join(site, "loudpkg")
    os.mkdir(package)
    with open(os.path.join(package, "__init__.py"), "w", encoding="utf-8") as f:
        f.write("print('hello from a package')\n")
    with open(os.path.join(package, "quiet.py"), "w", encoding="utf-8") as f:
        f.write("VALUE = 1\n")
    subprocess.run([python, "-m", "compileall", "-q", site], check=True, timeout=60)
    path = bundle(tmp_path / "python-loud.bin", python=python)
    try:
        old = server_pid(path)
        for _ in range(2):
            assert run(path, "-c", "import loudpkg.quiet").returncode == 0
        wait_until(lambda: "loudpkg.quiet" in status(path)["learn"]["refused"],
                   "loudpkg.quiet to be refused")  # fmt: skip
        refused = status(path)["learn"]["refused"]
        assert "printed" in refused["loudpkg"]
        assert refused["loudpkg.quiet"] == "its package loudpkg was refused"
        assert server_pid(path) == old and not in_server(path, "loudpkg")
    finally:
        cli("stop", path, check=False)

"""Tools that look at the process rather than at their arguments: ps, pgrep, pytest, coverage.

Each case runs the same real program with the bundle's python and with a starter and compares
exit status, stdout and stderr (timings in pytest's summary line aside). Where a warm run cannot
be exact (coverage, which must see the program from the interpreter's start) the server sends
the run back to be run cold, and says why in its log; pytest with a plugin module in the server
goes to the bundle's pytest server (test_pytest_warm.py). The comparison with python must hold
either way.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import zipfile

import pytest

import test_learn
from conftest import PYTHON, bare_venv, cli

TIMEOUT = 120
# pytest11 plugins and tools of this test venv: never learned, and their presence in a server
# sends pytest runs cold.
TOOLS = {"pytest", "_pytest", "py", "coverage", "pytest_cov", "xdist", "anyio", "hypothesis",
         "_hypothesis_pytestplugin", "fakeplug"}  # fmt: skip

PLUGIN = '''\
"""A pytest plugin: its distribution has an entry point in the group pytest11."""


def pytest_configure(config):
    config.addinivalue_line("markers", "fake: a marker from fakeplug")
'''
PROJECT = {
    "pyproject.toml": '[tool.pytest.ini_options]\nfilterwarnings = ["error"]\n',
    "test_a.py": "import mod\n\n\ndef test_one():\n    assert mod.f(1) == 1\n\n\n"
                 "def test_two():\n    assert [1, 2] == [1, 2]\n",
    "mod.py": "def f(x):\n    if x:\n        return 1\n    return 2\n",
    "script.py": "import mod\nprint(mod.f(1))\n",
}  # fmt: skip


def write_tree(root, files: dict) -> None:
    for rel, text in files.items():
        path = os.path.join(str(root), rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


def clean_env(**extra) -> dict:
    """The environment for both runs: nothing of the pytest session running these tests (its
    PYTEST_* and coverage variables would reach the programs), no bytecode written (a
    __pycache__ appearing in a watched directory would make a server stale)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "COV_CORE_", "COVERAGE_"))}  # fmt: skip
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


def run(argv: list, cwd, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=str(cwd), env=env or clean_env(), capture_output=True,
                          text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL, **kw)  # fmt: skip


def norm(text: str) -> str:
    """pytest's timings, and coverage's, are the only expected differences."""
    return re.sub(r" in \d+\.\d+s", " in N s", text)


def compare(python: str, starter: str, args: list, cwd, env=None) -> subprocess.CompletedProcess:
    """Run ``args`` with python, then with the starter; assert the same outcome; return python's."""
    expected = run([python, *args], cwd, env)
    got = run([starter, *args], cwd, env)
    assert (got.returncode, norm(got.stdout), norm(got.stderr)) == \
        (expected.returncode, norm(expected.stdout), norm(expected.stderr))  # fmt: skip
    return expected


def log_text(bundle: str) -> str:
    return cli("logs", "-n", "10000", bundle).stdout


def warm_runs(bundle: str) -> int:
    return test_learn.status(bundle)["runs"]


@pytest.fixture(scope="module")
def plugin_python(tmp_path_factory):
    """A venv whose site-packages holds a pytest plugin distribution (``fakeplug``, entry point
    in ``pytest11``) and sees this test venv's packages (pytest, xdist, pytest-cov, coverage)
    through a .pth file."""
    directory = tmp_path_factory.mktemp("plugvenv")
    python, site = bare_venv(directory)
    info = os.path.join(site, "fakeplug-1.0.dist-info")
    write_tree(site, {
        "fakeplug.py": PLUGIN,
        "fakeplug-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: fakeplug\nVersion: 1.0\n",
        "fakeplug-1.0.dist-info/entry_points.txt": "[pytest11]\nfakeplug = fakeplug\n",
        "fakeplug-1.0.dist-info/RECORD": "fakeplug.py,,\n",
        "test-venv.pth": sysconfig.get_paths()["purelib"] + "\n",
    })  # fmt: skip
    assert os.path.isdir(info)
    subprocess.run([python, "-m", "compileall", "-q", site], check=True, timeout=60)
    return python


@pytest.fixture(scope="module")
def plugin_bundle(plugin_python, tmp_path_factory):
    """A starter whose server holds the pytest plugin module ``fakeplug``."""
    path = str(tmp_path_factory.mktemp("plugbundle") / "python-plug.bin")
    cli("bundle", "json", "fakeplug", "-o", path, "--python", plugin_python,
        "--idle-timeout", "600", "--no-learn")  # fmt: skip
    first = run([path, "-c", "import sys; print('fakeplug' in sys.modules)"], "/")
    assert (first.returncode, first.stdout, first.stderr) == (0, "True\n", "")
    yield path
    cli("stop", path, check=False)


@pytest.fixture
def project(tmp_path):
    directory = tmp_path / "proj"
    write_tree(directory, PROJECT)
    return directory


# -- pytest -------------------------------------------------------------------------------------


def test_pytest_with_a_plugin_module_in_the_server(plugin_python, plugin_bundle, project):
    """Guards against PytestAssertRewriteWarning ("Module already imported so cannot be
    rewritten; fakeplug") failing a project with filterwarnings = error before any test ran."""
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider"]
    expected = compare(plugin_python, plugin_bundle, args, project)
    assert expected.returncode == 0 and "2 passed" in expected.stdout
    # The first pytest run: cold while the bundle's pytest server starts (test_pytest_warm.py).
    assert "cold run: the pytest server is starting" in log_text(plugin_bundle)


def test_pytest_console_script_with_a_plugin_module_in_the_server(plugin_python, plugin_bundle,
                                                                  project):  # fmt: skip
    script = os.path.join(os.path.dirname(PYTHON), "pytest")
    compare(plugin_python, plugin_bundle, [script, "-q", "-p", "no:cacheprovider"], project)


def test_pytest_cov(plugin_python, plugin_bundle, project):
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--cov=.", "--cov-report=term"]
    expected = compare(plugin_python, plugin_bundle, args, project)
    assert "mod.py" in expected.stdout and "2 passed" in expected.stdout


def test_pytest_runs_warm_without_plugin_modules_and_learns_none(tmp_path, project):
    """A server that holds no plugin or tool module runs pytest warm, exactly; learning from
    those runs takes pytest's helpers (iniconfig) but never pytest, _pytest or a plugin (anyio
    is one, imported by pytest as it loads its plugins): any of them would make the next pytest
    run warn."""
    bundle = test_learn.bundle(tmp_path / "python-learn.bin")
    try:
        args = ["-m", "pytest", "-q", "-p", "no:cacheprovider"]
        for _ in range(2):
            compare(PYTHON, bundle, args, project)
        test_learn.wait_until(lambda: test_learn.in_server(bundle, "iniconfig"),
                              "iniconfig to be learned")  # fmt: skip
        runs = warm_runs(bundle)
        expected = compare(PYTHON, bundle, args, project)
        assert warm_runs(bundle) == runs + 1  # served warm, not sent back cold
        assert "2 passed" in expected.stdout
        learned = {name.partition(".")[0] for name in test_learn.learned(bundle)}
        assert not learned & TOOLS
    finally:
        cli("stop", bundle, check=False)


@pytest.mark.parametrize("how", ["-p", "PYTEST_PLUGINS"])
def test_pytest_naming_a_module_of_the_server_as_a_plugin(tmp_path, project, how):
    """``-p colorsys``: pytest marks colorsys for rewriting before it imports it, and warns if
    it is already there (under python it is not)."""
    bundle = str(tmp_path / "python-colorsys.bin")
    cli("bundle", "json", "colorsys", "-o", bundle, "--idle-timeout", "600", "--no-learn")
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider"]
    env = clean_env()
    if how == "-p":
        args += ["-p", "colorsys"]
    else:
        env["PYTEST_PLUGINS"] = "colorsys"
    try:
        expected = compare(PYTHON, bundle, args, project, env)
        assert "2 passed" in expected.stdout
    finally:
        cli("stop", bundle, check=False)


@pytest.mark.parametrize("bundle_of", ["plugin", "light"])
def test_pytest_xdist_workers_warm_and_cold(plugin_python, plugin_bundle, tmp_path, project,
                                            bundle_of):  # fmt: skip
    """The controller runs warm (light server) or cold (plugin module in the server); execnet
    starts the workers with sys.executable, the bundle's python, in both."""
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2"]
    if bundle_of == "plugin":
        expected = compare(plugin_python, plugin_bundle, args, project)
    else:
        bundle = test_learn.bundle(tmp_path / "python-light.bin", "--no-learn")
        try:
            test_learn.ok(test_learn.run(bundle, "-c", "pass"))  # starts the server
            runs = warm_runs(bundle)
            expected = compare(PYTHON, bundle, args, project)
            assert warm_runs(bundle) == runs + 1
        finally:
            cli("stop", bundle, check=False)
    assert "2 passed" in expected.stdout


def test_pytest_with_cov_in_the_config_runs_cold(tmp_path, project):
    """--cov from a configuration file's addopts: coverage would start after the server's
    modules were imported; the run goes cold, with the reason logged."""
    with open(project / "pyproject.toml", "a", encoding="utf-8") as f:
        f.write('addopts = "--cov=. --cov-report=term"\n')
    bundle = test_learn.bundle(tmp_path / "python-light.bin", "--no-learn")
    try:
        compare(PYTHON, bundle, ["-m", "pytest", "-q", "-p", "no:cacheprovider"], project)
        assert "cold run: pytest with --cov" in log_text(bundle)
    finally:
        cli("stop", bundle, check=False)


# -- coverage -----------------------------------------------------------------------------------


def test_coverage_run_of_a_module_in_the_server(plugin_python, plugin_bundle, project):
    """Under python, coverage measures fakeplug's module-level code as the script imports it;
    a warm run would have imported it before coverage started."""
    with open(project / "script.py", "a", encoding="utf-8") as f:
        f.write("import fakeplug\n")
    compare(plugin_python, plugin_bundle, ["-m", "coverage", "run", "--source=fakeplug,.",
                                           "script.py"], project)  # fmt: skip
    expected = compare(plugin_python, plugin_bundle, ["-m", "coverage", "report"], project)
    assert "fakeplug.py" in expected.stdout and "100%" in expected.stdout
    assert "cold run: -m coverage" in log_text(plugin_bundle)


def test_coverage_console_script(plugin_python, plugin_bundle, project):
    """``STARTER .venv/bin/coverage run ...``: the console script, run by the starter."""
    with open(project / "script.py", "a", encoding="utf-8") as f:
        f.write("import fakeplug\n")
    script = os.path.join(os.path.dirname(PYTHON), "coverage")
    for args in (["run", "--source=fakeplug,.", "script.py"], ["report"]):
        expected = compare(plugin_python, plugin_bundle, [script, *args], project)
    assert "fakeplug.py" in expected.stdout and "100%" in expected.stdout
    assert "(coverage) must see the program" in log_text(plugin_bundle)


def test_coverage_process_start_runs_cold(plugin_python, plugin_bundle, project):
    """COVERAGE_PROCESS_START acts through a .pth at interpreter start-up (none is installed
    here: both runs simply run, and the server must not serve it warm)."""
    env = clean_env(COVERAGE_PROCESS_START=str(project / "pyproject.toml"))
    compare(plugin_python, plugin_bundle, ["script.py"], project, env)
    assert "cold run: COVERAGE_PROCESS_START is set" in log_text(plugin_bundle)


# -- ps, pgrep, /proc ---------------------------------------------------------------------------

SHOW_ME = """\
import os, sys
print(os.getpid(), flush=True)
sys.stdin.read()
"""


TERM = """\
import signal, sys
got = []
signal.signal(signal.SIGTERM, lambda *a: got.append(1))
print("ready", flush=True)
sys.stdin.readline()
print(len(got), "SIGTERM")
"""


def process_view(argv: list, cwd, marker: str) -> dict:
    """Start ``argv`` (a program that prints its pid and waits for stdin to close); what ps,
    pgrep and /proc show of the process that runs the program."""
    env = clean_env()
    proc = subprocess.Popen(argv, cwd=str(cwd), env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        pid = int(proc.stdout.readline())
        ps = subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(pid)], capture_output=True,
                            text=True, timeout=30).stdout  # fmt: skip
        pgrep = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True,
                               timeout=30).stdout.split()  # fmt: skip
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{pid}/comm", "rb") as f:
            comm = f.read()
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
        return {"ps": ps, "pgrep finds it alone": pgrep == [str(pid)], "cmdline": cmdline,
                "comm": comm, "environ": environ}  # fmt: skip
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


@pytest.mark.parametrize("client", ["python", "native"])
def test_ps_pgrep_and_proc_show_the_program(client, light_bundle, native_bundle, tmp_path):
    """Guards against ps/top/pgrep -f showing the server's command line (python -c "import sys;
    ...preloaded.server.loop..." <json>) for the process that runs the script, and against
    pgrep -f also finding the starter (pkill -f would signal the program twice)."""
    starter = light_bundle if client == "python" else native_bundle
    write_tree(tmp_path, {"show_me.py": SHOW_ME})
    marker = f"show_me.py {os.getpid()}-{client}"
    args = ["show_me.py", f"{os.getpid()}-{client}", "with space", ""]
    expected = process_view([PYTHON, *args], tmp_path, marker)
    assert expected["pgrep finds it alone"]
    assert process_view([starter, *args], tmp_path, marker) == expected


def test_pkill_f_signals_the_program_once(light_bundle, tmp_path):
    """pkill -f matched the starter too: a SIGTERM handler ran twice."""
    write_tree(tmp_path, {"term.py": TERM})
    args = ["term.py", f"{os.getpid()}-pkill"]
    outputs = []
    for argv in ([PYTHON, *args], [light_bundle, *args]):
        proc = subprocess.Popen(argv, cwd=str(tmp_path), env=clean_env(), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert proc.stdout.readline() == "ready\n"
        subprocess.run(["pkill", "-f", " ".join(args)], timeout=30)
        out, _ = proc.communicate("go\n", timeout=30)
        outputs.append((proc.returncode, out))
    assert outputs[1] == outputs[0] == (0, "1 SIGTERM\n")


# -- paths and messages -------------------------------------------------------------------------

SHOW_PATHS = "import sys; print(sys.argv[0], __file__, sys.path[0], __spec__ and __spec__.origin)\n"


@pytest.fixture
def paths_dir(tmp_path):
    write_tree(tmp_path, {"sub/f.py": SHOW_PATHS, "app/__main__.py": SHOW_PATHS})
    os.makedirs(tmp_path / "linkdir")
    os.symlink("../sub/f.py", tmp_path / "linkdir" / "l.py")
    os.symlink("sub", tmp_path / "subl")
    with zipfile.ZipFile(tmp_path / "app.zip", "w") as zf:
        zf.writestr("__main__.py", SHOW_PATHS)
    return tmp_path


@pytest.mark.parametrize("target", [
    "./sub/f.py", "sub/../sub/f.py", "sub//f.py", "linkdir/l.py", "./linkdir/l.py", "subl/f.py",
    "app", "./app", "app/", "app.zip", "./app.zip", "./sub", "./nope.py", "sub/../nope.py", ".",
])  # fmt: skip
def test_script_paths_as_python_makes_them(light_bundle, paths_dir, target):
    """sys.argv[0], __file__, sys.path[0] and the error messages: python makes the script's
    path absolute without normalising it (``./sub/f.py`` -> ``/dir/./sub/f.py``)."""
    compare(PYTHON, light_bundle, [target, "arg"], paths_dir)


def test_cant_open_file_names_python_as_a_cold_run_does(light_bundle, tmp_path):
    expected = compare(PYTHON, light_bundle, ["./nope.py"], tmp_path)
    cold = run([light_bundle, "./nope.py"], tmp_path, clean_env(PY_PRELOAD_COLD="1"))
    assert (cold.returncode, cold.stdout, cold.stderr) == \
        (expected.returncode, expected.stdout, expected.stderr)  # fmt: skip
    assert expected.stderr.startswith(f"{PYTHON}: can't open file '{tmp_path}/./nope.py'")


# -- learning -----------------------------------------------------------------------------------


def test_learning_never_takes_a_pytest_plugin(tmp_path, test_venv):
    """A plugin module (its distribution has a pytest11 entry point) is never learned, and a
    library that imports one is refused: in the server, either would send every pytest run cold
    (or, before, make it warn)."""
    python, site = test_venv
    write_tree(site, {
        "fakeplug.py": PLUGIN,
        "fakeplug-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: fakeplug\nVersion: 1.0\n",
        "fakeplug-1.0.dist-info/entry_points.txt": "[pytest11]\nfakeplug = fakeplug\n",
    })  # fmt: skip
    test_learn.install(test_venv, "usesplug", "import fakeplug\n")
    bundle = test_learn.bundle(tmp_path / "python-learn.bin", python=python)
    try:
        for _ in range(2):
            test_learn.ok(test_learn.run(bundle, "-c", "import fakeplug, colorsys"))
        test_learn.wait_until(lambda: "colorsys" in test_learn.learned(bundle),
                              "colorsys to be learned")  # fmt: skip
        assert "fakeplug" not in test_learn.learned(bundle)
        assert not test_learn.in_server(bundle, "fakeplug")
        for _ in range(2):
            test_learn.ok(test_learn.run(bundle, "-c", "import usesplug"))
        test_learn.wait_until(lambda: "usesplug" in test_learn.saved(bundle).get("refused", {}),
                              "usesplug to be refused")  # fmt: skip
        reason = test_learn.saved(bundle)["refused"]["usesplug"]
        assert "fakeplug" in reason
        assert not test_learn.in_server(bundle, "fakeplug")
    finally:
        cli("stop", bundle, check=False)


@pytest.fixture
def test_venv(tmp_path):
    directory = tmp_path / "venv"
    python, site = bare_venv(directory)
    return python, site


# -- torch + transformers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tt_bundle(tmp_path_factory):
    """(pytest with this bundle: test_pytest_warm.py.)"""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    path = str(tmp_path_factory.mktemp("tt") / "python-tt.bin")
    cli("bundle", "torch", "transformers", "-o", path, "--idle-timeout", "600", "--no-learn")
    first = run([path, "-c", "import sys; print('anyio' in sys.modules)"], "/")
    assert (first.returncode, first.stdout) == (0, "True\n"), first.stderr
    yield path
    cli("stop", path, check=False)


@pytest.mark.torch
def test_coverage_run_with_torch_in_the_server(tt_bundle, project):
    """coverage's check of already imported modules crashed on torch.ops (TypeError)."""
    compare(PYTHON, tt_bundle, ["-m", "coverage", "run", "--source=.", "script.py"], project)
    expected = compare(PYTHON, tt_bundle, ["-m", "coverage", "report"], project)
    assert "mod.py" in expected.stdout


# -- a third-party project's own test suite ------------------------------------------------------

SDIST = "six"


@pytest.fixture(scope="module")
def sdist_tree(tmp_path_factory):
    """The sdist of a small pure-Python project, unpacked (skipped without network)."""
    directory = tmp_path_factory.mktemp("sdist")
    proc = subprocess.run([PYTHON, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                           "--disable-pip-version-check", "-q", "-d", str(directory), SDIST],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    archives = [n for n in os.listdir(directory) if n.endswith(".tar.gz")]
    if proc.returncode != 0 or not archives:
        pytest.skip(f"cannot download the sdist of {SDIST} (no network?)")
    with tarfile.open(directory / archives[0]) as tar:
        tar.extractall(directory, filter="data") if sys.version_info >= (3, 12) else \
            tar.extractall(directory)  # fmt: skip
    return directory / archives[0][: -len(".tar.gz")]


@pytest.mark.network
@pytest.mark.parametrize("which", ["warm", "cold"])
def test_third_party_test_suite(sdist_tree, which, plugin_python, plugin_bundle, tmp_path):
    """six's own test suite, as python runs it: warm through a server without plugin modules,
    cold (sent back) through one that holds one."""
    if which == "warm":
        python = PYTHON
        starter = test_learn.bundle(tmp_path / "python-light.bin", "--no-learn")
    else:
        python, starter = plugin_python, plugin_bundle
    try:
        expected = compare(python, starter, ["-m", "pytest", "-q", "-p", "no:cacheprovider"],
                           sdist_tree)  # fmt: skip
        assert expected.returncode == 0 and " passed" in expected.stdout
        summary = norm(expected.stdout.strip().splitlines()[-1])
        print(f"\n{SDIST} ({which}): {summary}")
    finally:
        if which == "warm":
            cli("stop", starter, check=False)

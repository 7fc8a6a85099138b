"""A project's own module named like one the server holds (issue 18, part 2), differential.

Python imports a ``json.py``, ``decimal/`` or ``filelock.py`` of the script's directory (the cwd
for ``-m`` and ``-c``, or a ``PYTHONPATH`` directory) instead of the installed one; a warm child
holds the server's. Such a run must go cold (the server's run count unchanged) and print what
python prints. Where python itself keeps the server's module (a module the interpreter imported
while starting, a namespace portion beaten by a regular package, a name the server does not
hold), the run stays warm, still printing what python prints. Both clients.
"""

from __future__ import annotations

import importlib._bootstrap_external as bootstrap
import os
import subprocess
from importlib.machinery import EXTENSION_SUFFIXES

import pytest

from conftest import PYTHON, cli, make_bundle, native_only, serving
from test_differential import Case, Link, _explain, _run, server_runs

MODULES = ("json", "decimal", "filelock")  # two standard-library modules, one third-party
SHOW = ("import json, decimal, filelock\n"
        "print(json.dumps([1]), decimal.Decimal(1), filelock.__name__)\n")
LOCAL = "def dumps(x): return 'local json'\n"
EXTENSION = EXTENSION_SUFFIXES[0]  # name.cpython-3XY-<platform>.so
# The bundle's standard library json package (the bundle runs this interpreter): a link to it is
# the server's very own module; a copy of it is other files, though the same text.
JSON_DIR = subprocess.run([PYTHON, "-c", "import json, os; print(os.path.dirname(json.__file__))"],
                          capture_output=True, text=True, check=True).stdout.strip()


def _zip(members: dict) -> bytes:
    """A zip app: python puts the archive itself first on sys.path."""
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return buffer.getvalue()


def _pyc(source: str) -> bytes:
    """A sourceless module (``name.pyc`` beside the script) for this interpreter."""
    return bytes(bootstrap._code_to_timestamp_pyc(compile(source, "json.py", "exec")))


# (case, whether python keeps the server's modules: the run stays warm)
CASES = [
    (Case("stdlib-file", ["{d}/s.py"], {"s.py": SHOW, "json.py": LOCAL}), False),
    (Case("stdlib-package", ["{d}/s.py"], {"s.py": SHOW, "decimal/__init__.py": "Decimal = str\n"}),
     False),
    (Case("third-party-file", ["{d}/s.py"], {"s.py": SHOW, "filelock.py": "print('mine')\n"}),
     False),
    (Case("third-party-package", ["{d}/s.py"],
          {"s.py": SHOW, "filelock/__init__.py": "print('my package')\n"}), False),
    (Case("sourceless-pyc", ["{d}/s.py"], {"s.py": SHOW, "json.pyc": _pyc(LOCAL)}), False),
    (Case("extension-module", ["{d}/s.py"], {"s.py": SHOW, "json" + EXTENSION: b"not ELF"}), False),
    (Case("script-in-subdir", ["sub/s.py"], {"sub/s.py": SHOW, "sub/json.py": LOCAL}), False),
    (Case("symlinked-script", ["bin/s.py"],  # python lists the real script's directory
          {"bin/s.py": Link("../real/s.py"), "real/s.py": SHOW, "real/json.py": LOCAL}), False),
    (Case("symlinked-directory", ["{d}/link/s.py"],
          {"link": Link("real"), "real/s.py": SHOW, "real/json.py": LOCAL}), False),
    (Case("zip-app", ["{d}/app.zip"], {"app.zip": _zip({"__main__.py": SHOW, "json.py": LOCAL})}),
     False),
    (Case("cwd-with-c", ["-c", SHOW], {"json.py": LOCAL}), False),
    (Case("cwd-with-m", ["-m", "mod"], {"mod.py": SHOW, "filelock/__init__.py": ""}), False),
    (Case("pythonpath-file", ["-c", SHOW], {"pp/json.py": LOCAL}, env={"PYTHONPATH": "{d}/pp"}),
     False),
    (Case("pythonpath-package", ["-c", SHOW], {"pp/filelock/__init__.py": "X = 1\n"},
          env={"PYTHONPATH": "{d}/nothing:{d}/pp"}), False),
    (Case("pythonpath-sitecustomize", ["-c", SHOW], {"pp/sitecustomize.py": "print('custom')\n"},
          env={"PYTHONPATH": "{d}/pp"}), False),
    (Case("copy-of-the-held-package", ["{d}/s.py"],
          {"s.py": SHOW, **{f"json/{n}": open(os.path.join(JSON_DIR, n)).read()
                            for n in os.listdir(JSON_DIR) if n.endswith(".py")}}), False),
    # Python keeps the server's module in these: warm.
    (Case("link-to-the-held-package", ["{d}/s.py"], {"s.py": SHOW, "json": Link(JSON_DIR)}), True),
    (Case("pythonpath-link-to-the-held-package", ["-c", SHOW], {"pp/json": Link(JSON_DIR)},
          env={"PYTHONPATH": "{d}/pp"}), True),
    (Case("namespace-portion", ["{d}/s.py"], {"s.py": SHOW, "decimal/notes.txt": ""}), True),
    (Case("imported-at-start-up", ["{d}/s.py"], {"s.py": SHOW + "import os\nprint(os.sep)\n",
                                                 "os.py": "sep = 'local'\n"}), True),
    (Case("name-not-held", ["{d}/s.py"], {"s.py": "import colorsys\nprint(colorsys.X)\n",
                                          "colorsys.py": "X = 'local'\n"}), True),
    (Case("unrelated-files", ["-c", SHOW], {"data.json": "[]", "json_tools.py": ""}), True),
    (Case("beside-the-symlink-only", ["bin/s.py"],
          {"bin/s.py": Link("../real/s.py"), "bin/json.py": LOCAL, "real/s.py": SHOW}), True),
]


# The native client only relays the server's answer (warm, or cold: it execs python itself):
# a case of each kind of directory and answer is enough for it.
NATIVE = ("stdlib-file", "cwd-with-m", "pythonpath-package", "symlinked-script",
          "namespace-portion", "imported-at-start-up", "link-to-the-held-package")  # fmt: skip


@pytest.fixture(scope="module", params=["python", "native"])
def client(request):
    return request.param


@pytest.fixture(scope="module")
def starter(client, bundle_dir):
    """A bundle holding MODULES, its server started: the Python starter, or the native one
    that cannot fall back to Python (a cold run is its own exec of python)."""
    if client == "native":
        path = os.path.join(bundle_dir, "python-shadow-strict.bin")
        if not serving(path):
            native_only(path, *MODULES)
        return path
    path = os.path.join(bundle_dir, "python-shadow.bin")
    if not serving(path):
        make_bundle(path, *MODULES, client="python")
        subprocess.run([path, "-c", "pass"], check=True, timeout=120, capture_output=True,
                       stdin=subprocess.DEVNULL)  # fmt: skip
    return path


@pytest.mark.parametrize("case, warm", CASES, ids=[c.name for c, _ in CASES])
def test_local_module_named_like_a_held_one(client, starter, tmp_path, case, warm):
    if client == "native" and case.name not in NATIVE:
        pytest.skip("the Python client's case: the server decides, the client relays")
    directory = str(tmp_path / "w")
    expected = _run(PYTHON, case, directory)
    before = server_runs(starter)
    actual = _run(starter, case, directory)
    assert actual == expected, _explain(expected, actual)
    ran = server_runs(starter) - before
    assert ran == (1 if warm else 0), "warm" if ran else "cold"


def test_shadowing_appears_and_goes(starter, tmp_path):
    """The directory listing is cached by mtime: a module added (or removed) after a warm run
    of the same directory counts at once."""
    case = Case("later", ["{d}/s.py"], {"s.py": SHOW})
    directory = str(tmp_path / "w")
    _run(starter, case, directory)  # builds the directory, warm
    local = os.path.join(directory, "json.py")
    for present in (True, False):
        if present:
            with open(local, "w") as f:
                f.write(LOCAL)
        else:
            os.unlink(local)
        expected = _run_kept(PYTHON, directory)
        before = server_runs(starter)
        assert _run_kept(starter, directory) == expected
        assert server_runs(starter) - before == (0 if present else 1)


def _run_kept(exe: str, directory: str) -> tuple:
    """Run s.py of ``directory`` as it is (``_run`` would build it afresh)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run([exe, os.path.join(directory, "s.py")], capture_output=True,
                          env=env, cwd=directory, timeout=30, stdin=subprocess.DEVNULL)  # fmt: skip
    return proc.returncode, proc.stdout, proc.stderr


def test_namespace_package_the_server_holds(tmp_path, monkeypatch):
    """A directory without __init__.py beats nothing regular, but it is a portion of a namespace
    package the server holds (python's __path__ would start with it): cold; the server's own
    portion, on PYTHONPATH, is no change. In-process, on this process's modules."""
    import sys

    from preloaded.server.shadowing import Shadows

    site = tmp_path / "site"
    (site / "nspkg").mkdir(parents=True)
    (site / "nspkg" / "a.py").write_text("")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(sys, "modules", dict(sys.modules))  # nspkg is gone after the test
    __import__("nspkg.a")
    project = tmp_path / "project"
    (project / "nspkg").mkdir(parents=True)
    shadows, known = Shadows(frozenset()), frozenset(sys.modules)

    def reason(cwd, pythonpath=""):
        env = {"PYTHONPATH": pythonpath} if pythonpath else {}
        return shadows.reason({"mode": "code", "target": "", "cwd": str(cwd), "env": env}, known)

    assert "'nspkg' in " + str(project) in reason(project)
    assert reason(tmp_path, pythonpath=str(site)) is None
    assert reason(tmp_path) is None


def test_module_found_only_through_the_bundle_path(tmp_path):
    """A module the bundling caller's PYTHONPATH found is held by the server, but not on a
    child's path: a run whose directories lack its directory gets python's ModuleNotFoundError
    (cold), one that lists it (or a link to its very file) stays warm; sys.path is python's."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "bpmod.py").write_text("VALUE = 'bundled'\n")
    (tmp_path / "link").symlink_to(lib)
    bundle = str(tmp_path / "python-bpmod.bin")
    cli("bundle", "bpmod", "-o", bundle, "--idle-timeout", "120",
        env={**os.environ, "PYTHONPATH": str(lib)})  # fmt: skip
    code = "import sys; print(sys.path[:2]); import bpmod; print(bpmod.VALUE)"
    cases = [(Case("lacks-it", ["-c", code]), False),
             (Case("pythonpath-has-it", ["-c", code], env={"PYTHONPATH": str(lib)}), True),
             (Case("cwd-is-it", ["-c", code], cwd="l", files={"l": Link(str(lib))}), True)]
    try:
        for case, warm in cases:
            directory = str(tmp_path / "w")
            expected = _run(PYTHON, case, directory)
            if case.name == "lacks-it":
                assert b"ModuleNotFoundError" in expected[2]
            _run(bundle, Case("start", ["-c", "pass"], env={"PYTHONPATH": str(lib)}), directory)
            before = server_runs(bundle)
            actual = _run(bundle, case, directory)
            assert actual == expected, _explain(expected, actual)
            assert server_runs(bundle) - before == (1 if warm else 0), case.name
    finally:
        cli("stop", bundle, check=False)

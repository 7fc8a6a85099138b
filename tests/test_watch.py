"""An installed file edited in place (issue 18, part 3): the server notices through inotify.

The package lives in a directory named site-packages on PYTHONPATH (as an installed package:
only the directory's mtime is stamped, which an edit in place leaves alone), so that the test
never edits the shared .venv. Python is the oracle for every run.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import PYTHON, cli, make_bundle, need_native
from preloaded.server.watch import Watcher

CODE = "import edpkg; print(edpkg.V)"


def _run(exe: str, site: str, code: str = CODE) -> tuple:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = site
    proc = subprocess.run([exe, "-c", code], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(site), timeout=60,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    return proc.returncode, proc.stdout, proc.stderr


def _status(bundle: str) -> dict:
    return json.loads(cli("status", "--json", bundle).stdout)


def _same_as_python(bundle: str, site: str, code: str = CODE) -> str:
    expected = _run(PYTHON, site, code)
    assert _run(bundle, site, code) == expected
    return expected[1]


@pytest.mark.parametrize("client", ["python", "native"])
def test_installed_file_edited_in_place(tmp_path, monkeypatch, client):
    if client == "native":
        need_native()
    site = tmp_path / "lib" / "site-packages"
    package = site / "edpkg"
    package.mkdir(parents=True)
    init = package / "__init__.py"
    init.write_text("V = 1\n")
    (package / "extra.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(site))  # found at bundle time, as an installed package
    bundle = make_bundle(tmp_path / "python-edpkg.bin", "edpkg", client=client)
    monkeypatch.delenv("PYTHONPATH")
    try:
        assert _same_as_python(bundle, str(site)) == "1\n"
        server = _status(bundle)["pid"]
        # Runs write bytecode and output files into a watched directory: no change.
        code = f"import edpkg.extra; open({str(package / 'out.txt')!r}, 'w').write('x')"
        _same_as_python(bundle, str(site), code)
        assert _status(bundle)["stale"] is None and _status(bundle)["pid"] == server
        assert os.listdir(package / "__pycache__")
        init.write_text("V = 22\n")  # another size (the .pyc cannot pass); the run comes at once
        assert _same_as_python(bundle, str(site)) == "22\n"
        assert _status(bundle)["pid"] != server
        assert f"stale ({init} changed)" in cli("logs", "-n", "1000", bundle).stdout
        init.write_text("V = 333\n")
        assert _status(bundle)["stale"] == f"{init} changed"  # named before any run comes
        assert _same_as_python(bundle, str(site)) == "333\n"
    finally:
        cli("stop", bundle, check=False)


def test_watcher_names_only_imported_files(tmp_path):
    """Writes beside an imported file, __pycache__, then an edit by rename (sed -i, editors)."""
    module = tmp_path / "mod.py"
    module.write_text("A = 1\n")
    logged: list = []
    watcher = Watcher(logged.append)
    try:
        watcher.watch([str(module)])
        assert watcher.fileno() is not None, logged
        (tmp_path / "output.txt").write_text("x")
        (tmp_path / "__pycache__").mkdir()
        (tmp_path / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"")
        assert watcher.changed() is None
        (tmp_path / "mod.py.tmp").write_text("A = 2\n")
        os.replace(tmp_path / "mod.py.tmp", module)
        assert watcher.changed() == f"{module} changed"
    finally:
        watcher.close()


def test_watcher_falls_back_to_mtimes(tmp_path):
    """Without inotify (no instance or watch left), edits are still seen, and the log says so."""
    module = tmp_path / "mod.py"
    module.write_text("A = 1\n")
    logged: list = []
    watcher = Watcher(logged.append)
    watcher.watch([str(module)])
    watcher._fall_back("test: inotify_add_watch: No space left on device")
    assert watcher.fileno() is None and "checking their mtimes" in logged[-1]
    assert "No space left on device" in watcher.problem
    assert "sysctl fs.inotify.max_user_watches" in watcher.problem  # what to do (status shows it)
    assert watcher.changed() is None
    os.utime(module, ns=(0, 10**9))
    assert watcher.changed() == f"{module} changed"


def test_watcher_follows_a_module_inside_an_archive(tmp_path):
    """A module imported from a zip on the path (its __file__ lies inside the archive): the
    archive is watched; a module whose directory does not exist is no change (not stale for
    ever, which would restart the server on every run)."""
    archive = tmp_path / "lib.zip"
    archive.write_bytes(b"PK")
    watcher = Watcher(print)
    try:
        watcher.watch([str(archive / "pkg" / "mod.py"), str(tmp_path / "gone" / "x.py")])
        assert watcher.changed() is None
        archive.write_bytes(b"PK2")
        assert watcher.changed() == f"{archive} changed"
    finally:
        watcher.close()

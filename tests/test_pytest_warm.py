"""pytest warm, with python's report: the pytest server of a bundle (preloaded.server.pytestserver).

A bundle whose server holds a pytest plugin's modules (anyio's: its distribution has a pytest11
entry point; transformers imports it) runs pytest on a second server built as pytest builds its
state. Each case runs a real pytest project with the bundle's python and with both clients and
compares exit status, stdout and stderr (pytest's "in N.NNs" aside; under xdist, the order of
the progress characters). The runs the pytest server took are counted: warm is checked, not
assumed. Cases that state was not built for go cold or stay on the plain server: exact either
way.
"""

from __future__ import annotations

import os
import re
import socket
import time

import pytest

from conftest import PYTHON, bare_venv, cli, make_bundle, need_native
from preloaded import servers
from preloaded.paths import Paths
import test_learn
from test_tools import clean_env, log_text, run, write_tree

START_TIMEOUT = 120.0

PROJECT = {
    "pyproject.toml": '[tool.pytest.ini_options]\nfilterwarnings = ["error"]\n',
    # A module of anyio's (a plugin's distribution: the pytest server has it, through the hook)
    # and one of the project's.
    "conftest.py": 'pytest_plugins = ["helpers", "anyio._core._eventloop"]\n',
    "helpers.py": "import pytest\n\n\n@pytest.fixture\ndef answer():\n    return 42\n",
    "test_a.py": """\
import subprocess
import sys

import anyio
import pytest


@pytest.fixture(scope="module")
def table():
    return {"a": 1, "b": [1, 2, 3]}


@pytest.mark.parametrize("key", ["a", "b"])
def test_keys(table, key):
    assert key in table


def test_rewritten_message(table, answer):
    assert table == {"a": 1, "b": [1, 2, 4]}, answer


@pytest.mark.anyio
async def test_anyio_plugin():
    await anyio.sleep(0)


def test_python_in_a_test():
    out = subprocess.run([sys.executable, "-c", "import sys; print(sys.flags.optimize)"],
                         capture_output=True, text=True, check=True).stdout
    assert out == "0\\n"
""",
}  # fmt: skip


def norm(text: str) -> str:
    """Timings aside; under xdist, the order the workers finish in and which one ran what."""
    text = re.sub(r" in \d+\.\d+s( \(\d+:\d\d:\d\d\))?", " in N s", text)
    text = re.sub(r"^\[gw\d+\] ", "[gw] ", text, flags=re.M)  # which worker ran the failure
    return re.sub(r"^([.FEsx]+)(\s+\[)", lambda m: "".join(sorted(m[1])) + m[2], text, flags=re.M)


def small_venv(directory, requirements: tuple) -> str:
    """A venv that sees only ``requirements`` and what they require (symlinked from this test
    venv): python's pytest runs load no other plugin (hypothesis's alone costs 1.5 s a run)."""
    import subprocess
    from importlib import metadata

    from packaging.requirements import Requirement

    python, site = bare_venv(directory)
    todo, seen = list(requirements), set()
    while todo:
        name = todo.pop()
        if name.lower() in seen:
            continue
        seen.add(name.lower())
        dist = metadata.distribution(name)
        for entry in dist.files or ():
            top = str(entry).split("/")[0]
            target = os.path.join(site, top)
            if top != ".." and not os.path.lexists(target):
                os.symlink(str(dist.locate_file(top)), target)
        for text in dist.requires or ():
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return python


@pytest.fixture(scope="module")
def small_python(tmp_path_factory):
    return small_venv(tmp_path_factory.mktemp("smallvenv"), ("pytest", "pytest-xdist", "anyio"))


@pytest.fixture(scope="module")
def anyio_bundles(tmp_path_factory, small_python):
    """Starters (both clients) whose plain servers hold anyio, a pytest plugin's package."""
    directory = tmp_path_factory.mktemp("pytestwarm")
    bundles = {"python": directory / "python-anyio.bin"}
    try:
        need_native()
        bundles["native"] = directory / "python-anyio-n.bin"
    except pytest.skip.Exception:
        pass
    for client, path in bundles.items():
        cli("bundle", "anyio", "-o", str(path), "--python", small_python, "--client", client,
            "--idle-timeout", "600")  # fmt: skip
    bundles = {client: str(path) for client, path in bundles.items()}
    try:
        for bundle in [kick(path) for path in bundles.values()]:
            bundle.wait(timeout=START_TIMEOUT)  # their pytest servers start while tests run
        yield bundles
    finally:
        for path in bundles.values():
            cli("stop", path, check=False)


@pytest.fixture
def project(tmp_path):
    write_tree(tmp_path / "proj", PROJECT)
    return tmp_path / "proj"


def pytest_socket(bundle: str) -> str:
    return Paths(bundle, flavour="pytest").socket


def pytest_runs(bundle: str) -> int:
    """Runs the bundle's pytest server forked; -1 when none serves."""
    reply = servers.ask(pytest_socket(bundle), {"cmd": "status"})
    return reply["runs"] if isinstance(reply, dict) and "runs" in reply else -1


def kick(bundle: str):
    """Start the bundle's servers in the background: a pytest run starts the plain server, goes
    cold, and has the plain server start the pytest server. (Python's runs go on meanwhile.)"""
    import subprocess

    return subprocess.Popen([bundle, "-m", "pytest", "--version"], cwd="/", env=clean_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip


def ready(bundle: str, kicked=None) -> None:
    """Wait until the bundle's pytest server serves."""
    if pytest_runs(bundle) >= 0:
        return
    (kicked or kick(bundle)).wait(timeout=START_TIMEOUT)
    deadline = time.monotonic() + START_TIMEOUT
    while pytest_runs(bundle) < 0:
        assert time.monotonic() < deadline, f"no pytest server:\n{log_text(bundle)}"
        time.sleep(0.1)


def compare_all(bundles: dict, args: list, cwd, python=PYTHON, kicked=None) -> tuple:
    """python's run, then each starter's: the same outcome. (python's run, warm runs taken by
    each bundle's pytest server)."""
    expected = run([python, *args], cwd)
    kicked = kicked or {}
    want = (expected.returncode, norm(expected.stdout), norm(expected.stderr))
    taken = {}
    for client, bundle in bundles.items():
        ready(bundle, kicked.get(client))
        before = pytest_runs(bundle)
        got = run([bundle, *args], cwd)
        assert (got.returncode, norm(got.stdout), norm(got.stderr)) == want, client
        taken[client] = pytest_runs(bundle) - before
    return expected, taken


PYTEST = ["-m", "pytest", "-p", "no:cacheprovider"]


def test_warm_report_is_pythons(anyio_bundles, small_python, project):
    """Guards against the warm run's pytest warning "Module already imported so cannot be
    rewritten; anyio" (an error under filterwarnings = error) and against running it cold: the
    rewritten assertion message, a conftest's pytest_plugins, anyio's plugin, a test that runs
    sys.executable."""
    expected, taken = compare_all(anyio_bundles, PYTEST, project, small_python)
    assert expected.returncode == 1 and "1 failed, 4 passed" in expected.stdout
    assert "Full diff" in expected.stdout or "Differing items" in expected.stdout
    assert set(taken.values()) == {1}, taken


def test_console_script_cache_and_an_edited_test_file(anyio_bundles, small_python, project):
    """``STARTER .venv/bin/pytest`` writes pytest's cache; a test file edited between runs is
    picked up at once; ``--lf`` reads the cache."""
    script = os.path.join(os.path.dirname(PYTHON), "pytest")
    expected, taken = compare_all(anyio_bundles, [script, "-q"], project, small_python)
    assert "1 failed, 4 passed" in expected.stdout and set(taken.values()) == {1}
    with open(project / "test_a.py", "a", encoding="utf-8") as f:
        f.write("\n\ndef test_new():\n    assert 1 + 1 == 3\n")
    args = ["-m", "pytest", "-q", "--lf"]
    expected, taken = compare_all(anyio_bundles, args, project, small_python)
    assert "failed" in expected.stdout and set(taken.values()) == {1}


def test_xdist_workers_warm(anyio_bundles, small_python, project):
    """-n 2: the controller and both workers are children of the pytest server."""
    expected, taken = compare_all(anyio_bundles, PYTEST + ["-q", "-n", "2"], project, small_python)
    assert "1 failed, 4 passed" in expected.stdout
    assert set(taken.values()) == {3}, taken


@pytest.mark.parametrize("args, where", [
    (["-p", "no:anyio"], "cold"),  # the pytest server imported anyio's plugin
    (["--assert=plain"], "plain"),  # no hook, no marks: the plain server is exact
])  # fmt: skip
def test_command_lines_the_state_depends_on(anyio_bundles, small_python, project, args, where):
    """Decided by the servers, whatever the client: one client is enough."""
    bundle = anyio_bundles["python"]
    plain_runs = test_learn.status(bundle)["runs"]
    expected, taken = compare_all({"python": bundle}, PYTEST + ["-q", *args], project, small_python)
    assert expected.returncode in (1, 2) and taken == {"python": 0}
    assert test_learn.status(bundle)["runs"] == plain_runs + (where == "plain")
    if where == "cold":
        assert "cold run: pytest: -p no:anyio blocks a plugin" in _pytest_log(bundle)


def test_plain_runs_hold_nothing_of_pytest(anyio_bundles, tmp_path):
    """The plain server's children: no pytest module, no rewriting hook, anyio's modules
    loaded the ordinary way."""
    code = ("import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('pytest', '_pytest', 'xdist')), "
            "[type(f).__name__ for f in sys.meta_path], type(sys.modules['anyio'].__loader__))")
    for bundle in anyio_bundles.values():
        got = run([bundle, "-c", code], tmp_path)
        assert got.stdout.startswith("[] [") and "SourceFileLoader" in got.stdout, got
        assert "AssertionRewritingHook" not in got.stdout, got


@pytest.mark.parametrize("argv, env, config, workers", [
    (["pytest", "-n", "2"], {}, "", True),
    (["pytest", "-q"], {"PYTEST_ADDOPTS": "--numprocesses=auto"}, "", True),
    (["pytest", "-q"], {}, 'addopts = "-n 2"\n', True),
    (["pytest", "-q"], {}, "[testenv]\ncommands = pytest -n 2\n", False),  # tox's, not ours
    (["pytest", "-q", "tests/"], {}, "", False),
])  # fmt: skip
def test_wants_workers(argv, env, config, workers):
    """A controller's sys.executable is the starter only in a run that starts xdist workers."""
    from preloaded.server.pytestserver import wants_workers

    assert wants_workers({"argv": argv, "env": env}, config) is workers


@pytest.mark.parametrize("source, names", [
    ("x = 1\n", []),
    ("pytest_plugins = 'a.b'\n", ["a.b"]),
    ("pytest_plugins = ['a', 'b']\n", ["a", "b"]),
    ("pytest_plugins = ['a' + 'b']\n", None),  # computed: unknown, the run goes cold
    ("pytest_plugins = []\npytest_plugins += ['a']\n", None),
    ("import x\npytest_plugins = x.PLUGINS\n", None),
])  # fmt: skip
def test_conftest_pytest_plugins_read(tmp_path, source, names):
    from preloaded.server.pytestserver import _plugins_of

    write_tree(tmp_path, {"conftest.py": source})
    assert _plugins_of(str(tmp_path / "conftest.py")) == names


def _pytest_log(bundle: str) -> str:
    path = Paths(bundle, flavour="pytest").log
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


# -- torch and transformers ---------------------------------------------------------------------

BERT_PROJECT = {
    "pyproject.toml": '[tool.pytest.ini_options]\nfilterwarnings = ["error"]\n',
    "test_bert.py": """\
import pytest
import torch
from transformers import BertConfig, BertModel


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=20)
    return BertModel(config).eval()


@pytest.mark.parametrize("length", [2, 5])
def test_shape(model, length):
    with torch.no_grad():
        out = model(input_ids=torch.arange(length).unsqueeze(0))
    assert out.last_hidden_state.shape == (1, length, 16)


def test_hidden_size(model):
    assert model.config.to_dict()["hidden_size"] == 32
""",
}  # fmt: skip


@pytest.mark.torch
def test_torch_transformers_project(tmp_path):
    """``bundle torch transformers``: transformers imports anyio; the run is warm (before, it
    went cold every time) and its report python's, the failing assertion's message included."""
    write_tree(tmp_path / "proj", BERT_PROJECT)
    python = small_venv(tmp_path / "venv", ("pytest", "anyio", "torch", "transformers"))
    bundle = str(tmp_path / "python-tt.bin")
    cli("bundle", "torch", "transformers", "-o", bundle, "--python", python, "--no-learn")
    try:
        kicked = {"python": kick(bundle)}
        expected, taken = compare_all({"python": bundle}, PYTEST + ["-q"], tmp_path / "proj",
                                      python, kicked)  # fmt: skip
        assert "1 failed, 2 passed" in expected.stdout and "assert 16 == 32" in expected.stdout
        assert taken == {"python": 1}
    finally:
        cli("stop", bundle, check=False)

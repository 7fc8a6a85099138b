"""The environment the server's imports read (issue 18, part 1), TZ and the hash seed (part 5).

Differential, python as the oracle: a library that read a variable when the server imported it
keeps what it saw; a run with another value must behave as python does (it runs cold, the
variable named in the log), with both clients. One server per client and case family.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import PYTHON, REPO, cli, need_native

TIMEOUT = 120

ENVMOD = '''
import os
GREETING = os.environ.get("ENVDEPS_GREETING", "hello")  # read once, at import
'''
SCRIPT = '''
import time
import envmod
print(envmod.GREETING, time.tzname, time.localtime(0).tm_hour)
'''


def run(argv: list, env: dict, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, env=env,
                          cwd=cwd, stdin=subprocess.DEVNULL)  # fmt: skip


def status(bundle: str) -> dict:
    return json.loads(cli("status", "--json", bundle).stdout)


def log_text(bundle: str) -> str:
    with open(status(bundle)["log"], encoding="utf-8", errors="replace") as f:
        return f.read()


def with_env(base: dict, **changes) -> dict:
    env = dict(base)
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


class Case:
    """A bundle preloading ``modules``, its server started with ``server_env``; a script."""

    def __init__(self, bundle: str, script: str, cwd: str, base_env: dict, client: str) -> None:
        self.bundle, self.script, self.cwd, self.base_env = bundle, script, cwd, base_env
        self.client = client

    def compare(self, env: dict, warm: bool | None) -> str:
        """Python and the starter under ``env`` print the same; the starter's run was warm
        (True), cold (False) or either (None). Returns python's output."""
        python = run([PYTHON, self.script], env, self.cwd)
        runs = status(self.bundle)["runs"]
        starter = run([self.bundle, self.script], env, self.cwd)
        assert (starter.returncode, starter.stdout, starter.stderr) == (
            python.returncode, python.stdout, python.stderr)  # fmt: skip
        if warm is not None:
            assert status(self.bundle)["runs"] == runs + warm, "warm" if warm else "cold"
        return python.stdout


def make_case(tmp_path_factory, client: str, modules: tuple, script: str, env: dict,
              path: str | None = None) -> Case:  # fmt: skip
    if client == "native":
        need_native()
    directory = tmp_path_factory.mktemp(f"envdeps-{client}")
    bundle = str(directory / "python-envdeps.bin")
    cli("bundle", *modules, "-o", bundle, "--idle-timeout", "600", "--client", client,
        env=with_env(os.environ, PYTHONPATH=path))  # fmt: skip
    script_path = directory / "script.py"
    script_path.write_text(script)
    started = run([bundle, "-c", "pass"], env, str(directory))
    assert started.returncode == 0, started.stderr
    return Case(bundle, str(script_path), str(directory), env, client)


@pytest.fixture(scope="module", params=["python", "native"])
def envmod(request, tmp_path_factory):
    """A server preloading a module that reads ENVDEPS_GREETING, started without it."""
    mods = tmp_path_factory.mktemp("envmod")
    (mods / "envmod.py").write_text(ENVMOD)
    env = with_env(os.environ, ENVDEPS_GREETING=None, TZ=None, PYTHONHASHSEED=None,
                   PYTHONPATH=str(mods))  # python finds it there, the child in the server
    case = make_case(tmp_path_factory, request.param, ("envmod",), SCRIPT, env, str(mods))
    yield case
    cli("stop", case.bundle, check=False)


def test_a_variable_read_at_import_runs_cold_when_it_differs(envmod):
    assert envmod.compare(envmod.base_env, warm=True).startswith("hello ")
    changed = with_env(envmod.base_env, ENVDEPS_GREETING="bonjour")
    assert envmod.compare(changed, warm=False).startswith("bonjour ")
    assert "ENVDEPS_GREETING='bonjour' differs from the server's (unset)" in log_text(envmod.bundle)
    assert envmod.compare(envmod.base_env, warm=True).startswith("hello ")  # still warm


def test_tz_of_the_run(envmod):
    """The C library read TZ when the server imported ``time``: the child re-reads the run's."""
    for tz in ("ABC-3", "XYZ+7", None):
        out = envmod.compare(with_env(envmod.base_env, TZ=tz), warm=True)
        assert out.startswith(f"hello ('{tz[:3]}'" if tz else "hello ")


def test_hash_seed_random_is_new_every_run(envmod):
    """python picks a new hash secret per run for PYTHONHASHSEED=random; a fork would keep the
    server's, so such a run goes cold (unset stays warm: a documented difference)."""
    env = with_env(envmod.base_env, PYTHONHASHSEED="random")
    runs = status(envmod.bundle)["runs"]
    code = ["-c", "print(hash('py-preload envdeps'))"]
    hashes = {run([envmod.bundle, *code], env, envmod.cwd).stdout for _ in range(2)}
    assert len(hashes) == 2
    assert status(envmod.bundle)["runs"] == runs
    envmod.compare(with_env(envmod.base_env, PYTHONHASHSEED="0"), warm=False)


def test_status_lists_the_variables(envmod):
    st = status(envmod.bundle)
    assert st["env"]["read"]["ENVDEPS_GREETING"] is None
    text = cli("status", envmod.bundle).stdout
    assert "env:       depends on" in text and "ENVDEPS_GREETING" in text


def test_the_same_other_values_twice_in_a_row_make_a_server_for_them(envmod):
    """(Last of the envmod tests: it leaves a server made with other values.) A sweep with a value per job stays cold (no server per job); a shell whose variable
    changed for good gets a server made with it at its second run."""
    if envmod.client == "native":  # decided in the server; its "stale" reply is not new
        pytest.skip("the Python client's run covers it (CI time)")
    pid = status(envmod.bundle)["pid"]
    for value in ("a", "b"):
        envmod.compare(with_env(envmod.base_env, ENVDEPS_GREETING=value), warm=False)
    assert status(envmod.bundle)["pid"] == pid
    changed = with_env(envmod.base_env, ENVDEPS_GREETING="b")
    envmod.compare(changed, warm=None)  # the second "b" in a row: the server retires
    assert status(envmod.bundle)["pid"] != pid
    assert "ENVDEPS_GREETING=b" in cli("status", envmod.bundle).stdout
    assert envmod.compare(changed, warm=True).startswith("b ")
    envmod.compare(envmod.base_env, warm=False)  # the old value: cold on the new server


EXECUTOR = '''
import sys
import preloaded

def greeting():
    import envmod
    return envmod.GREETING

with preloaded.Executor(sys.argv[1], max_workers=1) as ex:
    print(ex.submit(greeting).result())
'''


def test_an_executor_with_other_values_gets_a_server_made_with_them(envmod, tmp_path):
    """(After the retire test: the server holds ENVDEPS_GREETING=b.) A worker is a warm child
    too: it must not see the server's values; the Executor retries, the server retires."""
    if envmod.client == "native":
        pytest.skip("the Executor is the same for both starters")
    script = tmp_path / "pool.py"
    script.write_text(EXECUTOR)
    env = with_env(envmod.base_env, ENVDEPS_GREETING="from the executor")
    env["PYTHONPATH"] += os.pathsep + REPO
    out = run([PYTHON, str(script), envmod.bundle], env, envmod.cwd)
    assert (out.returncode, out.stdout) == (0, "from the executor\n"), out.stderr


HF_SCRIPT = '''
import huggingface_hub.constants as c
print(c.HF_HUB_OFFLINE, c.HF_HOME)
if c.HF_HUB_OFFLINE:  # the offline error, with no network needed
    from huggingface_hub import hf_hub_download
    try:
        hf_hub_download("gpt2", "config.json")
    except Exception as exc:
        print(type(exc).__name__)
'''


@pytest.fixture(scope="module", params=["python", "native"])
def hf_client(request):
    return request.param


@pytest.mark.torch
@pytest.mark.parametrize("server_offline", [False, True])
def test_huggingface_hub_offline_and_home(tmp_path_factory, hf_client, server_offline):
    """A server started without HF_HUB_OFFLINE/HF_HOME and a run with them, and the reverse."""
    home = str(tmp_path_factory.mktemp("hf-home"))
    plain = with_env(os.environ, HF_HUB_OFFLINE=None, HF_HOME=None, TRANSFORMERS_OFFLINE=None)
    offline = with_env(plain, HF_HUB_OFFLINE="1", HF_HOME=home)
    first, other = (offline, plain) if server_offline else (plain, offline)
    case = make_case(tmp_path_factory, hf_client, ("huggingface_hub.constants",), HF_SCRIPT,
                     first)  # fmt: skip
    try:
        out = case.compare(other, warm=False)
        assert out.startswith("True " + home if not server_offline else "False ")
        assert "goes cold: HF_" in log_text(case.bundle)  # HF_HOME or HF_HUB_OFFLINE
        out = case.compare(first, warm=True)
        assert out.startswith("True " + home if server_offline else "False ")
    finally:
        cli("stop", case.bundle, check=False)


LISTER = '''
import os
SNAPSHOT = dict(os.environ)  # lists the whole environment: every variable counts
FROM_BYTES = os.environb.get(b"ENVDEPS_BYTES")
'''


@pytest.fixture
def fresh_record(monkeypatch, tmp_path):
    """The recorder of this process, reset (what a server does while it imports)."""
    from preloaded.server import envdeps

    monkeypatch.setattr(envdeps, "RECORD", envdeps.Record())
    monkeypatch.syspath_prepend(str(tmp_path))
    return envdeps


def test_code_that_lists_the_environment_depends_on_all_of_it(fresh_record, tmp_path,
                                                              monkeypatch):  # fmt: skip
    (tmp_path / "envdeps_lister.py").write_text(LISTER)
    monkeypatch.setenv("ENVDEPS_BYTES", "b")
    with fresh_record.recording() as record:
        import envdeps_lister  # noqa: F401
    assert record.seen["ENVDEPS_BYTES"] == "b"  # os.environb, recorded under its str name
    assert record.listers == [f"{tmp_path / 'envdeps_lister.py'}:3"]
    env = dict(os.environ)
    assert fresh_record.difference(env) is None
    assert "ENVDEPS_NEW differs" in fresh_record.difference({**env, "ENVDEPS_NEW": "1"})
    assert type(os.environ) is os._Environ  # the recorder is gone once the imports are done


TQDM = '''
import os
from preloaded.server import envdeps
with envdeps.recording() as record:
    import tqdm  # its envwrap lists os.environ for the TQDM_* defaults of tqdm()
assert record.whole is None and "TQDM_" in record.prefixes, (record.listers, record.prefixes)
env = {**os.environ, "TERM": "other", "PWD": "/elsewhere", "_": "x"}
assert envdeps.difference(env) is None, envdeps.difference(env)
print(envdeps.difference({**env, "TQDM_MININTERVAL": "5"}))
'''


def test_tqdm_depends_on_its_own_variables_only():
    pytest.importorskip("tqdm")
    out = subprocess.run([PYTHON, "-c", TQDM], capture_output=True, text=True, timeout=TIMEOUT,
                         env=with_env(os.environ, PYTHONPATH=REPO))  # fmt: skip
    assert out.stdout.startswith("TQDM_* variables differ"), out.stderr

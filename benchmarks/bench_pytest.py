"""Issue 21: pytest on a torch+transformers project, python against the starter (one run).

A realistic suite (a tiny BERT made from a config, no hub access: a module-scoped fixture, a
parametrized test, a failing assert, ``filterwarnings = ["error"]``) in a venv that holds what an
ML project's does (torch, transformers, pytest, pytest-xdist: symlinked from .venv, so that
this checkout's test plugins, hypothesis's above all, are not loaded by every run), through
``bundle torch transformers``. Interleaved rounds; medians; the report of every warm run is
compared with python's (timings aside, and the order of xdist's progress characters).

    .venv/bin/python benchmarks/bench_pytest.py [--rounds 5]

Targets (issue 21): warm <= 1/5 of cold; warm with -n 2 <= 1/3 of cold with -n 2. pytest-fast
and pytest-zygote are run beside them when they install from PyPI (into their own venv), else
skipped with the reason.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

from test_pytest_warm import norm, small_venv  # noqa: E402  (one venv builder for both)

PYTHON = os.path.join(REPO, ".venv", "bin", "python")
SUITE = {
    "pyproject.toml": '[tool.pytest.ini_options]\nfilterwarnings = ["error"]\n',
    "conftest.py": "import pytest\n\n\n@pytest.fixture\ndef seed():\n    return 0\n",
    "test_model.py": """\
import pytest
import torch
from transformers import BertConfig, BertModel


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=37)
    return BertModel(config).eval()


@pytest.mark.parametrize("length", [3, 5, 8, 13])
def test_shape(model, length):
    with torch.no_grad():
        out = model(input_ids=torch.arange(length).unsqueeze(0))
    assert out.last_hidden_state.shape == (1, length, 32)


def test_deterministic(model, seed):
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).last_hidden_state,
                           model(input_ids=ids).last_hidden_state)


def test_hidden_size(model):
    assert model.config.to_dict()["hidden_size"] == 64
""",
    "test_tokens.py": """\
import torch


def test_cat():
    assert torch.cat([torch.ones(2), torch.zeros(2)]).tolist() == [1, 1, 0, 0]


def test_softmax_sums_to_one():
    assert abs(torch.softmax(torch.randn(10), 0).sum().item() - 1) < 1e-5
""",
}  # fmt: skip
ARGS = ["-m", "pytest", "-q", "-p", "no:cacheprovider"]
BASE = ("pytest", "pytest-xdist", "torch", "transformers")  # what the suite's venv holds


def run(argv: list, cwd: str, env: dict) -> tuple:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - start, (proc.returncode, norm(proc.stdout), norm(proc.stderr))


def cli(*args, env) -> None:
    subprocess.run([PYTHON, "-m", "preloaded.cli", *args], cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=600)  # fmt: skip


def wait_pytest_server(bundle: str, env: dict) -> None:
    """The first pytest run goes cold and starts the pytest server: wait until it serves."""
    code = ("import sys; from preloaded import servers; from preloaded.paths import Paths; "
            "r = servers.ask(Paths(sys.argv[1], flavour='pytest').socket, {'cmd': 'status'}); "
            "print(r['runs'] if r else -1)")  # fmt: skip
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        out = subprocess.run([PYTHON, "-c", code, bundle], cwd=REPO, env=env, text=True,
                             capture_output=True).stdout.strip()  # fmt: skip
        if out and int(out) >= 0:
            return
        time.sleep(0.5)
    raise SystemExit("the pytest server did not start")


def others(work: str, base: tuple) -> dict:
    """Commands of pytest-fast and pytest-zygote (each in a venv like the suite's, installed from
    PyPI), when they install; else skipped with the reason."""
    found: dict = {}
    for package in ("pytest-fast", "pytest-zygote"):
        directory = Path(work) / package
        try:
            python = small_venv(directory, base)
            site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                                   "['purelib'])"], capture_output=True, text=True,
                                  check=True).stdout.strip()  # fmt: skip
            subprocess.run([PYTHON, "-m", "pip", "install", "-q", "--no-deps", "--target", site,
                            package], check=True, capture_output=True, timeout=300)  # fmt: skip
        except (subprocess.SubprocessError, OSError) as exc:
            print(f"{package}: not installed ({type(exc).__name__}); skipped")
            continue
        if package == "pytest-zygote":  # its forked workers: one process, imports paid once
            found["pytest-zygote --workers 2"] = [python, *ARGS, "--workers", "2"]
        else:  # a resident daemon that collected once; its own client and report
            sock = str(directory / "fast.sock")
            found["pytest-fast (daemon)"] = [python, "-m", "pytest_fast", "--address", sock,
                                             "--ttl", "600", "--workers", "2"]  # fmt: skip
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    opts = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-pytest-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTHON"))}
    env.update(XDG_RUNTIME_DIR=os.path.join(work, "run"), XDG_CACHE_HOME=os.path.join(work, "c"))
    os.makedirs(env["XDG_RUNTIME_DIR"], mode=0o700)
    python = small_venv(Path(work) / "venv", BASE)
    suite = os.path.join(work, "suite")
    for rel, text in SUITE.items():
        os.makedirs(os.path.dirname(os.path.join(suite, rel)), exist_ok=True)
        with open(os.path.join(suite, rel), "w", encoding="utf-8") as f:
            f.write(text)
    bundle = os.path.join(work, "python-tt.bin")
    cli("bundle", "torch", "transformers", "-o", bundle, "--python", python, env=env)
    try:
        measure(python, bundle, suite, env, opts.rounds, others(work, BASE))
    finally:
        cli("stop", "--all", env=env)
        shutil.rmtree(work, ignore_errors=True)


def measure(python: str, bundle: str, suite: str, env: dict, rounds: int, extra: dict) -> None:
    run([bundle, *ARGS], suite, env)  # starts the servers (this run goes cold)
    wait_pytest_server(bundle, env)
    for _ in range(3):  # what the runs import beyond the bundle is learned (two runs)
        run([bundle, *ARGS], suite, env)
        time.sleep(2)
    for name, argv in list(extra.items()):  # pytest-fast's first run starts its daemon
        _seconds, (code, out, err) = run(argv, suite, env)
        if not out:  # it did not run the suite at all
            print(f"{name}: did not run ({err.strip().splitlines()[-1:]}); left out")
            del extra[name]
    cases = {"cold": [python, *ARGS], "warm": [bundle, *ARGS],
             "cold -n 2": [python, *ARGS, "-n", "2"], "warm -n 2": [bundle, *ARGS, "-n", "2"]}
    cases.update(extra)
    times: dict = {name: [] for name in cases}
    reports: dict = {}
    differ: set = set()
    for _ in range(rounds):
        for name, argv in cases.items():
            seconds, report = run(argv, suite, env)
            times[name].append(seconds)
            reports.setdefault(name, report)
            if name.startswith("warm") and report != reports[name.replace("warm", "cold")]:
                differ.add(name)
    med = {name: statistics.median(values) for name, values in times.items()}
    for name, value in med.items():
        if name.startswith(("cold", "warm")):
            same = "report != python's: FAILED" if name in differ else "python's report"
        else:
            same = "report " + ("=" if reports[name] == reports["cold"] else "!=") + " python's"
        print(f"{name:>26}: {value * 1000:8.0f} ms  {med[name] / med['cold']:.3f} x cold  "
              f"(median of {rounds}; {same})")
    print(f"warm / cold           : {med['warm'] / med['cold']:.3f}  (target <= 0.200)")
    print(f"warm -n 2 / cold -n 2 : {med['warm -n 2'] / med['cold -n 2']:.3f}  (target <= 0.333)")
    print(f"warm -n 2 / cold      : {med['warm -n 2'] / med['cold']:.3f}")
    if differ:
        raise SystemExit(f"reports differ from python's: {sorted(differ)}")
    print("reports: identical to python's (exit status, outcome lines, assertion messages)")
    assert re.search(r"1 failed, 7 passed", reports["cold"][1]), reports["cold"]


if __name__ == "__main__":
    main()

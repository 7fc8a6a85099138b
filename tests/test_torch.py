"""A bundle of torch and transformers: real models in children, fresh RNGs, no CUDA, no threads."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import cli, make_bundle

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = pytest.mark.torch

TIMEOUT = 120


@pytest.fixture(scope="module")
def tt_bundle(tmp_path_factory):
    path = make_bundle(tmp_path_factory.mktemp("tt") / "python-tt.bin", "torch", "transformers")
    first = run(path, "-c", "pass")  # starts the server
    assert first.returncode == 0, first.stderr
    yield path
    cli("stop", path, check=False)


def run(bundle, *args, **kw):
    return subprocess.run([bundle, *args], capture_output=True, text=True, timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL, **kw)  # fmt: skip


def ok(proc) -> str:
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return proc.stdout


def status(bundle) -> dict:
    return json.loads(cli("status", "--json", bundle).stdout)


def test_tiny_bert_forward(tt_bundle):
    code = ("import torch; from transformers import BertConfig, BertModel\n"
            "c = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2,"
            " num_attention_heads=2, intermediate_size=32)\n"
            "m = BertModel(c).eval()\n"
            "with torch.no_grad(): print(tuple(m(input_ids=torch.tensor([[1, 5, 7, 2]]))"
            ".last_hidden_state.shape))\n")  # fmt: skip
    assert ok(run(tt_bundle, "-c", code)) == "(1, 4, 16)\n"


def test_rngs_differ_between_warm_runs(tt_bundle):
    code = "import torch, numpy; print(torch.rand(3).tolist(), numpy.random.rand(3).tolist())"
    a, b = ok(run(tt_bundle, "-c", code)), ok(run(tt_bundle, "-c", code))
    assert a.split("] [")[0] != b.split("] [")[0]  # torch
    assert a.split("] [")[1] != b.split("] [")[1]  # numpy's legacy global RNG


def test_no_cuda_and_one_thread_in_server(tt_bundle):
    st = status(tt_bundle)
    assert not any("CUDA" in w for w in st["warnings"])
    assert len(os.listdir(f"/proc/{st['pid']}/task")) == 1
    out = ok(run(tt_bundle, "-c", "import torch; print(torch.cuda.is_initialized(),"
                                  " torch.cuda.is_available() in (True, False))"))  # fmt: skip
    assert out == "False True\n"


def test_pytest_through_the_starter(tt_bundle, tmp_path):
    test = tmp_path / "test_t.py"
    test.write_text("import torch\n\ndef test_add():\n    assert (torch.ones(2) + 1).sum() == 4\n")
    proc = run(tt_bundle, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout


def test_fork_pool_with_torch(tt_bundle, tmp_path):
    script = tmp_path / "pool.py"
    script.write_text(
        "import multiprocessing as mp, torch\n"
        "def f(n):\n    return float(torch.arange(n).sum())\n"
        "if __name__ == '__main__':\n"
        "    with mp.get_context('fork').Pool(2) as p:\n        print(p.map(f, [3, 4, 5]))\n"
    )
    assert ok(run(tt_bundle, str(script))) == "[3.0, 6.0, 10.0]\n"

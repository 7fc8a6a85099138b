"""examples/serve.py answers the same cold (python) and warm (a starter): /health, /embed, errors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest
from conftest import PYTHON, REPO, cli, make_bundle

pytest.importorskip("torch")
pytest.importorskip("transformers")
httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.torch

SERVE = os.path.join(REPO, "examples", "serve.py")
TEXTS = ["py-preload keeps heavy imports warm", "a", "hello hello world"]


@pytest.fixture(scope="module")
def tt_bundle(tmp_path_factory):
    path = make_bundle(tmp_path_factory.mktemp("serve") / "python-tt.bin", "torch",
                       "transformers", "transformers.models.bert.modeling_bert")  # fmt: skip
    yield path
    cli("stop", path, check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(python: str) -> dict:
    """Start serve.py with ``python``, ask it a few things, stop it; the replies."""
    port = free_port()
    proc = subprocess.Popen([python, SERVE, "--port", str(port)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(trust_env=False, timeout=30) as client:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, proc.stderr.read().decode()
                try:
                    health = client.get(base + "/health")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "serve.py never answered"
                    time.sleep(0.05)
            embed = client.post(base + "/embed", json={"texts": TEXTS})
            bad = client.post(base + "/embed", content=b"not json")
            missing = client.get(base + "/nothing")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    return {
        "health": (health.status_code, health.json()),
        "embed": (embed.status_code, embed.json()),
        "bad": (bad.status_code, bad.json()),
        "missing": missing.status_code,
        "stdout": proc.stdout.read().decode().replace(str(port), "PORT"),
    }


def test_serve_cold_and_warm_agree(tt_bundle):
    """Guards against the example drifting from what the README promises (it must run as
    written with python and with a starter) and against a warm child computing differently
    (the same seeded weights must give the same embeddings to the last digit)."""
    cold = answers(PYTHON)
    answers(tt_bundle)  # the first run starts the server
    warm = answers(tt_bundle)
    assert cold["health"] == (200, {"status": "ok"})
    code, body = cold["embed"]
    assert code == 200 and body["dim"] == 64
    assert len(body["embeddings"]) == len(TEXTS)
    assert all(len(v) == 64 for v in body["embeddings"])
    assert cold["bad"][0] == 400 and cold["missing"] == 404
    assert warm == cold

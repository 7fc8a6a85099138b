"""Warm Jupyter kernels: start to first reply of `import torch`, python's kernel against a
starter's (`py-preload kernel install`), kernel starts 1-5, through jupyter_client.

The server of a `torch` bundle is started (and warm) before start 1, with nothing learned yet:
start 1 is the first kernel start after installing ipykernel. Starts 1 and 2 teach the server
the kernel's modules (ipykernel, zmq, tornado, IPython...); it probes and imports them once
start 2's kernel shut down. The benchmark waits for that before start 3 (it prints how long it
took): in real use it happens while the user looks at the notebook. Python and starter kernels
alternate. The whole sequence is repeated ROUNDS times, each with a fresh bundle and learned
set; the report gives the median of each start over the rounds (a noisy 2-core machine).
Targets (issue 13): start 1 no slower than python's; from start 3 on at most 1/5 of python's.

Uses its own bundle, runtime, cache and Jupyter data directories and stops its server at the
end. Needs jupyter_client and ipykernel. Usage:

    .venv/bin/python benchmarks/bench_kernel.py [-n STARTS] [-r ROUNDS]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
TIMEOUT = 300
FIRST_OVER_PYTHON = 1.0  # start 1: no slower than python
WARM_OVER_PYTHON = 0.2  # start 3 on: at most 1/5 of python


def cli(env: dict, *args: str) -> str:
    return subprocess.run([PYTHON, "-m", "preloaded.cli", *args], cwd=REPO, env=env, check=True,
                          capture_output=True, text=True, timeout=600).stdout  # fmt: skip


def first_reply(name: str) -> float:
    """Seconds from starting kernel ``name`` to the reply of `import torch`; then shut it down
    and wait until its process is gone."""
    from jupyter_client.manager import KernelManager

    start = time.perf_counter()
    manager = KernelManager(kernel_name=name)
    # The kernels' own chatter (the TCP warning, KeyboardInterrupt notes) is not the report.
    manager.start_kernel(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=TIMEOUT)
        reply = client.execute_interactive("import torch", timeout=TIMEOUT)
        elapsed = time.perf_counter() - start
        if reply["content"]["status"] != "ok":
            raise SystemExit(f"kernel {name}: import torch failed: {reply['content']}")
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=False)
    return elapsed


def learning(env: dict, bundle: str) -> tuple:
    """(modules pending, being probed or cleared, learned) in the bundle's server."""
    learn = json.loads(cli(env, "status", "--json", bundle))["learn"]
    busy = len(learn["pending"]) + len(learn.get("probing", ())) + len(learn.get("cleared", ()))
    return busy, len(learn["learned"]), len(learn["refused"])


def wait_learned(env: dict, bundle: str) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < TIMEOUT:
        if learning(env, bundle)[0] == 0:
            return time.perf_counter() - start
        time.sleep(0.1)
    raise SystemExit("the server did not finish learning")


def server_pid(env: dict, bundle: str) -> int:
    return json.loads(cli(env, "status", "--json", bundle))["pid"]


def measure(starts: int, tmp: str) -> tuple:
    """One round: (rows, whether the server restarted)."""
    env = {**os.environ, "XDG_RUNTIME_DIR": os.path.join(tmp, "run"),
           "XDG_CACHE_HOME": os.path.join(tmp, "cache"),
           "JUPYTER_DATA_DIR": os.path.join(tmp, "jupyter")}  # fmt: skip
    env.pop("PY_PRELOAD_COLD", None)
    env.pop("JUPYTER_PATH", None)
    os.mkdir(env["XDG_RUNTIME_DIR"], 0o700)
    os.environ.update(env)  # jupyter_client (in this process) finds the kernelspecs there
    bundle = os.path.join(tmp, "python-torch.bin")
    cli(env, "bundle", "torch", "-o", bundle)
    cli(env, "kernel", "install", bundle, "--name", "warm")
    _python_kernelspec(env["JUPYTER_DATA_DIR"])
    try:
        subprocess.run([bundle, "-c", "pass"], env=env, check=True, timeout=TIMEOUT)
        pid = server_pid(env, bundle)
        rows = []
        for number in range(1, starts + 1):
            python = first_reply("cold")
            warm = first_reply("warm")
            time.sleep(0.5)  # the kernel's report reaches the server as it is reaped
            took = wait_learned(env, bundle)
            rows.append((number, python, warm, took, learning(env, bundle)))
            print(f"start {number}: python {python * 1000:7.0f} ms  starter {warm * 1000:7.0f} ms"
                  f"  ratio {warm / python:5.2f}  learning after it {took:5.1f} s",
                  flush=True)  # fmt: skip
        return rows, server_pid(env, bundle) != pid
    finally:
        cli(env, "stop", "--all")


def _python_kernelspec(data_dir: str) -> None:
    """python's own kernel, as `python -m ipykernel install` writes it."""
    directory = os.path.join(data_dir, "kernels", "cold")
    os.makedirs(directory)
    spec = {"argv": [PYTHON, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "python", "language": "python"}  # fmt: skip
    with open(os.path.join(directory, "kernel.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f)


def report(rounds: list) -> None:
    restarted = any(r for _rows, r in rounds)
    rows = []
    for number, *_ in rounds[0][0]:
        runs = [round_rows[number - 1] for round_rows, _ in rounds]
        python = statistics.median(r[1] for r in runs)
        warm = statistics.median(r[2] for r in runs)
        took = statistics.median(r[3] for r in runs)
        rows.append((number, python, warm, took, runs[-1][4]))
    print(f"\nmedians over {len(rounds)} round(s):")
    for number, python, warm, took, _state in rows:
        print(f"start {number}: python {python * 1000:7.0f} ms  starter {warm * 1000:7.0f} ms"
              f"  ratio {warm / python:5.2f}  learning after it {took:5.1f} s")  # fmt: skip
    first = rows[0][2] / rows[0][1]
    print(f"\nstart 1 / python: {first:.2f} (target <= {FIRST_OVER_PYTHON})"
          f" {'met' if first <= FIRST_OVER_PYTHON else 'MISSED'}")  # fmt: skip
    for number, python, warm, _took, _state in rows[2:]:
        ratio = warm / python
        print(f"start {number} / python: {ratio:.2f} (target <= {WARM_OVER_PYTHON})"
              f" {'met' if ratio <= WARM_OVER_PYTHON else 'MISSED'}")  # fmt: skip
    _busy, learned, refused = rows[-1][4]
    print(f"learned {learned} module(s), refused {refused};"
          f" the server {'RESTARTED' if restarted else 'kept its pid'} throughout")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--starts", type=int, default=5, help="kernel starts of each kind")
    parser.add_argument("-r", "--rounds", type=int, default=3, help="sequences of starts")
    args = parser.parse_args()
    rounds = []
    for number in range(1, args.rounds + 1):
        print(f"round {number}:", flush=True)
        with tempfile.TemporaryDirectory(prefix="bench-kernel-") as tmp:
            rounds.append(measure(args.starts, tmp))
    report(rounds)


if __name__ == "__main__":
    main()

"""Where a warm run's time goes: client start, client imports, hand-over, child set-up, exit.

Measured in one run on a torch + transformers server (``--light``: json only): the default,
without the standby child (PY_PRELOAD_STANDBY=0) and without the fast exit (PY_PRELOAD_FASTEXIT=0). The client's share comes from timing the starter and ``-X importtime``; the
server's and child's shares from a client driven here, in-process, over the wire protocol, with
CLOCK_MONOTONIC (one clock for every process) stamped by the child at the start and end of the
user's code. Usage:

    .venv/bin/python benchmarks/bench_breakdown.py [-n N] [--light]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench_startup import MODULES, PYTHON, py_preload, timed  # noqa: E402

from preloaded import wire  # noqa: E402
from preloaded.paths import Paths  # noqa: E402

USER = ("import time; t0 = time.monotonic()\n"
        "import torch, transformers\nfrom transformers import AutoModel\n"
        "print(t0, time.monotonic())\n")  # fmt: skip
PAUSE = 0.1
LIGHT_USER = "import time; t0 = time.monotonic()\nimport json\nprint(t0, time.monotonic())\n"


def request(code: str, env: dict) -> dict:
    return {"v": 1, "mode": "code", "target": code, "argv": ["-c"], "orig_argv": [PYTHON, "-c"],
            "cwd": "/", "env": env, "umask": 0o22, "stdio": ["pipe", "pipe", "pipe"],
            "ignored": [], "flags": {"u": False, "B": False, "i": False, "q": False, "W": []}}  # fmt: skip


def one_run(socket_path: str, code: str, env: dict) -> dict:
    """Drive one run by hand: the phases' durations in seconds."""
    out_r, out_w = os.pipe()
    null = os.open(os.devnull, os.O_RDWR)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    reader = wire.FrameReader()
    try:
        t_connect = time.monotonic()
        sock.connect(socket_path)
        wire.send(sock, request(code, env), [null, out_w, null])
        t_sent = time.monotonic()
        os.close(out_w)
        started = wire.recv_frame(sock, reader)
        t_started = time.monotonic()
        end = wire.recv_frame(sock, reader)
        t_exit = time.monotonic()
    finally:
        sock.close()
        os.close(null)
    with os.fdopen(out_r) as f:
        user_start, user_end = map(float, f.read().split())
    assert "started" in started and end == {"exit": 0}, (started, end)
    return {"connect+send": t_sent - t_connect, "hand-over": t_started - t_sent,
            "child set-up": user_start - t_started, "user code": user_end - user_start,
            "exit": t_exit - user_end, "total": t_exit - t_connect}  # fmt: skip


def client_imports(bundle: str, env: dict) -> float:
    """Seconds of the starter's own imports (-X importtime, top-level entries not in noop's)."""

    def top_level(argv):
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        times = {}
        for line in proc.stderr.splitlines():
            if line.startswith("import time:") and "|" in line:
                _self, cumulative, name = line[len("import time:"):].split("|")
                if not name.startswith("  ") and cumulative.strip().isdigit():
                    times[name.strip()] = int(cumulative) / 1e6
        return times

    noop = top_level([PYTHON, "-SI", "-X", "importtime", "-c", "pass"])
    starter = top_level([PYTHON, "-SI", "-X", "importtime", bundle, "-c", "pass"])
    return sum(t for name, t in starter.items() if name not in noop)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=21, help="runs of each (default 21)")
    parser.add_argument("--light", action="store_true", help="a json-only server")
    args = parser.parse_args()
    modules, code = (("json",), LIGHT_USER) if args.light else (MODULES, USER)
    with tempfile.TemporaryDirectory(prefix="py-preload-bench-") as tmp:
        env = {**os.environ, "XDG_RUNTIME_DIR": os.path.join(tmp, "run"),
               "XDG_CACHE_HOME": os.path.join(tmp, "cache")}  # fmt: skip
        env.pop("PY_PRELOAD_COLD", None)
        os.mkdir(env["XDG_RUNTIME_DIR"], 0o700)
        os.environ.update(XDG_RUNTIME_DIR=env["XDG_RUNTIME_DIR"])
        os.environ.update(XDG_CACHE_HOME=env["XDG_CACHE_HOME"])
        configs = {"default": {}, "no standby": {"PY_PRELOAD_STANDBY": "0"},
                   "no fast exit": {"PY_PRELOAD_FASTEXIT": "0"}}  # fmt: skip
        bundles = {name: os.path.join(tmp, f"python-{i}.bin") for i, name in enumerate(configs)}
        envs = {name: {**env, **extra} for name, extra in configs.items()}  # reach the servers
        script = os.path.join(tmp, "script.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(code)
        try:
            for name, bundle in bundles.items():
                # The Python starter: its start and imports are phases here (bench_native.py
                # measures the native one, which has neither).
                py_preload(env, "bundle", *modules, "--client", "python", "-o", bundle)
                timed([bundle, script], envs[name])  # starts the server
            phases: dict = {name: [] for name in bundles}
            walls: dict = {"noop": [], **{name: [] for name in bundles}}
            for _ in range(args.n):
                walls["noop"].append(timed([PYTHON, "-S", "-E", "-c", "pass"], env))
                for name, bundle in bundles.items():
                    # Pauses as between two commands typed: the next standby is forked, the
                    # last run's memory torn down (back-to-back runs: bench_startup.py).
                    time.sleep(PAUSE)
                    walls[name].append(timed([bundle, script], envs[name]))
                    time.sleep(PAUSE)
                    phases[name].append(one_run(Paths(bundle).socket, code, envs[name]))
            imports = statistics.median(client_imports(bundles["default"], env) for _ in range(5))
            check = env_check(bundles["default"], envs["default"])
        finally:
            py_preload(env, "stop", "--all")
    report(walls, phases, imports, args.n, "json" if args.light else "torch + transformers")
    print(f"  {'env check (%d variables)' % check[0]:<34} {check[1] * 1e6:7.1f} us")
    return 0


def env_check(bundle: str, env: dict) -> tuple:
    """The per-run check of the environment against what the server's imports read
    (``envdeps.difference``, part of the hand-over), on that server's record, timed here:
    (variables, seconds per check)."""
    from preloaded import servers
    from preloaded.server import envdeps

    read = servers.ask(Paths(bundle).socket, {"cmd": "status"})["env"]["read"]
    envdeps.RECORD.seen = dict(read)
    envdeps.RECORD.freeze()
    assert envdeps.difference(env) is None
    runs = 2000
    start = time.perf_counter()
    for _ in range(runs):
        envdeps.difference(env)
    return len(read), (time.perf_counter() - start) / runs


def report(walls: dict, phases: dict, imports: float, n: int, what: str) -> None:
    ms = lambda v: f"{statistics.median(v) * 1000:7.2f} ms"  # noqa: E731
    print(f"warm run of a {what} script: medians of {n}, alternating ({os.cpu_count()} CPUs)")
    print(f"  {'python -S -E -c pass':<34} {ms(walls['noop'])}")
    for name in phases:
        print(f"  {'starter script.py, ' + name:<34} {ms(walls[name])}")
    print(f"  {'starter imports (-X importtime)':<34} {imports * 1000:7.2f} ms")
    print("  phases, driven in-process:" + "".join(f"{name:>14}" for name in phases))
    for phase in phases["default"][0]:
        row = "".join(f"{ms([p[phase] for p in runs]):>14}" for runs in phases.values())
        print(f"    {phase:<26}{row}")
    for name in phases:
        if name != "default":
            ratio = statistics.median(walls[name]) / statistics.median(walls["default"])
            print(f"  {name + ' / default (wall)':<34} {ratio:7.2f}")
    print(f"  {'default / noop (wall)':<34} "
          f"{statistics.median(walls['default']) / statistics.median(walls['noop']):7.2f}")


if __name__ == "__main__":
    sys.exit(main())

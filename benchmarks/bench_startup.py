"""Start-up time: plain python vs. a cold and a warm run of a torch + transformers script.

Measured in one run, alternating the commands so that machine noise hits all of them alike;
medians of N runs each. Uses its own bundle, runtime and cache directories (in a temporary
directory) and stops its server at the end. Usage:

    .venv/bin/python benchmarks/bench_startup.py [-n N] [--standby]

``--standby`` adds a warm run served by a server without a standby child (a copy of the bundle
whose server was started with PY_PRELOAD_STANDBY=0), to show what the standby gains.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable  # the venv's python (symlink kept), never a shim
SCRIPT = "import torch, transformers\nfrom transformers import AutoModel\nprint(torch.__version__)\n"
# transformers resolves AutoModel lazily, scanning every model's source (~0.3 s) on first use:
# the bundle imports the module that defines it, so that children find it done.
MODULES = ("torch", "transformers", "transformers.models.auto.modeling_auto")
COLD_OVER_WARM = 50.0  # targets: cold/warm at least this, warm at most WARM_OVER_NOOP x noop
WARM_OVER_NOOP = 4.0


def timed(argv: list, env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=300)  # fmt: skip
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed ({proc.returncode}):\n{proc.stderr.decode()}")
    return elapsed


def py_preload(env: dict, *args: str) -> None:
    subprocess.run([PYTHON, "-m", "preloaded.cli", *args], cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)  # fmt: skip


def measure(n: int, tmp: str, standby: bool) -> dict:
    env = {**os.environ, "XDG_RUNTIME_DIR": os.path.join(tmp, "run"),
           "XDG_CACHE_HOME": os.path.join(tmp, "cache")}  # fmt: skip
    env.pop("PY_PRELOAD_COLD", None)
    os.mkdir(env["XDG_RUNTIME_DIR"], 0o700)
    bundle, script = os.path.join(tmp, "python-tt.bin"), os.path.join(tmp, "script.py")
    with open(script, "w", encoding="utf-8") as f:
        f.write(SCRIPT)
    # The Python starter, as these figures always were (bench_native.py measures the native one).
    py_preload(env, "bundle", *MODULES, "--client", "python", "-o", bundle)
    commands = {
        "noop": [PYTHON, "-S", "-E", "-c", "pass"],
        "cold": [PYTHON, script],
        "warm": [bundle, script],
    }
    envs = {name: env for name in commands}
    if standby:
        plain = os.path.join(tmp, "python-tt-nostandby.bin")
        py_preload(env, "bundle", *MODULES, "--client", "python", "-o", plain)
        commands["warm-nostandby"] = [plain, script]
        envs["warm-nostandby"] = {**env, "PY_PRELOAD_STANDBY": "0"}  # reaches its server
    try:
        for name in commands:
            if name.startswith("warm"):
                timed(commands[name], envs[name])  # the first run starts the server
                timed(commands[name], envs[name])
        times: dict = {name: [] for name in commands}
        for _ in range(n):
            for name, argv in commands.items():
                times[name].append(timed(argv, envs[name]))
    finally:
        py_preload(env, "stop", "--all")
    return {name: statistics.median(values) for name, values in times.items()}


def report(med: dict, n: int) -> bool:
    print(f"medians of {n} runs each, alternating ({os.cpu_count()} CPUs)")
    for name, label in (("noop", "python -S -E -c pass"), ("cold", "cold: python script.py"),
                        ("warm", "warm: starter script.py"),
                        ("warm-nostandby", "warm, no standby child")):  # fmt: skip
        if name in med:
            print(f"  {label:<26} {med[name] * 1000:8.1f} ms")
    if "warm-nostandby" in med:
        print(f"  {'no standby/standby':<26} {med['warm-nostandby'] / med['warm']:8.2f}")
    checks = [
        ("cold/warm", med["cold"] / med["warm"], ">=", COLD_OVER_WARM),
        ("warm/noop", med["warm"] / med["noop"], "<=", WARM_OVER_NOOP),
    ]
    ok = True
    for name, value, op, target in checks:
        passed = value >= target if op == ">=" else value <= target
        ok &= passed
        print(f"  {name:<26} {value:8.1f}   target {op} {target:g}   {'PASS' if passed else 'FAIL'}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=15, help="runs of each command (default 15)")
    parser.add_argument("--standby", action="store_true",
                        help="also time warm runs of a server without a standby child")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="py-preload-bench-") as tmp:
        med = measure(args.n, tmp, args.standby)
    return 0 if report(med, args.n) else 1


if __name__ == "__main__":
    sys.exit(main())

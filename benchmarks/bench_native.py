"""Issue 12's targets, the native client beside the Python one, measured in one run.

    .venv/bin/python benchmarks/bench_native.py [-n ROUNDS] [--cold-runs N] [--json FILE]

--json FILE also writes the figures, the machine, the date and the load average to FILE
(docs/data/bench_native.json is what benchmarks/charts.py draws from).

Two bundles of torch + transformers (the same modules as bench_targets.py), one written with
`--client native`, one with `--client python`, each with its own server. Every command runs
with stdin, stdout and stderr not terminals (the runs the native client takes), the commands
alternated, 50 ms apart:
  the floor (`python -S -E -c pass`), a warm run of the script and of `-c pass` with each
  client, the native starter handing a run to the Python starter (PYTHONIOENCODING set: the
  cost of the fallback), cold runs; then 16 concurrent warm runs with each client.
Ratios come from one run (the machines are noisy). Everything runs in its own temporary
XDG_RUNTIME_DIR / XDG_CACHE_HOME, and the servers are stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import results
from bench_targets import MODULES, PYTHON, SCRIPT, cli, concurrent, note, timed


def startup(native: str, python: str, script: str, rounds: int, cold_runs: int) -> dict:
    fallback = ["env", "PYTHONIOENCODING=utf-8", native, script]
    commands = {
        "noop": [PYTHON, "-S", "-E", "-c", "pass"],
        "native": [native, script],
        "python": [python, script],
        "native_pass": [native, "-c", "pass"],
        "python_pass": [python, "-c", "pass"],
        "fallback": fallback,
        "python_ioenc": ["env", "PYTHONIOENCODING=utf-8", python, script],
        "cold": [PYTHON, script],
    }
    times: dict = {name: [] for name in commands}
    for i in range(rounds):
        for name, argv in commands.items():
            if name != "cold" or i < cold_runs:
                time.sleep(0.05)
                times[name].append(timed(argv))
    return {name: statistics.median(values) for name, values in times.items()}


def measure(args, tmp: str) -> dict:
    script = os.path.join(tmp, "script.py")
    with open(script, "w", encoding="utf-8") as f:
        f.write(SCRIPT)
    starters = {}
    for client in ("native", "python"):
        starters[client] = os.path.join(tmp, f"python-tt-{client}.bin")
        cli("bundle", *MODULES, "--client", client, "-o", starters[client])
    try:
        note("starting the servers...")
        for path in starters.values():
            timed([path, script])  # starts the server
            timed([path, script])  # the learned modules
        time.sleep(2)
        note(f"start-up: {args.rounds} rounds ({args.cold_runs} cold)...")
        res = {"startup": startup(starters["native"], starters["python"], script, args.rounds,
                                  args.cold_runs)}  # fmt: skip
        for client, path in starters.items():
            note(f"16 concurrent warm runs, {client} client...")
            res[f"concurrent_{client}"] = concurrent(path, script)
        for client, path in starters.items():
            cli("stop", path)
            pool = os.path.join(tmp, f"python-pool-{client}.bin")
            cli("bundle", *MODULES, "--client", client, "--standby", "16", "-o", pool)
            timed([pool, script])  # starts its server
            timed([pool, script])
            time.sleep(2)  # it learns what the runs import and parks its 16 standbys
            note(f"16 concurrent warm runs, {client} client, bundle --standby 16...")
            res[f"pool_{client}"] = concurrent(pool, script)
            cli("stop", pool)
    finally:
        cli("stop", "--all")
    return res


def report(res: dict, args) -> bool:
    s = res["startup"]
    ms = lambda v: f"{v * 1000:.1f} ms"  # noqa: E731
    print(f"py-preload native client ({os.cpu_count()} CPUs, Python {sys.version.split()[0]}; "
          f"medians, {args.rounds} rounds alternated, {args.cold_runs} cold; stdio not "
          "terminals)\n")  # fmt: skip
    print(f"  {'':<40} {'native':>10} {'python':>10}")
    rows = [
        ("warm script", s["native"], s["python"]),
        ("warm -c pass", s["native_pass"], s["python_pass"]),
        ("warm script / floor", s["native"] / s["noop"], s["python"] / s["noop"]),
        ("cold / warm script", s["cold"] / s["native"], s["cold"] / s["python"]),
        ("16 concurrent warm runs (wall)", res["concurrent_native"], res["concurrent_python"]),
        ("16 concurrent / one warm run", res["concurrent_native"] / s["native"],
         res["concurrent_python"] / s["python"]),
        ("the same, bundle --standby 16 (wall)", res["pool_native"], res["pool_python"]),
        ("  / one warm run", res["pool_native"] / s["native"], res["pool_python"] / s["python"]),
        ("PYTHONIOENCODING set (native: fallback)", s["fallback"], s["python_ioenc"]),
    ]  # fmt: skip
    for name, native, python in rows:
        if name in ("warm script", "warm -c pass") or name.endswith("(wall)") \
                or name.startswith("PYTHONIO"):
            print(f"  {name:<40} {ms(native):>10} {ms(python):>10}")
        else:
            print(f"  {name:<40} {native:>9.2f}x {python:>9.2f}x")
    print(f"  {'python -S -E -c pass (floor)':<40} {ms(s['noop']):>10}")
    print(f"  {'cold script':<40} {ms(s['cold']):>10}")
    checks = [
        ("native warm / floor", s["native"] / s["noop"], "<=", 1.1),
        ("cold / native warm", s["cold"] / s["native"], ">=", 150),
        ("16 concurrent / one warm (native)", res["concurrent_native"] / s["native"], "<=", 9),
        ("  the same with --standby 16", res["pool_native"] / s["native"], "<=", 9),
    ]
    print(f"\n  {'target':<40} {'measured':>10} {'target':>10}")
    ok = True
    for name, value, op, target in checks:
        passed = value >= target if op == ">=" else value <= target
        ok &= passed
        print(f"  {name:<40} {value:>9.2f}x {op + ' ' + f'{target:g}':>10}   "
              f"{'PASS' if passed else 'MISS'}")  # fmt: skip
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--rounds", type=int, default=30, help="warm/floor runs (30)")
    parser.add_argument("--cold-runs", type=int, default=5, help="cold runs (5)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    args = parser.parse_args()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="py-preload-native-") as tmp:
        os.environ["XDG_RUNTIME_DIR"] = os.path.join(tmp, "run")
        os.environ["XDG_CACHE_HOME"] = os.path.join(tmp, "cache")
        os.environ.pop("PY_PRELOAD_COLD", None)
        os.mkdir(os.environ["XDG_RUNTIME_DIR"], 0o700)
        started = time.perf_counter()
        res = measure(args, tmp)
        note(f"measured in {time.perf_counter() - started:.0f} s")
    if args.json:
        results.save(args.json, "bench_native", res, load)
    return 0 if report(res, args) else 1


if __name__ == "__main__":
    sys.exit(main())

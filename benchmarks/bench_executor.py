"""N small torch tasks: preloaded.Executor versus ProcessPoolExecutor on a forkserver.

The forkserver pool preloads torch and transformers (``set_forkserver_preload``), as the
bundle does; both run ``--workers`` tasks at once. Every measurement is a fresh program (the
forkserver dies with its program; the bundle's server persists), timed from creating the pool
to the last result of the first batch ("first use"), then a second batch in the same pool, then
the latency of one task at a time (submit to result; median of 10), then that of a tiny task
(``tiny``: no torch work, what a reused worker costs per task; median of ``TINY``).
``preloaded.Executor`` is measured with its server already running (warm) and with the server
stopped first (its start included). Medians of ``-r`` programs of each kind, alternated within
one run; its own bundle, runtime and cache directories (temporary); the server is stopped at
the end. Usage:

    .venv/bin/python benchmarks/bench_executor.py [-n TASKS] [-r REPEATS] [--workers W]
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
PYTHON = sys.executable  # the venv's python (symlink kept), never a shim
MODULES = ["torch", "transformers"]
KINDS = ("forkserver", "warm", "cold")
TINY = 300  # tiny tasks, one at a time, after the batches


def tiny(i: int) -> int:
    return i + 1


def task(i: int) -> float:
    """A small torch task (defined here: forkserver workers import this file as __mp_main__)."""
    import torch

    torch.manual_seed(i)
    a = torch.randn(128, 128)
    return float((a @ a).sum())


# -- one measured program -------------------------------------------------------------------


def one(kind: str, bundle: str, tasks: int, workers: int) -> dict:
    """Run two batches of ``tasks`` in a new pool of ``kind``; times in seconds."""
    import concurrent.futures
    import multiprocessing

    if kind == "forkserver":
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(MODULES)
        start = time.perf_counter()
        pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    else:
        sys.path.insert(0, REPO)
        import preloaded

        start = time.perf_counter()
        pool = preloaded.Executor(bundle, max_workers=workers)
    with pool:
        first = list(pool.map(task, range(tasks)))
        t_first = time.perf_counter()
        second = list(pool.map(task, range(tasks)))
        t_second = time.perf_counter()
        latencies = []
        for i in range(10):  # one task at a time: submit to result
            t = time.perf_counter()
            pool.submit(task, i).result()
            latencies.append(time.perf_counter() - t)
        tinies = []
        for i in range(TINY):
            t = time.perf_counter()
            pool.submit(tiny, i).result()
            tinies.append(time.perf_counter() - t)
    assert first == second and len(first) == tasks  # seeded: the same results both times
    return {"first": t_first - start, "second": t_second - t_first,
            "latency": statistics.median(latencies), "tiny": statistics.median(tinies)}  # fmt: skip


# -- the driver -----------------------------------------------------------------------------


def py_preload(env: dict, *args: str) -> None:
    subprocess.run([PYTHON, "-m", "preloaded.cli", *args], cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)  # fmt: skip


def measured(kind: str, bundle: str, tasks: int, workers: int, env: dict) -> dict:
    argv = [PYTHON, os.path.abspath(__file__), "--one", kind, "--bundle", bundle,
            "-n", str(tasks), "--workers", str(workers)]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600,
                          check=False)  # fmt: skip
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed ({proc.returncode}):\n{proc.stderr}")
    return {**json.loads(proc.stdout.splitlines()[-1]), "program": wall}


def measure(tasks: int, repeats: int, workers: int, tmp: str) -> dict:
    env = {**os.environ, "XDG_RUNTIME_DIR": os.path.join(tmp, "run"),
           "XDG_CACHE_HOME": os.path.join(tmp, "cache")}  # fmt: skip
    env.pop("PY_PRELOAD_COLD", None)
    os.mkdir(env["XDG_RUNTIME_DIR"], 0o700)
    bundle = os.path.join(tmp, "python-tt.bin")
    py_preload(env, "bundle", *MODULES, "-o", bundle)
    results: dict = {kind: [] for kind in KINDS}
    try:
        measured("cold", bundle, tasks, workers, env)  # page cache, .pyc files: both sides
        measured("forkserver", bundle, tasks, workers, env)
        for _ in range(repeats):
            for kind in KINDS:
                if kind == "cold":
                    py_preload(env, "stop", bundle)
                results[kind].append(measured(kind, bundle, tasks, workers, env))
    finally:
        py_preload(env, "stop", bundle)
    return {kind: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
            for kind, runs in results.items()}  # fmt: skip


def report(med: dict, tasks: int, repeats: int, workers: int) -> None:
    print(f"{tasks} small torch tasks, {workers} at a time; medians of {repeats} programs "
          f"of each kind, alternated ({os.cpu_count()} CPUs)")  # fmt: skip
    labels = {"forkserver": "ProcessPoolExecutor(forkserver, preload torch+transformers)",
              "warm": "preloaded.Executor, server running",
              "cold": "preloaded.Executor, server started by the first task"}  # fmt: skip
    print(f"  {'':<60} {'first use':>10} {'2nd batch':>10} {'1 task':>10} {'tiny task':>10} "
          f"{'program':>10}")  # fmt: skip
    for kind in KINDS:
        m = med[kind]
        print(f"  {labels[kind]:<60} {m['first'] * 1000:8.0f} ms {m['second'] * 1000:7.0f} ms "
              f"{m['latency'] * 1000:7.1f} ms {m['tiny'] * 1000:7.2f} ms "
              f"{m['program'] * 1000:7.0f} ms")  # fmt: skip
    fs = med["forkserver"]
    print(f"  first use, forkserver / Executor warm: {fs['first'] / med['warm']['first']:.1f}x")
    print(f"  first use, forkserver / Executor cold: {fs['first'] / med['cold']['first']:.2f}x")
    print(f"  whole program, forkserver / Executor warm: "
          f"{fs['program'] / med['warm']['program']:.1f}x")  # fmt: skip
    print(f"  second batch, Executor warm / forkserver: "
          f"{med['warm']['second'] / fs['second']:.2f}x (both reuse their workers)")  # fmt: skip
    print(f"  per tiny task, Executor warm / forkserver: "
          f"{med['warm']['tiny'] / fs['tiny']:.2f}x (target <= 1.2)")  # fmt: skip
    print("  (target: first use >= 4x faster than the forkserver pool, server running)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20, help="tasks per batch (default 20)")
    parser.add_argument("-r", type=int, default=5, help="programs of each kind (default 5)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--one", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--bundle", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.bundle, args.n, args.workers)))
        return 0
    with tempfile.TemporaryDirectory(prefix="py-preload-bench-") as tmp:
        med = measure(args.n, args.r, args.workers, tmp)
    report(med, args.n, args.r, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())

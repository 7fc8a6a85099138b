"""Learned preloads: runs 1-4 of an AutoModel/AutoTokenizer script through a `torch transformers`
bundle, against a hello-world run of the same bundle.

transformers loads its submodules lazily, so a bundle that names only ``torch transformers``
leaves a run that touches ``AutoModel`` about a second of imports. Runs 1 and 2 report those
modules; after run 2 the server imports them between runs; run 3 should then cost what a
hello-world costs. The benchmark waits for the server to finish learning before run 3 (it
prints how long that took): in real use that happens while the user reads run 2's output.

Uses its own bundle, runtime and cache directories and stops its server at the end. Usage:

    .venv/bin/python benchmarks/bench_learn.py [-n N]
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
SCRIPT = "from transformers import AutoModel, AutoTokenizer\nprint(AutoModel.__name__)\n"
HELLO = "print('hello')\n"
RUN3_OVER_HELLO = 1.5  # target: run 3 as fast as a hello-world (within noise)


def timed(argv: list, env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=600)  # fmt: skip
    elapsed = time.perf_counter() - start
    if proc.returncode != 0 or proc.stderr:
        raise SystemExit(f"{argv} failed ({proc.returncode}):\n{proc.stderr.decode()}")
    return elapsed


def cli(env: dict, *args: str) -> str:
    return subprocess.run([PYTHON, "-m", "preloaded.cli", *args], cwd=REPO, env=env, check=True,
                          capture_output=True, text=True, timeout=600).stdout  # fmt: skip


def wait_learned(env: dict, bundle: str, timeout: float = 300) -> tuple:
    """Wait until the server has nothing pending; return (seconds, its status)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        st = json.loads(cli(env, "status", "--json", bundle))
        learn = st["learn"]  # pending, being probed, or cleared and not yet imported
        if not (learn["pending"] or learn.get("probing") or learn.get("cleared")):
            return time.perf_counter() - start, st
        time.sleep(0.05)
    raise SystemExit("the server did not finish learning")


def measure(n: int, tmp: str) -> None:
    env = {**os.environ, "XDG_RUNTIME_DIR": os.path.join(tmp, "run"),
           "XDG_CACHE_HOME": os.path.join(tmp, "cache")}  # fmt: skip
    env.pop("PY_PRELOAD_COLD", None)
    os.mkdir(env["XDG_RUNTIME_DIR"], 0o700)
    bundle = os.path.join(tmp, "python-tt.bin")
    script, hello = os.path.join(tmp, "auto.py"), os.path.join(tmp, "hello.py")
    for path, text in ((script, SCRIPT), (hello, HELLO)):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    cli(env, "bundle", "torch", "transformers", "-o", bundle)
    try:
        runs = [timed([bundle, script], env)]  # run 1 also starts the server
        before = [timed([bundle, hello], env) for _ in range(n)]
        runs.append(timed([bundle, script], env))
        learning, st = wait_learned(env, bundle)
        time.sleep(0.5)  # let the status commands' processes go before timing run 3
        runs += [timed([bundle, script], env) for _ in range(2)]
        later = [timed([bundle, script], env) for _ in range(n)]
        after = [timed([bundle, hello], env) for _ in range(n)]
        report(runs, before, after, later, learning, st)
    finally:
        subprocess.run([PYTHON, "-m", "preloaded.cli", "stop", "--all"], cwd=REPO, env=env,
                       capture_output=True, timeout=60)  # fmt: skip


def report(runs, before, after, later, learning, st) -> None:
    ms = lambda s: f"{s * 1000:8.1f} ms"  # noqa: E731
    hello = statistics.median(after)
    learned = st["learn"]["learned"]
    print(f"script: {SCRIPT.splitlines()[0]!r}; bundle: torch transformers")
    for i, t in enumerate(runs, 1):
        print(f"run {i}:                  {ms(t)}")
    print(f"runs 5..: median          {ms(statistics.median(later))}")
    print(f"hello-world before learning {ms(statistics.median(before))}")
    print(f"hello-world after learning  {ms(hello)}")
    print(f"learning after run 2 took   {ms(learning)} ({len(learned)} modules imported,"
          f" {sum(learned.values()):.0f} ms of imports, {len(st['learn']['refused'])} refused)")
    ratio = runs[2] / hello
    verdict = "ok" if ratio <= RUN3_OVER_HELLO else "MISSED"
    print(f"run 3 / hello-world:        {ratio:8.2f}  (target <= {RUN3_OVER_HELLO}: {verdict})")
    print(f"runs 5.. / hello-world:     {statistics.median(later) / hello:8.2f}")
    print(f"run 2 / run 3:              {runs[1] / runs[2]:8.1f}")
    costly = sorted(learned.items(), key=lambda kv: -kv[1])[:8]
    print("costliest learned imports:  " + ", ".join(f"{k} {v:.0f} ms" for k, v in costly))
    if st["learn"]["refused"]:
        print("refused: " + "; ".join(f"{k}: {v}" for k, v in st["learn"]["refused"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=5, help="hello-world runs per median")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-learn-") as tmp:
        measure(args.n, tmp)


if __name__ == "__main__":
    main()

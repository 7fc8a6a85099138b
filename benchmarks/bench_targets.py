"""Every issue-5 target measured in one run on this machine: value, target, PASS or MISS.

    .venv/bin/python benchmarks/bench_targets.py [-n ROUNDS] [--cold-runs N] [--mb MB]

(a) warm run of a torch + transformers script against `python -S -E -c pass`, and cold/warm;
    the client's own share of a warm run (interpreter start + the starter's imports);
(b) 16 concurrent warm runs against one warm run, with one standby (the default) and with a
    pool of 16 (`bundle --standby 16`);
(c) 8 concurrent warm children (each builds and runs a tiny BERT, collects, parks): total PSS
    against one cold process's RSS (8 cold processes' total PSS shown beside it);
(d) readiness of examples/serve.py, warm against cold (with preloaded.bench);
(e) PTY relay throughput: a warm child writing MB to a terminal through the starter, against
    plain python writing the same to a PTY (what this machine can do).
Ratios come from one run with the commands alternated (the machines are noisy). Everything runs
in its own temporary XDG_RUNTIME_DIR / XDG_CACHE_HOME, and the server is stopped at the end.
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
import tty

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from preloaded import bench  # noqa: E402

PYTHON = sys.executable  # the venv's interpreter (symlink kept), never a pyenv shim
MODULES = ("torch", "transformers", "transformers.models.auto.modeling_auto",
           "transformers.models.bert.modeling_bert")  # fmt: skip
SCRIPT = ("import torch, transformers\nfrom transformers import AutoModel\n"
          "print(torch.__version__)\n")
PARK = """\
import gc, os, sys
import torch, transformers
config = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=128)
model = transformers.BertModel(config).eval()
with torch.no_grad():
    model(input_ids=torch.tensor([[1, 2, 3]]))
gc.collect()
print(os.getpid(), flush=True)
sys.stdin.read()
"""
WRITER = ("import sys\nblock = b'x' * (1 << 20)\nwrite = sys.stdout.buffer.write\n"
          "for _ in range({mb}):\n    write(block)\nsys.stdout.flush()\n")  # fmt: skip
CLIENT_IMPORTS = (f"import sys; sys.path.append({REPO!r}); "
                  "import preloaded.client.starter, preloaded.client.run")  # fmt: skip


def timed(argv: list) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, timeout=300)  # fmt: skip
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed ({proc.returncode}):\n{proc.stderr.decode()}")
    return elapsed


def cli(*args: str) -> None:
    subprocess.run([PYTHON, "-m", "preloaded.cli", *args], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)  # fmt: skip


def note(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def startup(tt: str, script: str, rounds: int, cold_runs: int) -> dict:
    """(a): medians of the floor, the client's imports, warm runs and cold runs, alternated.

    Each command starts 50 ms after the previous one ended: right after a warm run the server
    forks its next standby and a helper tears the run's memory down, work that would otherwise
    land on whatever command comes next (the figures of back-to-back runs are in the README)."""
    commands = {
        "noop": [PYTHON, "-S", "-E", "-c", "pass"],
        "client": [PYTHON, "-SI", "-c", CLIENT_IMPORTS],
        "warm_pass": [tt, "-c", "pass"],
        "warm": [tt, script],
        "cold": [PYTHON, script],
    }
    times: dict = {name: [] for name in commands}
    for i in range(rounds):
        for name, argv in commands.items():
            if name != "cold" or i < cold_runs:
                time.sleep(0.05)
                times[name].append(timed(argv))
    return {name: statistics.median(values) for name, values in times.items()}


def concurrent(tt: str, script: str, count: int = 16, repeats: int = 3) -> float:
    """(b): median wall time of ``count`` warm runs started at once on an idle server (a second
    apart: a server with a pool of standbys refills it between bursts, one fork per idle turn)."""
    walls = []
    for _ in range(repeats):
        time.sleep(1.0)
        start = time.perf_counter()
        procs = [subprocess.Popen([tt, script], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL) for _ in range(count)]  # fmt: skip
        codes = [p.wait(300) for p in procs]
        walls.append(time.perf_counter() - start)
        if any(codes):
            raise SystemExit(f"a concurrent warm run failed: {codes}")
    return statistics.median(walls)


def parked(argv: list, count: int) -> list:
    """(c): memory of ``count`` copies of ``argv`` running at once, once all are parked."""
    procs = [subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(count)]  # fmt: skip
    try:
        pids = [int(p.stdout.readline() or 0) for p in procs]
        if not all(pids):
            raise SystemExit(f"{argv} ended before parking")
        return [psutil.Process(pid).memory_full_info() for pid in pids]
    finally:
        for p in procs:
            p.stdin.close()
        for p in procs:
            p.wait(300)


def memory(tt: str, park: str, count: int = 8) -> dict:
    warm = parked([tt, park], count)
    cold = parked([PYTHON, park], count)
    return {"warm_pss": sum(m.pss for m in warm), "warm_uss": sum(m.uss for m in warm),
            "cold_rss": statistics.median(m.rss for m in cold),
            "cold_pss": sum(m.pss for m in cold)}  # fmt: skip


def readiness(tt: str, runs: int) -> dict:
    """(d): examples/serve.py until /health answers, through preloaded.bench."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve = os.path.join(REPO, "examples", "serve.py")
    return bench.run(tt, [serve, "--port", str(port)], runs=runs, timeout=120,
                     url=f"http://127.0.0.1:{port}/health", progress=_Quiet())  # fmt: skip


class _Quiet(bench.Progress):
    def show(self, text: str) -> None:
        pass


def pty_throughput(argv: list, mb: int) -> float:
    """(e): MB/s of ``argv``'s output read from the master of a raw PTY, start to EOF.

    The reader is ``wc -c`` (C, 16 KiB reads): a Python read loop capped what it measured at
    ~70-100 MB/s here, below what a PTY carries."""
    master, slave = os.openpty()
    tty.setraw(slave)  # the starter makes its terminal raw; the reference gets the same
    start = time.perf_counter()
    reader = subprocess.Popen(["wc", "-c"], stdin=master, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    os.close(master)
    try:
        out, _ = reader.communicate(timeout=120)  # ends with EIO once every slave is closed
        elapsed = time.perf_counter() - start
    finally:
        reader.kill()
        proc.wait(30)
    total = int(out.split()[0]) if out.split() else 0
    if total < mb << 20:
        raise SystemExit(f"{argv}: read {total} bytes of {mb} MB")
    return total / 1e6 / elapsed


def measure(args, tmp: str) -> dict:
    tt, script, park = (os.path.join(tmp, n) for n in ("python-tt.bin", "script.py", "park.py"))
    for path, text in ((script, SCRIPT), (park, PARK)):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    cli("bundle", *MODULES, "--client", args.client, "-o", tt)
    try:
        note("starting the server...")
        timed([tt, script])  # starts the server
        timed([tt, script])
        note(f"(a) start-up: {args.rounds} rounds ({args.cold_runs} cold)...")
        res = {"startup": startup(tt, script, args.rounds, args.cold_runs)}
        note("(b) 16 concurrent warm runs (1 standby, then a pool of 16)...")
        res["concurrent"] = concurrent(tt, script)
        pool = os.path.join(tmp, "python-pool.bin")
        cli("bundle", *MODULES, "--client", args.client, "--standby", "16", "-o", pool)
        timed([pool, script])  # starts its server
        timed([pool, script])
        time.sleep(2)  # let it learn what the runs import and park its 16 standbys
        res["concurrent_pool"] = concurrent(pool, script)
        cli("stop", pool)
        note("(c) memory: 8 warm children, 8 cold processes...")
        res["memory"] = memory(tt, park)
        note("(d) readiness of examples/serve.py...")
        res["readiness"] = readiness(tt, args.readiness_runs)
        note(f"(e) PTY relay: {args.mb} MB, {args.pty_runs} times each...")
        writer = WRITER.format(mb=args.mb)
        plain, warm = [], []
        for _ in range(args.pty_runs):  # alternated: the noisiest measure here
            plain.append(pty_throughput([PYTHON, "-c", writer], args.mb))
            warm.append(pty_throughput([tt, "-c", writer], args.mb))
        res["pty_plain"], res["pty_warm"] = statistics.median(plain), statistics.median(warm)
    finally:
        cli("stop", "--all")
    return res


def report(res: dict, args) -> bool:
    s, m, r = res["startup"], res["memory"], res["readiness"]
    ms = lambda v: f"{v * 1000:.1f} ms"  # noqa: E731
    mb = lambda v: f"{v / 1e6:.0f} MB"  # noqa: E731
    print(f"py-preload targets ({os.cpu_count()} CPUs, Python {sys.version.split()[0]}; "
          f"medians, {args.rounds} rounds alternated, {args.cold_runs} cold, "
          f"{args.readiness_runs} readiness, {args.pty_runs} PTY)\n")  # fmt: skip
    figures = [
        ("python -S -E -c pass (floor)", ms(s["noop"])),
        ("client start + imports", ms(s["client"])),
        ("warm -c pass", ms(s["warm_pass"])),
        ("warm script", ms(s["warm"])),
        ("cold script", ms(s["cold"])),
        ("16 concurrent warm runs (wall)", ms(res["concurrent"])),
        ("the same, bundle --standby 16", ms(res["concurrent_pool"])),
        ("8 warm children: total PSS / USS", f"{mb(m['warm_pss'])} / {mb(m['warm_uss'])}"),
        ("8 cold processes: total PSS", mb(m["cold_pss"])),
        ("one cold process: RSS", mb(m["cold_rss"])),
        ("serve.py readiness cold / warm",
         f"{r['cold']['median_ms']:.0f} ms / {r['warm']['median_ms']:.1f} ms"),
        ("PTY: plain python / through starter",
         f"{res['pty_plain']:.0f} / {res['pty_warm']:.0f} MB/s"),
    ]
    for name, value in figures:
        print(f"  {name:<38} {value}")
    checks = [
        ("warm / floor", s["warm"] / s["noop"], "<=", 2.5, "x"),
        ("cold / warm", s["cold"] / s["warm"], ">=", 100, "x"),
        ("16 concurrent / one warm", res["concurrent"] / s["warm"], "<=", 10, "x"),
        ("  the same with --standby 16", res["concurrent_pool"] / s["warm"], "<=", 10, "x"),
        ("8 warm PSS / one cold RSS", m["warm_pss"] / m["cold_rss"], "<=", 1.5, "x"),
        ("serve.py readiness warm / cold", 1 / r["ratio"], "<=", 1 / 20, ""),
        ("PTY relay through the starter", res["pty_warm"], ">=", 200, " MB/s"),
        ("PTY relay / plain python to a PTY", res["pty_warm"] / res["pty_plain"], "", None, ""),
        ("client share of a warm run", s["client"] / s["warm"], "", None, ""),
    ]
    print(f"\n  {'target':<38} {'measured':>12} {'target':>12}")
    ok = True
    for name, value, op, target, unit in checks:
        if target is None:
            print(f"  {name:<38} {value:>11.0%}  {'(info)':>12}")
            continue
        passed = value >= target if op == ">=" else value <= target
        ok &= passed
        fmt = ".3f" if value < 1 else ".2f" if value < 10 else ".1f"
        print(f"  {name:<38} {value:>10{fmt}}{unit:<2} {op + ' ' + f'{target:g}':>12}"
              f"{'':>3}{'PASS' if passed else 'MISS'}")  # fmt: skip
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--rounds", type=int, default=20, help="warm/floor runs (20)")
    parser.add_argument("--cold-runs", type=int, default=5, help="cold runs (5)")
    parser.add_argument("--readiness-runs", type=int, default=3, help="serve.py runs each (3)")
    parser.add_argument("--mb", type=int, default=200, help="MB written through the PTY (200)")
    parser.add_argument("--pty-runs", type=int, default=3, help="PTY runs each (3)")
    parser.add_argument("--client", choices=["python", "native"], default="python",
                        help="the starter (python: what issue 5's figures were measured with; "
                             "bench_native.py compares both)")  # fmt: skip
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="py-preload-targets-") as tmp:
        os.environ["XDG_RUNTIME_DIR"] = os.path.join(tmp, "run")
        os.environ["XDG_CACHE_HOME"] = os.path.join(tmp, "cache")
        os.environ.pop("PY_PRELOAD_COLD", None)
        os.mkdir(os.environ["XDG_RUNTIME_DIR"], 0o700)
        started = time.perf_counter()
        res = measure(args, tmp)
        note(f"measured in {time.perf_counter() - started:.0f} s")
    return 0 if report(res, args) else 1


if __name__ == "__main__":
    sys.exit(main())

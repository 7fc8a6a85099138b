"""What a warm run costs the machine (issue 20): CPU per run, back-to-back and concurrent wall,
against ``python -S -E -c pass``, for a ~250 MB server and one holding ~700 MB more.

    .venv/bin/python benchmarks/bench_cost.py [--quick] [-n RUNS] [--rounds R] [--mb MB]
                                              [--variants] [--json FILE]

Three commands are measured interleaved, in batches of back-to-back runs: the floor (the
interpreter itself, ``python -S -E -c pass``), a warm ``-c pass`` of a torch + transformers
bundle ("small"), and of the same bundle whose ``--warmup`` holds MB of tensors ("big"). For
each batch:

- machine CPU: busy jiffies of /proc/stat (every process of the machine: on a loaded machine
  the other users' work lands here too);
- attributed CPU: the clients' own rusage (``os.wait4``) plus the CPU of the server's process
  tree: the server itself, every child it reaped (runs, fast-exit helpers, standbys: cutime and
  cstime) and the children still alive (the parked standby). Load from others does not count
  here, only its slowing of the same work;
- wall per run of the batch (back-to-back, as ``xargs`` or a shell loop would start them).

Then 16 concurrent runs against one run (spaced out), and a breakdown of a warm run for each
server: the client, the server's loop and standby fork, the child's CPU and page faults until
the user's code runs, its exit and teardown, and a fork of the same address space measured
from inside a run (page-table copy, the teardown of an untouched fork). Targets are printed
as ratios with PASS or MISS. Everything runs in a temporary XDG_RUNTIME_DIR/XDG_CACHE_HOME and
the servers are stopped at the end.
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

import results  # benchmarks/results.py: --json FILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from preloaded.paths import Paths  # noqa: E402

PYTHON = sys.executable  # the venv's interpreter (a symlink to the binary), never a pyenv shim
MODULES = ("torch", "transformers")
TICK = os.sysconf("SC_CLK_TCK")
FLOOR = [PYTHON, "-S", "-E", "-c", "pass"]
# ~25 MB per tensor, like the weight matrices of a model; filled, so that every page is there.
WARMUP = ("import torch\n"
          "TENSORS = [torch.ones({n}, 6_553_600) for _ in range({count})]\n")  # fmt: skip
# Run warm: what the child spent from its fork to the user's code (CPU, minor faults).
PROBE = ("import os, time\ncpu = time.process_time()\n"
         "with open('/proc/self/stat', 'rb') as f:\n"
         "    minflt = int(f.read().rsplit(b')', 1)[1].split()[7])\n"
         "print(cpu, minflt)\n")  # fmt: skip
# Run warm: fork this address space (the server's, plus the run's few copied pages).
FORK_PROBE = ("import os, time\nc, t = time.process_time(), time.perf_counter()\n"
              "pid = os.fork()\nif pid == 0:\n    os._exit(0)\n"
              "fork_cpu, fork_wall = time.process_time() - c, time.perf_counter() - t\n"
              "ru = os.wait4(pid, 0)[2]\n"
              "with open('/proc/self/status') as f:\n"
              "    pte = [l.split()[1] for l in f if l.startswith('VmPTE')][0]\n"
              "print(fork_cpu, fork_wall, ru.ru_utime + ru.ru_stime, int(pte))\n")  # fmt: skip
TARGETS = {"cpu": 1.0, "wall": 1.0, "growth": 1.2, "burst": 9.0}


def note(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def cli(*args: str) -> None:
    subprocess.run([PYTHON, "-m", "preloaded.cli", *args], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, timeout=600)  # fmt: skip


def spawn(argv: list, stdout: int, env: dict | None = None) -> int:
    null = os.open(os.devnull, os.O_RDWR)
    try:
        return os.posix_spawn(argv[0], argv, env or os.environ,
                              file_actions=[(os.POSIX_SPAWN_DUP2, null, 0),
                                            (os.POSIX_SPAWN_DUP2, stdout, 1)])  # fmt: skip
    finally:
        os.close(null)


def run_one(argv: list, stdout: int | None = None, env: dict | None = None) -> float:
    """Run ``argv`` to its end; its CPU (user + system, from wait4)."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        pid = spawn(argv, stdout if stdout is not None else null, env)
    finally:
        os.close(null)
    _, status, ru = os.wait4(pid, 0)
    if status:
        raise SystemExit(f"{argv} failed: {os.waitstatus_to_exitcode(status)}")
    return ru.ru_utime + ru.ru_stime


def machine_busy() -> float:
    """Seconds of CPU the whole machine spent (every CPU, everything but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    # user, nice, system, irq, softirq (guest time is inside user; steal is not ours)
    return (sum(fields[:3]) + fields[5] + fields[6]) / TICK


def _stat(pid: int) -> list:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()


def _children(pid: int) -> list:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def tree_cpu(pid: int) -> float:
    """Seconds of CPU of the server's tree: itself (schedstat: exact), what it reaped (cutime,
    cstime) and its children still alive (the parked standbys, a run ending)."""
    with open(f"/proc/{pid}/schedstat") as f:
        own = int(f.read().split()[0]) / 1e9
    fields = _stat(pid)
    total = own + (int(fields[13]) + int(fields[14])) / TICK
    for child in _children(pid):
        try:
            fields = _stat(child)
        except OSError:
            continue  # reaped meanwhile: in cutime now, or at the next reading
        total += (int(fields[11]) + int(fields[12])) / TICK
    return total


def server_pid(bundle: str) -> int:
    with open(Paths(bundle, create=False).info) as f:
        return json.load(f)["pid"]


def server_memory(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "VmPTE"):
                out[key] = int(value.split()[0]) * 1024
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    out["AnonHugePages"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def batch(argv: list, runs: int, pid: int | None) -> dict:
    """``runs`` back-to-back runs of ``argv``: wall, machine CPU and attributed CPU per run.

    Readings end after a pause: the last run's teardown and the next standby's fork belong to
    the batch (they are paid for every run)."""
    settle = 0.3
    time.sleep(settle)
    busy, tree = machine_busy(), tree_cpu(pid) if pid else 0.0
    start = time.perf_counter()
    clients = sum(run_one(argv) for _ in range(runs))
    wall = time.perf_counter() - start
    time.sleep(settle)
    busy = machine_busy() - busy - _idle_busy(settle)
    tree = tree_cpu(pid) - tree if pid else 0.0
    return {"wall": wall / runs, "machine": busy / runs, "cpu": (clients + tree) / runs,
            "client": clients / runs}  # fmt: skip


_IDLE_RATE: list = []


def _idle_busy(seconds: float) -> float:
    """The machine's CPU during our pauses (others' load, if any): measured once, subtracted."""
    return _IDLE_RATE[0] * seconds if _IDLE_RATE else 0.0


def measure_idle_rate() -> None:
    busy = machine_busy()
    time.sleep(1.0)
    _IDLE_RATE.append(machine_busy() - busy)


def one_spaced(argv: list, count: int) -> float:
    walls = []
    for _ in range(count):
        time.sleep(0.1)
        start = time.perf_counter()
        run_one(argv)
        walls.append(time.perf_counter() - start)
    return statistics.median(walls)


def burst(argv: list, count: int, repeats: int) -> float:
    walls = []
    for _ in range(repeats):
        time.sleep(1.0)  # the server refills its standby between bursts
        null = os.open(os.devnull, os.O_WRONLY)
        start = time.perf_counter()
        pids = [spawn(argv, null) for _ in range(count)]
        os.close(null)
        codes = [os.waitpid(pid, 0)[1] for pid in pids]
        walls.append(time.perf_counter() - start)
        if any(codes):
            raise SystemExit(f"a concurrent run failed: {codes}")
    return statistics.median(walls)


def breakdown(bundle: str, pid: int, runs: int) -> dict:
    """A warm run's parts, averaged over ``runs`` spaced runs of PROBE and FORK_PROBE."""
    r, w = os.pipe()
    child_cpu, minflt, clients = [], [], 0.0
    own0, tree0, faults0 = _own(pid), tree_cpu(pid), _minflt(pid)
    for _ in range(runs):
        time.sleep(0.15)  # the standby refilled, the last run torn down
        clients += run_one([bundle, "-c", PROBE], w)
        cpu, flt = os.read(r, 4096).split()
        child_cpu.append(float(cpu))
        minflt.append(int(flt))
    time.sleep(0.3)
    own, tree = (_own(pid) - own0) / runs, (tree_cpu(pid) - tree0) / runs
    server_faults = (_minflt(pid) - faults0) / runs
    forks = []
    for _ in range(max(3, runs // 3)):
        time.sleep(0.15)
        run_one([bundle, "-c", FORK_PROBE], w)
        forks.append([float(v) for v in os.read(r, 4096).split()])
    os.close(r)
    os.close(w)
    setup = statistics.mean(child_cpu)
    return {"client": clients / runs, "server": own, "setup": setup,
            "minflt": statistics.median(minflt), "exit": tree - own - setup,
            "server_minflt": server_faults,
            "fork_cpu": statistics.median(f[0] for f in forks),
            "fork_wall": statistics.median(f[1] for f in forks),
            "untouched_exit": statistics.median(f[2] for f in forks),
            "pte": forks[0][3] * 1024}  # fmt: skip


def _minflt(pid: int) -> int:
    return int(_stat(pid)[7])


def wait_settled(pid: int, timeout: float = 120.0) -> None:
    """Until the server's memory stops changing (its huge-page collapse, its standby)."""
    last, deadline = None, time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = (server_memory(pid).get("AnonHugePages"), tuple(_children(pid)))
        if now == last:
            return
        last = now
        time.sleep(1.0)


def _own(pid: int) -> float:
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def measure(args, tmp: str) -> dict:
    warm = os.path.join(tmp, "warm.py")
    with open(warm, "w", encoding="utf-8") as f:
        f.write(WARMUP.format(n=1, count=max(1, args.mb // 25)))
    # name: (warm-up?, the server's environment): variants show what a setting is worth
    servers = {"small": (False, {}), "big": (True, {})}
    if args.variants:
        servers.update({"small, no standby": (False, {"PY_PRELOAD_STANDBY": "0"}),
                        "big, 4 KiB pages": (True, {"PY_PRELOAD_HUGEPAGES": "0"})})  # fmt: skip
    bundles, pids = {}, {}
    note("starting the servers...")
    for i, (name, (warmup, extra)) in enumerate(servers.items()):
        bundles[name] = os.path.join(tmp, f"python-{i}.bin")
        cli("bundle", *MODULES, "--client", args.client, *(["--warmup", warm] if warmup else []),
            "-o", bundles[name])  # fmt: skip
        env = {**os.environ, **extra}
        run_one([bundles[name], "-c", "pass"], env=env)  # starts its server with ``extra``
        run_one([bundles[name], "-c", "pass"])
        pids[name] = server_pid(bundles[name])
    for pid in pids.values():
        wait_settled(pid)
    commands = {"floor": (FLOOR, None)}
    commands.update({name: ([bundles[name], "-c", "pass"], pids[name]) for name in servers})
    measure_idle_rate()
    res: dict = {"load_before": load_average(), "idle_busy": _IDLE_RATE[0],
                 "memory": {k: server_memory(p) for k, p in pids.items()}}  # fmt: skip
    note(f"back-to-back: {args.rounds} rounds of {args.runs} runs each, interleaved...")
    batches: dict = {name: [] for name in commands}
    for _ in range(args.rounds):
        for name, (argv, pid) in commands.items():
            batches[name].append(batch(argv, args.runs, pid))
    res["batches"] = {name: {key: statistics.median(b[key] for b in runs) for key in runs[0]}
                      for name, runs in batches.items()}  # fmt: skip
    note("16 concurrent runs against one run...")
    res["one"] = {name: one_spaced(argv, args.spaced) for name, (argv, _) in commands.items()}
    res["burst"] = {name: burst(argv, 16, args.bursts) for name, (argv, _) in commands.items()}
    note("breakdown...")
    res["parts"] = {name: breakdown(bundles[name], pids[name], args.probes) for name in servers}
    res["load_after"] = load_average()
    return res


def report(res: dict, args) -> bool:
    b, parts, mem = res["batches"], res["parts"], res["memory"]
    ms = lambda v: f"{v * 1000:7.2f}"  # noqa: E731
    mb = lambda v: f"{v / 2**20:.0f} MiB"  # noqa: E731
    print(f"warm-run cost: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"{args.client} client, {time.strftime('%Y-%m-%d %H:%M')}; load average "
          f"{res['load_before']} before, {res['load_after']} after; machine busy while idle "
          f"{res['idle_busy']:.2f} CPU-s/s")  # fmt: skip
    for name, m in mem.items():
        print(f"  server {name}: RSS {mb(m.get('VmRSS', 0))}, anon {mb(m.get('RssAnon', 0))}, "
              f"anon huge pages {mb(m.get('AnonHugePages', 0))}, page tables "
              f"{m.get('VmPTE', 0) // 1024} KiB")  # fmt: skip
    print(f"\nback-to-back, medians of {args.rounds} batches of {args.runs} runs (ms per run)")
    print(f"  {'':<28}{'wall':>9}{'CPU attrib.':>13}{'CPU machine':>13}{'client':>9}")
    label = lambda name: "python -S -E -c pass" if name == "floor" else f"warm, {name}"  # noqa: E731
    for name, row in b.items():
        print(f"  {label(name):<28}{ms(row['wall']):>9}{ms(row['cpu']):>13}"
              f"{ms(row['machine']):>13}{ms(row['client']):>9}")  # fmt: skip
    print(f"\n16 concurrent (wall, ms; median of {args.bursts}) against one spaced run")
    for name in b:
        one, many = res["one"][name], res["burst"][name]
        print(f"  {label(name):<28}{ms(many):>9} / {ms(one)} = {many / one:5.1f}x")
    print("\nbreakdown of one warm run (CPU ms; spaced runs)")
    rows = [("client (starter)", "client"), ("server loop + standby fork", "server"),
            ("child: fork to user code", "setup"), ("child: exit + teardown", "exit"),
            ("  fork of this memory (CPU)", "fork_cpu"),
            ("  untouched fork's exit", "untouched_exit")]  # fmt: skip
    print(f"  {'':<32}" + "".join(f"{name:>19}" for name in parts))
    for text, key in rows:
        print(f"  {text:<32}" + "".join(f"{ms(p[key]):>19}" for p in parts.values()))
    counts = [("child minor faults to user code", "minflt", 1),
              ("server minor faults per run", "server_minflt", 1),
              ("page tables (VmPTE, KiB)", "pte", 1024)]  # fmt: skip
    for text, key, unit in counts:
        print(f"  {text:<32}" + "".join(f"{p[key] / unit:>19.0f}" for p in parts.values()))
    floor = b["floor"]
    checks = [
        ("CPU per warm run / floor (attributed)", b["small"]["cpu"] / floor["cpu"], TARGETS["cpu"]),
        ("CPU per warm run / floor (machine)", b["small"]["machine"] / floor["machine"],
         TARGETS["cpu"]),
        ("back-to-back wall / floor", b["small"]["wall"] / floor["wall"], TARGETS["wall"]),
        (f"CPU +{args.mb} MB / small (attributed)", b["big"]["cpu"] / b["small"]["cpu"],
         TARGETS["growth"]),
        (f"CPU +{args.mb} MB / small (machine)", b["big"]["machine"] / b["small"]["machine"],
         TARGETS["growth"]),
        ("16 concurrent / one run (small)", res["burst"]["small"] / res["one"]["small"],
         TARGETS["burst"]),
        ("16 concurrent / one run (big)", res["burst"]["big"] / res["one"]["big"],
         TARGETS["burst"]),
    ]  # fmt: skip
    print(f"\n  {'target':<42}{'measured':>9}{'target':>9}")
    ok = True
    for name, value, target in checks:
        passed = value <= target
        ok &= passed
        print(f"  {name:<42}{value:>8.2f}x{'<= ' + f'{target:g}':>9}  "
              f"{'PASS' if passed else 'MISS'}")  # fmt: skip
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="3 rounds of 20 runs (under a minute on the loaded 2-core machine)")  # fmt: skip
    parser.add_argument("-n", "--runs", type=int, default=None, help="runs per batch (40)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved batches (5)")
    parser.add_argument("--mb", type=int, default=700, help="MB the big server holds (700)")
    parser.add_argument("--client", choices=["native", "python"], default="native")
    parser.add_argument("--variants", action="store_true",
                        help="also servers without standby and without huge pages")  # fmt: skip
    parser.add_argument("--json", metavar="FILE",
                        help="also write the figures (with machine, date, load) to FILE")
    args = parser.parse_args()
    load = os.getloadavg()
    quick = args.quick
    args.runs = args.runs or (20 if quick else 40)
    args.rounds = args.rounds or (3 if quick else 5)
    args.spaced, args.bursts, args.probes = (10, 2, 10) if quick else (20, 3, 20)
    with tempfile.TemporaryDirectory(prefix="py-preload-cost-") as tmp:
        os.environ["XDG_RUNTIME_DIR"] = os.path.join(tmp, "run")
        os.environ["XDG_CACHE_HOME"] = os.path.join(tmp, "cache")
        os.environ.pop("PY_PRELOAD_COLD", None)
        os.mkdir(os.environ["XDG_RUNTIME_DIR"], 0o700)
        started = time.perf_counter()
        try:
            res = measure(args, tmp)
        finally:
            subprocess.run([PYTHON, "-m", "preloaded.cli", "stop", "--all"], cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        note(f"measured in {time.perf_counter() - started:.0f} s")
    if args.json:  # benchmarks/charts.py draws docs/img/cost.svg and growth.svg from it
        results.save(args.json, "bench_cost", {**res, "mb": args.mb, "client": args.client}, load)
    return 0 if report(res, args) else 1


if __name__ == "__main__":
    sys.exit(main())

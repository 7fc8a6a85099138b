"""GPU check: the CUDA path of warm children, on a machine that has a GPU (CI never needs one).

Verifies, against a real server of `bundle torch transformers --warmup examples/warm_bert.py`:
  1. a warm child moves the tiny BERT built by the warm-up to `cuda`, runs it, and gets what the
     CPU gets;
  2. two concurrent children both use the GPU (each holds a CUDA context while the other runs);
  3. the caller's CUDA_VISIBLE_DEVICES reaches the child (empty: no GPU for that run);
  4. the server never initialises CUDA: every child finds `torch.cuda.is_initialized()` False
     before touching the GPU, and the server holds no /dev/nvidia* device open (nor does
     nvidia-smi list it as a compute process), also after learning from the GPU runs;
and times cold (`python`, which builds the model itself) against warm to the first CUDA result.

This process never imports torch: whether CUDA is there is asked of a fresh interpreter (even
`torch.cuda.is_available()` may initialise CUDA in the process that calls it). Without torch
or without a CUDA device it prints why and exits 0. `--device cpu` runs the same checks on the
CPU (the plumbing, on a machine without a GPU). Exit status 1 when a check failed.

    .venv/bin/python benchmarks/gpu_check.py [-n RUNS] [--device cpu]
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
WARMUP = os.path.join(REPO, "examples", "warm_bert.py")
TIMEOUT = 300
BARRIER_TIMEOUT = 120

ASK_CUDA = ("import json, torch; ok = torch.cuda.is_available(); print(json.dumps({'ok': ok,"
            " 'count': torch.cuda.device_count() if ok else 0, 'torch': torch.__version__,"
            " 'cuda': torch.version.cuda}))")  # fmt: skip

# The run: the warm-up's model (inherited from the server, or built here when cold), moved to
# the device. First line: the result, as soon as the device computed it; second line: the CPU's
# result for the same input. With GPU_CHECK_BARRIER it then says "here" and waits for "go".
CHILD = r'''
import json, os, runpy, sys, time, types
try:
    from preloaded import warm
    source = "warm-up"
except ImportError:
    warm = types.SimpleNamespace(**runpy.run_path(sys.argv[1]))
    source = "built here"
import torch
device = os.environ["GPU_CHECK_DEVICE"]
before = torch.cuda.is_initialized()  # a warm child inherits this from the server
if device == "cuda" and not torch.cuda.is_available():
    print(json.dumps({"available": False, "initialised_before": before}), flush=True)
    sys.exit(0)
ids = warm.encode("py-preload keeps models warm on the GPU")
with torch.no_grad():
    out = warm.model.to(device)(input_ids=ids.to(device)).last_hidden_state.mean(dim=1)
if device == "cuda":
    torch.cuda.synchronize()
got = out.cpu()
print(json.dumps({"available": True, "pid": os.getpid(), "ppid": os.getppid(),
                  "source": source, "initialised_before": before, "device": str(out.device),
                  "name": torch.cuda.get_device_name() if device == "cuda" else "cpu"}),
      flush=True)
with torch.no_grad():
    ref = warm.model.to("cpu")(input_ids=ids).last_hidden_state.mean(dim=1)
print(json.dumps({"matches_cpu": bool(torch.allclose(got, ref, atol=1e-3, rtol=1e-3)),
                  "max_difference": float((got - ref).abs().max())}), flush=True)
barrier = os.environ.get("GPU_CHECK_BARRIER")
if barrier:
    open(os.path.join(barrier, str(os.getpid())), "w").close()
    deadline = time.monotonic() + float(os.environ["GPU_CHECK_BARRIER_TIMEOUT"])
    while not os.path.exists(os.path.join(barrier, "go")):
        if time.monotonic() > deadline:
            sys.exit("gpu_check: no go from the check")
        time.sleep(0.01)
'''


class Check:
    def __init__(self) -> None:
        self.failed = 0

    def __call__(self, ok: bool, what: str, detail: str = "") -> None:
        self.failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {what}" + (f" ({detail})" if detail else ""), flush=True)


def ask_cuda() -> dict | None:
    """torch's view of CUDA from a fresh interpreter; None (after saying why) to skip."""
    try:
        proc = subprocess.run([PYTHON, "-c", ASK_CUDA], capture_output=True, text=True,
                              timeout=TIMEOUT)  # fmt: skip
    except subprocess.TimeoutExpired:
        print("gpu_check: skipped: asking torch about CUDA timed out")
        return None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        print(f"gpu_check: skipped: torch is not usable here ({last})")
        return None
    info = json.loads(proc.stdout)
    if not info["ok"]:
        print(f"gpu_check: skipped: no CUDA device (torch {info['torch']},"
              f" built for CUDA {info['cuda'] or 'none: a CPU-only build'})")  # fmt: skip
        return None
    return info


def start(argv: list, env: dict) -> tuple:
    """Start a run; return (process, seconds to its first line, that line as a dict)."""
    begin = time.perf_counter()
    proc = subprocess.Popen([*argv, "-c", CHILD, WARMUP], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    line = proc.stdout.readline()
    elapsed = time.perf_counter() - begin
    if not line:
        proc.wait(TIMEOUT)
        raise SystemExit(f"gpu_check: {argv[0]} printed nothing (exit {proc.returncode})")
    return proc, elapsed, json.loads(line)


def finish(proc) -> tuple:
    """The rest of a run's output (the CPU comparison) and its exit status."""
    rest, _ = proc.communicate(timeout=TIMEOUT)
    lines = [json.loads(line) for line in rest.splitlines() if line.startswith("{")]
    return (lines[0] if lines else {}), proc.returncode


def one_run(argv: list, env: dict, check: Check, label: str) -> float:
    proc, elapsed, first = start(argv, env)
    second, code = finish(proc)
    device = env["GPU_CHECK_DEVICE"]
    check(code == 0 and first.get("device", "").startswith(device),
          f"{label}: ran the model on {first.get('device')} ({first.get('name')})",
          f"{elapsed * 1000:.0f} ms to the first result")  # fmt: skip
    check(not first.get("initialised_before"), f"{label}: CUDA not initialised before the run")
    if device == "cuda":
        check(second.get("matches_cpu") is True, f"{label}: result matches the CPU's",
              f"largest difference {second.get('max_difference')}")
    elif second.get("matches_cpu") is not True:  # the CPU against itself: only a note (once in
        # ~10 runs under load it differed here, never reproduced in isolation)
        print(f"note: {label}: the CPU's result differed from itself: {second}")
    return elapsed


def concurrent(bundle: str, env: dict, check: Check, tmp: str) -> None:
    """Two warm children hold the device at the same time (a barrier keeps both alive)."""
    barrier = os.path.join(tmp, "barrier")
    os.mkdir(barrier)
    env = {**env, "GPU_CHECK_BARRIER": barrier,
           "GPU_CHECK_BARRIER_TIMEOUT": str(BARRIER_TIMEOUT)}  # fmt: skip
    runs = [start([bundle], env) for _ in range(2)]
    pids = [first.get("pid") for _proc, _t, first in runs]
    deadline = time.monotonic() + BARRIER_TIMEOUT
    while len([n for n in os.listdir(barrier) if n != "go"]) < 2:
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    apps = gpu_processes() if env["GPU_CHECK_DEVICE"] == "cuda" else None
    if apps and any(pid in apps for pid in pids):
        check(all(pid in apps for pid in pids), "both children are GPU compute processes"
              " at once (nvidia-smi)", f"pids {pids}, nvidia-smi lists {sorted(apps)}")  # fmt: skip
    elif apps is not None:  # in a container nvidia-smi may show the host's pids
        print(f"note: nvidia-smi lists {sorted(apps)}, not our pids {pids} (pid namespace?)")
    open(os.path.join(barrier, "go"), "w").close()
    results = [(first, *finish(proc)) for proc, _t, first in runs]
    cuda = env["GPU_CHECK_DEVICE"] == "cuda"
    ok = all(code == 0 and first.get("device", "").startswith(env["GPU_CHECK_DEVICE"])
             and (second.get("matches_cpu") or not cuda)
             for first, second, code in results)  # fmt: skip
    check(ok, "two concurrent warm children both ran the model on the device",
          f"pids {pids}" if ok else f"{results}")


def gpu_processes() -> set | None:
    """PIDs nvidia-smi lists as compute processes; None without nvidia-smi. (In a container
    these may be the host's pids: the callers then only note them.)"""
    try:
        proc = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return {int(p) for p in proc.stdout.split() if p.strip().isdigit()}


def server_holds_no_gpu(pid: int, check: Check, when: str) -> None:
    """A CUDA context opens /dev/nvidia* (nvidiactl, nvidia0, nvidia-uvm): the server must not."""
    fd_dir = f"/proc/{pid}/fd"
    devices = []
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith("/dev/nvidia"):
            devices.append(target)
    check(not devices, f"{when}: the server holds no GPU device open", ", ".join(devices))
    apps = gpu_processes()
    if apps is not None:
        check(pid not in apps, f"{when}: nvidia-smi does not list the server")


def cli(env: dict, *args: str) -> str:
    return subprocess.run([PYTHON, "-m", "preloaded.cli", *args], cwd=REPO, env=env, check=True,
                          capture_output=True, text=True, timeout=TIMEOUT).stdout  # fmt: skip


def server_status(env: dict, bundle: str) -> dict:
    return json.loads(cli(env, "status", "--json", bundle))


def run_checks(runs: int, device: str, tmp: str) -> int:
    check = Check()
    env = {**os.environ, "XDG_RUNTIME_DIR": os.path.join(tmp, "run"),
           "XDG_CACHE_HOME": os.path.join(tmp, "cache"), "GPU_CHECK_DEVICE": device}  # fmt: skip
    env.pop("PY_PRELOAD_COLD", None)
    os.mkdir(env["XDG_RUNTIME_DIR"], 0o700)
    bundle = os.path.join(tmp, "python-gpu.bin")
    cli(env, "bundle", "torch", "transformers", "--warmup", WARMUP, "-o", bundle)
    try:
        subprocess.run([bundle, "-c", "pass"], env=env, check=True, timeout=TIMEOUT)
        st = server_status(env, bundle)
        pid = st["pid"]
        # A server that initialised CUDA refuses to start (ForkUnsafe): other warnings
        # (torch's short-lived helper thread on a loaded machine) are only shown.
        for warning in st["warnings"]:
            print(f"note: the server warns: {warning}")
        server_holds_no_gpu(pid, check, "after the warm-up")
        warm = [one_run([bundle], env, check, f"warm run {i + 1}") for i in range(runs)]
        cold = [one_run([PYTHON], env, check, f"cold run {i + 1}") for i in range(runs)]
        concurrent(bundle, env, check, tmp)
        proc, _, first = start([bundle], {**env, "CUDA_VISIBLE_DEVICES": ""})
        finish(proc)
        if device == "cuda":
            check(first.get("available") is False, "CUDA_VISIBLE_DEVICES='' hides the GPU"
                  " from a warm child (the caller's environment, not the server's)")  # fmt: skip
        time.sleep(1.0)  # the runs' reports: the server learns between runs
        st = server_status(env, bundle)
        check(st["pid"] == pid, "the same server served every run")
        server_holds_no_gpu(pid, check, "after the runs and learning")
        report(cold, warm, device)
    finally:
        cli(env, "stop", "--all")
    return check.failed


def report(cold: list, warm: list, device: str) -> None:
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"\nto the first {device} result (median of {len(cold)}): python {c * 1000:.0f} ms,"
          f" warm {w * 1000:.0f} ms, warm / python {w / c:.3f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--runs", type=int, default=3, help="timed runs of each kind")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the same checks without a GPU (tests the check itself)")
    args = parser.parse_args()
    if args.device == "cuda":
        info = ask_cuda()
        if info is None:
            sys.exit(0)
        print(f"gpu_check: {info['count']} CUDA device(s), torch {info['torch']},"
              f" CUDA {info['cuda']}", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        failed = run_checks(args.runs, args.device, tmp)
    print("gpu_check: all checks passed" if not failed else f"gpu_check: {failed} check(s) FAILED")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

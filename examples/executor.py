"""preloaded.Executor: small torch tasks, each in a warm worker, a child of a server that has torch loaded.

    python examples/executor.py [BUNDLE]

BUNDLE is a starter that preloads torch (`py-preload bundle torch -o python-torch.bin`). Without
one, the example writes one in a temporary directory and stops its server at the end; with one,
the server is left running, so the next run's first task is warm too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

# Run from a checkout: use its preloaded package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import preloaded


def matmul_trace(seed: int, size: int) -> float:
    """A small torch task: runs in a child that did not have to import torch."""
    import torch

    torch.manual_seed(seed)
    a = torch.randn(size, size)
    return float((a @ a.T).trace())


def fit_line(points: int) -> tuple:
    """A few steps of gradient descent; prints from the child go to our stdout."""
    import torch

    x = torch.linspace(0, 1, points)
    y = 3 * x + 0.5
    w = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        loss = ((w[0] * x + w[1] - y) ** 2).mean()
        loss.backward()
        opt.step()
    print(f"  [child {os.getpid()}] fitted {points} points, loss {loss.item():.2e}")
    return round(w[0].item(), 3), round(w[1].item(), 3)


def run(bundle: str) -> None:
    start = time.perf_counter()
    with preloaded.Executor(bundle, max_workers=2) as ex:
        first = ex.submit(matmul_trace, 0, 64).result()
        print(f"first task: {first:.1f} after {time.perf_counter() - start:.2f} s "
              "(includes the server's start if it was not running)")  # fmt: skip
        start = time.perf_counter()
        traces = list(ex.map(matmul_trace, range(8), [128] * 8))
        print(f"8 more tasks with map (in order): {[round(t) for t in traces]} "
              f"in {time.perf_counter() - start:.2f} s")  # fmt: skip
        print("fit_line ->", ex.submit(fit_line, 50).result())
        # Closures work (cloudpickle), and a task's exception comes back with its traceback.
        scale = 10
        print("closure ->", ex.submit(lambda: scale * matmul_trace(1, 8)).result())
        try:
            ex.submit(matmul_trace, 0, -1).result()
        except RuntimeError as exc:
            print(f"the task raised {type(exc).__name__}: {str(exc).splitlines()[0]}")
            print("remote traceback ends with:", exc.__cause__.tb.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1:
        run(sys.argv[1])
        return
    with tempfile.TemporaryDirectory() as tmp:
        bundle = os.path.join(tmp, "python-torch.bin")
        cli = [sys.executable, "-m", "preloaded.cli"]
        subprocess.run(cli + ["bundle", "torch", "-o", bundle], check=True, cwd=sys.path[0])
        try:
            run(bundle)
        finally:
            subprocess.run(cli + ["stop", bundle], check=True, cwd=sys.path[0],
                           stdout=subprocess.DEVNULL)  # fmt: skip


if __name__ == "__main__":
    main()

"""preloaded.Executor: calls run in real warm children of a real server, and come back."""

from __future__ import annotations

import concurrent.futures
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time

import cloudpickle
import pytest
from conftest import PYTHON, REPO, cli, make_bundle

import preloaded
from preloaded.pool.executor import (
    BundleError,
    Executor,
    RemoteTraceback,
    ServerUnavailable,
    WorkerDied,
)
from preloaded.pool.worker import RemoteError

# The functions below go to the children by value: importing this module there would import
# conftest, which makes a temporary directory of its own in every child.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

TIMEOUT = 60  # seconds: every wait on a future has a deadline


@pytest.fixture
def executor(light_bundle):
    ex = Executor(light_bundle, max_workers=2)
    yield ex
    ex.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def single(light_bundle):
    """One worker: which process runs a task is then certain (with more, a task submitted as
    the previous one returns may find its thread not yet idle, and start another worker)."""
    ex = Executor(light_bundle, max_workers=1)
    yield ex
    ex.shutdown(wait=True, cancel_futures=True)


def wait_running(future, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while not future.running():
        assert time.monotonic() < end, "the task never started"
        time.sleep(0.01)


def wait_for(path: str, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.01)


def _tag(value, *, suffix):
    """The value, this process, and what the previous task in this process left behind (in
    os.environ: a function pickled by value gets globals of its own in every task)."""
    seen = os.environ.get("EXECUTOR_STATE")
    os.environ["EXECUTOR_STATE"] = str(value)
    return f"{value}{suffix}", os.getpid(), seen


def test_returns_values_from_a_reused_worker(single):
    """Guards against results lost or mixed up, against a task running in the caller, and
    against a worker per task: as in a ProcessPoolExecutor, one worker runs task after task
    (the same pid, and a task sees what the one before it left)."""
    assert single.submit(pow, 2, 10).result(TIMEOUT) == 1024
    results = [single.submit(_tag, c, suffix="!").result(TIMEOUT) for c in "abcd"]
    assert [r[0] for r in results] == ["a!", "b!", "c!", "d!"]
    pids = {r[1] for r in results}
    assert len(pids) == 1 and os.getpid() not in pids
    assert [r[2] for r in results[1:]] == ["a", "b", "c"]


def test_shutdown_ends_the_workers(light_bundle):
    """Guards against reused workers outliving their executor (their server would never go
    idle, nor be stopped by the memory budget): shutdown(wait=True) returns once they ended;
    after shutdown(wait=False) they end by themselves."""
    ex = Executor(light_bundle, max_workers=1)
    worker = ex.submit(os.getpid).result(TIMEOUT)
    assert ex.submit(os.getpid).result(TIMEOUT) == worker
    ex.shutdown(wait=True)
    assert worker not in _server_children(light_bundle)
    ex = Executor(light_bundle, max_workers=1)
    worker = ex.submit(os.getpid).result(TIMEOUT)
    ex.shutdown(wait=False)
    end = time.monotonic() + 30
    while worker in _server_children(light_bundle):
        assert time.monotonic() < end, "the worker outlived shutdown(wait=False)"
        time.sleep(0.05)


def test_max_tasks_per_child_recycles_workers(light_bundle):
    """Guards against max_tasks_per_child being ignored (a worker that runs forever) or
    miscounted, and against a recycled worker's state reaching its successor: 1 is a fresh
    child per task."""
    with Executor(light_bundle, max_workers=1, max_tasks_per_child=2) as ex:
        results = [ex.submit(_tag, i, suffix="").result(TIMEOUT) for i in range(5)]
    pids = [r[1] for r in results]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4], pids
    assert [r[2] for r in results] == [None, "0", None, "2", None]
    with Executor(light_bundle, max_workers=1, max_tasks_per_child=1) as ex:
        results = [ex.submit(_tag, i, suffix="").result(TIMEOUT) for i in range(3)]
    assert len({r[1] for r in results}) == 3 and [r[2] for r in results] == [None] * 3


def test_max_tasks_per_child_checked_as_process_pool_does(light_bundle):
    """Guards against a bad max_tasks_per_child or initializer surfacing only at a task."""
    with pytest.raises(ValueError, match="max_tasks_per_child must be >= 1"):
        Executor(light_bundle, max_tasks_per_child=0)
    with pytest.raises(TypeError, match="max_tasks_per_child must be an integer"):
        Executor(light_bundle, max_tasks_per_child=1.5)
    with pytest.raises(TypeError, match="initializer must be a callable"):
        Executor(light_bundle, initializer="not callable")


def _init_worker(log, value):
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    os.environ["EXECUTOR_INIT"] = value


def _read_init():
    return os.environ.get("EXECUTOR_INIT"), os.getpid()


def test_initializer_runs_once_per_worker(light_bundle, tmp_path):
    """Guards against initializer/initargs ignored, run per task, or run in the caller."""
    log = str(tmp_path / "init.log")
    with Executor(light_bundle, max_workers=2, initializer=_init_worker,
                  initargs=(log, "ready")) as ex:  # fmt: skip
        results = list(ex.map(lambda _: _read_init(), range(8), timeout=TIMEOUT))
        results += [ex.submit(_read_init).result(TIMEOUT) for _ in range(3)]
    assert {r[0] for r in results} == {"ready"}
    with open(log) as f:
        inits = [int(line) for line in f]
    assert sorted(inits) == sorted({r[1] for r in results})  # once in every worker, no more
    assert os.getpid() not in inits and "EXECUTOR_INIT" not in os.environ


def _failing_init():
    raise LookupError("no such model")


def test_failing_initializer_breaks_the_executor(light_bundle):
    """Guards against a failed initializer hanging the task, being reported as a dead worker,
    or being retried for ever: as with ProcessPoolExecutor, the executor is broken, and says
    why (the initializer's exception, with its remote traceback, is the cause)."""
    ex = Executor(light_bundle, max_workers=1, initializer=_failing_init)
    try:
        error = ex.submit(len, "x").exception(TIMEOUT)
        assert isinstance(error, concurrent.futures.BrokenExecutor)
        assert "initializer raised LookupError: no such model" in str(error)
        assert isinstance(error.__cause__, LookupError)
        assert "_failing_init" in error.__cause__.__cause__.tb
        with pytest.raises(concurrent.futures.BrokenExecutor):
            ex.submit(len, "y")
    finally:
        ex.shutdown(wait=True)


def test_lambdas_and_closures(executor):
    """Guards against plain pickle: a lambda or a closure over a local must reach the child."""
    base = 10

    def add_base(x):
        return x + base

    assert executor.submit(lambda: base * 3).result(TIMEOUT) == 30
    assert executor.submit(add_base, 5).result(TIMEOUT) == 15
    assert executor.submit(lambda f, x: f(x), add_base, 1).result(TIMEOUT) == 11


def _inner_failure(n):
    raise ValueError(f"bad value {n}")


def _outer(n):
    return _inner_failure(n) + 1


def test_remote_exception_carries_its_traceback(executor):
    """Guards against a task's exception lost, retyped, or coming back without the child's
    traceback text (which names the functions it went through)."""
    future = executor.submit(_outer, 7)
    with pytest.raises(ValueError, match="bad value 7") as info:
        future.result(TIMEOUT)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "_outer" in cause.tb and "_inner_failure" in cause.tb
    assert "ValueError: bad value 7" in cause.tb
    assert "preloaded/pool/worker.py" not in cause.tb  # our own frames are left out


class _Unpicklable(Exception):
    def __init__(self) -> None:
        super().__init__("holds a lock")
        self.lock = threading.Lock()


def _raise_unpicklable():
    raise _Unpicklable()


def test_unpicklable_exception_still_reported(executor):
    """Guards against a task whose exception cannot be pickled looking like a dead worker."""
    with pytest.raises(RemoteError, match="_Unpicklable: holds a lock") as info:
        executor.submit(_raise_unpicklable).result(TIMEOUT)
    assert "_raise_unpicklable" in info.value.__cause__.tb


def test_sigkilled_worker_then_next_task_works(single):
    """Guards against a crashed worker hanging its future or breaking the executor (as a
    ProcessPoolExecutor does: BrokenProcessPool), and against the next task going to the dead
    worker: it gets a fresh one."""
    worker = single.submit(os.getpid).result(TIMEOUT)
    future = single.submit(lambda: os.kill(os.getpid(), signal.SIGKILL))
    with pytest.raises(WorkerDied, match=r"killed by signal 9 \(SIGKILL\)") as info:
        future.result(TIMEOUT)
    assert info.value.signal == signal.SIGKILL and info.value.exitcode == -signal.SIGKILL
    assert info.value.pid == worker
    assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)  # can travel on
    with pytest.raises(WorkerDied, match="exited with status 3") as info:
        single.submit(os._exit, 3).result(TIMEOUT)
    assert info.value.exitcode == 3 and info.value.signal is None
    assert single.submit(lambda: "alive").result(TIMEOUT) == "alive"
    assert single.submit(os.getpid).result(TIMEOUT) not in (worker, info.value.pid)


def test_worker_killed_between_tasks_is_replaced(light_bundle):
    """Guards against a task blamed (WorkerDied) for a worker that died while idle, and
    against it being sent to that dead worker: it runs in a new one."""
    with Executor(light_bundle, max_workers=1) as ex:
        first = ex.submit(os.getpid).result(TIMEOUT)
        assert ex.submit(os.getpid).result(TIMEOUT) == first  # reused while it lives
        os.kill(first, signal.SIGKILL)
        end = time.monotonic() + 30
        while first in _server_children(light_bundle):  # reaped: its end is reported to us
            assert time.monotonic() < end, "the server never reaped the killed worker"
            time.sleep(0.02)
        second = ex.submit(os.getpid).result(TIMEOUT)
    assert second != first


def _server_children(bundle: str) -> list:
    return json.loads(cli("status", bundle, "--json").stdout)["children"]


def test_unpicklable_result_is_a_clear_error(executor):
    """Guards against a result that cannot be pickled killing the child or hanging the caller."""
    future = executor.submit(lambda: (i for i in range(3)))
    with pytest.raises(pickle.PicklingError, match=r"result \(generator\) cannot be pickled"):
        future.result(TIMEOUT)
    unpicklable_arg = executor.submit(len, threading.Lock())
    assert isinstance(unpicklable_arg.exception(TIMEOUT), TypeError)
    assert executor.submit(len, "abc").result(TIMEOUT) == 3


def test_map_keeps_order(executor):
    """Guards against map yielding results in completion order, and against its timeout being
    ignored."""

    def slow_square(i):
        time.sleep(0.05 * (5 - i))  # later items finish first
        return i * i

    assert list(executor.map(slow_square, range(6), timeout=TIMEOUT)) == [0, 1, 4, 9, 16, 25]
    results = executor.map(time.sleep, [2, 2], timeout=0.2)
    with pytest.raises(concurrent.futures.TimeoutError):
        list(results)


def test_cancel_pending_futures(light_bundle, tmp_path):
    """Guards against cancel() failing on a queued task, or a cancelled task running anyway."""
    gate = str(tmp_path / "gate")
    ex = Executor(light_bundle, max_workers=1)
    try:
        blocker = ex.submit(wait_for, gate)
        wait_running(blocker)
        queued = [ex.submit(open, str(tmp_path / f"ran-{i}"), "w") for i in range(3)]
        assert all(f.cancel() for f in queued)
        assert blocker.cancel() is False  # running: cannot be cancelled
        open(gate, "w").close()
        assert blocker.result(TIMEOUT) is None
    finally:
        ex.shutdown(wait=True)
    assert all(f.cancelled() for f in queued)
    assert not [name for name in os.listdir(tmp_path) if name.startswith("ran-")]


def test_shutdown_wait_and_cancel_futures(light_bundle, tmp_path):
    """Guards against shutdown(wait=True) returning before running tasks end, and against
    cancel_futures leaving queued tasks to run."""
    gate, done = str(tmp_path / "gate"), str(tmp_path / "done")

    def wait_then_write():
        wait_for(gate)
        time.sleep(0.3)
        open(done, "w").close()
        return "finished"

    ex = Executor(light_bundle, max_workers=1)
    running = ex.submit(wait_then_write)
    wait_running(running)
    queued = ex.submit(open, str(tmp_path / "queued-ran"), "w")
    ex.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled()
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(len, "x")
    open(gate, "w").close()
    ex.shutdown(wait=True)
    assert running.done() and running.result(0) == "finished" and os.path.exists(done)
    assert not os.path.exists(tmp_path / "queued-ran")


def test_max_workers_respected(light_bundle, tmp_path):
    """Guards against more children running at once than max_workers (or fewer: no overlap)."""

    def count_peers(directory):
        mine = os.path.join(directory, str(os.getpid()))
        open(mine, "w").close()
        try:
            time.sleep(1.0)
            return len(os.listdir(directory))
        finally:
            os.unlink(mine)

    with Executor(light_bundle, max_workers=2) as ex:
        counts = list(ex.map(count_peers, [str(tmp_path)] * 6, timeout=TIMEOUT))
    assert max(counts) == 2, counts


CALLER = """\
import sys
import preloaded

def task(n):
    print("task says", n)
    print("task warns", file=sys.stderr)
    return n * 2

print("caller before")
with preloaded.Executor(sys.argv[1], max_workers=1) as ex:
    print("result", ex.submit(task, 21).result(60))
"""


def test_task_output_reaches_the_callers_stdout(light_bundle, tmp_path):
    """Guards against a task's prints being lost, mixed into the result channel (a corrupt
    result), or coming out before what the caller printed first."""
    script = tmp_path / "caller.py"
    script.write_text(CALLER)
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([PYTHON, str(script), light_bundle], capture_output=True, text=True,
                          env=env, timeout=TIMEOUT, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "caller before\ntask says 21\nresult 42\n"
    assert proc.stderr == "task warns\n"


def test_task_stdin_is_not_the_channel(executor):
    """Guards against a task reading the call channel (or the caller's stdin) as its stdin."""
    assert isinstance(executor.submit(input).exception(TIMEOUT), EOFError)


def test_missing_or_bad_bundle_fails_at_construction(tmp_path):
    """Guards against a typo in the bundle path surfacing only at the first result."""
    with pytest.raises(BundleError, match="no such bundle file"):
        Executor(str(tmp_path / "nope.bin"))
    other = tmp_path / "script.py"
    other.write_text("print('not a starter')\n")
    with pytest.raises(BundleError, match="not a starter"):
        Executor(str(other))
    with pytest.raises(ValueError):
        Executor(str(other), max_workers=0)


def test_server_that_cannot_start_is_a_one_line_error(tmp_path):
    """Guards against a failed server start hanging the future or giving a raw traceback."""
    module = tmp_path / "fragile_mod.py"
    module.write_text("X = 1\n")
    bundle = str(tmp_path / "fragile.bin")  # found through PYTHONPATH at bundle time...
    cli("bundle", "fragile_mod", "-o", bundle, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    module.write_text("raise ImportError('fragile_mod is broken')\n")  # ...then broken
    with Executor(bundle, max_workers=1) as ex:
        error = ex.submit(len, "x").exception(TIMEOUT)
    assert isinstance(error, ServerUnavailable)
    assert "cannot start the server" in str(error) and "fragile_mod is broken" in str(error)
    assert "\n" not in str(error)


def test_import_preloaded_stays_cheap():
    """Guards against `import preloaded` (every warm run does it) loading the executor."""
    code = (
        "import sys, preloaded; print(sorted(m for m in ('preloaded.pool.executor', "
        "'concurrent.futures', 'cloudpickle') if m in sys.modules))"
    )
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=REPO,
                         timeout=TIMEOUT, check=True).stdout  # fmt: skip
    assert out == "[]\n"
    assert preloaded.Executor is Executor and preloaded.WorkerDied is WorkerDied


@pytest.fixture(scope="module")
def torch_bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("torch") / "python-torch.bin", "torch")


@pytest.mark.torch
def test_torch_tensor_result(torch_bundle):
    """Guards against tensors failing to travel back, and against tasks not running in a fork
    of the server (torch already imported before the task imports it)."""
    import torch

    def make(n):
        import sys

        warm = "torch" in sys.modules
        import torch

        return torch.arange(n, dtype=torch.float32).reshape(2, -1) * 2, warm

    with Executor(torch_bundle, max_workers=2) as ex:
        futures = [ex.submit(make, n) for n in (4, 6)]
        results = [f.result(TIMEOUT) for f in futures]
    assert torch.equal(results[0][0], torch.tensor([[0.0, 2.0], [4.0, 6.0]]))
    assert results[1][0].shape == (2, 3) and results[1][1] is True


def test_server_without_the_executor_is_a_clear_worker_death(tmp_path, capfd, monkeypatch):
    """Guards against a bundle written by an older py-preload (its server's package has no
    worker module) giving a ConnectionResetError or a hang instead of a dead worker whose
    stderr says why."""
    old = tmp_path / "old"
    shutil.copytree(os.path.join(REPO, "preloaded"), old / "preloaded",
                    ignore=shutil.ignore_patterns("worker.py", "__pycache__"))  # fmt: skip
    # This checkout's editable install maps every preloaded.* name to it, worker.py included:
    # the old copy must stand alone, as an old installed py-preload would.
    with open(old / "preloaded" / "__init__.py", "a") as init:
        init.write("import sys\nsys.meta_path[:] = [f for f in sys.meta_path "
                   "if '__editable__' not in getattr(f, '__module__', '')]\n")
    bundle = str(tmp_path / "old.bin")
    subprocess.run([PYTHON, "-m", "preloaded.cli", "bundle", "json", "-o", bundle], cwd=old,
                   check=True, capture_output=True, timeout=TIMEOUT)  # fmt: skip
    # Not from this checkout: its preloaded/ (worker.py and all) is other files than the old
    # server's, which python would import from the cwd: such a task rightly goes cold.
    monkeypatch.chdir(tmp_path)
    with Executor(bundle, max_workers=1) as ex:
        error = ex.submit(len, "x").exception(TIMEOUT)
    assert isinstance(error, WorkerDied) and error.exitcode == 1
    assert "cannot run executor tasks" in capfd.readouterr().err


def test_big_arguments_and_results(executor):
    """Guards against a deadlock when the call or the outcome is bigger than a socket buffer
    (the child blocks writing its result until the caller reads it, and only then exits)."""
    big = b"x" * 20_000_000
    assert executor.submit(len, big).result(TIMEOUT) == len(big)
    result = executor.submit(bytes, 30_000_000).result(TIMEOUT)
    assert len(result) == 30_000_000 and not any(result[::4096])


def test_tasks_see_the_warm_up_globals(tmp_path):
    """Guards against tasks running anywhere but in a fork of the server: what the bundle's
    warm-up built there is preloaded.warm in every task, without being rebuilt."""
    warm = tmp_path / "warm.py"
    warm.write_text("import os\nBUILT_BY = os.getpid()\nTABLE = {'answer': 41}\n")
    bundle = str(tmp_path / "python-warm.bin")
    cli("bundle", "json", "--warmup", str(warm), "-o", bundle)

    def use_warm():
        import preloaded

        return preloaded.warm.TABLE["answer"] + 1, preloaded.warm.BUILT_BY, os.getppid()

    with Executor(bundle, max_workers=1) as ex:
        answer, built_by, parent = ex.submit(use_warm).result(TIMEOUT)
    assert answer == 42 and built_by == parent  # built once, in the server


def test_server_killed_during_a_task_then_a_new_one_serves(tmp_path):
    """Guards against a task hanging when its server dies under it (SIGKILL, OOM killer), and
    against the executor staying broken: the next task starts a fresh server."""
    bundle = make_bundle(tmp_path / "python-victim.bin", "json")
    gate = str(tmp_path / "started")
    with Executor(bundle, max_workers=1) as ex:
        first_server = ex.submit(os.getppid).result(TIMEOUT)
        running = ex.submit(lambda: (open(gate, "w").close(), time.sleep(30)))
        wait_for(gate)
        os.kill(first_server, signal.SIGKILL)
        error = running.exception(TIMEOUT)
        assert isinstance(error, ServerUnavailable) and "lost the server" in str(error)
        assert ex.submit(os.getppid).result(TIMEOUT) not in (first_server, os.getpid())
    cli("stop", bundle)


def _chunk_sum(values):
    return sum(values), os.getpid()


def test_dask_computes_with_the_executor_as_its_scheduler(light_bundle):
    """Guards against an Executor that only works with its own map/submit: dask takes any
    concurrent.futures.Executor as a scheduler, and its tasks must run in the warm workers
    (not in the caller) and come back right, in order, with a failing task's exception."""
    import dask

    parts = [dask.delayed(_chunk_sum)(range(i * 10, i * 10 + 10)) for i in range(6)]
    total = dask.delayed(lambda xs: (sum(x[0] for x in xs), [x[1] for x in xs]))(parts)
    with Executor(light_bundle, max_workers=2) as ex:
        (value, pids), = dask.compute(total, scheduler=ex)
        assert value == sum(range(60))
        assert os.getpid() not in pids and 1 <= len(set(pids)) <= 2
        with pytest.raises(ZeroDivisionError):
            dask.compute(dask.delayed(lambda: 1 / 0)(), scheduler=ex)

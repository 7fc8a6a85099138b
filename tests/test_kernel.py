"""Warm Jupyter kernels: `py-preload kernel install/list/remove`, and a real kernel run by a
starter, driven through jupyter_client (real ZMQ, real signals) as Jupyter drives it.

Every kernelspec goes to a JUPYTER_DATA_DIR under tmp_path (``--user`` honours it), so nothing
outside the test's directory changes.
"""

from __future__ import annotations

import json
import os
import time

import psutil
import pytest

from conftest import PYTHON, cli
from test_learn import bundle, venv  # noqa: F401  (the fixture: a venv without ipykernel)

pytest.importorskip("jupyter_client")
pytest.importorskip("ipykernel")

KERNEL_TIMEOUT = 60


@pytest.fixture
def jupyter_dir(tmp_path, monkeypatch):
    directory = tmp_path / "jupyter"
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(directory))
    monkeypatch.delenv("JUPYTER_PATH", raising=False)
    return directory


@pytest.fixture
def starter(tmp_path):
    path = bundle(tmp_path / "python-kernel.bin", "--standby", "0")
    yield path
    cli("stop", path, check=False)


def spec(jupyter_dir, name: str) -> dict:
    with open(jupyter_dir / "kernels" / name / "kernel.json", encoding="utf-8") as f:
        return json.load(f)


def test_install_list_remove(jupyter_dir, starter):
    """Guards the kernelspec: its argv runs the starter as Jupyter runs python's kernel."""
    proc = cli("kernel", "install", starter)
    assert "installed kernel py-preload-python-kernel in " in proc.stderr
    written = spec(jupyter_dir, "py-preload-python-kernel")
    assert written["argv"] == [starter, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    assert written["language"] == "python" and written["display_name"] == "Python (warm: json)"
    listed = cli("kernel", "list").stdout
    assert listed.startswith(f"py-preload-python-kernel  {starter}  {jupyter_dir}")
    proc = cli("kernel", "remove", "py-preload-python-kernel")
    assert "removed kernel py-preload-python-kernel" in proc.stderr
    assert not (jupyter_dir / "kernels" / "py-preload-python-kernel").exists()
    assert cli("kernel", "list").stdout == "no py-preload kernels installed\n"
    again = cli("kernel", "remove", "py-preload-python-kernel", check=False)
    assert again.returncode == 2 and again.stderr == "Error: no kernel named py-preload-python-kernel\n"


def test_install_name_display_name_and_prefix(jupyter_dir, starter, tmp_path):
    """Guards --name, --display-name and --prefix (Jupyter's own layout under PREFIX)."""
    prefix = tmp_path / "prefix"
    cli("kernel", "install", starter, "--name", "warm-json", "--display-name", "Warm JSON",
        "--prefix", str(prefix))  # fmt: skip
    kernel_json = prefix / "share" / "jupyter" / "kernels" / "warm-json" / "kernel.json"
    assert json.loads(kernel_json.read_text())["display_name"] == "Warm JSON"
    assert not (jupyter_dir / "kernels" / "warm-json").exists()
    bad = cli("kernel", "install", starter, "--name", "Not Valid", check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "kernel name" in bad.stderr
    assert not (jupyter_dir / "kernels").exists()


def test_remove_leaves_other_kernels_alone(jupyter_dir):
    """Guards against `kernel remove` deleting a kernelspec py-preload did not write."""
    other = jupyter_dir / "kernels" / "other"
    other.mkdir(parents=True)
    (other / "kernel.json").write_text(json.dumps(
        {"argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
         "display_name": "Other", "language": "python"}))  # fmt: skip
    proc = cli("kernel", "remove", "other", check=False)
    assert proc.returncode == 2 and "not a py-preload kernel" in proc.stderr
    assert (other / "kernel.json").exists()
    assert cli("kernel", "list").stdout == "no py-preload kernels installed\n"


def test_missing_ipykernel_is_one_clear_line(jupyter_dir, tmp_path, venv):  # noqa: F811
    """Guards the check in the bundle's own environment: a kernelspec whose kernel cannot start
    would only fail later, inside Jupyter, with a dead-kernel dialog."""
    python, _site = venv
    path = bundle(tmp_path / "python-bare.bin", python=python)
    proc = cli("kernel", "install", path, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"ipykernel is not installed for {python}" in proc.stderr
    assert not (jupyter_dir / "kernels").exists()


def test_missing_jupyter_client_is_one_clear_line(jupyter_dir, starter):
    """Guards the optional extra: without jupyter_client the command says what to install."""
    import subprocess

    code = ("import sys; sys.modules['jupyter_client'] = None\n"
            "from preloaded.cli import main; main()")  # fmt: skip
    proc = subprocess.run([PYTHON, "-c", code, "kernel", "install", starter],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "needs jupyter_client: pip install 'py-preload[jupyter]'" in proc.stderr


def _execute(client, code: str) -> tuple:
    """Run ``code``; return (reply content, printed text)."""
    out = []

    def hook(msg):
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])

    reply = client.execute_interactive(code, timeout=KERNEL_TIMEOUT, output_hook=hook)
    return reply["content"], "".join(out)


def _server_pid(starter: str) -> int:
    return json.loads(cli("status", "--json", starter).stdout)["pid"]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + KERNEL_TIMEOUT
    while not _gone(pid):
        assert time.monotonic() < deadline, f"process {pid} still there"
        time.sleep(0.05)


@pytest.mark.parametrize("client", ["native", "python"])
def test_real_kernel_execute_interrupt_restart_shutdown(jupyter_dir, tmp_path, client):
    """Guards the warm kernel under jupyter_client: it is a fork of the server, runs code,
    turns interrupt_kernel (SIGINT to the starter) into KeyboardInterrupt in the running cell,
    restarts into a new warm kernel, and leaves no process behind at shutdown."""
    from jupyter_client.manager import KernelManager

    starter = bundle(tmp_path / "python-kernel.bin", "--standby", "0", "--client", client)
    cli("kernel", "install", starter, "--name", "warm")
    manager = KernelManager(kernel_name="warm")
    manager.start_kernel()
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=KERNEL_TIMEOUT)
        content, out = _execute(client, "import os, json; print(os.getpid(), os.getppid(),"
                                        " json.dumps([1]))")  # fmt: skip
        assert content["status"] == "ok"
        pid, ppid, dumped = out.split()
        assert int(ppid) == _server_pid(starter) and dumped == "[1]"  # warm: a fork
        starter_pid = manager.provisioner.pid

        client.execute("import time; time.sleep(30)")
        time.sleep(1.0)  # the cell is running
        manager.interrupt_kernel()
        reply = client.get_shell_msg(timeout=10)["content"]
        assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt"
        content, out = _execute(client, "x = 40 + 2; print(x)")
        assert content["status"] == "ok" and out == "42\n"  # the kernel lives on

        manager.restart_kernel(now=False)
        client.wait_for_ready(timeout=KERNEL_TIMEOUT)
        _wait_gone(int(pid))
        _wait_gone(starter_pid)
        content, out = _execute(client, "import os; print(os.getpid(), 'x' in globals())")
        new_pid, leftover = out.split()
        assert content["status"] == "ok" and int(new_pid) != int(pid) and leftover == "False"
        starter_pid = manager.provisioner.pid
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=False)
    try:
        _wait_gone(int(new_pid))
        _wait_gone(starter_pid)
        assert not manager.is_alive()
    finally:
        cli("stop", starter, check=False)


# A stand-in for Jupyter: starts kernel argv[1], prints "<kernel pid> <launched pid>", waits.
JUPYTER = """\
import sys, time
from jupyter_client.manager import KernelManager
manager = KernelManager(kernel_name=sys.argv[1])
manager.start_kernel()
client = manager.client()
client.start_channels()
client.wait_for_ready(timeout=60)
out = []
client.execute_interactive("import os; print(os.getpid())", timeout=60,
                           output_hook=lambda m: out.append(m["content"].get("text", "")))
print("".join(out).strip(), manager.provisioner.pid, flush=True)
time.sleep(600)
"""


def _dispositions(hup: str):
    """What Jupyter's kernels inherit: SIGHUP as ``hup`` says (`nohup jupyter lab &` ignores it),
    the rest at their defaults whatever this test run was started with."""
    import signal

    def preexec() -> None:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN if hup == "nohup" else signal.SIG_DFL)

    return preexec


@pytest.mark.parametrize("hup", ["plain", "nohup"])
@pytest.mark.parametrize("client", ["native", "python", "python's own kernel"])
def test_kernel_ends_when_jupyter_dies(jupyter_dir, tmp_path, client, hup):
    """Guards python's behaviour when Jupyter is killed: ipykernel watches its parent (the
    JPY_PARENT_PID) and exits. A warm kernel's parent is the server, so the starter keeps that
    watch for it (a pidfd of its parent); without it, kernel and starter lived on forever after
    a Jupyter crash. Also under `nohup jupyter`, where a SIGHUP-based watch did nothing."""
    import signal
    import subprocess

    if client == "python's own kernel":  # the oracle: what the starter must match
        kernel = jupyter_dir / "kernels" / "plain"
        kernel.mkdir(parents=True)
        (kernel / "kernel.json").write_text(json.dumps(
            {"argv": [PYTHON, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
             "display_name": "python", "language": "python"}))  # fmt: skip
        path = None
    else:
        path = bundle(tmp_path / f"python-{client}.bin", "--client", client)
        cli("kernel", "install", path, "--name", "plain")
    jupyter = subprocess.Popen([PYTHON, "-c", JUPYTER, "plain"], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True,
                               preexec_fn=_dispositions(hup))  # fmt: skip
    pids = []
    try:
        line = jupyter.stdout.readline()
        assert line, "the kernel did not start"
        pids[:] = map(int, line.split())
        kernel_pid, launched_pid = pids
        if path is not None:
            assert kernel_pid != launched_pid  # warm: the kernel is the server's fork
        os.kill(jupyter.pid, signal.SIGKILL)
        jupyter.wait(KERNEL_TIMEOUT)
        _wait_gone(kernel_pid)
        _wait_gone(launched_pid)
    finally:
        jupyter.kill()
        for pid in pids:  # a failed check must not leave the kernel running
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if path is not None:
            cli("stop", path, check=False)


def test_forced_shutdown_leaves_no_process(jupyter_dir, starter):
    """Guards shutdown_kernel(now=True), which kills the kernel process Jupyter started (the
    starter) outright: the warm kernel, a fork of the server, must go with it."""
    from jupyter_client.manager import KernelManager

    cli("kernel", "install", starter, "--name", "forced")
    manager = KernelManager(kernel_name="forced")
    manager.start_kernel()
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=KERNEL_TIMEOUT)
        content, out = _execute(client, "import os; print(os.getpid())")
        assert content["status"] == "ok"
        starter_pid = manager.provisioner.pid
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    _wait_gone(int(out))
    _wait_gone(starter_pid)

"""``py-preload bench``: cold and warm runs really happen, N times each; readiness; errors.

Never a timing assertion: the figures are only checked to be plausible (positive, finite, one per
run). What is checked is who ran each run (a cold run's parent is the bench itself, a warm run's
is the server), that nothing is left running, and the messages and exit statuses of bad input.
"""

from __future__ import annotations

import json
import socket
import textwrap
import time

import psutil
from conftest import PYTHON, REPO, cli

# Appends "<ppid> <pid>" to the file named in argv[1]: tells cold runs from warm ones.
RECORDER = "import os, sys\nopen(sys.argv[1], 'a').write(f'{os.getppid()} {os.getpid()}\\n')\n"

# A stdlib HTTP server on the port in argv[1] that records its pid in argv[2] before listening.
HTTP_SERVER = textwrap.dedent("""\
    import http.server, os, sys
    open(sys.argv[2], "a").write(f"{os.getpid()}\\n")
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
        def log_message(self, *a):
            pass
    http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")

# Records its pid, then never listens: readiness can only time out.
SILENT = ("import os, sys, time\nopen(sys.argv[1], 'a').write(f'{os.getpid()}\\n')\n"
          "time.sleep(600)\n")


def bench(*args):
    import subprocess

    proc = subprocess.Popen([PYTHON, "-m", "preloaded.cli", "bench", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    out, err = proc.communicate(timeout=180)
    return proc.pid, proc.returncode, out, err


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except OSError:
        return True


def wait_gone(pids, timeout: float = 5.0) -> list:
    """The pids still alive (zombies count as gone) after waiting up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def read_pids(path) -> list:
    if not path.exists():
        return []
    return [int(line.split()[-1]) for line in path.read_text().splitlines()]


def plausible(stats: dict, runs: int) -> None:
    assert len(stats["times_ms"]) == runs
    assert all(0 < t < 120_000 for t in stats["times_ms"])
    order = [stats[k] for k in ("min_ms", "q1_ms", "median_ms", "q3_ms", "max_ms")]
    assert order == sorted(order)


def test_completion_json_runs_cold_and_warm_n_times(light_bundle, tmp_path):
    """Guards against a bench whose "cold" runs go through the server (or whose warm runs go
    cold), and against a wrong run count: each run records its parent, which is the bench for a
    cold run and the server for a warm one; 1 warm-up + 3 + 3 runs."""
    script = write(tmp_path / "record.py", RECORDER)
    log = tmp_path / "runs.txt"
    pid, code, out, err = bench(light_bundle, "-n", "3", "--json", "--", script, str(log))
    assert code == 0, err
    result = json.loads(out)
    assert result["mode"] == "completion" and result["runs"] == 3
    assert result["command"] == [script, str(log)]
    plausible(result["cold"], 3)
    plausible(result["warm"], 3)
    assert result["ratio"] == result["cold"]["median_ms"] / result["warm"]["median_ms"]
    server = json.loads(cli("status", light_bundle, "--json").stdout)["pid"]
    parents = [int(line.split()[0]) for line in log.read_text().splitlines()]
    assert parents.count(pid) == 3, parents  # cold: the real interpreter, started by bench
    assert parents.count(server) == 4, parents  # warm: forks of the server (with the warm-up)
    assert parents[0] == server  # the warm-up comes first: it starts the server
    assert "run 3/3 warm" in err  # plain progress lines when stderr is not a terminal
    assert "\r" not in err


def test_table_output(light_bundle, tmp_path):
    """Guards against the human-readable summary losing a row or the ratio."""
    script = write(tmp_path / "noop.py", "pass\n")
    _, code, out, err = bench(light_bundle, "--runs", "1", "--", script)
    assert code == 0, err
    lines = out.splitlines()
    assert "time to completion, 1 runs each" in lines[1]
    assert [line.split()[0] for line in lines[3:]] == ["cold", "warm", "cold/warm"]


def test_readiness_stops_each_server_and_frees_the_port(light_bundle, tmp_path):
    """Guards against readiness runs that leave the HTTP server running (a warm child lives
    under the py-preload server, not under bench) or start the next run on a busy port: every
    started server process is gone and the port is free when bench returns."""
    script = write(tmp_path / "http_server.py", HTTP_SERVER)
    port, pids = free_port(), tmp_path / "pids.txt"
    url = f"http://127.0.0.1:{port}/"
    _, code, out, err = bench(light_bundle, "-n", "2", "--json", "--readiness", url,
                              "--", script, str(port), str(pids))  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["mode"] == "readiness" and result["url"] == url
    plausible(result["cold"], 2)
    plausible(result["warm"], 2)
    started = read_pids(pids)
    assert len(started) == 5  # warm-up + 2 cold + 2 warm, each started after the last stopped
    assert wait_gone(started, timeout=0.5) == []
    assert port_refuses(port)


def test_readiness_timeout_leaves_nothing(light_bundle, tmp_path):
    """Guards against a readiness wait without a deadline, and against the process that never
    answered living on after bench gave up: exit status 1, one line, the process gone."""
    script = write(tmp_path / "silent.py", SILENT)
    pids = tmp_path / "pids.txt"
    url = f"http://127.0.0.1:{free_port()}/health"
    started = time.monotonic()
    _, code, out, err = bench(light_bundle, "--timeout", "1", "--readiness", url,
                              "--", script, str(pids))  # fmt: skip
    assert time.monotonic() - started < 60
    assert code == 1
    assert out == ""
    error = [line for line in err.splitlines() if line.startswith("Error")]
    assert len(error) == 1
    assert error[0].startswith(f"Error: {url} did not answer 200 within 1 s of starting ")
    assert read_pids(pids) and wait_gone(read_pids(pids)) == []


def test_failing_command_is_reported(light_bundle, tmp_path):
    """Guards against timing a command that fails (its figures would be meaningless): exit
    status 1 and the command's last stderr line."""
    script = write(tmp_path / "fails.py", "import sys\nsys.exit('no model here')\n")
    _, code, out, err = bench(light_bundle, "--", script)
    assert code == 1 and out == ""
    line = err.strip().splitlines()[-1]
    assert line.startswith("Error: ") and line.endswith("failed (exit status 1): no model here")


def test_bad_input(light_bundle, tmp_path):
    """Guards against tracebacks or usage dumps for bad input: one line, exit status 2."""
    text = write(tmp_path / "notes.txt", "just text\n")
    cases = [
        ((str(tmp_path / "missing.bin"), "--", "x.py"), "no such file: "),
        ((text, "--", "x.py"), f"{text} is not a starter written by py-preload bundle"),
        ((light_bundle,), "name the command to bench after --"),
        ((light_bundle, "--readiness", "localhost:80", "--", "x.py"), "--readiness needs"),
    ]
    for args, message in cases:
        _, code, _, err = bench(*args)
        assert code == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], err


def test_busy_port_is_refused(light_bundle, tmp_path):
    """Guards against timing an already-running server (readiness at once, a meaningless
    ratio): a port in use before the first run is an error."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        _, code, _, err = bench(light_bundle, "--readiness", f"http://127.0.0.1:{port}/",
                                "--", "x.py")  # fmt: skip
    assert code == 1
    assert f"port {port} is already in use" in err


def test_bench_imports_no_httpx_without_readiness():
    """Guards against the CLI paying for httpx on every command: it is imported by bench.py
    only when --readiness is given, and by no other module."""
    code = "import preloaded.cli, preloaded.bench, sys; print('httpx' in sys.modules)"
    import subprocess

    out = subprocess.run([PYTHON, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_progress_rewrites_one_line_on_a_terminal(light_bundle, tmp_path):
    """Guards against a progress display that scrolls a terminal (or, elsewhere, fills a log
    with carriage returns): on a terminal each update rewrites the same line."""
    import pexpect

    script = write(tmp_path / "noop.py", "pass\n")
    child = pexpect.spawn(PYTHON, ["-m", "preloaded.cli", "bench", "-n", "2", light_bundle,
                                   "--", script], cwd=REPO, timeout=120)  # fmt: skip
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    output = child.before.decode()
    assert "\r\x1b[Kbench: run 2/2 warm" in output
    assert "\nbench: run" not in output
    assert "cold/warm" in output

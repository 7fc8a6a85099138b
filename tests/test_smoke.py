"""The basic path end to end: a first run starts a server, the second is served by a fork."""

import subprocess

from conftest import server_pids


def test_first_and_second_run(light_bundle, tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import os, sys\nprint('pid', os.getpid(), sys.argv[1:])\n")
    first = subprocess.run([light_bundle, str(script), "x"], capture_output=True, text=True,
                           timeout=60)
    second = subprocess.run([light_bundle, str(script), "y"], capture_output=True, text=True,
                            timeout=60)
    assert first.returncode == second.returncode == 0, (first.stderr, second.stderr)
    assert first.stdout.endswith("['x']\n") and second.stdout.endswith("['y']\n")
    assert first.stdout.split()[1] != second.stdout.split()[1]
    assert len(server_pids()) >= 1

"""What a newcomer meets at the command line: help, refusals, damaged files, platforms.

Each case runs the real CLI (``python -m preloaded.cli``) or a real starter in a subprocess.
"""

from __future__ import annotations

import os
import subprocess

import click
from click.testing import CliRunner

from conftest import PYTHON, REPO, cli, server_pids

# Run py-preload's CLI, or a starter, in an interpreter that believes it is on another system.
# The starter is the file itself, run as its shebang would (python -SI FILE ARGS).
FAKE_OS = "import sys, runpy; sys.platform = 'darwin'; sys.argv = sys.argv[1:]; "
FAKE_CLI = FAKE_OS + "runpy.run_module('preloaded.cli', run_name='__main__')"
FAKE_STARTER = FAKE_OS + "runpy.run_path(sys.argv[0], run_name='__main__')"


def test_bundle_on_another_system_stops_with_one_line(tmp_path):
    out = tmp_path / "python-j.bin"
    proc = subprocess.run([PYTHON, "-c", FAKE_CLI, "py-preload", "bundle", "json", "-o", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1
    assert "needs Linux" in proc.stderr and "darwin" in proc.stderr
    assert not out.exists()


def test_a_starter_on_another_system_runs_python_cold_with_one_warning(tmp_path, light_bundle):
    before = server_pids()
    proc = subprocess.run(
        [PYTHON, "-SI", "-c", FAKE_STARTER, light_bundle, "-c", "import sys; print(sys.argv)", "a"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "['-c', 'a']\n"  # python's own run (the cold exec)
    assert proc.stderr == "py-preload: the server needs Linux, not darwin; running without it\n"
    assert server_pids() == before  # no server was started for it


def test_pyproject_says_linux():
    with open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8") as f:
        assert '"Operating System :: POSIX :: Linux"' in f.read()




# -- --help: whole, with an example per command --------------------------------------------------


def _commands(group, prefix=()):
    """Every command and group under ``group``, with its command line (depth first)."""
    for name, command in sorted(group.commands.items()):
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))


def test_help_is_whole_and_shows_examples_in_80_columns():
    from preloaded.cli import main

    runner = CliRunner()
    top = runner.invoke(main, ["--help"], terminal_width=80)
    assert top.exit_code == 0
    listed = top.output.split("Commands:\n")[1].split("\n\n")[0]
    assert "..." not in listed  # click cuts a summary too long for the terminal with "..."
    for path, command in [((), main), *_commands(main)]:
        out = runner.invoke(main, [*path, "--help"], terminal_width=80).output
        assert "Examples:" in out, path
        too_long = [line for line in out.splitlines() if len(line) > 80]
        assert not too_long, (path, too_long)
        if path:
            assert f"  {path[-1]} " in (top.output if len(path) == 1 else _group_help(path))


def _group_help(path) -> str:
    from preloaded.cli import main

    return CliRunner().invoke(main, [*path[:-1], "--help"], terminal_width=80).output


# -- bundle -o: never replaces what is not a starter ----------------------------------------------


def test_bundle_refuses_to_replace_a_file_that_is_not_a_starter(tmp_path):
    precious = tmp_path / "python"
    precious.write_text("#!/bin/sh\necho the real thing\n")
    os.utime(precious, (1_000_000_000, 1_000_000_000))
    link = tmp_path / "link"
    os.symlink(PYTHON, link)  # `-o .venv/bin/python`: a venv's interpreter is a symlink
    for target in (precious, link):
        proc = cli("bundle", "json", "--client", "python", "-o", str(target), check=False)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.count("\n") == 1
        assert f"{target} exists and is not a py-preload starter" in proc.stderr
        assert "--force" in proc.stderr
    assert precious.read_text() == "#!/bin/sh\necho the real thing\n"
    assert precious.stat().st_mtime == 1_000_000_000
    assert os.readlink(link) == PYTHON
    cli("bundle", "json", "--client", "python", "-o", str(precious), "--force")
    assert "py-preload starter" in precious.read_text()
    cli("bundle", "decimal", "--client", "python", "-o", str(precious))  # a starter: replaced
    assert "decimal kept warm" in precious.read_text()


# -- status, stop, logs, forget: a FILE that is not a starter ---------------------------------------


def test_a_file_that_is_not_a_starter_is_named_as_such(tmp_path, light_bundle):
    foreign = tmp_path / "notes.txt"
    foreign.write_text("not a starter\n")
    damaged = tmp_path / "damaged.bin"
    with open(light_bundle, "rb") as f:
        damaged.write_bytes(f.read()[:120])  # cut in the middle of its config
    missing = tmp_path / "missing.bin"
    for command in ("status", "stop", "logs", "forget"):
        for path in (foreign, damaged):
            out = _invoke(command, path)
            assert out.exit_code == 2, (command, path, out.output)
            assert out.output == (f"Error: {path} is not a py-preload starter (damaged, or another"
                                  f" program); write it again with `py-preload bundle MODULES -o"
                                  f" {path}`\n")  # fmt: skip
        out = _invoke(command, missing)
        assert (out.exit_code, out.output) == (
            2, f"Error: {missing}: no such file; name a starter written by `py-preload bundle`\n")
    assert foreign.read_text() == "not a starter\n"


def _invoke(command, path):
    from preloaded.cli import main

    return CliRunner().invoke(main, [command, str(path)], terminal_width=80)

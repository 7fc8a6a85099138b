"""``py-preload``: write starters (bundle) and look after their servers (status, stop, list, logs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import click

from preloaded import servers
from preloaded.paths import Paths, UnsafeDirectory
from preloaded.server.standby import MAX_STANDBYS

PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STARTER = """\
#!{python} -SI
# py-preload starter: runs like `python`, with {modules} kept warm in a server.
# Written by `py-preload bundle`; run it as you would run python.
import sys
sys.path.append({pkg_root!r})
from preloaded.client.starter import main
main({config!r})
"""

# Run by the bundle's interpreter: can it host the server and find every module? A module found
# only through the caller's cwd or PYTHONPATH needs its directory recorded: the server starts
# in "/" without the caller's PYTHON* variables.
CHECK = """\
import importlib.util, json, os, sys
sys.path.append(sys.argv[1])
import preloaded.server.loop
cwd = os.getcwd()
user = {cwd} | {os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
missing, extra = [], []
for name in sys.argv[2:]:
    spec = importlib.util.find_spec(name.split(".")[0])
    if spec is None:
        missing.append(name)
        continue
    locations = list(spec.submodule_search_locations or ())
    where = locations[0] if locations else spec.origin if spec.has_location else None
    # The path entry it was found in: the directory holding it (a prefix of its path is not:
    # a venv inside the cwd holds site-packages).
    entry = os.path.dirname(os.path.abspath(where)) if where else None
    if entry in user and entry not in extra:
        extra.append(entry)
print(json.dumps({"executable": sys.executable, "missing": missing, "path": extra}))
"""


def require_linux() -> None:
    """Stop with one line where a server cannot work (see docs/differences.md, Platforms)."""
    if not sys.platform.startswith("linux"):
        raise click.ClickException(
            "py-preload needs Linux (a forked warm server, /proc, SO_PEERCRED, pidfds); "
            f"this system is {sys.platform}"
        )


def resolve_python(python: str) -> str:
    """The interpreter binary to name in the shebang.

    A venv's ``bin/python`` symlink is kept as it is (resolving it would lose the venv); a shim
    script (pyenv, asdf) costs ~100 ms per start, so it is replaced by the binary it runs.
    """
    path = os.path.abspath(python) if os.sep in python else _which(python)
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as exc:
        raise click.ClickException(f"cannot use {python} as the interpreter: {exc.strerror}")
    if not os.access(path, os.X_OK):
        raise click.ClickException(f"{path} is not executable; pass --python PATH")
    if head == b"#!":
        out = _ask(path, "import sys; print(sys.executable)")
        path = out.strip()
    return path


def _which(name: str) -> str:
    import shutil

    found = shutil.which(name)
    if not found:
        raise click.ClickException(f"no interpreter named {name} on PATH; pass --python PATH")
    return found


def _ask(python: str, code: str, *args: str) -> str:
    proc = subprocess.run([python, "-c", code, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise click.ClickException(f"{python} failed: {last}")
    return proc.stdout


def write_atomic(path: str, data, mode: int) -> None:
    """Write ``path`` (text or bytes) so that it is either the old file or the complete new one."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    if isinstance(data, str):
        data = data.encode("utf-8")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise click.ClickException(f"cannot write {path}: {exc.strerror}")


def examples(*lines: str) -> str:
    """An epilog of example command lines, kept as written (click rewraps other paragraphs)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


# Help text wraps at the terminal's width up to 100 columns; each command's summary in the
# list of commands is its short_help, written to fit in 80 columns (click would cut it with "...").
HELP = {"max_content_width": 100}


@click.group(context_settings=HELP, epilog=examples(
    "py-preload bundle torch transformers -o python-tt.bin",
    "./python-tt.bin script.py   # first run starts the server; later runs fork",
    "py-preload status python-tt.bin",
    "py-preload stop python-tt.bin",
))  # fmt: skip
@click.version_option(package_name="py-preload")
def main() -> None:
    """Keep heavy Python imports warm: write a drop-in `python` that forks a preloaded server.

    Linux only. `py-preload COMMAND --help` shows a command's options and examples; the
    documentation is in docs/ of the source tree.
    """


@main.command(short_help="Write a starter: a drop-in python with MODULES preloaded.",
              epilog=examples(
    "py-preload bundle torch transformers -o python-tt.bin",
    "py-preload bundle torch --python .venv/bin/python -o python-t.bin",
    "py-preload bundle -p 'numpy<3' -r requirements.txt -o job.bin",
))  # fmt: skip
@click.argument("modules", nargs=-1)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Starter file to write (an executable, used like `python`).")
@click.option("--force", is_flag=True,
              help="Replace the -o file even if it is not a starter (by default it is refused).")
@click.option("--python", "python", default=sys.executable, show_default="this interpreter",
              help="Interpreter the starter runs and the server imports into.")
@click.option("--idle-timeout", type=click.FloatRange(min=1), default=1800, show_default=True,
              help="Seconds without clients after which the server exits.")
@click.option("-p", "--package", "packages", multiple=True, metavar="SPEC",
              help="A requirement (PEP 508) to install on the first run; repeatable.")
@click.option("-r", "--requirements", "requirement_files", multiple=True,
              type=click.Path(dir_okay=False), help="A requirements file to install from.")
@click.option("--script", type=click.Path(dir_okay=False),
              help="Read its PEP 723 dependencies; its imports are the default MODULES.")
@click.option("--warmup", type=click.Path(exists=True, dir_okay=False),
              help="A script the server runs after the imports; its globals are preloaded.warm.")
@click.option("--learn-after", type=click.IntRange(min=1), default=2, show_default=True,
              help="Preload a library module once this many runs imported it.")
@click.option("--no-learn", is_flag=True, help="Learn no modules from the runs.")
@click.option("--standby", type=click.IntRange(min=0, max=MAX_STANDBYS), default=1,
              show_default=True,
              help="Children kept forked ahead (0: fork per run; more for bursts of runs).")
@click.option("--client", type=click.Choice(["native", "python"]), default=None,
              help="The starter: a compiled client (non-terminal runs skip the interpreter's "
                   "start) or a Python script. Default: native when a C compiler works.")
def bundle(modules, output, force, python, idle_timeout, packages, requirement_files, script,
           warmup, learn_after, no_learn, standby, client) -> None:  # fmt: skip
    """Write a starter FILE that runs like python with MODULES preloaded.

    Requirements the interpreter lacks are installed with uv by the first run (or ahead of
    time by `py-preload install FILE`) into an overlay shared by bundles with the same set.
    Library modules that runs keep importing are learned: the server imports them too.
    """
    require_linux()
    if not modules and not script:
        raise click.UsageError("name the MODULES to preload, or pass --script FILE")
    if not force and os.path.lexists(output) and not_a_starter(output):
        # `-o .venv/bin/python` once replaced a venv's interpreter without a word.
        raise click.ClickException(f"{output} exists and is not a py-preload starter; not "
                                   "replacing it (pass --force to replace it)")  # fmt: skip
    config = plan_bundle(modules, python, idle_timeout, packages, requirement_files, script)
    config.update(learn=not no_learn, learn_after=learn_after, standby=standby)
    if warmup:
        config["warmup"] = _warmup_path(warmup)
    write_starter(output, config, client)
    note = " installs what it needs," if config.get("overlay") else ""
    click.echo(f"wrote {output}: run it like python; the first run{note} starts the server",
               err=True)  # fmt: skip


def _warmup_path(path: str) -> str:
    """The warm-up script, absolute; it must compile (a typo is reported now, not at run time)."""
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            compile(f.read(), path, "exec", dont_inherit=True)
    except OSError as exc:
        raise click.ClickException(f"cannot read the warm-up {path}: {exc.strerror}")
    except (SyntaxError, ValueError) as exc:
        raise click.ClickException(f"the warm-up {path} does not compile: {exc}")
    return path


def plan_bundle(modules, python, idle_timeout, packages=(), requirement_files=(), script=None):
    """The starter's config: modules, interpreter, and the overlay of what must be installed."""
    from preloaded.install import installer as install

    for name in modules:
        if not all(part.isidentifier() for part in name.split(".")):
            raise click.ClickException(f"{name!r} is not a module name")
    python = resolve_python(python)
    plan = install.Plan()
    try:
        plan.read(packages, requirement_files, script)
        if not modules:
            modules = plan.default_modules(python)
        found = json.loads(_ask(python, CHECK, PKG_ROOT, *modules))
        modules = plan.resolve_missing(found["missing"], list(modules), python)
        overlay, wanted = plan.overlay(python)
    except install.InstallError as exc:
        raise click.ClickException(str(exc))
    config = {"python": python, "modules": list(modules), "idle_timeout": idle_timeout,
              "pkg_root": PKG_ROOT, "path": found["path"]}  # fmt: skip
    if overlay:
        config.update(overlay=overlay, requirements=wanted, installer=sys.executable)
    return config


def write_starter(output: str, config: dict, client: str | None = None) -> None:
    """Write the starter: native (``client`` "native", or None when a compiler works) or Python.

    With no compiler (or a failed compile) and no explicit choice, the Python starter is
    written and one line says so.
    """
    if client != "python":
        from preloaded.install import nativebuild

        try:
            data = nativebuild.starter_bytes(config, nativebuild.build())
        except (nativebuild.BuildError, OSError, ValueError) as exc:
            if client == "native":
                raise click.ClickException(f"cannot build the native client: {exc}")
            click.echo(f"py-preload: wrote a Python starter (no native client: {exc})", err=True)
        else:
            write_atomic(output, data, 0o755)
            return
    text = STARTER.format(python=config["python"], modules=", ".join(config["modules"]),
                          pkg_root=PKG_ROOT, config=config)  # fmt: skip
    write_atomic(output, text, 0o755)


@main.command(short_help="Install what a starter needs now (e.g. in a container build).",
              epilog=examples("py-preload install job.bin"))
@click.argument("file", type=click.Path(dir_okay=False))
def install(file) -> None:
    """Install what the starter FILE needs now (e.g. when building a container image)."""
    from preloaded.install import installer

    try:
        config = installer.starter_config(file)
        overlay = config.get("overlay")
        if not overlay:
            click.echo(f"{file} needs nothing installed", err=True)
            return
        done = installer.ensure(overlay, config["requirements"], config["python"])
    except installer.InstallError as exc:
        raise click.ClickException(str(exc).removeprefix("py-preload: "))
    state = "installed" if done else "already installed"
    click.echo(f"{state}: {', '.join(config['requirements'])} in {overlay}", err=True)


@main.command(context_settings={"allow_interspersed_args": False},
              short_help="Run a script warm, from a bundle kept in the cache.",
              epilog=examples("py-preload run job.py --epochs 3",
                              "py-preload run -p 'torch>=2' train.py"))
@click.option("-p", "--package", "packages", multiple=True, metavar="SPEC",
              help="A requirement (PEP 508) the script needs; repeatable.")
@click.option("-r", "--requirements", "requirement_files", multiple=True,
              type=click.Path(dir_okay=False), help="A requirements file the script needs.")
@click.option("--python", "python", default=sys.executable, show_default="this interpreter",
              help="Interpreter to run the script with.")
@click.argument("script", type=click.Path(dir_okay=False))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run(packages, requirement_files, python, script, args) -> None:
    """Run SCRIPT warm: its PEP 723 dependencies and imports make a bundle kept in the cache.

    The first run installs and warms; later runs with the same requirements are forks of the
    warm server.
    """
    from preloaded.install import runcache

    require_linux()
    try:
        bundle_file = runcache.bundle_for(packages, requirement_files, python, script)
    except OSError as exc:
        raise click.ClickException(f"cannot read {exc.filename}: {exc.strerror}")
    if not os.path.exists(bundle_file):
        os.makedirs(os.path.dirname(bundle_file), mode=0o700, exist_ok=True)
        config = plan_bundle((), python, 1800, packages, requirement_files, script)
        write_starter(bundle_file, config)
    os.execv(bundle_file, [bundle_file, script, *args])


class _Failure(click.ClickException):
    """A one-line error with its own exit status (2: bad input, 1: the run failed)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def not_a_starter(file: str) -> str | None:
    """Why ``file`` is not a starter that ``bundle`` wrote (None when it is one)."""
    from preloaded.install import installer

    try:
        installer.starter_config(file)
    except installer.InstallError as exc:
        return str(exc)
    return None


def _paths(file: str) -> Paths:
    """The paths of a starter's server; a FILE that is no starter is bad input (exit 2),
    whether it is missing, a directory, damaged or another program."""
    again = "name a starter written by `py-preload bundle`"
    if not os.path.lexists(file):
        raise _Failure(f"{file}: no such file; {again}", 2)
    if not os.path.isfile(file):
        raise _Failure(f"{file} is not a file; {again}", 2)
    if not_a_starter(file):
        raise _Failure(f"{file} is not a py-preload starter (damaged, or another program); "
                       f"write it again with `py-preload bundle MODULES -o {file}`", 2)  # fmt: skip
    try:
        return Paths(file)
    except (UnsafeDirectory, OSError) as exc:
        raise click.ClickException(str(exc))


def _memory(status: dict) -> dict:
    import psutil

    def mem(pid):
        try:
            info = psutil.Process(pid).memory_full_info()
            return {"rss": info.rss, "pss": getattr(info, "pss", None), "uss": info.uss}
        except (psutil.Error, OSError):
            return None

    return {"server": mem(status["pid"]), "children": {p: mem(p) for p in status["children"]}}


def _format_standbys(pids: list) -> str:
    if not pids:
        return "none parked"
    if len(pids) == 1:
        return f"pid {pids[0]} parked"
    return f"{len(pids)} parked (pids {', '.join(map(str, pids))})"


def _format_status(st: dict) -> str:
    mb = lambda n: f"{n / 1e6:.0f} MB" if n is not None else "?"  # noqa: E731
    server = st["memory"]["server"] or {}
    lines = [
        f"bundle:    {st['bundle']}",
        f"pid:       {st['pid']}   uptime {st['uptime']:.0f} s   runs served {st['runs']}",
        "modules:   " + ", ".join(f"{m} ({t:.2f} s)" for m, t in st["import_times"].items()),
        f"children:  {len(st['children'])} running",
        "standby:   " + _format_standbys(st.get("standbys") or []),
        f"memory:    RSS {mb(server.get('rss'))}, PSS {mb(server.get('pss'))}",
        "stale:     " + (f"{st['stale']} (the next run starts a fresh server)" if st["stale"]
                         else "no"),
    ]
    lines += _format_learning(st)
    lines += _format_env(st.get("env"))
    lines += [_wrapped("warning:   ", w) for w in st["warnings"]]
    return "\n".join(lines)


def _format_env(env: dict | None) -> list:
    """The variables the imports read: those set with their values, the unset ones by prefix
    (a run whose values differ runs cold)."""
    if not env:
        return []
    read = env["read"]
    unset = sorted(name for name, value in read.items() if value is None)
    groups: dict = {}
    for name in unset:
        groups.setdefault(name.split("_")[0], []).append(name)
    shown = [names[0] if len(names) == 1 else f"{prefix}_* ({len(names)})"
             for prefix, names in groups.items()]  # fmt: skip
    lines = [f"env:       depends on {len(read)} variable(s) read at import"
             " (a run with other values runs cold)"]  # fmt: skip
    lines += [f"  {name}={value}" for name, value in sorted(read.items()) if value is not None]
    if unset:
        lines.append(_wrapped("  unset: ", ", ".join(shown)))
    lines += [f"  every {prefix}* variable (listed at import)" for prefix in env["prefixes"]]
    lines += [f"  every variable: {where} lists the whole environment" for where in env["whole"]]
    return lines


def _wrapped(label: str, text: str) -> str:
    """A long status line, wrapped and indented under its label."""
    import textwrap

    return textwrap.fill(text, 100, initial_indent=label, subsequent_indent=" " * len(label),
                         break_on_hyphens=False, break_long_words=False)  # fmt: skip


def _format_learning(st: dict) -> list:
    lines = []
    if st.get("warmup"):
        took = st.get("warmup_time")
        lines.append(f"warm-up:   {st['warmup']}" + (f" ({took:.2f} s)" if took else ""))
    learn = st.get("learn")
    if not learn:
        return lines
    if not learn["enabled"]:
        return lines + ["learned:   off (--no-learn)"]
    learned = learn["learned"]
    total = sum(learned.values())
    lines.append(f"learned:   {len(learned)} module(s), {total:.0f} ms"
                 + (" (after %d runs)" % learn["after"]))  # fmt: skip
    lines += [f"  {name} ({ms:.1f} ms)" for name, ms in learned.items()]
    pending = len(learn["pending"]) + len(learn.get("probing", ())) + len(learn.get("cleared", ()))
    if pending:
        lines.append(f"learning:  {pending} pending")
    lines += [f"refused:   {name}: {why}" for name, why in learn["refused"].items()]
    return lines


@main.command(short_help="Show a server: modules, runs, memory, warnings.",
              epilog=examples("py-preload status python-tt.bin", "py-preload status --json"))
@click.argument("file", required=False, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(file, as_json) -> None:
    """Show the server of FILE (or of every bundle)."""
    sockets = [_paths(file).socket] if file else [i["socket"] for i in servers.listed()]
    results = []
    for path in sockets:
        st = servers.ask(path, {"cmd": "status"})
        if st is None or "pid" not in st:
            continue
        st["memory"] = _memory(st)
        results.append(st)
    if file and not results:
        if as_json:
            click.echo(json.dumps(None))
        raise click.ClickException(f"no server is running for {file}")
    if as_json:
        click.echo(json.dumps(results[0] if file else results, indent=2))
    elif not results:
        click.echo("no servers running")
    else:
        click.echo("\n\n".join(_format_status(st) for st in results))


@main.command(short_help="Stop the server of a starter, or all of yours.",
              epilog=examples("py-preload stop python-tt.bin", "py-preload stop --all",
                              "py-preload stop --now python-tt.bin"))
@click.argument("file", required=False, type=click.Path())
@click.option("--all", "stop_all", is_flag=True, help="Stop every server of this user.")
@click.option("--now", is_flag=True, help="End the programs they are running (SIGHUP).")
def stop(file, stop_all, now) -> None:
    """Stop the server of FILE, or all with --all: no new runs; running programs finish and the
    server exits after the last (at once with --now, which ends them)."""
    if bool(file) == stop_all:
        raise click.UsageError("name a starter FILE or pass --all")
    sockets = [_paths(file).socket] if file else [i["socket"] for i in servers.listed()]
    stopped = 0
    for path in sockets:
        reply = servers.ask(path, {"cmd": "stop", "now": now})
        if reply and "stopping" in reply:
            stopped += 1
            runs = reply.get("runs")
            if runs:  # a training run started hours ago must not end because of a stop
                click.echo(f"server {reply['stopping']} exits after its {runs} running "
                           f"program(s) end (`stop --now` ends them)", err=True)  # fmt: skip
            else:
                _wait_gone(reply["stopping"])
    if file and not stopped:
        raise click.ClickException(f"no server is running for {file}")
    click.echo(f"stopped {stopped} server(s)", err=True)


def _wait_gone(pid: int, timeout: float = 5.0) -> None:
    import psutil

    try:
        proc = psutil.Process(pid)
        proc.wait(timeout)
    except psutil.NoSuchProcess:
        return
    except psutil.TimeoutExpired:
        proc.kill()


@main.command(short_help="Forget the modules a server learned; it restarts.",
              epilog=examples("py-preload forget python-tt.bin"))
@click.argument("file", type=click.Path())
def forget(file) -> None:
    """Forget the modules FILE's server learned (and refused); its next run starts afresh."""
    paths = _paths(file)
    # The server clears its sets and retires at once (its socket and lock go; running children
    # finish): nothing to wait for, the next run starts a fresh server.
    reply = servers.ask(paths.socket, {"cmd": "forget"})
    try:
        os.unlink(paths.learned)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise click.ClickException(f"cannot remove {paths.learned}: {exc.strerror}")
    state = "server retired" if reply and "stopping" in reply else "no server was running"
    click.echo(f"forgot the learned modules of {file} ({state})", err=True)


@main.command(short_help="Time a command cold (python) and warm (the starter).",
              epilog=examples(
    "py-preload bench python-tt.bin -- examples/tiny_bert.py",
    "py-preload bench python-tt.bin --readiness http://localhost:8000/ -- app.py",
))  # fmt: skip
@click.argument("file", type=click.Path())
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("-n", "--runs", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed runs of each kind (cold and warm, alternating).")
@click.option("--readiness", metavar="URL",
              help="Time until URL answers HTTP 200 (then stop the command), not completion.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=120,
              show_default=True, help="Seconds one run may take (to completion or readiness).")
def bench(file, command, runs, readiness, as_json, timeout) -> None:
    """Time python COMMAND cold (the real interpreter) and warm (the starter FILE).

    Write the command after --, as for python: `py-preload bench FILE -- serve.py --port 8000`.
    """
    from preloaded import bench as benchmark

    try:
        result = benchmark.run(file, list(command), runs=runs, url=readiness, timeout=timeout)
    except benchmark.BenchError as exc:
        raise _Failure(str(exc), exc.exit_code)
    click.echo(json.dumps(result, indent=2) if as_json else benchmark.format_table(result))


@main.command(name="list", short_help="List your servers: pid, memory, last use, starter.",
              epilog=examples("py-preload list", "PY_PRELOAD_MEMORY_BUDGET=8G py-preload list"))
def list_() -> None:
    """List running servers: pid, memory (PSS, with parked standbys), last use, bundle file."""
    from preloaded.server import budget

    try:
        limits = budget.settings()
    except budget.BudgetError as exc:
        raise _Failure(str(exc), 2)
    rows = []
    for info in servers.listed():
        usage = servers.ask(info["socket"], {"cmd": "usage", "pss": True})
        if not (usage and usage.get("pid") == info["pid"]):  # gone (or a py-preload too old)
            if not servers.ask(info["socket"], {"cmd": "status"}):
                continue
            usage = {}
        rows.append((info, usage))
    if not rows:
        click.echo("no servers running")
        return
    click.echo(f"{'PID':>8}  {'MEMORY':>8}  {'LAST USE':<12}  BUNDLE")
    for info, usage in rows:
        click.echo(f"{info['pid']:>8}  {_size(usage.get('pss')):>8}  {_last_use(usage):<12}  "
                   f"{info['bundle']}  ({', '.join(info['modules'])})")  # fmt: skip
    if limits.budget is not None:
        held = sum(usage.get("pss") or 0 for _info, usage in rows)
        click.echo(f"memory budget {limits.text} ({limits.source}); "
                   f"the servers hold {_size(held)}")  # fmt: skip


def _size(n) -> str:
    return "?" if n is None else f"{n / 1e6:.0f} MB"


def _last_use(usage: dict) -> str:
    """When a run last started or ended on a server ("running" while one runs)."""
    if not usage:
        return "?"
    if usage.get("busy"):
        return "running"
    ago = max(0.0, time.time() - usage["last_used"])
    for unit, seconds in (("d", 86400), ("h", 3600), ("min", 60)):
        if ago >= seconds:
            return f"{ago // seconds:.0f} {unit} ago"
    return f"{ago:.0f} s ago"


@main.command(short_help="Print the end of a server's log.",
              epilog=examples("py-preload logs python-tt.bin", "py-preload logs -n 200 python-tt.bin"))
@click.argument("file", type=click.Path())
@click.option("-n", "--lines", default=50, show_default=True, help="How many lines to show.")
def logs(file, lines) -> None:
    """Print the end of the server log of FILE."""
    path = _paths(file).log
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.readlines()[-lines:]
    except FileNotFoundError:
        raise click.ClickException(f"no log yet for {file} (expected at {path})")
    click.echo("".join(text), nl=False)


@main.group(short_help="Jupyter kernels that run warm (install, list, remove).",
            epilog=examples(
    'py-preload kernel install python-tt.bin --display-name "Python (warm torch)"',
    "py-preload kernel list",
    "py-preload kernel remove py-preload-python-tt",
))  # fmt: skip
def kernel() -> None:
    """Jupyter kernels that run warm: a kernelspec whose interpreter is a starter FILE."""


@kernel.command(name="install", short_help="Install a kernelspec that starts a warm kernel.",
                epilog=examples("py-preload kernel install python-tt.bin",
                                "py-preload kernel install python-tt.bin --sys-prefix"))
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--name", help="Kernel name (default: py-preload-<file name>).")
@click.option("--display-name", help="Name shown by Jupyter (default: Python (warm: MODULES)).")
@click.option("--user", "where", flag_value="user", default=True,
              help="Install for this user (the default; JUPYTER_DATA_DIR is honoured).")
@click.option("--sys-prefix", "where", flag_value="sys-prefix",
              help="Install into the environment py-preload runs in.")
@click.option("--prefix", type=click.Path(file_okay=False), help="Install under PREFIX.")
def kernel_install(file, name, display_name, where, prefix) -> None:
    """Install a kernelspec that starts the warm kernel `FILE -m ipykernel_launcher`."""
    from preloaded import kernel as kernels
    from preloaded.install import installer

    try:
        config = installer.starter_config(file)
        if config.get("overlay"):  # the check below looks for ipykernel there
            installer.ensure(config["overlay"], config["requirements"], config["python"])
    except installer.InstallError as exc:
        raise _Failure(str(exc).removeprefix("py-preload: "), 2)
    if prefix is None and where == "sys-prefix":
        prefix = kernels.sys_prefix()
    try:
        name, directory = kernels.install(file, config, name, display_name,
                                          user=prefix is None, prefix=prefix)  # fmt: skip
    except kernels.KernelError as exc:
        raise _Failure(str(exc), exc.exit_code)
    click.echo(f"installed kernel {name} in {directory}", err=True)


@kernel.command(name="list", short_help="List the py-preload kernels Jupyter finds.",
                epilog=examples("py-preload kernel list"))
def kernel_list() -> None:
    """List the py-preload kernels Jupyter finds: name, starter, kernelspec directory."""
    from preloaded import kernel as kernels

    try:
        found = kernels.installed()
    except kernels.KernelError as exc:
        raise _Failure(str(exc), exc.exit_code)
    if not found:
        click.echo("no py-preload kernels installed")
    for name, directory, starter, exists in found:
        missing = "" if exists else "  (starter missing)"
        click.echo(f"{name}  {starter}{missing}  {directory}")


@kernel.command(name="remove", short_help="Remove a py-preload kernel.",
                epilog=examples("py-preload kernel remove py-preload-python-tt"))
@click.argument("name")
def kernel_remove(name) -> None:
    """Remove the py-preload kernel NAME (other kernels are left to `jupyter kernelspec`)."""
    from preloaded import kernel as kernels

    try:
        directory = kernels.remove(name)
    except kernels.KernelError as exc:
        raise _Failure(str(exc), exc.exit_code)
    click.echo(f"removed kernel {name} ({directory})", err=True)


if __name__ == "__main__":
    sys.exit(main())

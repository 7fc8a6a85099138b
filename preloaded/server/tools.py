"""Runs of tools that look at the interpreter as it starts: when a warm run cannot be exact.

A warm run begins with the server's modules imported. Most programs cannot tell; a few tools
can, because what they do depends on what is already in ``sys.modules`` when they start:

- pytest marks the modules of every distribution that has a ``pytest11`` entry point for
  assertion rewriting, and warns (``PytestAssertRewriteWarning: Module already imported so
  cannot be rewritten``) about those already imported: with ``filterwarnings = ["error"]`` the
  session fails before any test runs. Under python those modules are imported later, through
  pytest's rewriting hook. Dropping them from ``sys.modules`` would not help: the server's other
  modules hold the old ones (anyio's classes, imported by transformers, would exist twice).
  Such a run goes to the bundle's pytest server, whose state was built through that hook
  (``pytestserver``), unless a setting it was not built for says cold (``route``).
- coverage (``-m coverage``, ``--cov`` of pytest-cov, ``COVERAGE_PROCESS_START``) measures
  code as it is executed: the module-level code of the server's modules ran before it started,
  and coverage's own check of already imported modules crashes on torch (``torch.ops``).
- cProfile, profile and trace see the imports of python's run, not of a warm one.

The others go cold (python itself runs them) and the server logs why. A pytest run whose
plugins and tools are all absent from the server stays warm here: that one is exactly python's.
Learning (``learn.py``) never takes one of these modules either (``never_learned``).
"""

from __future__ import annotations

import os
import sys

from preloaded.server.pytestserver import named_plugins

# Modules that measure or trace the program from the interpreter's start (``-m NAME``).
TRACING_MODULES = frozenset({"coverage", "cProfile", "profile", "trace"})
PYTEST_MODULES = frozenset({"pytest", "py.test"})
# Whose presence changes how pytest or coverage start, besides the pytest11 distributions'.
TOOL_MODULES = frozenset({"pytest", "_pytest", "py", "coverage", "pytest_cov", "xdist"})
# Where pytest finds its configuration (``addopts`` may hold ``--cov``).
PYTEST_CONFIGS = ("pytest.ini", ".pytest.ini", "pyproject.toml", "tox.ini", "setup.cfg")
# Start coverage in every python process through a .pth (which a warm run never reads).
COVERAGE_ENV = ("COVERAGE_PROCESS_START", "COV_CORE_SOURCE")

_plugin_cache: dict = {}


def send_cold(conn, reason: str, log) -> None:
    """Tell the client to run python itself (``{"cold": reason}``: silently); log why."""
    log(f"cold run: {reason}")
    conn.reply({"cold": reason})


def route(request: dict) -> tuple:
    """Where the plain server sends ``request``: ("here", None), ("pytest", None) for the
    pytest server (``pytestserver``), or ("cold", reason)."""
    reason = cold_reason(request)
    if reason is None:
        return "here", None
    if reason is PYTEST_SERVER:
        return "pytest", None
    return "cold", reason


PYTEST_SERVER = "the pytest server"  # cold_reason's answer for a run that server takes


def cold_reason(request: dict) -> str | None:
    """Why ``request`` cannot run warm here because of a tool that looks at the interpreter
    (``PYTEST_SERVER``: the pytest server runs it), or None."""
    env = request["env"]
    for name in COVERAGE_ENV:
        if env.get(name):
            return f"{name} is set: coverage starts with the interpreter"
    mode, target = request["mode"], request["target"]
    if mode == "module" and target in TRACING_MODULES:
        return f"-m {target} must see the program from the interpreter's start"
    if mode == "script" and _tool_script(target) == "coverage":
        return f"{target} (coverage) must see the program from the interpreter's start"
    if mode == "module" and target in PYTEST_MODULES or mode == "script" and _tool_script(target):
        return _pytest_reason(request)
    return None


def _tool_script(target: str) -> str | None:
    """"coverage" or "pytest" for the console scripts of those tools (by name: a cold run of
    anything else that bears one of these names is still exact)."""
    name = os.path.basename(target)
    if name in ("coverage", "coverage3") or name.startswith("coverage-"):
        return "coverage"
    if name in ("pytest", "py.test"):
        return "pytest"
    return None


def _pytest_reason(request: dict) -> str | None:
    if _wants_coverage(request):
        return "pytest with --cov: coverage must start before the server's modules"
    if _assert_mode(request["argv"]) == "plain":
        return None  # no rewriting hook, no marking: nothing pytest does depends on sys.modules
    held = sorted(set(sys.modules) & tool_modules(_search_path(request)))
    held += [name for name in named_plugins(request) if name in sys.modules]
    if not held:
        return None
    unusual = _unusual_settings(request)
    if unusual:
        return f"pytest with {', '.join(held[:3])} already imported and {unusual}"
    return PYTEST_SERVER


def _assert_mode(argv: list) -> str | None:
    """The last ``--assert`` of the command line (it wins over addopts, which come first)."""
    mode = None
    for i, arg in enumerate(argv):
        if arg.startswith("--assert="):
            mode = arg.partition("=")[2]
        elif arg == "--assert" and i + 1 < len(argv):
            mode = argv[i + 1]
    return mode


# Settings that change which modules pytest rewrites, or how: the pytest server is built for
# none of them (any mention counts: such a run goes cold, which is always exact).
UNUSUAL = ("--assert", "enable_assertion_pass_hook", "python_files", "disable-plugin-autoload",
           "-c", "--config-file", "--rootdir", "--confcutdir", "--import-mode")  # fmt: skip


def _unusual_settings(request: dict) -> str | None:
    env = request["env"]
    if env.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        return "PYTEST_DISABLE_PLUGIN_AUTOLOAD set"
    opts = request["argv"][1:] + env.get("PYTEST_ADDOPTS", "").split()
    for arg in opts:
        if arg.startswith(UNUSUAL):
            return f"{arg} given"
    text = config_text(request["cwd"])
    for word in UNUSUAL[:4] + (" -p", "=-p", "\t-p", "\n-p"):
        if word in text:
            return f"{word.strip()} in a configuration file"
    return None


def _search_path(request: dict) -> tuple:
    """The directories the run's importlib.metadata will search: sys.path[0] (the cwd for -m,
    the script's directory), PYTHONPATH, then the server's path."""
    cwd, env = request["cwd"], request["env"]
    first = cwd if request["mode"] == "module" else os.path.dirname(
        os.path.realpath(os.path.join(cwd, request["target"] or "")))
    value = env.get("PYTHONPATH", "")
    extra = [os.path.join(cwd, p) for p in value.split(os.pathsep)] if value else []
    return tuple([first] + extra + [p for p in sys.path if p])


def tool_modules(path=None) -> frozenset:
    """Top-level names of pytest, coverage and every ``pytest11`` distribution on ``path``.

    The same names pytest marks for rewriting (the top-level modules and packages listed in a
    plugin distribution's files), plus the entry points' own and ``top_level.txt``'s. Cached
    per directory (the server retires when site-packages change): ~50 ms for a venv of 70
    distributions, once.
    """
    names = set(TOOL_MODULES)
    for directory in sys.path if path is None else path:
        found = _plugin_cache.get(directory)
        if found is None:
            found = _plugin_cache[directory] = _plugin_modules(directory)
        names |= found
    return frozenset(names)


def _plugin_modules(directory: str) -> frozenset:
    from importlib import metadata

    names: set = set()
    for dist in metadata.distributions(path=[directory]):
        try:
            eps = [ep for ep in dist.entry_points if ep.group == "pytest11"]
            if not eps:
                continue
            names.update(ep.value.split(":")[0].split(".")[0].strip() for ep in eps)
            names.update(_top_level(dist))
        except Exception:  # a broken distribution: pytest itself would skip it too
            continue
    return frozenset(n for n in names if n.isidentifier())


def _top_level(dist) -> set:
    names = set((dist.read_text("top_level.txt") or "").split())
    for file in dist.files or ():
        parts = str(file).split("/")
        if len(parts) == 1 and parts[0].endswith(".py"):
            names.add(parts[0][:-3])
        elif len(parts) == 2 and parts[1] == "__init__.py":
            names.add(parts[0])
    return names


def _wants_coverage(request: dict) -> bool:
    """Does pytest-cov have a ``--cov`` to act on: on the command line, in PYTEST_ADDOPTS, or in
    a configuration file pytest could read (any mention counts: cold is always exact)."""
    if any(a.startswith("--cov") for a in request["argv"]):
        return True
    if "--cov" in request["env"].get("PYTEST_ADDOPTS", ""):
        return True
    return "--cov" in config_text(request["cwd"])


def _ancestors(directory: str) -> list:
    found = [directory]
    while True:
        parent = os.path.dirname(directory)
        if parent == directory:
            return found
        found.append(parent)
        directory = parent


def config_text(cwd: str) -> str:
    """Every configuration file pytest could read for a run in ``cwd``, as one text."""
    texts = []
    for directory in _ancestors(cwd):
        for name in PYTEST_CONFIGS:
            try:
                with open(os.path.join(directory, name), "rb") as f:
                    texts.append(f.read(1 << 20).decode("utf-8", "replace"))
            except OSError:
                continue
    return "\n".join(texts)


def never_learned(name: str, path=None) -> bool:
    """May learning import ``name``? Not a module whose presence changes how a tool starts."""
    return name.partition(".")[0] in tool_modules(path)

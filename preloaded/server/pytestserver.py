"""The pytest server: a second server of a bundle whose warm state is built as pytest builds it.

A pytest run marks the modules of every ``pytest11`` distribution (anyio's, which transformers
imports) for assertion rewriting and warns ("Module already imported so cannot be rewritten")
about those already imported by another loader: a bundle's plain server holds them imported
the ordinary way, so its children cannot run pytest exactly. This server is started by the plain
one on the first pytest run (that run goes cold) and builds its state in pytest's order:

1. ``import pytest`` and the builtin plugins (``get_config``), as every pytest run does first;
2. pytest's own rewriting hook installed and the plugin distributions' modules marked, with the
   very calls pytest makes at its start (``install_importhook``, ``_mark_plugins_for_rewrite``)
   and the default ini values (``python_files``, no ``enable_assertion_pass_hook``);
3. the bundle's modules imported through that hook: anyio's modules come out rewritten, as
   under python, where the test modules import transformers while the hook is installed;
4. the hook taken out of ``sys.meta_path``: the run's pytest installs its own, and finds the
   marked modules loaded by a hook of its own class (``mark_rewrite``): no warning.

Nothing of this is in the plain server: its runs (and its probe, its learning) never see pytest.
The plain server hands a pytest run's connection over (``adopt``, the client's socket and stdio
by SCM_RIGHTS): the client never knows. Where the state depends on the command line or the
configuration in a way this server was not built for, the plain server keeps the run (exact) or
sends it cold (see ``tools.route``); this server checks what only it can: plugins named by
``-p``, ``PYTEST_PLUGINS`` or a conftest's ``pytest_plugins`` that it holds, loaded otherwise.

xdist: an ``-n``/``--tx`` run's ``sys.executable`` is the starter (only in the controller, which
runs no test), so that its workers start as warm children of this server (``is_worker``).
"""

from __future__ import annotations

import ast
import contextlib
import os
import re
import sys

FLAVOUR = "pytest"
# What execnet's popen gateway runs (xdist's workers): ``PYTHON -u -c LINE``.
EXECNET_BOOTSTRAP = "import sys;exec(eval(sys.stdin.readline()))"
DEFAULT_FILES = ["test_*.py", "*_test.py"]  # pytest's default python_files
MAX_DIRS = 3000  # a tree larger than this is not scanned for conftest.py: the run goes cold
PLUGINS: set = set()  # the entry points' names whose modules this server imported
_HOOK = None  # this server's hook: learned modules are imported through it too
_XDIST = re.compile(r"(?:^|[\s\"'=,\[])(?:-n\s*\S|--numprocesses|--tx|-d\b|--dist)")


def prepare():
    """Steps 1 and 2 above: return the installed hook (before the bundle's modules import)."""
    import importlib

    import pytest  # noqa: F401  (first, as in every pytest run)
    from _pytest.assertion import install_importhook
    from _pytest.config import default_plugins, get_config

    for name in default_plugins:  # what get_config imports: their imports' reads are recorded
        importlib.import_module(f"_pytest.{name}")
    with _unrecorded():
        config = get_config()
        # The ini values the rewriting depends on, as pytest's defaults (a project that sets
        # them is not sent here: tools.route).
        config._inicache.update(python_files=list(DEFAULT_FILES),
                                enable_assertion_pass_hook=False)  # fmt: skip
        global _HOOK
        _HOOK = hook = install_importhook(config)
        mark = config._mark_plugins_for_rewrite
        # pytest 9: (hook, disable_autoload); 7 and 8 read PYTEST_DISABLE_PLUGIN_AUTOLOAD (a
        # run with it set never comes here: tools.route)
        if mark.__code__.co_argcount > 2:
            mark(hook, False)
        else:
            mark(hook)
    _load_plugins()
    return hook


@contextlib.contextmanager
def _unrecorded():
    """Reads of the environment by the making of this server's own Config (the terminal's size,
    the locale, PYTEST_DEBUG): not state any child inherits (each run's pytest makes its own
    Config and reads them itself), so no dependency of the warm state (envdeps)."""
    classes = [(env, env.__class__) for env in (os.environ, getattr(os, "environb", None))
               if env is not None]  # fmt: skip
    for env, _cls in classes:
        env.__class__ = os._Environ  # type: ignore[attr-defined]  # not the recorder
    try:
        yield
    finally:
        for env, cls in classes:
            env.__class__ = cls


def _load_plugins() -> None:
    """Import the ``pytest11`` entry points' modules as pluggy's load_setuptools_entrypoints
    does (same order, first of a name only), through the hook: each pytest run imports them
    (hypothesis's alone costs a second). A run that blocks one (``-p no:NAME``) goes cold."""
    import importlib.metadata

    for dist in list(importlib.metadata.distributions()):
        for ep in dist.entry_points:
            if ep.group == "pytest11" and ep.name not in PLUGINS:
                ep.load()
                PLUGINS.add(ep.name)


def finish(hook) -> None:
    """Step 4: the run's pytest installs a hook of its own; python's run has only that one."""
    if hook in sys.meta_path:
        sys.meta_path.remove(hook)


@contextlib.contextmanager
def hook_installed():
    """Around a learned import of the pytest server: through the hook, as the test modules'
    imports go under python (nothing in any other server)."""
    if _HOOK is None or _HOOK in sys.meta_path:
        yield
        return
    sys.meta_path.insert(0, _HOOK)
    try:
        yield
    finally:
        sys.meta_path.remove(_HOOK)


def is_pytest(request: dict) -> bool:
    mode, target = request["mode"], request["target"]
    if mode == "module":
        return target in ("pytest", "py.test")
    return mode == "script" and os.path.basename(target) in ("pytest", "py.test")


def is_worker(request: dict) -> bool:
    """execnet's popen bootstrap: what xdist's workers run."""
    return request["mode"] == "code" and request["target"] == EXECNET_BOOTSTRAP


def wants_workers(request: dict, config_text: str) -> bool:
    """Will this pytest run start xdist workers with ``sys.executable``?"""
    opts = " ".join(request["argv"][1:]) + " " + request["env"].get("PYTEST_ADDOPTS", "")
    # Only an addopts line of a configuration file (a tox.ini's "pytest -n 2" is no option of
    # this run; a continuation line is missed: its workers then start cold, which is exact).
    addopts = [line for line in config_text.splitlines() if line.strip().startswith("addopts")]
    return bool(_XDIST.search(opts) or any(_XDIST.search(line) for line in addopts))


def cold_reason(request: dict) -> str | None:
    """Why this server cannot run ``request`` exactly, or None."""
    if is_worker(request):
        return None
    if not is_pytest(request):
        return "not a pytest run"
    blocked = [n for n in blocked_plugins(request) if n in PLUGINS or "pytest_" + n in PLUGINS]
    if blocked:
        return f"pytest: -p no:{blocked[0]} blocks a plugin this server imported"
    named = named_plugins(request)
    found = conftest_plugins(request)
    if found is None:
        return "pytest: conftest.py files not scanned (too many directories, or unreadable)"
    for name in named + found:
        if _loaded_otherwise(name):
            return f"pytest: plugin {name} already imported, not through the rewriting hook"
    return None


def _loaded_otherwise(name: str) -> bool:
    """Would pytest's ``mark_rewrite(name)`` warn in a child of this server?"""
    module = sys.modules.get(name)
    if module is None:
        return False
    from _pytest.assertion.rewrite import AssertionRewriter, AssertionRewritingHook

    if AssertionRewriter.is_rewrite_disabled(module.__doc__ or ""):
        return False
    return not isinstance(getattr(module, "__loader__", None), AssertionRewritingHook)


def named_plugins(request: dict) -> list:
    """Plugins named by ``-p NAME`` and ``PYTEST_PLUGINS``: pytest marks each for rewriting
    (and warns if it is already imported) before importing it."""
    argv, names = request["argv"], []
    for i, arg in enumerate(argv):
        if arg == "-p" and i + 1 < len(argv):
            names.append(argv[i + 1])
        elif arg.startswith("-p") and not arg.startswith("--"):
            names.append(arg[2:])
    names += request["env"].get("PYTEST_PLUGINS", "").split(",")
    return [name.strip() for name in names if name.strip() and not name.startswith("no:")]


def blocked_plugins(request: dict) -> list:
    """The NAMEs of ``-p no:NAME`` (command line and PYTEST_ADDOPTS)."""
    argv = request["argv"][1:] + request["env"].get("PYTEST_ADDOPTS", "").split()
    names = []
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "-p" and i + 1 < len(argv) else arg[2:]
        if arg.startswith("-p") and not arg.startswith("--") and value.startswith("no:"):
            names.append(value[3:])
    return names


def conftest_plugins(request: dict) -> list | None:
    """The names in ``pytest_plugins`` of every conftest.py pytest could load for this run: in
    the cwd's tree and its ancestors, and in those of path arguments (more than pytest reads:
    only a run sent cold for nothing). None when that cannot be known."""
    cwd = request["cwd"]
    roots = [cwd] + [os.path.join(cwd, a) for a in request["argv"][1:]
                     if not a.startswith("-") and os.path.exists(os.path.join(cwd, a))]
    names: list = []
    files: set = set()
    for root in roots:
        found = _conftests(root if os.path.isdir(root) else os.path.dirname(root))
        if found is None:
            return None
        files |= found
    for path in sorted(files):
        got = _plugins_of(path)
        if got is None:
            return None
        names += got
    return names


def _conftests(root: str) -> set | None:
    found = set()
    directory = os.path.realpath(root)
    while True:  # the ancestors' (up to the rootdir, under pytest; here up to /)
        found.add(os.path.join(directory, "conftest.py"))
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    count = 0
    for top, dirs, files in os.walk(os.path.realpath(root)):
        count += 1
        if count > MAX_DIRS:
            return None
        # A virtual environment and dot-directories pytest never collects (norecursedirs).
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"
                   and not os.path.exists(os.path.join(top, d, "pyvenv.cfg"))]
        if "conftest.py" in files:
            found.add(os.path.join(top, "conftest.py"))
    return {path for path in found if os.path.isfile(path)}


def _plugins_of(path: str) -> list | None:
    """``pytest_plugins`` of one conftest.py: [] without one; None when not a literal."""
    try:
        with open(path, "rb") as f:
            source = f.read()
    except OSError:
        return None
    if b"pytest_plugins" not in source:
        return []
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []  # pytest fails on it the same way warm or cold
    names: list = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.AugAssign, ast.AnnAssign)) and \
                getattr(node.target, "id", None) == "pytest_plugins":  # fmt: skip
            return None
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(t, ast.Name) and t.id == "pytest_plugins" for t in targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return None
            names += [value] if isinstance(value, str) else list(value)
        elif isinstance(node, ast.Name) and node.id == "pytest_plugins" and \
                not isinstance(node.ctx, ast.Store):  # fmt: skip
            return None  # computed (pytest_plugins += ...): unknown
    return [n for n in names if isinstance(n, str)]

"""What a bundle needs installed, and installing it with uv into a shared overlay directory.

A bundle's requirements (``-p``, ``-r``, a script's PEP 723 block, distributions inferred for
unimportable modules) that the bundle's interpreter does not already satisfy are installed into
``$XDG_CACHE_HOME/py-preload/overlays/<key>``, ``<key>`` a hash of the interpreter's tag and
the requirement set: bundles with the same set share one overlay. The server puts the overlay
first on ``sys.path``; a cold run gets it through ``PYTHONPATH``.

An install goes into a temporary directory under a file lock and is renamed into place only
once uv succeeded and the completion marker is written: an interrupted or failed install leaves
nothing that looks installed, and the next run tries again. Not on the starter path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from preloaded.client.overlay import MARKER
from preloaded.paths import cache_dir


class InstallError(Exception):
    """Bad requirements or a failed install; the message is one paragraph for the user."""


# Import name -> distribution, for modules named in a bundle that are not importable and that
# no requirement provides. Names equal to their distribution are listed too: only these are
# guessed, anything else must be passed with -p.
INFER = {
    "torch": "torch", "torchvision": "torchvision", "torchaudio": "torchaudio",
    "transformers": "transformers", "numpy": "numpy", "scipy": "scipy", "pandas": "pandas",
    "cv2": "opencv-python-headless", "sklearn": "scikit-learn", "PIL": "pillow",
    "yaml": "pyyaml", "skimage": "scikit-image", "bs4": "beautifulsoup4",
    "dateutil": "python-dateutil", "dotenv": "python-dotenv", "jwt": "pyjwt",
    "huggingface_hub": "huggingface-hub", "sentence_transformers": "sentence-transformers",
    "tokenizers": "tokenizers", "safetensors": "safetensors", "accelerate": "accelerate",
    "datasets": "datasets", "diffusers": "diffusers", "sentencepiece": "sentencepiece",
    "matplotlib": "matplotlib", "requests": "requests", "httpx": "httpx", "tqdm": "tqdm",
    "attr": "attrs", "attrs": "attrs", "pydantic": "pydantic", "fastapi": "fastapi",
    "uvicorn": "uvicorn", "flask": "flask", "django": "django", "sqlalchemy": "sqlalchemy",
    "psycopg2": "psycopg2-binary", "lxml": "lxml", "zmq": "pyzmq", "serial": "pyserial",
    "Crypto": "pycryptodome", "OpenSSL": "pyopenssl", "fitz": "pymupdf", "docx": "python-docx",
    "einops": "einops", "timm": "timm", "peft": "peft", "onnxruntime": "onnxruntime",
    "polars": "polars", "numba": "numba", "sympy": "sympy", "networkx": "networkx",
    "xgboost": "xgboost", "lightgbm": "lightgbm", "tiktoken": "tiktoken", "openai": "openai",
    "anthropic": "anthropic", "jax": "jax", "tensorflow": "tensorflow", "keras": "keras",
    "nltk": "nltk", "spacy": "spacy", "regex": "regex", "rich": "rich", "click": "click",
}  # fmt: skip

# Run by the bundle's interpreter (stdlib only, any python 3.9+): what it has installed, its
# marker environment and tag, its stdlib module names.
PROBE = """\
import json, os, platform, sys, sysconfig
from importlib import metadata
dists = {}
for dist in metadata.distributions():
    name = dist.metadata["Name"]
    if name:
        dists.setdefault(name, dist.version)
impl = sys.implementation
iver = "{0.major}.{0.minor}.{0.micro}".format(impl.version)
env = {
    "implementation_name": impl.name, "implementation_version": iver,
    "os_name": os.name, "platform_machine": platform.machine(),
    "platform_release": platform.release(), "platform_system": platform.system(),
    "platform_version": platform.version(), "python_full_version": platform.python_version(),
    "platform_python_implementation": platform.python_implementation(),
    "python_version": ".".join(platform.python_version_tuple()[:2]), "sys_platform": sys.platform,
}
tag = [impl.cache_tag, sysconfig.get_platform(), getattr(sys, "abiflags", "")]
stdlib = sorted(getattr(sys, "stdlib_module_names", ()))
print(json.dumps({"dists": dists, "env": env, "tag": tag, "stdlib": stdlib}))
"""


def canonical_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_requirement(spec: str, where: str):
    """A ``packaging`` Requirement, or InstallError naming ``where`` it came from."""
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        return Requirement(spec)
    except InvalidRequirement as exc:
        why = str(exc).splitlines()[0]  # packaging adds the line and a caret below it
        raise InstallError(f"{where}: {spec!r} is not a valid requirement: {why}") from None


def normalize(req) -> str:
    """One spelling per requirement, so that equal sets hash equally."""
    text = canonical_name(req.name)
    if req.extras:
        text += "[" + ",".join(sorted(canonical_name(e) for e in req.extras)) + "]"
    if req.url:
        text += " @ " + req.url
    elif req.specifier:
        text += ",".join(sorted(str(s) for s in req.specifier))
    if req.marker:
        text += ("; " if req.url else " ; ") + str(req.marker)
    return text


def read_requirements_file(path: str) -> list:
    """Requirement lines of a requirements file (comments and blank lines skipped)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise InstallError(f"cannot read requirements file {path}: {exc.strerror}") from None
    specs = []
    for number, line in enumerate(lines, 1):
        line = re.sub(r"(^|\s)#.*", "", line).strip()
        if not line:
            continue
        if line.startswith("-"):
            raise InstallError(
                f"{path}:{number}: option lines ({line.split()[0]}) are not supported; list "
                "requirements only, and set UV_INDEX_URL or UV_FIND_LINKS for where to find them"
            )
        specs.append((line, f"{path}:{number}"))
    return specs


PEP723 = re.compile(
    r"(?m)^# /// (?P<type>[a-zA-Z0-9-]+)$\s(?P<content>(^#(| .*)$\s)+)^# ///$"
)


def script_metadata(path: str) -> tuple:
    """(source text, the PEP 723 ``script`` table or {}) of a script."""
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise InstallError(f"cannot read script {path}: {exc}") from None
    blocks = [m for m in PEP723.finditer(source) if m.group("type") == "script"]
    if len(blocks) > 1:
        raise InstallError(f"{path}: more than one '# /// script' block (PEP 723 allows one)")
    if not blocks:
        return source, {}
    content = "".join(
        line[2:] if line.startswith("# ") else line[1:]
        for line in blocks[0].group("content").splitlines(keepends=True)
    )
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # the same parser, before it joined the standard library (PEP 680)
        import tomli as tomllib

    try:
        table = tomllib.loads(content)
    except tomllib.TOMLDecodeError as exc:
        raise InstallError(f"{path}: the '# /// script' block is not valid TOML: {exc}") from None
    deps = table.get("dependencies", [])
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        raise InstallError(f"{path}: 'dependencies' in the script block must be a list of strings")
    return source, table


def script_imports(source: str, path: str) -> list:
    """Absolute imports at the top level of a script (also under module-level if/try/with)."""
    import ast

    try:
        tree = ast.parse(source, path)
    except SyntaxError as exc:
        raise InstallError(f"{path}:{exc.lineno}: cannot parse the script: {exc.msg}") from None
    names: list = []
    stack = list(tree.body)
    while stack:
        node = stack.pop(0)
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module != "__future__":
                names.append(node.module)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            nested = []
            for field in ("body", "handlers", "orelse", "finalbody"):
                for child in getattr(node, field, []):
                    nested += child.body if isinstance(child, ast.ExceptHandler) else [child]
            stack[0:0] = nested  # in source order
    return list(dict.fromkeys(names))


def probe(python: str) -> dict:
    proc = subprocess.run([python, "-I", "-c", PROBE], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise InstallError(f"{python} failed to list its packages: {last}")
    return json.loads(proc.stdout)


def satisfied(req, info: dict) -> bool:
    """Whether the interpreter already has ``req`` (extras and URLs are always installed)."""
    if req.url or req.extras:
        return False
    versions = {canonical_name(k): v for k, v in info["dists"].items()}
    version = versions.get(canonical_name(req.name))
    if version is None:
        return False
    return not req.specifier or req.specifier.contains(version, prereleases=True)


def to_install(reqs: list, info: dict) -> list:
    """Normalized requirements the interpreter lacks (markers false for it are dropped)."""
    wanted = []
    for req in reqs:
        if req.marker and not req.marker.evaluate(info["env"]):
            continue
        if not satisfied(req, info):
            wanted.append(normalize(req))
    return sorted(set(wanted))


def overlay_path(requirements: list, info: dict) -> str:
    """The overlay of a requirement set for this interpreter tag (python version, platform)."""
    text = json.dumps({"tag": info["tag"], "requirements": sorted(requirements)})
    key = hashlib.sha256(text.encode()).hexdigest()[:24]
    return os.path.join(cache_dir(), "overlays", key)


def provided(module: str, reqs: list) -> bool:
    """Whether a requirement obviously provides ``module`` (same name, or the inferred one)."""
    top = module.split(".")[0]
    names = {canonical_name(r.name) for r in reqs}
    return canonical_name(top) in names or canonical_name(INFER.get(top, "-")) in names


# -- installing ---------------------------------------------------------------------------------


def is_installed(overlay: str) -> bool:
    return os.path.exists(os.path.join(overlay, MARKER))


def ensure(overlay: str, requirements: list, python: str, stream=None) -> bool:
    """Install ``requirements`` into ``overlay`` unless done; True if this call installed.

    Concurrent callers (first runs of any bundle sharing the overlay, ``py-preload install``)
    queue on a file lock and all but the first find it installed.
    """
    from filelock import FileLock

    if is_installed(overlay):
        return False
    parent = os.path.dirname(overlay)
    os.makedirs(parent, mode=0o700, exist_ok=True)
    with FileLock(overlay + ".lock"):
        if is_installed(overlay):
            return False
        _remove_leftovers(overlay)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(overlay) + ".", suffix=".tmp", dir=parent)
        try:
            _run_uv(tmp, requirements, python, Progress(stream or sys.stderr, requirements))
            with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
                json.dump({"requirements": requirements, "python": python}, f)
            if os.path.lexists(overlay):  # a directory without a marker: not ours to trust
                shutil.rmtree(overlay)
            os.rename(tmp, overlay)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return True


def _remove_leftovers(overlay: str) -> None:
    """Temporary directories of installs that were killed (we hold the lock: none is live)."""
    parent, name = os.path.split(overlay)
    for entry in os.listdir(parent):
        if entry.startswith(name + ".") and entry.endswith(".tmp"):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def uv_command(target: str, requirements: list, python: str) -> list:
    try:
        import uv
    except ImportError:
        raise InstallError(f"py-preload: cannot install {', '.join(requirements)}: uv is not "
                           f"installed for {sys.executable}; pip install uv there") from None
    return [uv.find_uv_bin(), "pip", "install", "--target", target, "--python", python,
            "--color", "never", "--no-progress", *requirements]  # fmt: skip


def _run_uv(target: str, requirements: list, python: str, progress) -> None:
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as err:
        command = uv_command(target, requirements, python)
        try:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        except OSError as exc:
            names = ", ".join(requirements)
            raise InstallError(f"py-preload: cannot run uv to install {names}: {exc}") from None
        progress.start(err.fileno())
        try:
            while proc.poll() is None:
                progress.tick(target)
                time.sleep(0.1)
        except BaseException:
            proc.kill()  # Ctrl-C or SIGTERM: uv goes too, and the caller removes the directory
            proc.wait()
            progress.clear()
            raise
        progress.done(target, proc.returncode == 0)
        if proc.returncode != 0:
            err.seek(0)
            raise InstallError(explain(requirements, err.read(), proc.returncode))


# uv's wording for each kind of failure (uv 0.13), and what to suggest.
FAILURES = (
    (r"failed to build|build backend|failed to prepare|setup\.py", "building {names} failed",
     "install what it needs to build, or pin a version that has a wheel for this Python"),
    (r"error sending request|failed to fetch|connection|dns|network|timed out|offline|"
     r"not found in the cache", "the package index could not be reached for {names}",
     "check the network or proxy, or point UV_INDEX_URL / UV_FIND_LINKS at an index you can reach"),
    (r"no version of|there is no version|only .* available|versions? .* (is|are) available",
     "no version of {names} matches", "check the version (uv pip install NAME== lists them)"),
    (r"was not found in|not found in the package registry|no matching distribution",
     "no package {names} was found", "check the name (the distribution's name on PyPI, e.g. "
     "pillow for PIL), and the index (UV_INDEX_URL, UV_FIND_LINKS)"),
)  # fmt: skip


def explain(requirements: list, output: str, code: int) -> str:
    """One paragraph: which requirement failed, why, what to try, and uv's own words."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", output)
    lower = text.lower()
    named = [r for r in requirements if _name_of(r) in lower.replace("_", "-")]
    names = ", ".join(named or requirements)
    reason, hint = f"uv failed (exit status {code}) installing {names}", "see uv's message"
    for pattern, what, tip in FAILURES:
        if re.search(pattern, lower):
            reason, hint = what.format(names=names), tip
            break
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if line.startswith("error:")), 0)
    said = " ".join(lines[start:]).removeprefix("error: ")  # from uv's error on, no preamble
    if len(said) > 500:
        said = said[:500] + " ..."
    return (f"py-preload: cannot install {names}: {reason}. Try: {hint}. Nothing was installed; "
            f"the next run tries again. uv said: {said}")  # fmt: skip


def _name_of(requirement: str) -> str:
    return canonical_name(re.split(r"[\s\[<>=!~;@]", requirement, maxsplit=1)[0])


class Progress:
    """On a terminal, one line saying what uv is doing, redrawn only when its text changes;
    otherwise one line at the start and one at the end.

    uv reports its phases on stderr (a file here, so it draws no bars of its own): "Resolved N
    packages", "Downloading NAME (SIZE)" and " Downloaded NAME" for large files, "Prepared",
    "Installed". The line follows that report as it grows, then counts what has landed in the
    target directory; the seconds shown are whole seconds elapsed, never rounded up.
    """

    def __init__(self, stream, requirements: list) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.requirements = requirements
        self.started = 0.0
        self.report = UvReport()
        self.report_fd = -1
        self.shown = ""
        self.last_walk = 0.0
        self.landed = (0, 0)

    def start(self, report_fd: int = -1) -> None:
        self.started = time.monotonic()
        self.report_fd = report_fd
        self._write(f"py-preload: installing {', '.join(self.requirements)} with uv", self.tty)

    def tick(self, target: str) -> None:
        if not self.tty:
            return
        if self.report_fd >= 0:
            self.report.read(self.report_fd)
        now = time.monotonic()
        if self.report.prepared and now - self.last_walk >= 0.5:  # uv is linking into target
            self.last_walk = now
            self.landed = measure(target)
        line = (f"py-preload: installing {', '.join(self.requirements)}: "
                f"{self.report.state(*self.landed)}, {int(now - self.started)} s")  # fmt: skip
        if line != self.shown:
            self._write(line, True)

    def done(self, target: str, ok: bool) -> None:
        self.clear()
        if ok:
            count, size = measure(target)
            self._write(f"py-preload: installed {count} package(s), {size / 1e6:.0f} MB, "
                        f"in {time.monotonic() - self.started:.1f} s", False)  # fmt: skip

    def clear(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = ""

    def _write(self, line: str, transient: bool) -> None:
        if transient:
            self.stream.write("\r\x1b[K" + line)
            self.shown = line
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
_REPORT = re.compile(r"^(?:Resolved (?P<resolved>\d+) packages?"
                     r"|Downloading (?P<name>\S+) \((?P<size>[\d.]+)(?P<unit>[KMG]?i?B)\)"
                     r"|\s*Downloaded (?P<got>\S+)"
                     r"|Prepared (?P<prepared>\d+) packages?)")  # fmt: skip


class UvReport:
    """What uv's stderr said so far (read with pread: uv shares the file's offset)."""

    def __init__(self) -> None:
        self.offset = 0
        self.partial = ""
        self.resolved = 0
        self.prepared = 0
        self.downloads: dict = {}  # name -> bytes, for the files uv reports downloading
        self.downloaded: set = set()

    def read(self, fd: int) -> None:
        try:
            data = os.pread(fd, 1 << 16, self.offset)
        except OSError:
            return
        self.offset += len(data)
        text = self.partial + data.decode("utf-8", "replace")
        *lines, self.partial = text.split("\n")
        for line in lines:
            self.feed(line)

    def feed(self, line: str) -> None:
        m = _REPORT.match(line)
        if not m:
            return
        if m["resolved"]:
            self.resolved = int(m["resolved"])
        elif m["name"]:
            self.downloads[m["name"]] = float(m["size"]) * _UNITS.get(m["unit"], 1)
        elif m["got"]:
            self.downloaded.add(m["got"])
        elif m["prepared"]:
            self.prepared = int(m["prepared"])

    def state(self, landed: int = 0, landed_bytes: int = 0) -> str:
        """The phase in words, with the counts known so far."""
        if self.prepared:
            return (f"{landed} of {self.prepared} package(s) in place, "
                    f"{landed_bytes / 1e6:.0f} MB")  # fmt: skip
        if not self.resolved:
            return "resolving"
        words = f"{self.resolved} package(s) to fetch"
        if self.downloads:
            got = sum(size for name, size in self.downloads.items() if name in self.downloaded)
            words += (f", downloaded {got / 1e6:.0f} of {sum(self.downloads.values()) / 1e6:.0f}"
                      f" MB in large files ({len(self.downloaded)} of {len(self.downloads)})")
        return words


def measure(target: str) -> tuple:
    """(distributions, bytes) installed so far under ``target``."""
    count = size = 0
    for root, dirs, files in os.walk(target):
        if root == target:
            count = sum(d.endswith(".dist-info") for d in dirs)
        for name in files:
            try:
                size += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return count, size


def main() -> None:
    """Entry of ``python -c`` from a starter's first run: install, or explain and exit 1."""
    import signal

    job = json.loads(sys.argv[1])
    # SIGTERM (and SIGHUP when the terminal goes) unwind like Ctrl-C: the temporary directory is
    # removed on the way out.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda s, f: sys.exit(128 + s))
    try:
        ensure(job["overlay"], job["requirements"], job["python"])
    except InstallError as exc:
        sys.stderr.write(str(exc) + "\n")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


# -- planning a bundle --------------------------------------------------------------------------


class Plan:
    """What ``bundle`` gathered: requirements (parsed, with where each came from), and modules."""

    def __init__(self) -> None:
        self.reqs: list = []  # packaging Requirements
        self.script_modules: list = []  # default modules read from --script (may be dropped)
        self.requires_python = None
        self.info = None

    def add(self, spec: str, where: str) -> None:
        self.reqs.append(parse_requirement(spec, where))

    def read(self, packages, requirement_files, script) -> None:
        for spec in packages:
            self.add(spec, "-p")
        for path in requirement_files:
            for spec, where in read_requirements_file(path):
                self.add(spec, where)
        if script:
            source, table = script_metadata(script)
            for spec in table.get("dependencies", []):
                self.add(spec, f"{script} (script dependencies)")
            self.requires_python = table.get("requires-python")
            self.script_modules = script_imports(source, script)

    def probe(self, python: str) -> dict:
        if self.info is None:
            self.info = probe(python)
        return self.info

    def default_modules(self, python: str) -> list:
        """The script's imports, without the standard library's."""
        stdlib = set(self.probe(python)["stdlib"]) | set(sys.builtin_module_names)
        return [m for m in self.script_modules if m.split(".")[0] not in stdlib]

    def resolve_missing(self, missing: list, modules: list, python: str) -> list:
        """Account for modules the interpreter cannot import; return the modules to preload.

        A module a requirement provides (same name) stays; a common one gets its distribution
        inferred; a script's import that nothing provides is dropped (a local module); any other
        is an error unless requirements still to be installed might provide it.
        """
        keep = []
        pending = bool(to_install(self.reqs, self.probe(python))) if self.reqs else False
        for name in modules:
            top = name.split(".")[0]
            if name not in missing or provided(name, self.reqs):
                keep.append(name)
            elif top in INFER:
                self.add(INFER[top], f"inferred for module {top}")
                keep.append(name)
            elif name in self.script_modules:
                continue
            elif pending:
                keep.append(name)
            else:
                raise InstallError(
                    f"module {name} is not importable by {python} and py-preload cannot tell "
                    f"which package provides it: pass -p DISTRIBUTION (e.g. -p {top})"
                )
        return keep

    def overlay(self, python: str) -> tuple:
        """(overlay directory or None, requirements to install into it)."""
        if not self.reqs and not self.requires_python:
            return None, []
        info = self.probe(python)
        if self.requires_python:
            from packaging.specifiers import InvalidSpecifier, SpecifierSet

            try:
                ok = SpecifierSet(self.requires_python).contains(
                    info["env"]["python_full_version"], prereleases=True)
            except InvalidSpecifier:
                raise InstallError(f"requires-python {self.requires_python!r} is not valid")
            if not ok:
                raise InstallError(
                    f"the script requires python {self.requires_python}, but {python} is "
                    f"{info['env']['python_full_version']}: pass --python PATH"
                )
        wanted = to_install(self.reqs, info)
        return (overlay_path(wanted, info) if wanted else None), wanted


def starter_config(path: str) -> dict:
    """The config dict a starter file was written with: the literal passed to ``main`` in a
    Python starter, the embedded JSON block in a native one."""
    import ast

    from preloaded.client import native

    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if native.is_native(head):
            config = native.read_config(path)
            if config is None:
                raise InstallError(f"{path} is not a starter written by py-preload bundle")
            return config
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError) as exc:
        raise InstallError(f"{path} is not a starter written by py-preload bundle: {exc}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "main" and node.args:
            try:
                config = ast.literal_eval(node.args[0])
            except ValueError:
                break
            if isinstance(config, dict) and "python" in config:
                return config
    raise InstallError(f"{path} is not a starter written by py-preload bundle")

"""Jupyter kernelspecs that start a warm kernel: ``FILE -m ipykernel_launcher -f {connection_file}``.

A starter runs ``-m ipykernel_launcher`` like python does, so Jupyter (JupyterLab, VS Code,
``jupyter console``) needs only a kernelspec naming the starter as its interpreter. Install,
list and remove go through jupyter_client's KernelSpecManager, so JUPYTER_DATA_DIR,
JUPYTER_PATH, ``--user``, ``--sys-prefix`` and ``--prefix`` mean what they mean to Jupyter.
jupyter_client is imported only here (the ``jupyter`` extra): the CLI says so if it is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

MARK = "py_preload"  # the kernelspec's metadata key that says a starter runs this kernel
INSTALL_HINT = "pip install 'py-preload[jupyter]'"

# Run by the bundle's interpreter, with the overlay where the server puts it (sys.path[1]):
# can the kernel's entry point be found there?
CHECK = """\
import importlib.util, sys
overlay = sys.argv[1]
if overlay:
    sys.path.insert(1, overlay)
sys.exit(0 if importlib.util.find_spec("ipykernel_launcher") else 3)
"""


class KernelError(Exception):
    """A one-line problem with ``exit_code`` (2: bad input or a missing package; 1: failure)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _manager():
    try:
        from jupyter_client.kernelspec import KernelSpecManager
    except ImportError:
        raise KernelError(f"py-preload kernel needs jupyter_client: {INSTALL_HINT}") from None
    return KernelSpecManager()


def default_name(starter: str) -> str:
    """``py-preload-<file name>``, lower-cased to the characters Jupyter allows in a name."""
    stem = os.path.basename(starter)
    stem = stem[: -len(".bin")] if stem.endswith(".bin") else stem
    stem = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-.") or "kernel"
    return f"py-preload-{stem}"


def _check_name(name: str) -> str:
    if not re.fullmatch(r"[a-z0-9._-]+", name):
        raise KernelError(f"{name!r} is not a kernel name (lower-case letters, digits, . _ -)")
    return name


def spec_for(starter: str, config: dict, display_name: str | None) -> dict:
    """The kernel.json of a warm kernel run by ``starter`` (an absolute path)."""
    modules = ", ".join(config.get("modules", []))
    return {
        "argv": [starter, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": display_name or f"Python (warm: {modules})",
        "language": "python",
        "interrupt_mode": "signal",  # SIGINT to the starter, which forwards it to the child
        "metadata": {"debugger": True, MARK: {"starter": starter}},
    }


def check_ipykernel(config: dict) -> None:
    """Raise KernelError unless the bundle's interpreter (with its overlay) has ipykernel."""
    overlay = config.get("overlay") or ""
    python = config["python"]
    try:
        proc = subprocess.run([python, "-c", CHECK, overlay], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=60)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelError(f"cannot run the bundle's interpreter {python}: {exc}", 1) from None
    if proc.returncode == 3:
        where = f"{python} (with its overlay {overlay})" if overlay else python
        raise KernelError(f"ipykernel is not installed for {where}: install it there, or bundle"
                          " with `-p ipykernel`")  # fmt: skip
    if proc.returncode != 0:
        last = (proc.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise KernelError(f"{python} failed: {last}", 1)


def install(starter: str, config: dict, name: str | None, display_name: str | None,
            user: bool, prefix: str | None) -> tuple:  # fmt: skip
    """Write the kernelspec; return (name, directory). ``config``: the starter's config."""
    starter = os.path.abspath(starter)
    name = _check_name(name or default_name(starter))
    manager = _manager()
    check_ipykernel(config)
    source = tempfile.mkdtemp(prefix="py-preload-kernel-")
    try:
        with open(os.path.join(source, "kernel.json"), "w", encoding="utf-8") as f:
            json.dump(spec_for(starter, config, display_name), f, indent=1)
        _copy_logos(source)
        try:
            where = manager.install_kernel_spec(source, name, user=user, prefix=prefix)
        except OSError as exc:
            raise KernelError(f"cannot install the kernelspec {name}: {exc}", 1) from None
    finally:
        shutil.rmtree(source, ignore_errors=True)
    return name, where


def _copy_logos(target: str) -> None:
    """ipykernel's logos, when the interpreter running py-preload has them (cosmetic only)."""
    try:
        from ipykernel.kernelspec import RESOURCES
    except ImportError:
        return
    for logo in ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg"):
        try:
            shutil.copy(os.path.join(RESOURCES, logo), target)
        except OSError:
            pass


def installed() -> list:
    """(name, directory, starter, starter exists) of every py-preload kernelspec Jupyter sees."""
    found = []
    for name, info in sorted(_manager().get_all_specs().items()):
        spec = info.get("spec") or {}
        mark = (spec.get("metadata") or {}).get(MARK)
        if isinstance(mark, dict):
            starter = str(mark.get("starter", ""))
            found.append((name, info.get("resource_dir", ""), starter, os.path.isfile(starter)))
    return found


def remove(name: str) -> str:
    """Remove the py-preload kernelspec ``name``; return the directory removed."""
    manager = _manager()
    ours = {entry[0]: entry for entry in installed()}
    if name not in ours:
        others = manager.find_kernel_specs()
        if name in others:
            raise KernelError(f"{name} is not a py-preload kernel (at {others[name]}); use"
                              " `jupyter kernelspec remove`")  # fmt: skip
        raise KernelError(f"no kernel named {name}")
    try:
        return manager.remove_kernel_spec(name)
    except OSError as exc:
        raise KernelError(f"cannot remove {name}: {exc}", 1) from None


def sys_prefix() -> str:
    """``--sys-prefix``: the environment py-preload (and so, usually, Jupyter) runs in."""
    return sys.prefix

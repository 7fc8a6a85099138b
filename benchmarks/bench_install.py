"""First-run install: uv into an empty overlay vs. `pip install --target`, and a second bundle.

Installs torch (the local CPU wheel in /opt/wheels) and transformers (from the local index
/opt/pypi/simple) into an empty directory, once with uv (py-preload's own install path) and
once with pip, each after a warm-up install that fills its cache; prints both times and their
ratio. Then times how long a second bundle with the same requirement set takes to be ready
(`py-preload bundle` + `py-preload install`, which finds the overlay installed). Works offline;
everything lives in a temporary directory. Usage:

    .venv/bin/python benchmarks/bench_install.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from preloaded.install import installer as install  # noqa: E402

PYTHON = sys.executable
REQUIREMENTS = ["torch==2.13.0", "transformers"]
WHEELS = "/opt/wheels"
INDEX = "file:///opt/pypi/simple"
UV_OVER_PIP = 3.0  # targets: uv at least this much faster; a second bundle ready within 1 s
SECOND_BUNDLE = 1.0


def timed(func, *args) -> float:
    start = time.perf_counter()
    func(*args)
    return time.perf_counter() - start


def uv_install(overlay: str, python: str) -> None:
    install.ensure(overlay, REQUIREMENTS, python, stream=open(os.devnull, "w"))


def pip_install(target: str) -> None:
    cmd = [PYTHON, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target",
           target, "--index-url", INDEX, "--find-links", WHEELS, *REQUIREMENTS]  # fmt: skip
    # This machine's pip configuration (extra indexes, constraints) is left out: same sources.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, env=env)


def cli(env: dict, *args: str) -> None:
    subprocess.run([PYTHON, "-m", "preloaded.cli", *args], check=True, env=env, cwd=REPO,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def main() -> None:
    tmp = tempfile.mkdtemp(prefix="bench-install-")
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    base = os.path.join(sys.base_prefix, "bin", f"python{version}")
    plain = os.path.join(tmp, "venv", "bin", "python")
    subprocess.run([base, "-m", "venv", "--without-pip", os.path.join(tmp, "venv")], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("UV_")}
    env.update(UV_NO_CONFIG="1", UV_INDEX_URL=INDEX, UV_FIND_LINKS=WHEELS,
               UV_CACHE_DIR=os.path.join(tmp, "uv-cache"),
               XDG_CACHE_HOME=os.path.join(tmp, "cache"),
               XDG_RUNTIME_DIR=os.path.join(tmp, "run"))  # fmt: skip
    os.makedirs(env["XDG_RUNTIME_DIR"], mode=0o700)
    os.environ.update(env)
    try:
        print(f"requirements: {' '.join(REQUIREMENTS)}"
              f" (torch from {WHEELS}, the rest from {INDEX})")
        warm_uv = timed(uv_install, os.path.join(tmp, "warmup-uv"), plain)
        uv_s = timed(uv_install, os.path.join(tmp, "overlay-uv"), plain)
        warm_pip = timed(pip_install, os.path.join(tmp, "warmup-pip"))
        pip_s = timed(pip_install, os.path.join(tmp, "target-pip"))
        print(f"uv, cold cache (warm-up):  {warm_uv:7.2f} s")
        print(f"pip, warm-up:              {warm_pip:7.2f} s")
        print(f"uv into an empty overlay:  {uv_s:7.2f} s")
        print(f"pip install --target:      {pip_s:7.2f} s")
        print(f"pip / uv:                  {pip_s / uv_s:7.1f} (target >= {UV_OVER_PIP:.0f})")
        args = ("bundle", "torch", "transformers", "--python", plain)
        cli(env, *args, "-o", os.path.join(tmp, "first.bin"))
        cli(env, "install", os.path.join(tmp, "first.bin"))  # installs (from uv's warm cache)
        second = os.path.join(tmp, "second.bin")
        ready = timed(lambda: (cli(env, *args, "-o", second), cli(env, "install", second)))
        print(f"second bundle ready:       {ready:7.2f} s (target < {SECOND_BUNDLE:.0f} s; "
              "bundle + install, overlay found)")  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Where ``py-preload run`` keeps the bundle of a script: keyed by what decides its contents.

Kept cheap (no interpreter probe, no resolution): a second ``run`` of the same script with the
same requirements finds its bundle and execs it at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

from preloaded.paths import cache_dir


def bundle_for(packages, requirement_files, python: str, script: str) -> str:
    """The cached bundle file for these inputs (not created here)."""
    from preloaded.install.installer import PEP723, script_imports, InstallError

    with open(script, encoding="utf-8", errors="replace") as f:
        source = f.read()
    block = "".join(m.group(0) for m in PEP723.finditer(source))
    try:
        imports = script_imports(source, script)
    except InstallError:
        imports = []  # python will report the syntax error when it runs the script
    files = []
    for path in requirement_files:
        with open(path, encoding="utf-8", errors="replace") as f:
            files.append(f.read())
    key = json.dumps({"python": os.path.abspath(python) if os.sep in python else python,
                      "packages": sorted(packages), "files": files, "block": block,
                      "imports": imports})  # fmt: skip
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(script))[:40]
    return os.path.join(cache_dir(), "run", f"{name}.{digest}.bin")

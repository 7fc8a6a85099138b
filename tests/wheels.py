"""Small pure-Python wheels and sdists written by the tests themselves (no network, no build)."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import tarfile
import zipfile


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode()


def write_wheel(directory, name: str, version: str, files: dict, requires=()) -> str:
    """Write ``name-version-py3-none-any.whl`` with ``files`` ({path: text}) into ``directory``."""
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    metadata = [f"Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    metadata += [f"Requires-Dist: {r}" for r in requires]
    contents = {path: text.encode() for path, text in files.items()}
    contents[f"{info}/METADATA"] = ("\n".join(metadata) + "\n").encode()
    contents[f"{info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: py-preload-tests\n"
                                 b"Root-Is-Purelib: true\nTag: py3-none-any\n")  # fmt: skip
    record = [f"{path},{_record_hash(data)},{len(data)}" for path, data in contents.items()]
    record.append(f"{info}/RECORD,,")
    contents[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = os.path.join(str(directory), f"{dist}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name_, data in contents.items():
            zf.writestr(name_, data)
    return path


FAILING_BACKEND = '''\
def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    raise RuntimeError("this package cannot be built (on purpose, for a test)")

def build_sdist(sdist_directory, config_settings=None):
    raise RuntimeError("no")

def get_requires_for_build_wheel(config_settings=None):
    return []
'''


def write_failing_sdist(directory, name: str, version: str) -> str:
    """An sdist whose in-tree build backend (no build requirements) always fails."""
    base = f"{name}-{version}"
    files = {
        "pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "backend"\n'
                          'backend-path = ["."]\n',
        "backend.py": FAILING_BACKEND,
        "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
    }
    path = os.path.join(str(directory), base + ".tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        for rel, text in files.items():
            data = text.encode()
            member = tarfile.TarInfo(f"{base}/{rel}")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return path

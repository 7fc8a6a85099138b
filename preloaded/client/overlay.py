"""The starter's side of a bundle's overlay (stdlib only): is it installed, install it if not.

Only the spawn and cold paths call ``ensure``: a warm run never looks at the overlay (the server
has it on ``sys.path`` and notices, through its staleness stamps, when it disappears).
"""

from __future__ import annotations

import os

MARKER = ".py-preload-complete"  # written last, inside the temporary directory, before the rename

INSTALL_BOOT = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from preloaded.install.installer import main; main()"
)


def ensure(config: dict) -> None:
    """Install the bundle's overlay if its marker is missing; exit 1 if that fails.

    The install runs in the interpreter that wrote the bundle (it has uv and filelock; the
    bundle's own interpreter may have nothing but the standard library).
    """
    overlay = config.get("overlay")
    if not overlay or os.path.exists(os.path.join(overlay, MARKER)):
        return
    import json
    import subprocess

    job = {"overlay": overlay, "requirements": config["requirements"], "python": config["python"]}
    argv = [config["installer"], "-c", INSTALL_BOOT, config["pkg_root"], json.dumps(job)]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    except OSError as exc:
        os.write(2, f"py-preload: cannot run the installer {config['installer']}: "
                    f"{exc.strerror}; run `py-preload install FILE`\n".encode())  # fmt: skip
        os._exit(1)
    code = _wait_ignoring_ctrl_c(proc)
    if code in (130, -2):  # interrupted: end by SIGINT, as python does on Ctrl-C
        import signal

        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    if code != 0:
        os._exit(1)


def _wait_ignoring_ctrl_c(proc) -> int:
    """Wait for the installer. Ctrl-C reaches it too (same process group): it stops uv, removes
    its temporary directory and exits 130; killing it from here would leave that to the next
    install."""
    import signal

    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGINT, old)

"""The warm-up hook: the server runs the bundle's ``warm.py``; its globals are ``preloaded.warm``.

Children inherit the module by fork, so what ``warm.py`` built (a tokenizer, a model on the CPU)
is shared copy-on-write by every run. CUDA must stay untouched in the server: while warm-up
runs, a line tracer (only in frames of ``warm.py``) checks ``torch.cuda.is_initialized()`` after
each line and names the line that initialised it. The idiom is "build on the CPU in warm-up,
move to the GPU in the child".
"""

from __future__ import annotations

import os
import sys
import time
import types

from preloaded.server.preload import ForkUnsafe, cuda_initialised

MODULE = "preloaded.warm"


class WarmupError(ForkUnsafe):
    """warm.py raised, or left the server unfit to fork (CUDA): the server does not start."""


class _CudaWatch:
    """A trace function active only in ``warm.py``'s frames: the first line after which CUDA
    is initialised is remembered (and the run stopped)."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.line: int | None = None  # the offending line
        self.last = 0

    def __call__(self, frame, event, arg):
        if frame.f_code.co_filename != self.filename:
            return None  # no line events in other code: only its calls cost anything
        return self._local

    def _local(self, frame, event, arg):
        if self.line is not None:
            return None
        if event == "line" or event == "return":
            if event == "return":
                self.last = frame.f_lineno
            if self.last and cuda_initialised():
                self.line = self.last
                raise WarmupError("CUDA initialised")  # stop warm.py here
            self.last = frame.f_lineno
        return self._local


def run(path: str, log) -> float:
    """Execute ``path`` as the module ``preloaded.warm``; return the seconds it took.

    Raises WarmupError with a message naming the file (and the line, or the traceback).
    """
    import preloaded

    try:
        with open(path, "rb") as f:
            source = f.read()
        code = compile(source, path, "exec", dont_inherit=True)
    except (OSError, SyntaxError, ValueError) as exc:
        raise WarmupError(f"warm-up {path} cannot be loaded: {type(exc).__name__}: {exc}") from exc
    module = types.ModuleType(MODULE, f"globals of the warm-up {os.path.basename(path)}")
    module.__file__ = path
    sys.modules[MODULE] = module
    preloaded.warm = module
    watch = _CudaWatch(code.co_filename)
    directory = os.path.dirname(path)
    old_cwd = os.getcwd()
    sys.path.insert(0, directory)  # as for a script: its own helpers are importable
    start = time.perf_counter()
    try:
        os.chdir(directory)  # relative paths in warm.py mean what they mean next to it
        sys.settrace(watch)
        try:
            exec(code, module.__dict__)
        finally:
            sys.settrace(None)
    except BaseException as exc:
        _forget(module)
        if watch.line is not None:
            raise WarmupError(_cuda_message(path, watch.line, source)) from None
        raise WarmupError(f"warm-up {path} raised {type(exc).__name__}: {exc}\n"
                          + _traceback(exc, code.co_filename)) from None  # fmt: skip
    finally:
        os.chdir(old_cwd)
        try:
            sys.path.remove(directory)
        except ValueError:
            pass
    if watch.line is not None or cuda_initialised():
        _forget(module)
        raise WarmupError(_cuda_message(path, watch.line, source))
    seconds = time.perf_counter() - start
    log(f"warm-up {path} ran in {seconds:.3f} s")
    return seconds


def _forget(module) -> None:
    import preloaded

    sys.modules.pop(MODULE, None)
    if getattr(preloaded, "warm", None) is module:
        del preloaded.warm


def _cuda_message(path: str, line: int | None, source: bytes) -> str:
    where = ""
    if line:
        lines = source.decode("utf-8", "replace").splitlines()
        text = lines[line - 1].strip() if 0 < line <= len(lines) else ""
        where = f" at line {line} ({text})" if text else f" at line {line}"
    return (f"warm-up {path} initialised CUDA{where}; forked children could not use the GPU."
            " Build on the CPU in warm-up and move to the GPU in the child")  # fmt: skip


def _traceback(exc: BaseException, filename: str) -> str:
    """The traceback from warm.py's first frame on (py-preload's own frames left out)."""
    import traceback

    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb)).rstrip("\n")

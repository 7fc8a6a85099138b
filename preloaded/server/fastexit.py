"""End a large child without making its run wait for the teardown of its memory.

A child forked from a server holding torch maps hundreds of MB; when it exits, the kernel
unmaps all of it (exit_mmap) *before* the process becomes a zombie, so the server's ``waitpid``
and the client's exit status wait for it (3-5 ms measured on the 2-core machines). The memory
is torn down only by the last task using it: a helper sharing it (``clone(CLONE_VM)``) that
outlives the child moves the teardown off the run's path. The helper only sleeps, then exits;
with ``CLONE_PARENT`` it is the server's child, which reaps it like any pid it does not know.
If anything here fails the child simply exits the usual way.
"""

from __future__ import annotations

import ctypes
import os

CLONE_VM = 0x100
CLONE_PARENT = 0x8000
HELPER_SLEEP_US = 5000  # the child reaches exit_mmap within microseconds; this is slack
STACK_SIZE = 64 << 10

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _clone = _libc.clone
    _clone.restype = ctypes.c_int
    _clone.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    # The helper runs C only: usleep(arg), then the clone trampoline's exit(2). Python code in a
    # task sharing the child's memory would corrupt the interpreter.
    _usleep = ctypes.cast(_libc.usleep, ctypes.c_void_p).value
    # Allocated in the server, before any fork: each child has its own copy, used once.
    _stack = ctypes.create_string_buffer(STACK_SIZE)
    _stack_top = (ctypes.addressof(_stack) + STACK_SIZE - 64) & ~0xF
except (OSError, AttributeError):  # not Linux/glibc: children exit the usual way
    _clone = None


def release_memory_later() -> None:
    """Close every fd (a helper must not keep a pipe or the terminal open) and start the helper
    that keeps this process's memory alive past its exit. Call right before ``os._exit``."""
    if _clone is None:
        return
    try:
        os.closerange(0, os.sysconf("SC_OPEN_MAX"))
    except (OSError, ValueError):
        return
    _clone(_usleep, _stack_top, CLONE_VM | CLONE_PARENT, HELPER_SLEEP_US)

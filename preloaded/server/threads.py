"""Thread counts that libraries fix when they are loaded: torch's intra-op threads, OpenBLAS's.

Loaded in the server, they were computed from the server's environment and CPU affinity (those
of the run that started it). A child must have the counts the library would have chosen for
its own caller. Each library's rule is reproduced here and checked against the server itself
(``calibrated``): if the rule does not give the server's own count, it is not trusted, and a
caller whose inputs differ from the server's runs cold. A value the rule does not understand
(``OMP_NUM_THREADS=2,1``, ``MKL_DYNAMIC``) runs cold too, when it differs from the server's.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys

from preloaded.server.peer import Cold

# Variables that change how MKL/OpenMP size their pools, beyond the two counts modelled here.
FIXED_AT_LOAD = ("MKL_DYNAMIC", "OMP_DYNAMIC", "MKL_DOMAIN_NUM_THREADS", "OMP_THREAD_LIMIT",
                 "MKL_THREADING_LAYER", "MKL_NUM_STRIPES", "KMP_AFFINITY", "GOMP_CPU_AFFINITY",
                 "OMP_PROC_BIND", "OMP_PLACES", "OMP_MAX_ACTIVE_LEVELS")  # fmt: skip
TORCH_VARS = ("MKL_NUM_THREADS", "OMP_NUM_THREADS")
OPENBLAS_VARS = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")


class Unknown(Cold):
    """A library's thread count for this caller cannot be known here: run cold."""


class Model:
    """The server's libraries and their counts; ``plan`` says what a child must set."""

    def __init__(self, affinity: list) -> None:
        self.affinity = affinity
        self.cores = _core_ids()
        self.libraries: dict = {}  # name -> _Library, found once the module is loaded

    def plan(self, env: dict, affinity: list, own_env) -> dict:
        """{"torch": n, "openblas": n} where the caller's count differs from the server's."""
        counts = {}
        for library in self._loaded():
            if not library.differs(env, affinity, own_env, self.affinity):
                continue
            want = library.rule(env, affinity, self.cores)
            if want is None or not library.calibrated(own_env, self.affinity, self.cores):
                raise Unknown(f"{library.name}'s thread count for this caller is unknown"
                              f" ({library.inputs(env, affinity)})")  # fmt: skip
            if want != library.count:
                counts[library.name] = want
        return counts

    def _loaded(self) -> list:
        found = []
        for name, module in (("torch", "torch"), ("openblas", "numpy")):
            if module not in sys.modules:
                continue
            if name not in self.libraries:
                self.libraries[name] = _Library.find(name)
            found.append(self.libraries[name])
        return found


class _Library:
    def __init__(self, name: str, count, rule, variables: tuple) -> None:
        self.name = name
        self.count = count  # the server's, read once (None: the library cannot be queried)
        self.rule = rule
        self.variables = variables + FIXED_AT_LOAD
        self._calibrated: bool | None = None

    @classmethod
    def find(cls, name: str) -> _Library:
        if name == "torch":
            torch = sys.modules["torch"]
            mkl = getattr(getattr(torch, "backends", None), "mkl", None)
            rule = _torch_mkl if mkl is not None and mkl.is_available() else _no_rule
            return cls(name, torch.get_num_threads(), rule, TORCH_VARS)
        get, _set = openblas_functions()
        return cls(name, get() if get else None, _openblas if get else _no_rule, OPENBLAS_VARS)

    def inputs(self, env, affinity) -> str:
        shown = [f"{v}={env[v]}" for v in self.variables if v in env]
        return ", ".join(shown + [f"{len(affinity)} CPU(s)"])

    def differs(self, env, affinity, own_env, own_affinity) -> bool:
        if any(env.get(v) != own_env.get(v) for v in FIXED_AT_LOAD):
            raise Unknown(f"{self.name}: {self._which(env, own_env)} differs from the server's,"
                          " which the library read when it was loaded")  # fmt: skip
        mine = [own_env.get(v) for v in self.variables], own_affinity
        return ([env.get(v) for v in self.variables], affinity) != mine

    def _which(self, env, own_env) -> str:
        return next(v for v in FIXED_AT_LOAD if env.get(v) != own_env.get(v))

    def calibrated(self, own_env, own_affinity, cores) -> bool:
        if self._calibrated is None:
            self._calibrated = self.count is not None and (
                self.rule(own_env, own_affinity, cores) == self.count)
        return self._calibrated


def _torch_mkl(env, affinity, cores: dict):
    """torch's intra-op default in an MKL build: at::init_num_threads sets OpenMP to
    mkl_get_max_threads(), which takes MKL_NUM_THREADS, else OMP_NUM_THREADS (capped at the
    machine's physical cores), else the physical cores among the CPUs the process may use."""
    for name in TORCH_VARS:
        value = env.get(name)
        if value is None:
            continue
        if not re.fullmatch(r"[1-9][0-9]{0,5}", value):
            return None  # MKL's handling of anything else was not pinned down here
        return min(int(value), _physical(cores, list(cores)))
    return _physical(cores, affinity)


def _openblas(env, affinity, cores: dict):
    """OpenBLAS's blas_get_cpu_number(): OPENBLAS_NUM_THREADS, else GOTO_NUM_THREADS, else
    OMP_NUM_THREADS (each read with atoi), capped at the CPUs the process may use."""
    available = min(os.cpu_count() or len(affinity), len(affinity))
    for name in OPENBLAS_VARS[:2]:
        wanted = _atoi(env.get(name))
        if wanted > 0:
            return min(wanted, available)
    wanted = _atoi(env.get("OMP_NUM_THREADS"))
    return min(wanted, available) if wanted > 0 else available


def _no_rule(env, affinity, cores):
    return None


def _atoi(value) -> int:
    match = re.match(r"\s*([+-]?[0-9]+)", value or "")
    return int(match.group(1)) if match else 0


def _physical(cores: dict, cpus: list) -> int:
    """Physical cores (package, core) among ``cpus``; a CPU without topology counts alone."""
    return len({cores.get(cpu, ("cpu", cpu)) for cpu in cpus}) or 1


def _core_ids() -> dict:
    """cpu number -> (package id, core id), from sysfs, for the online CPUs."""
    ids = {}
    base = "/sys/devices/system/cpu"
    try:
        names = os.listdir(base)
    except OSError:
        return ids
    for name in names:
        if not re.fullmatch(r"cpu[0-9]+", name):
            continue
        try:
            with open(f"{base}/{name}/topology/physical_package_id") as f:
                package = f.read().strip()
            with open(f"{base}/{name}/topology/core_id") as f:
                core = f.read().strip()
        except OSError:
            continue
        ids[int(name[3:])] = (package, core)
    return ids


def openblas_functions() -> tuple:
    """(get, set) of the OpenBLAS numpy loaded, or (None, None)."""
    path = _loaded_library("openblas")
    if path is None:
        return None, None
    try:
        lib = ctypes.CDLL(path)  # already loaded: the same handle, no new code runs
    except OSError:
        return None, None
    for prefix in ("scipy_openblas_", "openblas_", ""):
        for suffix in ("64_", ""):
            get = getattr(lib, f"{prefix}get_num_threads{suffix}", None)
            put = getattr(lib, f"{prefix}set_num_threads{suffix}", None)
            if prefix == "" and suffix == "":
                get = getattr(lib, "openblas_get_num_threads", None)
                put = getattr(lib, "openblas_set_num_threads", None)
            if get is not None and put is not None:
                get.restype = ctypes.c_int
                put.argtypes = [ctypes.c_int]
                return get, put
    return None, None


def _loaded_library(word: str) -> str | None:
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                path = line.rstrip("\n").partition("/")[2]
                name = os.path.basename(path)
                if word in name and ".so" in name:
                    return "/" + path
    except OSError:
        pass
    return None

"""py-preload: keep heavy Python imports warm behind a drop-in `python` starter."""

# Loaded on first use (module __getattr__, PEP 562): every warm run imports this package, and
# the executor pulls in concurrent.futures and cloudpickle.
_EXECUTOR_NAMES = ("Executor", "WorkerDied")


def __getattr__(name: str):
    if name in _EXECUTOR_NAMES:
        from preloaded.pool import executor

        return getattr(executor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Ray start-up shared by sharded comparisons and sweeps: the optional import, the session, attempt counts.

Ray is an optional extra (``quantlab[ray]``) imported only here, when asked for. ``"auto"`` is
Ray's default: the cluster named by ``RAY_ADDRESS`` or started by ``ray start`` on this machine,
else a new local instance sized to this machine; any other address connects to an existing
cluster (``ray://head:10001`` through Ray Client, or ``host:6379`` from a node of the cluster).
A Ray already initialised by the caller (a test, a notebook, a task running inside Ray) is
used as it is and left running.

Fault injection for tests: :func:`maybe_kill_once` makes the first attempt of a named task
kill its own worker process (SIGKILL) after creating a marker file; Ray then retries it.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailableError

__all__ = ["RAY_HINT", "import_ray", "ray_session", "AttemptCounter", "maybe_kill_once"]

RAY_HINT = "pip install 'quantlab[ray]'"


def import_ray(what: str = "--ray") -> Any:
    """The ``ray`` module; BackendUnavailableError naming the extra when it is not installed."""
    try:
        import ray
    except ImportError:
        raise BackendUnavailableError(f"{what} needs Ray, which is not installed: {RAY_HINT}") from None
    return ray


@contextmanager
def ray_session(address: str, *, what: str = "--ray",
                runtime_env: Mapping[str, Any] | None = None) -> Iterator[Any]:
    """Ray connected to ``address`` ("auto": a new local instance) for the block; yields the module.

    An instance this call started is shut down at the end; one the caller had started is kept.
    """
    ray = import_ray(what)
    started = not ray.is_initialized()
    if started:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "runtime_env": dict(runtime_env or {})}
        if address == "auto":
            ray.init(**kwargs)
        else:
            ray.init(address=address, **kwargs)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


class AttemptCounter:
    """Counts task attempts per name (used as a Ray actor): a count above 1 means Ray retried the task."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def attempt(self, name: str) -> int:
        self.counts[name] = self.counts.get(name, 0) + 1
        return self.counts[name]


def maybe_kill_once(env: str, name: str) -> None:
    """With ``$env`` = ``NAME:MARKER`` and no file MARKER yet: create it, then SIGKILL this process."""
    setting = os.environ.get(env, "")
    if not setting:
        return
    target, _, marker = setting.partition(":")
    if target == name and marker and not Path(marker).exists():
        Path(marker).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)

"""The reductions of one model run on the thread pool, while the model computes the next run."""

from __future__ import annotations

import queue
from collections.abc import Mapping
from concurrent.futures import wait as wait_for
from typing import Any

import numpy as np

from ..backends.base import TensorValues
from ..clipped import ClippedPair, NotDerivable
from ..histogram import AbsHistogram

__all__ = ["Reductions", "sample_weights"]


class Reductions:
    """The reductions of the last model run, in flight on the pool while the model computes the next run.

    ::

        main thread:  run k ──> submit k ──> run k+1 ──> submit k+1 (waits for k first) ──> ...
        pool:                   reduce k ───────────────┘ reduce k+1 ...

    A tensor's reducer is fed by one task at a time, runs in data order (run
    k's reductions end before run k+1's start), so the results do not depend on
    threads or timing. Two runs' outputs are alive at once: the collection gives
    each run half of the memory budgets. Without a pool, each run is reduced at once.
    One task per thread takes the run's tensors from a queue, largest first
    (95 futures per run cost 1 ms of Python; a queue balances as well).
    """

    def __init__(self, reducers: Mapping[str, AbsHistogram | ClippedPair], pool: Any, workers: int) -> None:
        self._reducers = reducers
        self._pool = pool
        self._workers = workers
        self._pending: list[Any] = []

    def submit(self, outputs: Mapping[str, np.ndarray], weights: Mapping[str, int] | None = None) -> None:
        """Wait for the previous run's reductions, then start this run's. ``weights``: tensor -> how many
        samples its value stands for (:func:`sample_weights`; 1 where missing)."""
        self.wait()
        names: queue.SimpleQueue[str] = queue.SimpleQueue()
        for t in sorted(outputs, key=lambda t: -_size(outputs[t])):
            names.put(t)
        weights = weights or {}
        if self._pool is None:
            self._reduce(names, outputs, weights)
            return
        self._pending = [self._pool.submit(self._reduce, names, outputs, weights)
                         for _ in range(min(self._workers, names.qsize()))]

    def _reduce(self, names: queue.SimpleQueue[str], outputs: Mapping[str, np.ndarray],
                weights: Mapping[str, int]) -> None:
        """Feed tensors taken from ``names`` to their reducers until it is empty."""
        while True:
            try:
                t = names.get_nowait()
            except queue.Empty:
                return
            value = outputs[t]
            try:
                if isinstance(value, TensorValues):  # a Conv output: per sample, never weighted
                    self._reducers[t].update_values(value.pieces, value.in_layout)
                else:
                    self._reducers[t].update(value, weights.get(t, 1))
            except NotDerivable as exc:
                raise NotDerivable(f"{t!r}: {exc}") from None

    def wait(self) -> None:
        """Block until the reductions in flight are done; raises the first error of one."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def drain(self) -> None:
        """Wait for the reductions in flight without raising (cleanup after an error elsewhere)."""
        pending, self._pending = self._pending, []
        wait_for(pending)


def sample_weights(outputs: Mapping[str, Any], rows: int, carries: Mapping[str, bool]) -> dict[str, int]:
    """Tensor -> how many samples its value in a model run of ``rows`` samples stands for (1 if missing).

    A tensor that holds a part per sample counts once. One that does not
    (:func:`quantlab.graph.samples.carries_samples` False, and no axis of ``rows``
    in this run: a position table's slice, a constant mask) is computed once per
    run for all ``rows`` samples, so it counts ``rows`` times: its counts are then
    those of running every sample alone, whatever the batch size or slicing. (A
    shared tensor that happens to have an axis of ``rows`` counts once: never more
    than its samples, when in doubt.)
    """
    if rows == 1:
        return {}
    return {t: rows for t, value in outputs.items()
            if carries.get(t) is False and not isinstance(value, TensorValues) and rows not in np.shape(value)}


def _size(value: Any) -> int:
    return value.size if isinstance(value, TensorValues) else int(np.size(value))

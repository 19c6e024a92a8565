"""Thread scheduling of a comparison: each batch is a small task graph run by ``workers`` threads.

::

    R(b): reference ─┬─► L(b): local model + sums ──┐
    C(b): candidate ─┴─► A(b): accumulated sums ────┴─► release; end-to-end figures, in batch order

Model runs and the numba metric kernels release the GIL, so the reference and candidate
runs overlap, then the local model and the metric kernels; single-threaded sessions side by
side also use the cores better than one two-threaded session at a time. Sums are merged
strictly in batch order: the same data and seed give the same tables whatever the timing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data import Batch

__all__ = ["Task", "BatchState", "Pipeline", "WINDOW"]

WINDOW = 1
"""Batches in flight when several workers run. 2 overlaps a batch's local/metric work with the next
batch's runs (about 7 % faster on EfficientNet-Lite0) but makes the peak memory depend on thread
timing (it kept rising for ~30 batches on a loaded machine); 1 keeps it the same every batch."""

TaskKey = tuple[Any, ...]


@dataclass
class Task:
    key: TaskKey
    fn: Callable[[], Any]
    deps: tuple[TaskKey, ...] = ()
    inline: bool = False     # run on the calling thread (cheap bookkeeping)


@dataclass(eq=False)
class BatchState:
    """One batch in flight: its live tensors per model and the metric sums of its tasks."""

    batch: Batch
    ref_live: dict[str, np.ndarray]
    cand_live: dict[str, dict[str, np.ndarray]]
    sums: dict[tuple[str, str, str], Any] = field(default_factory=dict)
    keys: set[TaskKey] = field(default_factory=set)
    runs: set[TaskKey] = field(default_factory=set)   # the model runs (R, C tasks)

    def sorted_sums(self) -> list[tuple[tuple[str, str, str], Any]]:
        """The batch's sums in insertion order of the keys' first appearance: deterministic merging."""
        return sorted(self.sums.items(), key=lambda kv: kv[0])


class Pipeline:
    """Runs every batch's task graph on ``workers`` threads, ``WINDOW`` batches in flight (one use).

    Runs and metric kernels release the GIL, so two workers keep two cores busy
    (ONNX Runtime sessions then use ``cores / workers`` threads each); a session
    never runs twice at once. Results are handed to ``finished`` strictly in batch
    order, so the tables do not depend on which task ends first. One worker runs
    everything in order on the calling thread. ``tasks(b, state)`` gives batch
    ``b``'s graph; task keys start with "R"/"C" for model runs.
    """

    def __init__(self, workers: int, candidates: Sequence[str],
                 tasks: Callable[[int, BatchState], list[Task]]) -> None:
        self.workers = workers
        self.window = WINDOW if workers > 1 else 1
        self._candidates = list(candidates)
        self._make_tasks = tasks
        self._states: dict[int, BatchState] = {}
        self._pending: list[Task] = []
        self._known: set[TaskKey] = set()
        self._done: set[TaskKey] = set()
        self._running: dict[Future[Any], TaskKey] = {}
        self._exhausted = False
        self._prefetched: Batch | None = None
        self._next_batch = 0
        self._next_finish = 0

    def run(self, batches: Iterable[Batch], opened: Callable[[Batch], None],
            finished: Callable[[BatchState], None]) -> None:
        """Every batch through its task graph: ``opened`` as it is loaded, ``finished`` in batch order."""
        self._source = iter(batches)
        self._opened = opened
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="quantlab-compare") if self.workers > 1 else None
        try:
            while True:
                retired = self._retire()
                self._start_batches()
                self._run_ready(pool)
                # this thread's own work, while the workers run the models: end-to-end figures of the
                # batches done, and loading the next batch
                for state in retired:
                    finished(state)
                if pool is not None and self._prefetched is None:
                    self._prefetched = self._load()
                if not self._running:
                    if self._exhausted and self._prefetched is None and not self._states:
                        return
                    if not self._pending or any(self._ready(t) for t in self._pending) or retired:
                        continue
                    raise RuntimeError("internal error: the comparison's task graph is stuck")  # pragma: no cover
                self._wait()
        finally:
            if pool is not None:
                for fut in self._running:
                    fut.cancel()
                pool.shutdown(wait=True, cancel_futures=True)

    def _load(self) -> Batch | None:
        if self._exhausted:
            return None
        batch = next(self._source, None)
        if batch is None:
            self._exhausted = True
            return None
        self._opened(batch)
        return batch

    def _ready(self, task: Task) -> bool:
        return all(d in self._done or d not in self._known for d in task.deps)

    def _retire(self) -> list[BatchState]:
        """The batches whose every task is done, in batch order."""
        retired: list[BatchState] = []
        while self._next_finish in self._states and self._states[self._next_finish].keys <= self._done:
            state = self._states.pop(self._next_finish)
            self._done -= state.keys
            self._known -= state.keys
            retired.append(state)
            self._next_finish += 1
        return retired

    def _start_batches(self) -> None:
        states = self._states
        while len(states) < self.window and (not states or states[self._next_batch - 1].runs <= self._done):
            # the next batch starts once this one's models ran (window > 1): its metric and local
            # work then overlap the next batch's runs
            batch, self._prefetched = (self._prefetched, None) if self._prefetched is not None \
                else (self._load(), None)
            if batch is None:
                break
            state = BatchState(batch, dict(batch.feeds), {n: dict(batch.feeds) for n in self._candidates})
            states[self._next_batch] = state
            tasks = self._make_tasks(self._next_batch, state)
            state.keys = {t.key for t in tasks}
            state.runs = {t.key for t in tasks if t.key[0] in ("R", "C")}
            self._known |= state.keys
            self._pending.extend(tasks)
            self._next_batch += 1

    def _run_ready(self, pool: ThreadPoolExecutor | None) -> None:
        """Every task whose dependencies are done: inline ones here, the others on free workers."""
        progressed = True
        while progressed:
            progressed = False
            for task in list(self._pending):
                if not self._ready(task):
                    continue
                if pool is None or task.inline:
                    self._pending.remove(task)
                    task.fn()
                    self._done.add(task.key)
                    progressed = True
                elif len(self._running) < self.workers:
                    self._pending.remove(task)
                    self._running[pool.submit(task.fn)] = task.key

    def _wait(self) -> None:
        finished_now, _ = wait(list(self._running), return_when=FIRST_COMPLETED)
        for fut in finished_now:
            key = self._running.pop(fut)
            fut.result()  # re-raises the task's error here
            self._done.add(key)

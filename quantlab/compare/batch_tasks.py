"""The task graph of one batch, which :class:`.schedule.Pipeline` runs: per chunk ``k`` of compared layers,

::

    R(b, k)        the reference's segment k           after R(b, k-1) and R(b-1, k)
    C(b, k, c)     candidate c's segment k             after C(b, k-1, c) and C(b-1, k, c)
    MA(b, k, c)    c's accumulated sums of the chunk   after R(b, k) and C(b, k, c)
    L(b, k, c, i)  c's local model i and its sums      after R(b, k) and L(b-1, k, c, i)
    REL(b, k)      the chunk's tensors released        after all of the above and REL(b, k-1)

Each run waits for the same run of the previous batch: a session never runs twice at once (its memory arena
would grow to hold both). Sums land in ``BatchState.sums`` under (candidate, mode, tensor); a tensor whose size
the data decides (NMS boxes) and whose shapes differ in a batch has none for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from ..errors import CompareError
from ..metrics import error_sums
from .alignment import CandidatePlan
from .islands import LocalModel
from .layers import Layer
from .runners import Runners
from .schedule import BatchState, Task, TaskKey

__all__ = ["BatchTasks"]


@dataclass(frozen=True)
class BatchTasks:
    """The per-batch task graphs of one pass over its sessions (``runners``); ``accumulated``: the accumulated
    mode runs; ``data_sized``: tensors whose size the data decides."""

    runners: Runners
    plans: Mapping[str, CandidatePlan]
    chunks: Sequence[Sequence[Layer]]
    accumulated: bool
    data_sized: frozenset[str]

    def for_batch(self, b: int, state: BatchState) -> list[Task]:
        """Batch ``b``'s tasks, chunk by chunk (see the module docstring)."""
        tasks: list[Task] = []
        for k in range(self.runners.k_count):
            tasks.extend(self._chunk_tasks(b, k, state))
        return tasks

    def _chunk_tasks(self, b: int, k: int, state: BatchState) -> list[Task]:
        """Chunk ``k``'s runs and sums, then the release that waits for all of them."""
        runners = self.runners
        chunk = self.chunks[k] if k < len(self.chunks) else []
        tasks = [Task(("R", b, k), partial(runners.reference.step, k, state.ref_live),
                      (("R", b, k - 1), ("R", b - 1, k)))]
        chunk_tasks: list[TaskKey] = [("R", b, k)] + ([("REL", b, k - 1)] if k else [])  # earlier chunks' readers first
        for name, p in self.plans.items():
            staged = runners.candidates[name]
            if k < len(staged.steps):
                tasks.append(Task(("C", b, k, name), partial(staged.step, k, state.cand_live[name]),
                                  (("C", b, k - 1, name), ("C", b - 1, k, name))))
                chunk_tasks.append(("C", b, k, name))
            if self.accumulated and p.carriers and chunk:
                tasks.append(Task(("MA", b, k, name), partial(self._accumulated_sums, state, name, chunk),
                                  (("R", b, k), ("C", b, k, name))))
                chunk_tasks.append(("MA", b, k, name))
            for i, model in enumerate(runners.local.get(name, [[]] * (k + 1))[k]):
                tasks.append(Task(("L", b, k, name, i), partial(self._local_sums, state, name, model),
                                  (("R", b, k), ("L", b - 1, k, name, i))))
                chunk_tasks.append(("L", b, k, name, i))
        tasks.append(Task(("REL", b, k), partial(runners.release, state, k), tuple(chunk_tasks), inline=True))
        return tasks

    def _accumulated_sums(self, state: BatchState, name: str, chunk: Sequence[Layer]) -> None:
        """The chunk's layers in the candidate's own end-to-end run against the reference's, by their carriers."""
        p = self.plans[name]
        live = state.cand_live[name]
        for x in chunk:
            carrier = p.carriers.get(x.tensor)
            if carrier is not None:
                r, c = state.ref_live[x.tensor], live[carrier]
                if r.shape != c.shape and x.tensor in self.data_sized:
                    continue  # NMS kept other boxes: nothing to compare element by element in this batch
                _check_shape(r, c, name, x.tensor, "accumulated")
                state.sums[(name, "accumulated", x.tensor)] = error_sums(r, c)

    def _local_sums(self, state: BatchState, name: str, model: LocalModel) -> None:
        """A local model fed the reference's values, its outputs against the reference's."""
        got = model.run(state.ref_live)
        for tensor, value in got.items():
            r = state.ref_live[tensor]
            if r.shape != value.shape and tensor in self.data_sized:
                continue
            _check_shape(r, value, name, tensor, "local")
            state.sums[(name, "local", tensor)] = error_sums(r, value)


def _check_shape(r: np.ndarray, c: np.ndarray, name: str, tensor: str, mode: str) -> None:
    if r.shape != c.shape:
        raise CompareError(f"candidate {name!r}: tensor {tensor!r} ({mode}) has shape {list(c.shape)}, the "
                           f"reference's has {list(r.shape)}; the written model does not compute the same layer")

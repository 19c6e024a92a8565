"""ShapeLog: the shapes each input had, counted as the calibration and validation batches stream by.

What a profile is derived from (:mod:`quantlab.shapes.profiles`). Sample shapes (the batch axis
set to 1, counted per sample) are what a calibration table keeps, so that ``quantlab build``,
which has no data, still knows the shapes the data had; the counts (not only the extremes)
pick the profile's OPT, the most frequent value.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputMismatchError
from .ranges import Shape

__all__ = ["BATCH_AXIS", "ShapeLog"]

BATCH_AXIS = 0
"""The axis the data layer stacks samples on; its profile minimum is 1 (partial batches)."""


@dataclass
class ShapeLog:
    """Counts of the shapes seen per input, as batches stream by (calibration, validation).

    ``observe`` counts a feed dict's batch shapes; ``observe_samples`` its sample shapes (the
    batch axis set to 1, counted once per sample: what a calibration table keeps, the same
    whatever the batch size). :func:`~quantlab.shapes.profiles_from_data` turns the counts into ranges.
    """

    counts: dict[str, Counter[Shape]] = field(default_factory=dict)

    def observe(self, feeds: Mapping[str, object]) -> None:
        for name, array in feeds.items():
            shape = tuple(int(d) for d in getattr(array, "shape", ()))
            self.counts.setdefault(name, Counter())[shape] += 1

    def observe_samples(self, feeds: Mapping[str, object], batch_axes: Mapping[str, int | None],
                        alone: Mapping[str, Sequence[Sequence[int]]] | None = None) -> None:
        """Count each sample's shape: the batch axis (``batch_axes``, default 0; None: none) set to 1. An input
        without a batch axis counts once per sample of the batch too (the same counts whatever the batch size).
        ``alone``: for inputs a ``[pad]`` padded, each sample's shape padded alone (no batch axis;
        ``Batch.alone_shapes``), counted instead of the batch's padded one."""
        shapes = {name: [int(d) for d in getattr(array, "shape", ())] for name, array in feeds.items()}
        axes = {name: batch_axes.get(name, BATCH_AXIS) for name in shapes}
        sizes = [shape[axes[n]] for n, shape in shapes.items() if axes[n] is not None and axes[n] < len(shape)]
        samples = sizes[0] if sizes else 1
        for name, shape in shapes.items():
            counts = self.counts.setdefault(name, Counter())
            axis = axes[name]
            if alone and name in alone and axis is not None and axis < len(shape):
                for own in alone[name]:
                    counts[tuple(int(d) for d in own[:axis]) + (1,) + tuple(int(d) for d in own[axis:])] += 1
                continue
            if axis is not None and axis < len(shape):
                shape[axis] = 1
            counts[tuple(shape)] += samples

    @classmethod
    def of(cls, batches: Iterable[Any]) -> ShapeLog:
        """The sample shapes of every batch in ``batches`` (:class:`quantlab.data.Batch` items, on their
        ``batch_axes``, or plain feed mappings, batched on axis 0)."""
        log = cls()
        for item in batches:
            log.observe_samples(getattr(item, "feeds", item), getattr(item, "batch_axes", {}),
                                getattr(item, "alone_shapes", None))
        return log

    def update(self, other: ShapeLog) -> ShapeLog:
        """Add ``other``'s counts (e.g. the validation data's to the calibration data's); returns self."""
        for name, counts in other.counts.items():
            self.counts.setdefault(name, Counter()).update(counts)
        return self

    def shapes(self, name: str) -> Counter[Shape]:
        return self.counts.get(name, Counter())

    def as_dict(self) -> dict[str, list[list[int]]]:
        """Shapes seen per input as JSON, ``[*shape, count]`` rows (count-ordered): enough to derive the ranges again.

        A calibration table can keep it (``calib_set["input_shapes"]``) so that ``quantlab build``,
        which has no data, still builds profiles from the shapes the data had.
        """
        return {name: [[*shape, n] for shape, n in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))]
                for name, c in sorted(self.counts.items())}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Sequence[Sequence[int]]], where: str = "input_shapes") -> ShapeLog:
        """The log :meth:`as_dict` wrote; InputMismatchError naming ``where`` for anything else."""
        log = cls()
        for name, rows in doc.items():
            for row in rows:
                if not row or not all(isinstance(d, int) and d >= 0 for d in row):
                    raise InputMismatchError(f"{where}: input {name!r} has row {row!r}; rows are "
                                             "[dim, ..., dim, count] of non-negative integers")
                log.counts.setdefault(str(name), Counter())[tuple(row[:-1])] += row[-1]
        return log

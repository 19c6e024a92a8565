"""Merged statistics: calibrate on A ∪ B from A's and B's histograms, without running the model again.

Each :class:`~quantlab.histogram.HistogramState` bins |x| over ``[0, R)`` with
``R`` a power of two that only ever doubles (adjacent bins merge pairwise). Two
histograms of the same bin count therefore always share a grid after the
smaller-range one has been doubled up to the larger ``R``, which is exactly
what the streaming pass does when a later batch grows the range::

    A: R=4 |a0 a1 a2 a3|           B: R=8 |b0 b1 b2 b3|
    A doubled to R=8: |a0+a1 a2+a3 0 0|  +  |b0 b1 b2 b3|  = one pass over A then B

Binning at a power-of-two scale and then merging pairs is exact (``floor(y) // 2
== floor(y / 2)`` for the power-of-two scaled ``y``), so the merge equals one
pass over the union, count for count (``tests/test_coverage.py`` checks it).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import CalibrationError
from ..histogram import AbsHistogram, HistogramState
from ..stats import Statistics

__all__ = ["merge_states", "merge_statistics"]


def merge_states(states: Sequence[HistogramState]) -> HistogramState:
    """One state holding every value of ``states`` (same bin count and huge threshold)."""
    if not states:
        raise CalibrationError("nothing to merge: give at least one histogram")
    acc = AbsHistogram(states[0].bins, states[0].huge_threshold)
    for state in states:
        if state.huge_threshold != acc.huge_threshold:
            raise CalibrationError(f"cannot merge histograms with huge thresholds {acc.huge_threshold:g} and "
                                   f"{state.huge_threshold:g}; collect both with the same setting")
        acc.merge(state)
    return acc.state()


def _check_compatible(parts: Sequence[Statistics], labels: Sequence[str]) -> None:
    first, label0 = parts[0], labels[0]
    for stats, label in zip(parts[1:], labels[1:]):
        if stats.model_sha256 != first.model_sha256:
            raise CalibrationError(
                f"{label} was collected on another model (sha256 {stats.model_sha256[:12]}) than {label0} "
                f"({first.model_sha256[:12]}); statistics merge only for the same model file")
        if (stats.bins, stats.huge_threshold) != (first.bins, first.huge_threshold):
            raise CalibrationError(
                f"{label} has {stats.bins} bins / huge threshold {stats.huge_threshold:g}, {label0} has "
                f"{first.bins} / {first.huge_threshold:g}; collect both with the same settings")
        missing = [t for t in first.tensors if t not in stats.tensors]
        extra = [t for t in stats.tensors if t not in first.tensors]
        if missing or extra:
            shown = ", ".join(repr(t) for t in (missing or extra)[:5])
            raise CalibrationError(
                f"{label} and {label0} cover different tensors ({len(missing)} missing from {label}, {len(extra)} "
                f"only in it, e.g. {shown}); collect both with the same --tensors scope")


def merge_statistics(parts: Sequence[Statistics], labels: Sequence[str] | None = None) -> Statistics:
    """Statistics over the union of the data sets behind ``parts`` (same model, bins and tensors).

    ``labels`` name the parts in errors (e.g. their file paths). Sample and
    batch counts add up; ``passes`` is the largest of the parts'; the backend
    description is the first part's.
    """
    if not parts:
        raise CalibrationError("nothing to merge: give at least one statistics file")
    names = list(labels) if labels is not None else [f"statistics #{i + 1}" for i in range(len(parts))]
    _check_compatible(parts, names)
    first = parts[0]
    tensors = {t: merge_states([p.tensors[t] for p in parts]) for t in first.tensors}
    return Statistics(tensors=tensors, samples=sum(p.samples for p in parts), batches=sum(p.batches for p in parts),
                      model_sha256=first.model_sha256, bins=first.bins, huge_threshold=first.huge_threshold,
                      passes=max(p.passes for p in parts), backend=dict(first.backend))

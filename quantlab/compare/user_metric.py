"""A user's own end-to-end metric (``--metric file.py:function``): loading it and calling it per sample.

The function gets the reference's and the candidate's outputs of one sample (name -> array)
and the sample's label (None without labels) and returns a mapping of names to numbers; each
name becomes a column of the end-to-end table (mean over samples, with a bootstrap interval).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data import Batch
from ..errors import CompareError
from ..hooks import load_hook
from .result import RESERVED_COLUMNS
from .sample_axes import samples_first

__all__ = ["SampleMetric", "load_metric", "call_metric", "metric_rows", "sample_metric"]

SampleMetric = Callable[[str, Batch, Mapping[str, np.ndarray], Mapping[str, np.ndarray]], list[dict[str, float]]]
"""(candidate, batch, reference outputs, candidate outputs) -> the user metric's numbers, one mapping per sample."""


def load_metric(spec: str) -> Callable[..., Any]:
    """``--metric``: ``file.py:function``, ``module.py`` in the current folder, or an importable module."""
    return load_hook(spec, Path.cwd(), CompareError, f"metric {spec!r}",
                     "Make it importable or give a file path, e.g. --metric my_metrics.py:score")


def call_metric(func: Callable[..., Any], spec: str, ref: Mapping[str, np.ndarray], cand: Mapping[str, np.ndarray],
                label: Any, candidate: str, index: int, key: str) -> dict[str, float]:
    """The metric's numbers for one sample; its failures and wrong results name the sample and candidate."""
    try:
        got = func(ref, cand, label)
    except Exception as exc:  # noqa: BLE001 - any failure of user code is reported with the sample
        raise CompareError(f"metric {spec!r} raised {type(exc).__name__}: {exc} on sample {index} ({key!r}), "
                           f"candidate {candidate!r}. Fix the metric function or the data.") from None
    if not isinstance(got, Mapping):
        raise CompareError(f"metric {spec!r} returned {type(got).__name__} on sample {index} ({key!r}); it must "
                           "return a mapping of names to numbers, e.g. {'iou': 0.87}")
    out: dict[str, float] = {}
    for k, v in got.items():
        if str(k) in RESERVED_COLUMNS:
            raise CompareError(f"metric {spec!r} returns {k!r}, a name the comparator uses itself; rename it")
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            raise CompareError(f"metric {spec!r} returned {k!r} = {v!r} on sample {index} ({key!r}); values must "
                               "be numbers") from None
    return out


def metric_rows(func: Callable[..., Any], spec: str, batch: Batch, ref: Mapping[str, np.ndarray],
                cand: Mapping[str, np.ndarray], candidate: str, use_labels: bool) -> list[dict[str, float]]:
    """The metric's numbers for every sample of ``batch``; ``ref`` and ``cand`` hold the outputs with their
    samples on axis 0 (:func:`quantlab.compare.sample_axes.samples_first`)."""
    labels = None if batch.labels is None or not use_labels else np.asarray(batch.labels)
    return [call_metric(func, spec, {o: v[i] for o, v in ref.items()}, {o: v[i] for o, v in cand.items()},
                        None if labels is None else labels[i].item(), candidate, int(batch.indices[i]),
                        str(batch.keys[i]))
            for i in range(len(batch))]


def sample_metric(func: Callable[..., Any] | None, spec: str, sample_axes: Mapping[str, int], outputs: Sequence[str],
                  use_labels: bool) -> SampleMetric | None:
    """The user metric per sample of a batch whose ``outputs`` hold their samples on ``sample_axes`` (axis 0
    when not named), as the end-to-end pass splits them; None without a metric."""
    if func is None:
        return None

    def measure(name: str, batch: Batch, ref: Mapping[str, np.ndarray],
                cand: Mapping[str, np.ndarray]) -> list[dict[str, float]]:
        return metric_rows(func, spec, batch,
                           {o: samples_first(ref[o], sample_axes.get(o, 0), len(batch), o) for o in outputs},
                           {o: samples_first(cand[o], sample_axes.get(o, 0), len(batch), o) for o in outputs},
                           name, use_labels)
    return measure

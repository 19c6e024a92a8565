"""The result of a statistics pass (:class:`Statistics`) and its file: one ``.npz``, no pickles."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path
from ..errors import CalibrationError
from ..histogram import DEFAULT_BINS, DEFAULT_HUGE_THRESHOLD, HistogramState

__all__ = ["STATISTICS_FORMAT", "Statistics", "save_statistics", "load_statistics"]

STATISTICS_FORMAT = "quantlab.statistics/1"


@dataclass(frozen=True)
class Statistics:
    """Per-tensor histograms of |x| with min/max/counts, from one pass over a data set.

    ``tensors`` maps a tensor name to its :class:`HistogramState`, in
    topological order; ``samples``/``batches`` count what was run; ``passes``
    is the number of runs over the data (1 unless the memory budget split the
    tensors into groups).
    """

    tensors: Mapping[str, HistogramState]
    samples: int
    batches: int
    model_sha256: str
    bins: int = DEFAULT_BINS
    huge_threshold: float = DEFAULT_HUGE_THRESHOLD
    passes: int = 1
    backend: Mapping[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def __getitem__(self, name: str) -> HistogramState:
        return self.tensors[name]

    def metadata(self) -> dict[str, Any]:
        """Everything but the counts, as JSON-ready data."""
        return {
            "format": STATISTICS_FORMAT,
            "samples": self.samples,
            "batches": self.batches,
            "model_sha256": self.model_sha256,
            "bins": self.bins,
            "huge_threshold": self.huge_threshold,
            "passes": self.passes,
            "backend": dict(self.backend),
            "tensors": list(self.tensors),
        }


_SCALARS = ("upper", "min", "max", "count", "nonfinite", "huge", "zeros")
_OPTIONAL_SCALARS = ("zeros",)
"""Scalars files from older quantlab versions lack; read as 0 (e.g. no exact-zero count: entropy keeps zeros)."""


def save_statistics(stats: Statistics, path: str | os.PathLike[str]) -> Path:
    """Write ``stats`` as one ``.npz`` (no pickles): counts [tensors, bins], per-tensor scalars, JSON metadata.

    The scalars include ``zeros`` (exact-zero count); files written before it
    existed still load, with ``zeros`` 0.
    """
    names = list(stats.tensors)
    states = [stats.tensors[n] for n in names]
    arrays: dict[str, np.ndarray] = {
        "metadata": np.frombuffer(json.dumps(stats.metadata(), sort_keys=True).encode(), dtype=np.uint8),
        "counts": np.stack([s.counts for s in states]) if states else np.zeros((0, stats.bins), np.int64),
    }
    for key in _SCALARS:
        dtype = np.int64 if key in ("count", "nonfinite", "huge", "zeros") else np.float64
        arrays[key] = np.array([getattr(s, key) for s in states], dtype=dtype)
    target = Path(path)
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    return target


def load_statistics(path: str | os.PathLike[str]) -> Statistics:
    """Read a file written by :func:`save_statistics`; CalibrationError when it is not one."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        meta = json.loads(arrays["metadata"].tobytes().decode())
    except FileNotFoundError:
        raise CalibrationError(f"{path}: no such statistics file") from None
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"{path}: not a quantlab statistics file ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != STATISTICS_FORMAT:
        raise CalibrationError(f"{path}: not a {STATISTICS_FORMAT} file (format {meta.get('format')!r})")
    names = meta["tensors"]
    missing = [k for k in ("counts", *_SCALARS) if k not in arrays and k not in _OPTIONAL_SCALARS]
    if missing or arrays["counts"].shape != (len(names), meta["bins"]):
        raise CalibrationError(f"{path}: statistics file is incomplete or inconsistent (missing {missing})")
    zeros = arrays["zeros"] if "zeros" in arrays else np.zeros(len(names), np.int64)
    tensors = {}
    for i, name in enumerate(names):
        counts = arrays["counts"][i].astype(np.int64)
        counts.setflags(write=False)
        try:
            tensors[name] = HistogramState(
                counts=counts,
                upper=float(arrays["upper"][i]),
                min=float(arrays["min"][i]),
                max=float(arrays["max"][i]),
                count=int(arrays["count"][i]),
                nonfinite=int(arrays["nonfinite"][i]),
                huge=int(arrays["huge"][i]),
                huge_threshold=float(meta["huge_threshold"]),
                zeros=int(zeros[i]),
            )
        except (ValueError, IndexError) as exc:
            raise CalibrationError(f"{path}: statistics of tensor {name!r} are inconsistent ({exc})") from None
    return Statistics(
        tensors=tensors,
        samples=int(meta["samples"]),
        batches=int(meta["batches"]),
        model_sha256=str(meta["model_sha256"]),
        bins=int(meta["bins"]),
        huge_threshold=float(meta["huge_threshold"]),
        passes=int(meta["passes"]),
        backend=meta.get("backend", {}),
    )

"""What went in: :class:`DataFingerprint` reduces the batches a run consumed to a :class:`DataSummary`.

    batch ──refuse NaN/Inf──> per sample: ArrayHasher (content hash, in order) ─┬─> DataSummary.sha256
                                          per-sample hash (duplicates, overlap)─┼─> duplicates, sample_hashes
                                          RunningStats per input (float64)      ─┴─> InputStats

The hash and the statistics are merged one sample at a time, so they do not
depend on the batch size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import DataError
from ..fingerprint import ArrayHasher
from .batches import DataSet, format_shape
from .checks import dataset_label

__all__ = ["DataFingerprint", "DataSummary", "InputStats", "RunningStats", "overlap", "summarize"]


@dataclass(frozen=True)
class InputStats:
    """Value range of one input over every sample seen (float64 statistics)."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]
    """Per-sample shape; None where it varied between samples."""
    min: float
    max: float
    mean: float
    std: float
    values: int
    """Number of scalar values the statistics cover."""
    shape_min: tuple[int, ...] | None = None
    """Per-sample shape, the smallest size seen on each axis (None: samples of several ranks, or a summary
    written before it was recorded); with :attr:`shape_max`, the sizes a calibration covered."""
    shape_max: tuple[int, ...] | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"shape": list(self.shape),
                                           "shape_min": None if self.shape_min is None else list(self.shape_min),
                                           "shape_max": None if self.shape_max is None else list(self.shape_max)}


@dataclass(frozen=True)
class DataSummary:
    """What went in: sample count, content hash (in order), per-input ranges, duplicates, per-sample hashes.

    ``duplicates`` pairs each repeated sample's key with the key of its first
    occurrence. ``sample_hashes`` (content only, no keys) let :func:`overlap`
    count samples shared by two sets.
    """

    count: int
    sha256: str
    inputs: tuple[InputStats, ...]
    duplicates: tuple[tuple[str, str], ...]
    sample_hashes: frozenset[str] = field(repr=False)

    @property
    def unique(self) -> int:
        return len(self.sample_hashes)

    def input(self, name: str) -> InputStats:
        for s in self.inputs:
            if s.name == name:
                return s
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "sha256": self.sha256,
            "unique": self.unique,
            "inputs": {s.name: s.as_dict() for s in self.inputs},
            "duplicates": [list(d) for d in self.duplicates],
            "sample_hashes": sorted(self.sample_hashes),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataSummary:
        try:
            inputs = tuple(
                InputStats(**{**v, "shape": tuple(v["shape"]),
                              "shape_min": None if v.get("shape_min") is None else tuple(v["shape_min"]),
                              "shape_max": None if v.get("shape_max") is None else tuple(v["shape_max"])})
                for v in data["inputs"].values()
            )
            return cls(count=int(data["count"]), sha256=str(data["sha256"]), inputs=inputs,
                       duplicates=tuple((str(a), str(b)) for a, b in data["duplicates"]),
                       sample_hashes=frozenset(data.get("sample_hashes", ())))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"not a quantlab data summary ({type(exc).__name__}: {exc})") from None

    def to_frame(self) -> Any:
        """One row per input: dtype, per-sample shape, min, max, mean, std (``attrs``: count, sha256)."""
        import pandas as pd  # 0.3 s: only for whoever asks for a table

        frame = pd.DataFrame([{
            "input": s.name, "dtype": s.dtype, "shape": format_shape(s.shape),
            "min": s.min, "max": s.max, "mean": s.mean, "std": s.std,
        } for s in self.inputs], columns=["input", "dtype", "shape", "min", "max", "mean", "std"])
        frame.attrs.update(count=self.count, sha256=self.sha256, duplicates=len(self.duplicates))
        return frame

    def describe(self, max_duplicates: int = 5) -> str:
        """A short human summary: count, per-input value ranges, duplicates found."""
        lines = [f"{self.count} samples ({self.unique} unique), content sha256 {self.sha256[:12]}"]
        for s in self.inputs:
            lines.append(f"  {s.name}: {s.dtype} {format_shape(s.shape)}  range [{s.min:.4g}, {s.max:.4g}]  "
                         f"mean {s.mean:.4g}  std {s.std:.4g}")
        if not self.duplicates:
            lines.append("  duplicates: none")
        else:
            shown = ", ".join(f"{a} = {b}" for a, b in self.duplicates[:max_duplicates])
            more = len(self.duplicates) - max_duplicates
            lines.append(f"  duplicates: {len(self.duplicates)} sample(s) repeat an earlier one: {shown}"
                         + (f" (and {more} more)" if more > 0 else ""))
        return "\n".join(lines)


class RunningStats:
    """min/max/mean/M2 merged one sample at a time (Chan et al.), so results do not depend on batch size."""

    def __init__(self, dtype: str, shape: tuple[int, ...]) -> None:
        self.dtype = dtype
        self.shape: tuple[int | None, ...] = shape
        self.extent: tuple[tuple[int, ...], tuple[int, ...]] | None = (shape, shape)  # per-axis (min, max)
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, sample: np.ndarray) -> None:
        if sample.shape != self.shape:
            self.shape = tuple(None if len(self.shape) != sample.ndim or a != b else a
                               for a, b in zip(self.shape, sample.shape))
        if self.extent is not None:
            low, high = self.extent
            self.extent = (None if len(low) != sample.ndim else
                           (tuple(map(min, low, sample.shape)), tuple(map(max, high, sample.shape))))
        if sample.size == 0:
            return
        x = sample.astype(np.float64, copy=False)
        n_b = x.size
        mean_b = float(x.mean())
        deviations = np.asarray(x - mean_b)  # a 0-d sample gives a scalar: out= needs an array
        np.multiply(deviations, deviations, out=deviations)  # squared in place: one temporary, not two
        m2_b = float(deviations.sum())
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.n * n_b / n
        self.n = n
        self.min = min(self.min, float(sample.min()))  # the same value in the sample's dtype, fewer bytes read
        self.max = max(self.max, float(sample.max()))

    def result(self, name: str) -> InputStats:
        std = math.sqrt(self.m2 / self.n) if self.n else math.nan
        low, high = self.extent if self.extent is not None else (None, None)
        return InputStats(name=name, dtype=self.dtype, shape=self.shape,
                          min=self.min if self.n else math.nan, max=self.max if self.n else math.nan,
                          mean=self.mean if self.n else math.nan, std=std, values=self.n,
                          shape_min=low, shape_max=high)


class DataFingerprint:
    """Reduces the batches a run consumes to a :class:`DataSummary`, without keeping samples.

    ``update(batch)`` refuses NaN/Inf (DataError naming the sample key and
    input), hashes every sample in order (inputs sorted by name, through
    :class:`quantlab.fingerprint.ArrayHasher`, so the hash does not depend on
    the batch size), and tracks per-input statistics and repeated samples.
    """

    def __init__(self) -> None:
        self._hasher = ArrayHasher()
        self._count = 0
        self._stats: dict[str, RunningStats] = {}
        self._first_key: dict[str, str] = {}
        self._duplicates: list[tuple[str, str]] = []

    def update(self, batch: Any) -> None:
        feeds: Mapping[str, Any] = getattr(batch, "feeds", batch)
        per_sample = getattr(batch, "per_sample", None)  # a Batch puts each input's samples on axis 0
        arrays = {name: per_sample(name) if per_sample else np.asarray(feeds[name]) for name in sorted(feeds)}
        if not arrays:
            raise DataError("a batch holds no inputs")
        n = next(iter(arrays.values())).shape[0]
        given = None if isinstance(batch, Mapping) else getattr(batch, "keys", None)
        keys = list(given) if given is not None else [f"sample {self._count + i}" for i in range(n)]
        if len(keys) != n or any(a.shape[:1] != (n,) for a in arrays.values()):
            raise DataError(f"a batch must hold {len(keys)} samples on axis 0 of every input; got shapes "
                            f"{ {k: a.shape for k, a in arrays.items()} }")
        for name, arr in arrays.items():
            if arr.dtype.kind not in "biuf":
                raise DataError(f"input {name!r}: holds {arr.dtype} values (sample {keys[0]!r}); inputs must be "
                                "numeric arrays.")
            if arr.dtype.kind == "f":
                finite = np.isfinite(arr.reshape(n, -1)).all(axis=1)
                if not finite.all():
                    i = int(np.argmin(finite))
                    bad = int(np.size(arr[i]) - np.count_nonzero(np.isfinite(arr[i])))
                    kinds = "NaN" if np.isnan(arr[i]).any() else "Inf"
                    if np.isnan(arr[i]).any() and np.isinf(arr[i]).any():
                        kinds = "NaN and Inf"
                    raise DataError(f"sample {keys[i]!r}: input {name!r} holds {bad} {kinds} value(s). Fix or "
                                    "remove that sample (or its preprocessing); quantlab does not calibrate or "
                                    "compare on non-finite inputs.")
        own = getattr(batch, "own_shapes", None) or {}  # [pad]ded inputs: each sample as it was, not as batched
        for i in range(n):
            sample_hash = ArrayHasher()
            for name, arr in arrays.items():
                a = arr[i][tuple(slice(0, d) for d in own[name][i])] if name in own else arr[i]
                self._hasher.update(name, a)
                sample_hash.update(name, a)
                stats = self._stats.get(name)
                if stats is None:
                    stats = self._stats[name] = RunningStats(arr.dtype.name, tuple(a.shape))
                stats.add(a)
            digest = sample_hash.hexdigest()
            first = self._first_key.setdefault(digest, keys[i])
            if first != keys[i]:
                self._duplicates.append((keys[i], first))
            self._count += 1

    def summary(self) -> DataSummary:
        return DataSummary(
            count=self._count,
            sha256=self._hasher.hexdigest(),
            inputs=tuple(s.result(name) for name, s in self._stats.items()),
            duplicates=tuple(self._duplicates),
            sample_hashes=frozenset(self._first_key),
        )


def summarize(dataset: DataSet, batch_size: int = 16, *, progress: bool = False) -> DataSummary:
    """One pass over ``dataset``: its :class:`DataSummary` (DataError on NaN/Inf or an empty set)."""
    fingerprint = DataFingerprint()
    bar = None
    if progress:  # in samples: batches by shape are not all full
        from tqdm.auto import tqdm

        bar = tqdm(total=len(dataset), unit="sample", desc=f"summarize {getattr(dataset, 'name', 'data')}")
    try:
        for batch in dataset.batches(batch_size):
            fingerprint.update(batch)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    summary = fingerprint.summary()
    if summary.count == 0:
        raise DataError(f"{dataset_label(dataset)} is empty; give it at least one sample.")
    return summary


BEYOND_CALIBRATION = 0.05
"""A validation input whose values pass the calibration set's range by more than this share of that range's
span is named (its INT8 range, and those after it, clip what calibration never showed)."""


NOT_CALIBRATED_SIZES = "where calibration covered"
"""The words of :func:`beyond_calibration`'s size warnings, by which a caller holding only its notes finds them."""


def beyond_calibration(validation: DataSummary, calibration: DataSummary, *, values: bool = True,
                       role: str = "validation") -> list[str]:
    """Warnings for the inputs whose ``role`` samples go where calibration did not: sizes outside the ones it
    covered (the ranges of an attention over more positions, of sums over a larger image, were never measured:
    DINOv2 at 84 px calibrated on 56-70 px lost 9 dB) and, with ``values``, float values past its range
    (``quantlab coverage`` measures those itself, tensor by tensor)."""
    calibrated = {s.name: s for s in calibration.inputs}
    out = []
    sizes: dict[tuple[str, str], list[str]] = {}  # (validation, calibration extents) -> inputs: BERT's three said once
    for v in validation.inputs:
        c = calibrated.get(v.name)
        if c is None:
            continue
        if None not in (v.shape_min, v.shape_max, c.shape_min, c.shape_max) and len(v.shape_min) == len(c.shape_min):
            if any(a < b for a, b in zip(v.shape_min, c.shape_min)) or any(
                    a > b for a, b in zip(v.shape_max, c.shape_max)):
                sizes.setdefault((_extent(v), _extent(c)), []).append(v.name)
        span = c.max - c.min
        if values and v.dtype.startswith("float") and span > 0 and (v.max > c.max + BEYOND_CALIBRATION * span
                                                         or v.min < c.min - BEYOND_CALIBRATION * span):
            amax = max(abs(c.min), abs(c.max))
            out.append(f"input {v.name!r}: validation values reach [{v.min:.4g}, {v.max:.4g}] where calibration saw "
                       f"[{c.min:.4g}, {c.max:.4g}]: ranges calibrated without such values clip them where a Q/DQ "
                       f"reads them (the input itself, if an INT8 layer reads it, at +-{amax:.4g} in the TensorRT "
                       f"form, at [{c.min:.4g}, {c.max:.4g}] in the ORT form; the INT8 layers after it likewise; "
                       "`quantlab coverage` measures by how much); calibrate on data like the validation set's")
    return [f"input{'s' if len(names) > 1 else ''} {', '.join(map(repr, names))}: {role} samples of sizes {seen} "
            f"{NOT_CALIBRATED_SIZES} {covered}: the ranges of tensors whose values grow with the size (attention "
            "over more positions, sums over a larger image) were not measured on such sizes; calibrate on samples "
            "of every size the model will see" for (seen, covered), names in sizes.items()] + out


def _extent(stats: InputStats) -> str:
    low, high = stats.shape_min or (), stats.shape_max or ()
    return "[" + ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in zip(low, high)) + "]"


def overlap(a: DataSummary, b: DataSummary) -> int:
    """How many distinct samples (by content) appear in both summaries."""
    return len(a.sample_hashes & b.sample_hashes)

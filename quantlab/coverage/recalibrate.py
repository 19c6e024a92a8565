"""Recalibrate from several statistics files: the tables of A ∪ B without running the model again.

    calib/statistics.npz ─┐                               ┌─> calib_<method>.json per method
    cov/prod/statistics.npz ┴─> merge_statistics ─> Statistics ─┤
    (data_summary.json beside each, or the set's summary in coverage.json) ─> merged DataSummary

The summaries are merged too (counts, per-input ranges with Chan's update,
sample hashes), so the overlap warnings of ``compare --calib`` keep working.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..calibrate import CalibrationResult, table_from_statistics
from ..data import DataSummary, InputStats
from ..errors import CalibrationError
from ..fingerprint import tool_versions
from ..graph import LoadedModel
from ..methods import resolve_methods
from ..shapes import ShapeLog
from ..stats import Statistics, load_statistics, probability_tensors, unquantized_tensors
from .merge import merge_statistics
from .result import COVERAGE_FILE

__all__ = ["merge_summaries", "recalibrate", "shapes_beside", "summary_beside"]


def summary_beside(stats_path: str | os.PathLike[str]) -> DataSummary | None:
    """The data summary of a statistics file: ``data_summary.json`` beside it (a calibrate output), or its set's
    entry in ``../coverage.json`` (a coverage output); None when neither exists."""
    path = Path(stats_path)
    beside = path.parent / "data_summary.json"
    try:
        if beside.is_file():
            return DataSummary.from_dict(json.loads(beside.read_text(encoding="utf-8")))
        coverage = path.parent.parent / COVERAGE_FILE
        if coverage.is_file():
            doc = json.loads(coverage.read_text(encoding="utf-8"))
            for d in doc.get("datasets", []):
                if path.parent.name in (d.get("name"), "".join(c if c.isalnum() or c in "-_." else "_"
                                                                for c in d.get("name", ""))):
                    return DataSummary.from_dict(d["summary"]) if d.get("summary") else None
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{path}: cannot read the data summary beside it ({exc})") from None
    return None


def _merge_inputs(parts: Sequence[InputStats]) -> InputStats:
    n = sum(p.values for p in parts)
    mean = sum(p.mean * p.values for p in parts) / n if n else math.nan
    m2 = sum(p.std ** 2 * p.values + p.values * (p.mean - mean) ** 2 for p in parts)
    shape = parts[0].shape
    for p in parts[1:]:  # None where the per-sample shape varied (as DataFingerprint records it)
        shape = tuple(a if a == b else None for a, b in zip(shape, p.shape)) if len(p.shape) == len(shape) else ()
    return InputStats(name=parts[0].name, dtype=parts[0].dtype, shape=shape,
                      min=min(p.min for p in parts), max=max(p.max for p in parts), mean=mean,
                      std=math.sqrt(m2 / n) if n else math.nan, values=n)


def merge_summaries(parts: Sequence[DataSummary]) -> DataSummary:
    """One summary for the union (the content hash is a hash of the parts' hashes, in order)."""
    names = list(dict.fromkeys(s.name for p in parts for s in p.inputs))
    inputs = tuple(_merge_inputs([s for p in parts for s in p.inputs if s.name == n]) for n in names)
    digest = hashlib.sha256("".join(p.sha256 for p in parts).encode()).hexdigest()
    return DataSummary(count=sum(p.count for p in parts), sha256=digest, inputs=inputs,
                       duplicates=tuple(d for p in parts for d in p.duplicates),
                       sample_hashes=frozenset().union(*(p.sample_hashes for p in parts)))


def recalibrate(model: LoadedModel, stats_paths: Sequence[str | os.PathLike[str]], methods: Sequence[str] | str, *,
                percentile: float = 99.99, entropy_skip_zeros: bool = True) -> CalibrationResult:
    """Tables of ``methods`` from the merged statistics files (checked against ``model``)."""
    if not stats_paths:
        raise CalibrationError("give at least one statistics file (statistics.npz) to recalibrate from")
    parts: list[Statistics] = [load_statistics(p) for p in stats_paths]
    labels = [str(p) for p in stats_paths]
    for stats, label in zip(parts, labels):
        if stats.model_sha256 != model.sha256:
            raise CalibrationError(f"{label} was collected on another model (sha256 {stats.model_sha256[:12]}) "
                                   f"than {model.label} ({model.sha256[:12]}); give statistics of this model")
    merged = merge_statistics(parts, labels=labels)
    summaries = [summary_beside(p) for p in stats_paths]
    known = [s for s in summaries if s is not None]
    summary = merge_summaries(known) if len(known) == len(summaries) else DataSummary(
        count=merged.samples, sha256="", inputs=(), duplicates=(), sample_hashes=frozenset())
    calib_set: dict[str, Any] = {"merged_statistics": labels, "sha256": summary.sha256, "count": merged.samples,
                                 **_merged_shapes([shapes_beside(p) for p in stats_paths])}
    unquantized = unquantized_tensors(model.proto)
    versions = tool_versions()
    tables = {m: table_from_statistics(merged, m, percentile=percentile, calib_set=calib_set, versions=versions,
                                       entropy_skip_zeros=entropy_skip_zeros, unquantized=unquantized,
                                       probabilities=probability_tensors(model.proto))
              for m in resolve_methods(methods)}
    if "input_shapes" not in calib_set and any(not isinstance(d, int) for s in model.inputs for d in s.shape or ()):
        note = (f"no sample shapes are known for {', '.join(labels)} (no calibration table beside a statistics file "
                "records them): `quantlab build --backend tensorrt*` cannot take engine profiles from this table; "
                "give --shapes")
        tables = {m: replace(t, notes=(*t.notes, note)) for m, t in tables.items()}
    return CalibrationResult(tables=tables, statistics=merged, data=summary)


def shapes_beside(stats_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The sample shapes a statistics file was collected on (``input_shapes`` and ``batch_axes``): those a
    calibration table beside it records (a calibrate output), None when none does (a coverage output)."""
    for table in sorted(Path(stats_path).parent.glob("calib_*.json")):
        try:
            calib_set = json.loads(table.read_text(encoding="utf-8")).get("calib_set") or {}
        except (OSError, ValueError, AttributeError):
            continue
        if calib_set.get("input_shapes"):
            return {"input_shapes": calib_set["input_shapes"], "batch_axes": calib_set.get("batch_axes") or {}}
    return None


def _merged_shapes(parts: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """The union of the parts' sample shapes (counts added), when every part records them and their batch axes
    agree; {} otherwise (a table must not claim shapes some of its data never said)."""
    if not parts or any(p is None for p in parts):
        return {}
    known = [p for p in parts if p is not None]
    if any(p["batch_axes"] != known[0]["batch_axes"] for p in known):
        return {}
    log = ShapeLog()
    for p in known:
        log.update(ShapeLog.from_dict(p["input_shapes"]))
    return {"input_shapes": log.as_dict(), "batch_axes": known[0]["batch_axes"]}

"""Coverage figures per tensor and data set, the verdict in the threshold language, and the files.

One row per (data set, tensor) with the columns of :data:`TENSOR_METRICS`; a
threshold (``--fail-if``) is checked on every row and on the summary row, where
each metric also exists as ``<metric>_max`` (the largest over tensors and data
sets). The default gate (:data:`quantlab.coverage.gate.DEFAULT_GATE`) fails when over a fifth
of a set's samples go beyond the calibration maximum in some tensor, more than the calibration set's own
distribution gives once in a hundred times (:func:`quantlab.coverage.gate.outside_surprise`), or when
a set sits so far below the calibrated range that a fifth more of some tensor's non-zero values round to 0 in INT8
(``zeroed_excess_max>0.2``). Others: ``saturated_excess_max>0.01`` when a tensor saturates 1 % more of its values
than on the calibration set; ``psi_excess_max>0.1`` when the lower end of some
tensor's PSI interval is 0.1 above the noise level (the distribution moved).
A metric that is NaN on every row cannot be evaluated: the gate fails.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_dir, write_json
from ..errors import CalibrationError
from ..stats import Statistics, load_statistics, save_statistics
from ..threshold import Threshold
from .gate import DEFAULT_GATE, TENSOR_METRICS, known_metrics, parse_gate

__all__ = ["TENSOR_METRICS", "DEFAULT_GATE", "COVERAGE_FILE", "OWNED_FILES", "DataSetCoverage", "CoverageResult",
           "known_metrics", "parse_gate", "with_max_names", "worst_first", "summary_row", "gate_check", "load_coverage"]

COVERAGE_FILE = "coverage.json"
TENSORS_CSV = "coverage_tensors.csv"
OWNED_FILES = (COVERAGE_FILE, TENSORS_CSV, "*/statistics.npz")
"""What :meth:`CoverageResult.save` writes into its folder (the only files a rerun may replace)."""


def _nanmax(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return max(finite) if finite else math.nan


def summary_row(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The largest value of every metric over ``rows``, under both names (``m`` and ``m_max``)."""
    out: dict[str, float] = {}
    for m in TENSOR_METRICS:
        out[m] = out[f"{m}_max"] = _nanmax([float(r[m]) for r in rows if m in r])
    return out


def worst_first(rows: Sequence[Mapping[str, Any]], gate: str | None) -> list[Mapping[str, Any]]:
    """``rows`` ordered by the gate's first metric, worst first (NaN last), then by PSI above noise."""
    cond = parse_gate(gate)[0].conditions[0]
    metric = cond.metric.removesuffix("_max")
    sign = -1.0 if cond.op in (">", ">=") else 1.0  # the gate fails on high values: high is bad

    def key(row: Mapping[str, Any]) -> tuple[float, float]:
        v, p = row.get(metric, math.nan), row.get("psi_excess", math.nan)
        return (math.inf if v is None or math.isnan(v) else sign * v, math.inf if math.isnan(p) else -p)

    return sorted(rows, key=key)


def with_max_names(row: Mapping[str, Any]) -> dict[str, Any]:
    """A tensor row where ``m_max`` is the row's own ``m`` (so one threshold reads tensor and summary rows)."""
    return {**row, **{f"{m}_max": row[m] for m in TENSOR_METRICS if m in row}}


def gate_check(gate: Sequence[Threshold], row: Mapping[str, Any]) -> dict[str, Any]:
    """``{"fails": bool, "values": {...}, "unknown": [...]}``: the gate fails when one of its thresholds holds (or
    cannot be evaluated: NaN)."""
    fails, values, unknown = False, {}, []
    for threshold in gate:
        check = threshold.check(with_max_names(row))
        missing = [k for k, v in check.values.items() if v is None or math.isnan(v)]
        fails = fails or bool(check.passed or missing)
        values.update(check.values)
        unknown += [k for k in missing if k not in unknown]
    return {"fails": fails, "values": values, "unknown": unknown}


@dataclass(frozen=True)
class DataSetCoverage:
    """Coverage of one data set: tensor rows, worst samples, input summary, and its fine histograms."""

    name: str
    source: str
    samples: int
    rows: tuple[dict[str, Any], ...]
    worst_samples: tuple[dict[str, Any], ...]
    summary: Any
    """``quantlab.data.DataSummary`` of the set (None when loaded without it)."""
    statistics: Statistics | None = field(default=None, repr=False)
    notes: tuple[str, ...] = ()

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "samples": self.samples,
                "worst_samples": list(self.worst_samples),
                "summary": self.summary.as_dict() if hasattr(self.summary, "as_dict") else self.summary,
                "notes": list(self.notes)}


@dataclass(frozen=True)
class CoverageResult:
    """Everything ``quantlab coverage`` found, and the gate's verdict on it."""

    datasets: tuple[DataSetCoverage, ...]
    gate: str
    table: Mapping[str, Any]
    """Method, model hash and calibration-set record of the table checked."""
    calibration: Mapping[str, Any]
    """Calibration statistics path and samples, and its data summary (dict) when known."""

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [dict(r, dataset=d.name) for d in self.datasets for r in d.rows]

    @property
    def summary(self) -> dict[str, float]:
        return summary_row(self.rows)

    def verdict(self) -> dict[str, Any]:
        """Overall gate outcome plus the failing tensors, worst first."""
        gate = parse_gate(self.gate)
        overall = gate_check(gate, self.summary)
        failing = []
        for row in self.rows:
            check = gate_check(gate, row)
            if check["fails"]:
                failing.append({"dataset": row["dataset"], "tensor": row["tensor"], **check["values"]})
        return {"gate": self.gate, "fails": overall["fails"], "values": overall["values"],
                "unknown": overall["unknown"], "failing_tensors": failing}

    def frame(self) -> Any:
        """One row per (data set, tensor), with ``flagged``: the gate fails on that row alone."""
        import pandas as pd

        gate = parse_gate(self.gate)
        return pd.DataFrame([{**r, "flagged": gate_check(gate, r)["fails"]} for r in self.rows])

    def save(self, out: str | os.PathLike[str]) -> dict[str, Path]:
        """Write ``coverage.json``, ``coverage_tensors.csv`` and ``<set>/statistics.npz`` into ``out`` (all or nothing)."""
        out = Path(out)
        paths = {"coverage": out / COVERAGE_FILE, "tensors_csv": out / TENSORS_CSV}
        with atomic_dir(out, owned=OWNED_FILES) as tmp:
            for d in self.datasets:
                if d.statistics is not None:
                    (tmp / _folder(d.name)).mkdir(exist_ok=True)
                    save_statistics(d.statistics, tmp / _folder(d.name) / "statistics.npz")
                    paths[f"statistics:{d.name}"] = out / _folder(d.name) / "statistics.npz"
            self.frame().to_csv(tmp / TENSORS_CSV, index=False)
            write_json(tmp / COVERAGE_FILE, {
                "format": "quantlab.coverage/1", "gate": self.gate, "verdict": self.verdict(),
                "table": dict(self.table), "calibration": dict(self.calibration),
                "datasets": [d.record() for d in self.datasets], "rows": self.rows,
            })
        return paths


def _folder(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "data"


def load_coverage(folder: str | os.PathLike[str]) -> CoverageResult:
    """Read a folder written by :meth:`CoverageResult.save` (statistics loaded when present)."""
    import json

    folder = Path(folder)
    path = folder / COVERAGE_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CalibrationError(f"{path}: no coverage results here; run `quantlab coverage ... --out {folder}`") from None
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{path}: not a coverage file ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != "quantlab.coverage/1":
        raise CalibrationError(f"{path}: not a quantlab.coverage/1 file")
    sets = []
    for d in doc["datasets"]:
        stats_path = folder / _folder(d["name"]) / "statistics.npz"
        rows = tuple({k: v for k, v in r.items() if k != "dataset"} for r in doc["rows"] if r["dataset"] == d["name"])
        sets.append(DataSetCoverage(name=d["name"], source=d["source"], samples=int(d["samples"]), rows=rows,
                                    worst_samples=tuple(d["worst_samples"]), summary=d.get("summary"),
                                    statistics=load_statistics(stats_path) if stats_path.is_file() else None,
                                    notes=tuple(d.get("notes", ()))))
    return CoverageResult(datasets=tuple(sets), gate=doc["gate"], table=doc["table"], calibration=doc["calibration"])



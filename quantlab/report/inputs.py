"""What a report shows, as plain data (:class:`ReportInputs`), and its files on disk.

Rendering never re-runs a model: the experiment runner assembles these inputs
from saved results, :func:`save_report_inputs` keeps them beside the page
(``report_inputs.json`` plus one Parquet and one CSV file per table), and
``quantlab report DIR`` re-renders from them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..atomic import atomic_path, json_dumps, write_json
from ..compare.mask_examples import MaskExample, load_mask_examples, save_mask_examples
from ..errors import ExperimentError

__all__ = ["Verdict", "HistogramView", "ReportInputs", "PER_LAYER_COLUMNS", "REPORT_INPUTS_FILE",
           "WORST_LAYERS_SHOWN", "MAX_TABLE_ROWS", "worst_layers", "check_per_layer", "save_report_inputs",
           "load_report_inputs", "with_title"]

REPORT_INPUTS_FILE = "report_inputs.json"


PER_LAYER_COLUMNS = ("candidate", "order", "layer", "op_type", "accumulated", "local")
"""Columns :attr:`ReportInputs.per_layer` must have (more are allowed and shown in tables)."""


WORST_LAYERS_SHOWN = 10


MAX_TABLE_ROWS = 200


@dataclass(frozen=True)
class Verdict:
    """The answer a reviewer looks for first: does ``candidate`` meet ``threshold``?

    ``value`` is the measured ``metric``, ``ci_low``/``ci_high`` its bootstrap
    confidence interval (``confidence``, e.g. 0.95), ``op``/``target`` the
    comparison of the threshold (``">="``, ``0.995``).
    """

    threshold: str
    candidate: str
    metric: str
    op: str
    target: float
    value: float
    passed: bool
    ci_low: float | None = None
    ci_high: float | None = None
    confidence: float = 0.95
    detail: str = ""

    def ci_straddles(self) -> bool:
        """True when the confidence interval contains the target: more data would be needed to be sure."""
        if self.ci_low is None or self.ci_high is None:
            return False
        return min(self.ci_low, self.ci_high) < self.target < max(self.ci_low, self.ci_high)


@dataclass(frozen=True)
class HistogramView:
    """One activation tensor's histogram and the clipping range each calibrator chose.

    ``edges`` has ``len(counts) + 1`` bin edges in the tensor's units; ``ranges``
    maps a calibrator name to its ``(low, high)`` clipping range (symmetric INT8:
    ``(-amax, amax)``); ``clipped`` maps it to the share of values outside it, ``zeroed`` to the share of
    non-zero values under half a step (INT8 reads them as 0), ``sqnr_db`` to the SQNR INT8 with that range is
    predicted to keep (quantlab.noise; nan when unknown).
    ``abs_values`` says the histogram is of |x| (only ``high`` is drawn).
    """

    tensor: str
    edges: tuple[float, ...]
    counts: tuple[float, ...]
    ranges: Mapping[str, tuple[float, float]]
    clipped: Mapping[str, float] = field(default_factory=dict)
    zeroed: Mapping[str, float] = field(default_factory=dict)
    sqnr_db: Mapping[str, float] = field(default_factory=dict)
    abs_values: bool = False
    note: str = ""


@dataclass(frozen=True)
class ReportInputs:
    """Everything the report shows, as plain data.

    - ``end_to_end``: one row per candidate (column ``candidate`` first); a metric
      ``X`` with columns ``X_ci_low`` and ``X_ci_high`` is shown as ``X [low, high]``.
    - ``per_layer``: one row per (candidate, layer) with at least
      :data:`PER_LAYER_COLUMNS`: ``order`` is the topological index, ``accumulated``
      and ``local`` the per-layer metric named by ``layer_metric`` (e.g. SQNR in dB)
      with the candidate run end to end and with each layer fed the reference's
      own inputs.
    - ``sensitivity``: ranked fusion groups (most sensitive first).
    - ``trajectory``: one row per search step with ``step``, ``metric``,
      ``ci_low``, ``ci_high``, ``int8_fraction`` and optional ``action``,
      ``pinned``, ``latency_ms``, ``meets``.
    - ``plan``: the final precision plan, one row per fusion group / node with
      a ``precision`` column.
    - ``environment``: tool versions; ``reproducibility``: hashes, settings,
      seed, command line (nested dicts are flattened for display).
    - ``coverage``: the calibration-coverage figures as plain data
      (:func:`quantlab.report.coverage.coverage_view`), None when not computed.
    - ``changed_samples``: the samples whose decision a candidate changed
      (:func:`quantlab.report.samples.changed_samples`), None when no output is read as a choice.
    - ``bodies``: per method, the Loop/Scan bodies (If branches) calibrated (:func:`quantlab.table.bodies_frame`),
      None when the model has none.
    - ``unjudged``: why a threshold was set and ``verdict`` is None (a reference that draws random numbers, no
      candidate that computes in INT8 or FP16); "" otherwise.
    - ``mask_examples``: for maps read as masks, each candidate's most changed sample's two masks
      (:mod:`quantlab.compare.mask_examples`), drawn one over the other.
    """

    title: str
    model: Mapping[str, Any]
    end_to_end: pd.DataFrame
    per_layer: pd.DataFrame | None = None
    verdict: Verdict | None = None
    unjudged: str = ""  # why a threshold was set and got no verdict
    candidates: Mapping[str, str] = field(default_factory=dict)
    layer_metric: str = "sqnr_db"
    layer_metric_higher_is_better: bool = True
    histograms: tuple[HistogramView, ...] = ()
    sensitivity: pd.DataFrame | None = None
    trajectory: pd.DataFrame | None = None
    trajectory_metric: str = ""
    plan: pd.DataFrame | None = None
    environment: Mapping[str, str] = field(default_factory=dict)
    reproducibility: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    coverage: Mapping[str, Any] | None = None
    changed_samples: pd.DataFrame | None = None
    bodies: pd.DataFrame | None = None
    mask_examples: tuple[MaskExample, ...] = ()


def worst_layers(per_layer: pd.DataFrame, higher_is_better: bool, n: int) -> pd.DataFrame:
    """At most ``n`` rows with the worst local metric (culprits), per candidate.

    Only layers with a finite local figure: the others (not quantized: Reshape, Flatten, an FP32 layer; or
    exact, +inf dB) only inherit error, and padding the list with them in topological order put Magika's exact
    one-hot Cast 4th of its "worst 10 layers".
    """
    frames = []
    for _, group in per_layer.groupby("candidate", sort=False):
        local = pd.to_numeric(group["local"], errors="coerce")
        order = local[np.isfinite(local)].sort_values(ascending=higher_is_better).index[:n]
        frames.append(group.loc[order])
    return pd.concat(frames) if frames else per_layer.head(0)


def check_per_layer(df: pd.DataFrame) -> None:
    missing = [c for c in PER_LAYER_COLUMNS if c not in df.columns]
    if missing:
        raise ExperimentError(f"per-layer results lack the columns {missing}; cannot draw the per-layer plot")


_FRAMES = ("end_to_end", "per_layer", "sensitivity", "trajectory", "plan", "changed_samples", "bodies")


def _parquet_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Object columns holding lists/dicts/mixed types become JSON text so Parquet can store them."""
    out = df.copy()
    for c in out.columns:
        if out[c].dtype == object:
            out[c] = [v if isinstance(v, str) or v is None else json.dumps(v, default=str) for v in out[c]]
    out.columns = [str(c) for c in out.columns]
    return out.reset_index(drop=True)


def save_report_inputs(folder: Path, inputs: ReportInputs) -> Path:
    """Save ``inputs`` as ``report_inputs.json`` plus one Parquet and one CSV file per table.

    Parquet is what :func:`load_report_inputs` reads back; CSV is for people and
    spreadsheets. Each file is written atomically.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"format": "quantlab.report_inputs/1", "tables": {}}
    for f in fields(ReportInputs):
        value = getattr(inputs, f.name)
        if f.name in _FRAMES:
            if value is None:
                continue
            safe = _parquet_safe(value)
            with atomic_path(folder / f"{f.name}.parquet") as tmp:
                safe.to_parquet(tmp, index=False)
            with atomic_path(folder / f"{f.name}.csv") as tmp:
                safe.to_csv(tmp, index=False)
            meta["tables"][f.name] = f"{f.name}.parquet"
        elif f.name == "verdict":
            meta["verdict"] = None if value is None else {k.name: getattr(value, k.name) for k in fields(Verdict)}
        elif f.name == "histograms":
            meta["histograms"] = [
                {"tensor": h.tensor, "edges": list(h.edges), "counts": list(h.counts),
                 "ranges": {k: list(v) for k, v in h.ranges.items()}, "clipped": dict(h.clipped),
                 "zeroed": dict(h.zeroed),
                 "sqnr_db": {k: v if math.isfinite(v) else None for k, v in h.sqnr_db.items()},
                 "abs_values": h.abs_values, "note": h.note}
                for h in value
            ]
        elif f.name == "notes":
            meta["notes"] = list(value)
        elif f.name == "mask_examples":
            save_mask_examples(value, folder)
        else:
            meta[f.name] = value
    return write_json(folder / REPORT_INPUTS_FILE, json.loads(json_dumps(meta)))


def load_report_inputs(folder: Path) -> ReportInputs:
    """Read what :func:`save_report_inputs` wrote (a report folder or its results folder)."""
    folder = Path(folder)
    candidates = [folder / REPORT_INPUTS_FILE, folder / "results" / REPORT_INPUTS_FILE]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise ExperimentError(
            f"{folder}: no {REPORT_INPUTS_FILE} here or in results/; is this a finished quantlab report folder? "
            "Re-run `quantlab run` to produce it."
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ExperimentError(f"{path}: unreadable ({exc}); re-run the experiment") from None
    kwargs: dict[str, Any] = {}
    for name, file in meta.get("tables", {}).items():
        kwargs[name] = pd.read_parquet(path.parent / file)
    if meta.get("verdict"):
        kwargs["verdict"] = Verdict(**meta["verdict"])
    kwargs["histograms"] = tuple(
        HistogramView(tensor=h["tensor"], edges=tuple(h["edges"]), counts=tuple(h["counts"]),
                      ranges={k: (float(v[0]), float(v[1])) for k, v in h["ranges"].items()},
                      clipped=h.get("clipped", {}), zeroed=h.get("zeroed", {}),
                      sqnr_db={k: math.nan if v is None else float(v) for k, v in h.get("sqnr_db", {}).items()},
                      abs_values=bool(h.get("abs_values")),
                      note=h.get("note", ""))
        for h in meta.get("histograms", [])
    )
    kwargs["notes"] = tuple(meta.get("notes", []))
    kwargs["mask_examples"] = load_mask_examples(path.parent)  # its errors name the file
    for f in fields(ReportInputs):
        if f.name not in kwargs and f.name in meta:
            kwargs[f.name] = meta[f.name]
    if "end_to_end" not in kwargs:
        raise ExperimentError(f"{path}: the end-to-end table is missing; re-run the experiment")
    return ReportInputs(**kwargs)


def with_title(inputs: ReportInputs, title: str) -> ReportInputs:
    """A copy with another title (used when comparing runs)."""
    return replace(inputs, title=title)

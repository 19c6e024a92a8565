"""The "Calibration coverage" section: does the calibration set represent the validation (and other) data?

:func:`coverage_view` turns a :class:`quantlab.coverage.CoverageResult` and the
calibration statistics into plain data (what ``ReportInputs.coverage`` holds
and ``report_inputs.json`` stores); :func:`coverage_section` renders it: the
verdict, the tensors farthest from the calibration set with both |x|
histograms overlaid and the calibrated range drawn, the worst samples, the
model inputs side by side, and what to do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..coverage import CoverageResult
from ..coverage.result import worst_first
from ..stats import Statistics
from .markup import esc, fmt, img, short, table
from .plots import figure, histogram_area, histogram_outline, log_counts, png

__all__ = ["coverage_view", "coverage_plot", "coverage_section", "COVERAGE_TENSORS_SHOWN"]

COVERAGE_TENSORS_SHOWN = 4
"""Tensors drawn with overlaid histograms (the table lists up to 12)."""

_ROW_COLUMNS = ("dataset", "tensor", "psi", "psi_ci_low", "psi_ci_high", "psi_noise", "saturated", "saturated_calib",
                "saturated_samples", "outside_samples", "outside_surprise", "outside", "zeroed", "zeroed_calib",
                "sqnr_drop", "wasserstein")
"""The worst tensors' columns; ``zeroed*`` and ``sqnr_drop`` are nan in coverage results written before them."""


_SAMPLE_COLUMNS = ("key", "worst_tensor", "saturated_excess", "tensors_saturated", "tensors_outside")


def _overlay(result: CoverageResult, row: Mapping[str, Any], calibration: Statistics, bins: int) -> dict[str, Any]:
    data = next(d for d in result.datasets if d.name == row["dataset"])
    calib = calibration.tensors[row["tensor"]]
    seen = data.statistics.tensors[row["tensor"]] if data.statistics is not None else None
    top = max(calib.absmax, seen.absmax if seen is not None else 0.0, float(row["amax"])) * 1.05 or 1.0
    edges = np.linspace(0.0, top, bins + 1)

    def shares(state: Any) -> list[float]:
        counts = state.rebin_to(bins, top) if state is not None and state.count else np.zeros(bins)
        return (counts / max(counts.sum(), 1.0)).tolist()

    return {"tensor": row["tensor"], "dataset": row["dataset"], "edges": edges.tolist(),
            "calibration": shares(calib), "data": shares(seen), "amax": float(row["amax"]),
            "calib_absmax": float(row["calib_absmax"]), "psi": row["psi"], "saturated": row["saturated"],
            "outside_samples": row["outside_samples"]}


def _advice(verdict: Mapping[str, Any], worst: Sequence[Mapping[str, Any]]) -> list[str]:
    if not verdict["fails"]:
        return ["The calibration set covers these data sets by the gate above; nothing to do."]
    names = ", ".join(dict.fromkeys(r["tensor"] for r in verdict["failing_tensors"][:6]))
    sets = ", ".join(dict.fromkeys(r["dataset"] for r in verdict["failing_tensors"]))
    saturating = any(r["saturated_excess"] > 0.001 for r in worst if not math.isnan(r["saturated_excess"]))
    tips = [(f"Add samples like the worst ones below (from {sets}) to the calibration set. Cheap: "
             "`quantlab calibrate MODEL --stats CALIB/statistics.npz --stats COVERAGE/<set>/statistics.npz` "
             "recalibrates from the merged histograms without running the model again."),
            f"Or keep the layers of the flagged tensors in FP16 ({names}): a plan file with those groups pinned.",
            ]
    if saturating:
        tips.append("Values saturate beyond what calibration accepted: a wider method for these tensors "
                    "(minmax, or percentile 99.999) trades resolution for range.")
    return tips


def coverage_view(result: CoverageResult, calibration: Statistics, *, tensors: int = COVERAGE_TENSORS_SHOWN,
                  bins: int = 60) -> dict[str, Any]:
    """Plain, JSON-ready data for the section (see the module docstring)."""
    verdict = result.verdict()
    rows = worst_first(result.rows, result.gate)
    worst = [{k: r.get(k, math.nan) for k in _ROW_COLUMNS} | {"saturated_excess": r["saturated_excess"]}
             for r in rows[:12]]
    samples = sorted(({"dataset": d.name, **{k: s[k] for k in _SAMPLE_COLUMNS}} for d in result.datasets
                      for s in d.worst_samples), key=lambda s: (s["saturated_excess"], s["tensors_outside"]), reverse=True)
    inputs = []
    calib_summary = result.calibration.get("summary")
    for label, summary in ([("calibration", calib_summary)] if calib_summary else []) + [
            (d.name, d.summary.as_dict() if hasattr(d.summary, "as_dict") else d.summary) for d in result.datasets]:
        for name, s in (summary or {}).get("inputs", {}).items():
            inputs.append({"input": name, "set": label, **{k: s[k] for k in ("min", "max", "mean", "std")}})
    return {
        "gate": result.gate, "fails": verdict["fails"], "values": verdict["values"],
        "method": result.table.get("method"), "calibration_samples": calibration.samples,
        "sets": [{"name": d.name, "samples": d.samples, "notes": list(d.notes),
                  "flagged": sum(1 for f in verdict["failing_tensors"] if f["dataset"] == d.name),
                  "tensors": len(d.rows)} for d in result.datasets],
        "worst_tensors": worst, "histograms": [_overlay(result, r, calibration, bins) for r in rows[:tensors]],
        "worst_samples": samples[:10], "inputs": sorted(inputs, key=lambda r: r["input"]),
        "advice": _advice(verdict, worst),
    }


def coverage_plot(histograms: Sequence[Mapping[str, Any]]) -> bytes:
    """|x| histograms of calibration vs data set (shares, log scale), amax and the calibration absmax drawn."""
    n = len(histograms)
    cols = 2 if n > 1 else 1
    rows = math.ceil(n / cols)
    fig = figure(10, 2.9 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, h in zip(axes, histograms):
        edges = np.asarray(h["edges"], dtype=float)
        histogram_area(ax, np.asarray(h["calibration"]), edges, color="#aeb6bf", alpha=0.8, label="calibration")
        histogram_outline(ax, np.asarray(h["data"]), edges, color="#c0392b", lw=1.4,
                          label=short(str(h["dataset"]), 30))
        ax.axvline(h["amax"], color="#17202a", ls="--", lw=1.3, label=f"amax {fmt(h['amax'])}")
        ax.axvline(h["calib_absmax"], color="#2471a3", ls=":", lw=1.3, label=f"calibration max {fmt(h['calib_absmax'])}")
        if max(max(h["calibration"], default=0), max(h["data"], default=0)) > 0:
            log_counts(ax)
        # two lines: one was wider than its axes, and the constrained layout fits titles' heights only
        ax.set_title(f"{short(str(h['tensor']), 60)}\n{100 * h.get('outside_samples', math.nan):.3g} % of samples "
                     f"beyond, {100 * h['saturated']:.3g} % of values above amax; PSI {fmt(h['psi'])}",
                     fontsize=8, loc="left")
        ax.set_xlabel("|activation|", fontsize=8)
        ax.set_ylabel("share of values", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="upper right")
    for ax in axes[n:]:
        ax.set_visible(False)
    return png(fig)


def coverage_section(view: Mapping[str, Any] | None) -> str:
    """The section's HTML ('' when the run computed no coverage)."""
    if not view:
        return ""
    cls, word = ("fail", "FLAGGED") if view["fails"] else ("pass", "COVERED")
    values = ", ".join(f"{esc(k)} = {fmt(v)}" for k, v in view["values"].items())
    sets = "".join(f"<li><b>{esc(s['name'])}</b>: {s['samples']} samples, {s['flagged']} of {s['tensors']} tensors "
                   f"flagged{''.join('; ' + esc(n) for n in s['notes'])}</li>" for s in view["sets"])
    advice = "".join(f"<li>{esc(a)}</li>" for a in view["advice"])
    plot = coverage_plot(view["histograms"]) if view["histograms"] else None
    return (
        '<section id="coverage"><h2>Calibration coverage</h2>'
        f'<div class="verdict {cls}"><span class="badge">{word}</span> gate <code>{esc(view["gate"])}</code> '
        f"({values}); table: {esc(view['method'])}, calibrated on {view['calibration_samples']} samples.</div>"
        f"<ul>{sets}</ul>"
        "<p>One FP32 pass over each data set, binned against the calibration table: <code>saturated</code> is the "
        "share of values above amax (<code>saturated_calib</code>: the same on the calibration set), "
        "<code>saturated_samples</code> / <code>outside_samples</code> the share of samples with any value above "
        "amax / above anything calibration saw (<code>outside_surprise</code>: how unlikely that many such samples "
        "are for data of the calibration set's own distribution, -log10 of the chance over all tensors checked: 2 is "
        "one in a hundred); <code>psi</code> the population stability index of |x| against "
        "the calibration set (bracketed: block-bootstrap interval; <code>psi_noise</code>: what two sets of these "
        "sizes from one distribution would show; above 0.25 is a different population); <code>zeroed</code> the "
        "share of non-zero values under half an INT8 step, read as 0 (the low end: a quieter set); "
        "<code>sqnr_drop</code> the dB of INT8 SQNR the calibrated range is predicted to lose on this set against the "
        "calibration set, both ends weighed by energy.</p>"
        f"{img(plot, 'calibration vs data |x| histograms with the calibrated range')}"
        f"<h3>Tensors farthest from the calibration set</h3>{table(pd.DataFrame(view['worst_tensors']))}"
        f"<h3>Worst samples</h3>{table(pd.DataFrame(view['worst_samples']))}"
        f"<h3>Model inputs, calibration set vs data sets</h3>{table(pd.DataFrame(view['inputs']))}"
        f"<h3>What to do</h3><ul>{advice}</ul></section>"
    )

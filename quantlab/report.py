"""The HTML accuracy report: one self-contained file a reviewer opens from disk.

Everything the report shows arrives as plain data in :class:`ReportInputs`
(pandas DataFrames, dicts, tuples), assembled by the experiment runner from
results it already saved: rendering never re-runs a model. The file has inline
CSS and PNG plots embedded as base64 ``data:`` URIs; no network, no JavaScript.

Every string that can come from a model or a user file (node, tensor, input
names, settings) is HTML-escaped: with :func:`html.escape` for text and with
``DataFrame.to_html(escape=True)`` for tables; plots are PNG, so names drawn in
them are pixels, not markup.

Plots use matplotlib's object API with the Agg canvas (``Figure`` +
``FigureCanvasAgg``): no pyplot, no global backend switch in the caller's process.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .atomic import atomic_path, json_dumps, write_bytes, write_json, write_text
from .errors import ExperimentError

__all__ = [
    "Verdict",
    "HistogramView",
    "ReportInputs",
    "PER_LAYER_COLUMNS",
    "render_report",
    "report_plots",
    "write_report",
    "render_comparison",
    "write_comparison",
    "save_report_inputs",
    "load_report_inputs",
    "REPORT_INPUTS_FILE",
    "worst_layers",
]

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
    ``(-amax, amax)``); ``clipped`` maps it to the share of values outside it.
    ``abs_values`` says the histogram is of |x| (only ``high`` is drawn).
    """

    tensor: str
    edges: tuple[float, ...]
    counts: tuple[float, ...]
    ranges: Mapping[str, tuple[float, float]]
    clipped: Mapping[str, float] = field(default_factory=dict)
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
    """

    title: str
    model: Mapping[str, Any]
    end_to_end: pd.DataFrame
    per_layer: pd.DataFrame | None = None
    verdict: Verdict | None = None
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


# --------------------------------------------------------------------------- small helpers


def esc(value: Any) -> str:
    """HTML-escaped text of anything (quotes too, so it is safe in attributes)."""
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 4) -> str:
    """A number for people: 4 significant digits, integers as is, NaN as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "—"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.{digits - 1}e}"
        if 0.99 <= abs(v) < 1:  # cosine / agreement near 1: the digits after the 9s matter
            return f"{v:.6f}".rstrip("0")
        return f"{v:.{digits}g}" if abs(v) >= 1 else f"{v:.{digits}f}".rstrip("0").rstrip(".") or "0"
    return str(value)


def _png(fig: Any) -> bytes:
    """PNG bytes of a matplotlib Figure, rendered with the Agg canvas (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _img(png: bytes | None, alt: str) -> str:
    """An <img> embedding ``png`` as a base64 data URI."""
    if not png:
        return ""
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="plot" alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig


def _short(name: str, limit: int = 48) -> str:
    """Long tensor names shortened for plot titles (the tables keep them whole)."""
    return name if len(name) <= limit else "…" + name[-(limit - 1):]


def _merge_ci_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Columns ``X``, ``X_ci_low``, ``X_ci_high`` become one text column ``X`` = ``v [lo, hi]``."""
    out = pd.DataFrame(index=df.index)
    cols = list(df.columns)
    for col in cols:
        if col.endswith(("_ci_low", "_ci_high")) and col.rsplit("_ci_", 1)[0] in cols:
            continue
        lo, hi = f"{col}_ci_low", f"{col}_ci_high"
        if lo in cols and hi in cols:
            out[col] = [
                f"{_fmt(v)} [{_fmt(a)}, {_fmt(b)}]" if not _isnan(a) else _fmt(v)
                for v, a, b in zip(df[col], df[lo], df[hi])
            ]
        else:
            out[col] = [_fmt(v) for v in df[col]]
    return out


def _isnan(v: Any) -> bool:
    try:
        return v is None or math.isnan(float(v))
    except (TypeError, ValueError):
        return False


def _table(df: pd.DataFrame | None, *, max_rows: int = MAX_TABLE_ROWS, merge_ci: bool = True,
           caption: str = "") -> str:
    """An escaped HTML table (pandas ``to_html(escape=True)``), numbers formatted for people."""
    if df is None or df.empty:
        return '<p class="muted">(nothing to show)</p>'
    shown = df.head(max_rows)
    shown = _merge_ci_columns(shown) if merge_ci else shown.map(_fmt)
    body = shown.to_html(escape=True, index=False, border=0, classes="tbl", na_rep="—")
    more = ""
    if len(df) > max_rows:
        more = f'<p class="muted">… {len(df) - max_rows} more rows in the CSV/Parquet files next to this report.</p>'
    cap = f'<p class="caption">{esc(caption)}</p>' if caption else ""
    return f'<div class="tablewrap">{body}</div>{cap}{more}'


def _kv_table(items: Mapping[str, Any]) -> str:
    """Two-column key/value table of flattened ``items`` (all escaped)."""
    flat = _flatten(items)
    if not flat:
        return '<p class="muted">(nothing recorded)</p>'
    rows = "".join(f"<tr><th>{esc(k)}</th><td><code>{esc(v)}</code></td></tr>" for k, v in flat.items())
    return f'<div class="tablewrap"><table class="tbl kv">{rows}</table></div>'


def _flatten(items: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in sorted(items.items(), key=lambda kv: str(kv[0])):
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (list, tuple)) and all(not isinstance(x, (Mapping, list, tuple)) for x in v):
            out[key] = ", ".join(str(x) for x in v)
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v, default=str)
        else:
            out[key] = str(v)
    return out


# --------------------------------------------------------------------------- sections


def _verdict_section(inputs: ReportInputs) -> str:
    v = inputs.verdict
    if v is None:
        return ('<section id="verdict"><h2>Verdict</h2><p class="verdict none">No threshold was set: '
                "the tables below describe the drift without a pass/fail verdict.</p></section>")
    cls = "pass" if v.passed else "fail"
    word = "PASS" if v.passed else "FAIL"
    ci = ""
    if v.ci_low is not None and v.ci_high is not None:
        ci = f" ({int(round(v.confidence * 100))} % CI {_fmt(v.ci_low)} – {_fmt(v.ci_high)})"
    sentence = (
        f"Candidate <b>{esc(v.candidate)}</b>: {esc(v.metric)} = <b>{_fmt(v.value)}</b>{ci}; "
        f"threshold <code>{esc(v.threshold)}</code>."
    )
    caveat = ""
    if v.ci_straddles():
        caveat = ('<p class="caveat">The confidence interval contains the threshold: with this much validation '
                  "data the verdict could go either way. Add validation samples before relying on it.</p>")
    detail = f"<p>{esc(v.detail)}</p>" if v.detail else ""
    return (f'<section id="verdict"><h2>Verdict</h2><div class="verdict {cls}"><span class="badge">{word}</span>'
            f" {sentence}</div>{caveat}{detail}</section>")


def _candidates_list(inputs: ReportInputs) -> str:
    if not inputs.candidates:
        return ""
    items = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in inputs.candidates.items())
    return f'<ul class="cands">{items}</ul>'


def _end_to_end_section(inputs: ReportInputs) -> str:
    return (
        '<section id="end-to-end"><h2>End to end, per candidate</h2>'
        "<p>Each candidate's outputs against the FP32 ONNX reference on the validation set. "
        "Bracketed figures are bootstrap confidence intervals. Accuracy (<code>top1</code>, "
        "<code>top5</code>) and agreement with the reference's top-1 are in %; drops are in percentage "
        "points (reference minus candidate); <code>mcnemar_p</code> is the exact McNemar test between the "
        "reference's and the candidate's correctness: a small value means the accuracy difference is "
        "not noise.</p>"
        f"{_candidates_list(inputs)}{_table(_end_to_end_view(inputs.end_to_end))}</section>"
    )


_END_TO_END_FIRST = ("candidate", "output", "samples", "top1_agreement", "top1", "ref_top1", "top1_drop",
                     "mcnemar_p", "cosine", "sqnr_db", "top5", "ref_top5", "top5_drop")


def _end_to_end_view(df: pd.DataFrame | None) -> pd.DataFrame | None:
    """The figures a reviewer decides on first (agreement, accuracy, drop, McNemar), then the rest."""
    if df is None:
        return None
    first = [c for c in _END_TO_END_FIRST if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]]


def worst_layers(per_layer: pd.DataFrame, higher_is_better: bool, n: int) -> pd.DataFrame:
    """The ``n`` rows with the worst local metric (culprits), per candidate.

    Layers without a local figure (not quantized: Reshape, Flatten...) only
    inherit error, so they rank after every layer that has one.
    """
    frames = []
    for _, group in per_layer.groupby("candidate", sort=False):
        order = group["local"].sort_values(ascending=higher_is_better, na_position="last").index[:n]
        frames.append(group.loc[order])
    return pd.concat(frames) if frames else per_layer.head(0)


def _per_layer_plot(inputs: ReportInputs, worst: pd.DataFrame) -> bytes:
    df = inputs.per_layer
    assert df is not None
    cands = list(dict.fromkeys(df["candidate"]))
    fig = _figure(10, 2.6 * len(cands) + 0.4)
    axes = fig.subplots(len(cands), 1, squeeze=False, sharex=True)[:, 0]
    label = inputs.layer_metric
    for ax, cand in zip(axes, cands):
        g = df[df["candidate"] == cand].sort_values("order")
        x = g["order"].to_numpy()
        ax.plot(x, g["accumulated"].to_numpy(dtype=float), "-", color="#c0392b", lw=1.6,
                label="accumulated (candidate end to end)")
        ax.plot(x, g["local"].to_numpy(dtype=float), "o", color="#2471a3", ms=3.5,
                label="local (layer fed reference inputs)")
        w = worst[worst["candidate"] == cand]
        for rank, (_, row) in enumerate(w.iterrows(), start=1):
            y = row["local"] if not _isnan(row["local"]) else row["accumulated"]
            if _isnan(y):
                continue
            ax.annotate(str(rank), (row["order"], float(y)), xytext=(0, -12 if inputs.layer_metric_higher_is_better else 6),
                        textcoords="offset points", ha="center", fontsize=7, color="#2471a3")
        ax.set_title(_short(str(cand), 80), fontsize=10, loc="left")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    axes[-1].set_xlabel("layer, in topological order (input → output)")
    from matplotlib.ticker import MaxNLocator

    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    return _png(fig)


def _check_per_layer(df: pd.DataFrame) -> None:
    missing = [c for c in PER_LAYER_COLUMNS if c not in df.columns]
    if missing:
        raise ExperimentError(f"per-layer results lack the columns {missing}; cannot draw the per-layer plot")


def _per_layer_section(inputs: ReportInputs, plots: Mapping[str, bytes]) -> str:
    df = inputs.per_layer
    if df is None or df.empty:
        return ('<section id="per-layer"><h2>Per-layer error</h2><p class="muted">No per-layer comparison '
                "was recorded.</p></section>")
    _check_per_layer(df)
    better = "higher is better" if inputs.layer_metric_higher_is_better else "lower is better"
    worst = worst_layers(df, inputs.layer_metric_higher_is_better, WORST_LAYERS_SHOWN)
    shown = worst.copy()
    shown.insert(1, "rank", shown.groupby("candidate", sort=False).cumcount() + 1)
    names = []
    for cand, g in worst.groupby("candidate", sort=False):
        top = ", ".join(f"<code>{esc(n)}</code>" for n in g["layer"].head(3))
        names.append(f"<li><b>{esc(cand)}</b>: {top}</li>")
    return (
        '<section id="per-layer"><h2>Per-layer error</h2>'
        f"<p>{esc(inputs.layer_metric)} of every layer's output against the reference ({better}). "
        "<b>Accumulated</b>: the candidate runs end to end, so a layer's error includes everything upstream. "
        "<b>Local</b>: the layer is fed the reference's own inputs, so only its own quantization error shows. "
        "A layer whose local error is bad is a <i>culprit</i>; one that is bad only when accumulated is a "
        "<i>victim</i> of layers before it. Numbers on the plot are ranks in the table below.</p>"
        f"<p>Worst layers by local error:</p><ul>{''.join(names)}</ul>"
        f"{_img(plots.get('per_layer'), 'per-layer ' + inputs.layer_metric + ', accumulated vs local')}"
        f"<h3>Worst {WORST_LAYERS_SHOWN} layers per candidate</h3>{_table(shown)}</section>"
    )


def _histogram_plot(views: Sequence[HistogramView]) -> bytes:
    n = len(views)
    cols = 2 if n > 1 else 1
    rows = math.ceil(n / cols)
    fig = _figure(10, 2.9 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    palette = ["#c0392b", "#27ae60", "#8e44ad", "#d68910", "#2471a3", "#17202a"]
    methods = sorted({m for v in views for m in v.ranges})
    color = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    styles = ["--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1)), "-"]
    for ax, view in zip(axes, views):
        edges = np.asarray(view.edges, dtype=float)
        counts = np.asarray(view.counts, dtype=float)
        ax.stairs(np.maximum(counts, 0), edges, fill=True, color="#aeb6bf", alpha=0.9)
        ax.set_yscale("log") if counts.max(initial=0) > 0 else None
        lo_x, hi_x = float(edges[0]), float(edges[-1])
        for i, m in enumerate(methods):
            if m not in view.ranges:
                continue
            lo, hi = view.ranges[m]
            frac = view.clipped.get(m)
            if view.abs_values:
                lab = f"{m}: amax {_fmt(hi)}"
            elif abs(lo + hi) < 1e-12 * max(1.0, abs(hi)):
                lab = f"{m}: ±{_fmt(hi)}"
            else:
                lab = f"{m}: [{_fmt(lo)}, {_fmt(hi)}]"
            if frac is not None:
                lab += f" (clips {frac * 100:.3g} %)"
            ls = styles[i % len(styles)]
            ax.axvline(hi, color=color[m], ls=ls, lw=1.5, label=lab)
            if not view.abs_values:
                ax.axvline(lo, color=color[m], ls=ls, lw=1.5)
            lo_x, hi_x = min(lo_x, lo if not view.abs_values else lo_x), max(hi_x, hi)
        span = hi_x - lo_x
        ax.set_xlim(lo_x - 0.03 * span, hi_x + 0.03 * span)
        ax.set_title(_short(view.tensor, 60), fontsize=9, loc="left")
        ax.set_xlabel("|activation|" if view.abs_values else "activation value", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="upper right")
    for ax in axes[n:]:
        ax.set_visible(False)
    return _png(fig)


def _histogram_section(inputs: ReportInputs, plots: Mapping[str, bytes]) -> str:
    if not inputs.histograms:
        return ('<section id="histograms"><h2>Activation ranges of the worst tensors</h2>'
                '<p class="muted">No activation statistics were recorded.</p></section>')
    rows = []
    for v in inputs.histograms:
        for m in sorted(v.ranges):
            lo, hi = v.ranges[m]
            rows.append({"tensor": v.tensor, "calibrator": m, "low": lo, "high": hi,
                         "clipped %": 100 * v.clipped[m] if m in v.clipped else float("nan")})
    notes = "".join(f"<li><code>{esc(v.tensor)}</code>: {esc(v.note)}</li>" for v in inputs.histograms if v.note)
    return (
        '<section id="histograms"><h2>Activation ranges of the worst tensors</h2>'
        "<p>Histogram of each tensor's values over the calibration set (log scale), with the clipping range "
        "each calibrator chose. Values beyond a line saturate in INT8; a wider range keeps outliers but "
        "spends resolution on them (coarser steps for everything else). This is why entropy often clips "
        "what minmax keeps.</p>"
        f"{_img(plots.get('histograms'), 'activation histograms with each calibrator range')}"
        f"{'<ul>' + notes + '</ul>' if notes else ''}{_table(pd.DataFrame(rows))}</section>"
    )


def _sensitivity_section(inputs: ReportInputs) -> str:
    return (
        '<section id="sensitivity"><h2>Sensitivity ranking</h2>'
        "<p>Fusion groups ranked by how much quantizing them alone hurts (most sensitive first); "
        "the search pins groups from the top of this list.</p>"
        f"{_table(inputs.sensitivity, max_rows=30)}</section>"
    )


def _trajectory_plot(inputs: ReportInputs) -> bytes:
    t = inputs.trajectory
    assert t is not None
    fig = _figure(10, 3.4)
    ax = fig.subplots()
    x = t["step"].to_numpy()
    # the search writes the metric's name in "metric" and its value in "value"
    y = pd.to_numeric(t["value"] if "value" in t.columns else t["metric"], errors="coerce").to_numpy(dtype=float)
    label = inputs.trajectory_metric or (inputs.verdict.metric if inputs.verdict else "metric")
    full = t["full"].to_numpy(dtype=bool) if "full" in t.columns else np.ones(len(t), dtype=bool)
    has_ci = {"ci_low", "ci_high"} <= set(t.columns) and t["ci_low"].notna().any()
    for mask, style, what in ((full, "o", "full validation"), (~full, "s", "probe on a subset")):
        if not mask.any():
            continue
        if has_ci:
            lo = y[mask] - t["ci_low"].to_numpy(dtype=float)[mask]
            hi = t["ci_high"].to_numpy(dtype=float)[mask] - y[mask]
            ax.errorbar(x[mask], y[mask], yerr=np.nan_to_num(np.vstack([np.abs(lo), np.abs(hi)])), fmt=style,
                        color="#2471a3", mfc="#2471a3" if what.startswith("full") else "white", capsize=3,
                        label=f"{label}, {what} (with CI)")
        else:
            ax.plot(x[mask], y[mask], style, color="#2471a3", label=f"{label}, {what}")
    if inputs.verdict is not None:
        ax.axhline(inputs.verdict.target, color="#c0392b", ls="--", lw=1.2,
                   label=f"threshold {inputs.verdict.op} {_fmt(inputs.verdict.target)}")
    ax.set_xlabel("search step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    if "int8_fraction" in t.columns:
        ax2 = ax.twinx()
        ax2.bar(x, t["int8_fraction"].to_numpy(dtype=float) * 100, color="#27ae60", alpha=0.25, width=0.6,
                label="INT8 share of groups (%)")
        ax2.set_ylabel("INT8 groups (%)")
        ax2.set_ylim(0, 105)
        ax.set_zorder(ax2.get_zorder() + 1)
        ax.patch.set_visible(False)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower right")
    else:
        ax.legend(fontsize=8)
    ax.set_xticks(x)
    return _png(fig)


def _trajectory_view(t: pd.DataFrame) -> pd.DataFrame:
    """The trajectory as a reviewer reads it: short plan hashes, the bookkeeping columns left to the CSV."""
    view = t.drop(columns=[c for c in ("pins", "margin", "latency_ms") if c in t.columns
                           and (c != "latency_ms" or t[c].isna().all())])
    if "plan_hash" in view.columns:
        view = view.assign(plan_hash=view["plan_hash"].astype(str).str[:12])
    if "pinned" in view.columns:
        view = view.assign(pinned=view["pinned"].astype(str).str.replace(",", ", "))
    return view


def _trajectory_section(inputs: ReportInputs, plots: Mapping[str, bytes]) -> str:
    t = inputs.trajectory
    if t is None or t.empty:
        why = ("the all-INT8 candidates already met the threshold or the search was off"
               if inputs.verdict is not None else "no threshold was set")
        return (f'<section id="search"><h2>Sensitivity search</h2><p class="muted">No search ran ({esc(why)}).'
                "</p></section>")
    return (
        '<section id="search"><h2>Search trajectory</h2>'
        "<p>Each step evaluates one precision plan on the validation set: the metric with its confidence "
        "interval (left axis) and the share of fusion groups still in INT8 (bars, right axis).</p>"
        f"{_img(plots.get('trajectory'), 'search trajectory: metric and INT8 share per step')}"
        f"{_table(_trajectory_view(t))}</section>"
    )


def _plan_section(inputs: ReportInputs) -> str:
    plan = inputs.plan
    if plan is None or plan.empty:
        return ""
    summary = ""
    if "precision" in plan.columns:
        counts = plan["precision"].value_counts()
        summary = "<p>" + ", ".join(f"<b>{int(c)}</b> {esc(p)}" for p, c in counts.items()) + \
            f" of {len(plan)} groups.</p>"
    return (
        '<section id="plan"><h2>Final precision plan</h2>'
        "<p>The plan the final candidate was built with (the same format as a hand-edited plan file, "
        "<code>plan.json</code> next to this report).</p>"
        f"{summary}{_table(plan, max_rows=MAX_TABLE_ROWS)}</section>"
    )


def _environment_section(inputs: ReportInputs) -> str:
    return (
        '<section id="environment"><h2>Environment and reproducibility</h2>'
        "<h3>Model</h3>" + _kv_table(inputs.model) +
        "<h3>Hashes, settings and command</h3>" + _kv_table(inputs.reproducibility) +
        "<h3>Versions</h3>" + _kv_table(inputs.environment) + "</section>"
    )


def _notes_section(inputs: ReportInputs) -> str:
    if not inputs.notes:
        return ""
    items = "".join(f"<li>{esc(n)}</li>" for n in inputs.notes)
    return f'<section id="notes"><h2>Notes</h2><ul class="notes">{items}</ul></section>'


_CSS = """
:root { --fg:#1c2833; --muted:#5d6d7e; --line:#d5dbdb; --pass:#1e8449; --fail:#b03a2e; --bg:#fbfcfc; }
* { box-sizing: border-box; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--fg); background: var(--bg); margin: 0; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; border-bottom: 2px solid var(--line); padding-bottom: 4px; margin-top: 36px; }
h3 { font-size: 16px; margin: 20px 0 6px; }
.subtitle { color: var(--muted); margin: 0 0 12px; }
nav { font-size: 14px; margin: 8px 0 0; }
nav a { margin-right: 14px; color: #2471a3; text-decoration: none; }
code { font: 13px/1.4 ui-monospace, "DejaVu Sans Mono", monospace; background: #eef2f3; padding: 0 3px;
       border-radius: 3px; word-break: break-all; }
.verdict { font-size: 17px; padding: 14px 16px; border-radius: 6px; border: 2px solid; }
.verdict.pass { border-color: var(--pass); background: #e9f7ef; }
.verdict.fail { border-color: var(--fail); background: #fdedec; }
.verdict.none { border-color: var(--line); background: #f4f6f6; font-size: 15px; }
.badge { display: inline-block; font-weight: 700; color: #fff; padding: 1px 10px; border-radius: 4px;
         margin-right: 8px; }
.pass .badge { background: var(--pass); } .fail .badge { background: var(--fail); }
.caveat { background: #fef5e7; border-left: 4px solid #d68910; padding: 8px 12px; }
.tablewrap { overflow-x: auto; margin: 8px 0; }
table.tbl { border-collapse: collapse; font-size: 13px; }
table.tbl th, table.tbl td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: left;
                             vertical-align: top; }
table.tbl thead th { background: #eaf2f8; position: sticky; top: 0; }
table.tbl tbody tr:nth-child(even) { background: #f4f6f7; }
table.kv th { width: 32%; font-weight: 600; }
img.plot { max-width: 100%; height: auto; display: block; margin: 10px 0; border: 1px solid var(--line);
           background: #fff; }
.muted, .caption { color: var(--muted); font-size: 14px; }
ul.cands, ul.notes { margin: 6px 0 10px; }
footer { color: var(--muted); font-size: 13px; margin-top: 40px; border-top: 1px solid var(--line);
         padding-top: 8px; }
"""


def _page(title: str, subtitle: str, nav: Sequence[tuple[str, str]], body: str) -> str:
    links = "".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t in nav)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">"
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body><main>"
        f"<h1>{esc(title)}</h1><p class=\"subtitle\">{subtitle}</p><nav>{links}</nav>"
        f"{body}<footer>Written by quantlab. Self-contained: inline styles and embedded images, "
        "no scripts, no network.</footer></main></body></html>\n"
    )


def report_plots(inputs: ReportInputs) -> dict[str, bytes]:
    """The report's plots as PNG bytes, by name (``per_layer``, ``histograms``, ``trajectory``)."""
    plots: dict[str, bytes] = {}
    if inputs.per_layer is not None and not inputs.per_layer.empty:
        _check_per_layer(inputs.per_layer)
        worst = worst_layers(inputs.per_layer, inputs.layer_metric_higher_is_better, WORST_LAYERS_SHOWN)
        plots["per_layer"] = _per_layer_plot(inputs, worst)
    if inputs.histograms:
        plots["histograms"] = _histogram_plot(inputs.histograms)
    if inputs.trajectory is not None and not inputs.trajectory.empty:
        plots["trajectory"] = _trajectory_plot(inputs)
    return plots


def render_report(inputs: ReportInputs, plots: Mapping[str, bytes] | None = None) -> str:
    """The whole report as one HTML string (escaped, self-contained).

    ``plots`` are the PNGs from :func:`report_plots` when the caller has them already.
    """
    if plots is None:
        plots = report_plots(inputs)
    model_name = inputs.model.get("name") or inputs.model.get("path") or "model"
    subtitle = f"Accuracy report for <code>{esc(model_name)}</code>"
    if inputs.model.get("sha256"):
        subtitle += f" (sha256 <code>{esc(str(inputs.model['sha256'])[:12])}</code>)"
    has_sens = inputs.sensitivity is not None and not inputs.sensitivity.empty
    sections = [
        _verdict_section(inputs),
        _notes_section(inputs),
        _end_to_end_section(inputs),
        _per_layer_section(inputs, plots),
        _histogram_section(inputs, plots),
        _sensitivity_section(inputs) if has_sens else "",
        _trajectory_section(inputs, plots),
        _plan_section(inputs),
        _environment_section(inputs),
    ]
    nav = [("verdict", "Verdict"), ("end-to-end", "End to end"), ("per-layer", "Per layer"),
           ("histograms", "Histograms")]
    if has_sens:
        nav.append(("sensitivity", "Sensitivity"))
    nav.append(("search", "Search"))
    if inputs.plan is not None and not inputs.plan.empty:
        nav.append(("plan", "Plan"))
    nav.append(("environment", "Environment"))
    return _page(f"quantlab report: {inputs.title}", subtitle, nav, "".join(sections))


def write_report(report_dir: Path, inputs: ReportInputs, *, save_plots: bool = True) -> Path:
    """Write ``report_dir/index.html`` (and ``plots/*.png``) atomically; returns the page's path.

    The plots are written first, the page last, so a page never points at
    plots that are not there (it embeds its own copies anyway).
    """
    report_dir = Path(report_dir)
    plots = report_plots(inputs)
    if save_plots:
        for name, png in plots.items():
            write_bytes(report_dir / "plots" / f"{name}.png", png)
    return write_text(report_dir / "index.html", render_report(inputs, plots))


# --------------------------------------------------------------------------- comparison of two runs


def _settings_diff(a: ReportInputs, b: ReportInputs) -> pd.DataFrame:
    fa, fb = _flatten(a.reproducibility), _flatten(b.reproducibility)
    rows = [{"setting": k, "A": fa.get(k, "—"), "B": fb.get(k, "—")}
            for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
    return pd.DataFrame(rows, columns=["setting", "A", "B"])


def _end_to_end_side_by_side(a: ReportInputs, b: ReportInputs) -> pd.DataFrame:
    ea, eb = a.end_to_end, b.end_to_end
    if "candidate" not in ea.columns or "candidate" not in eb.columns:
        return pd.DataFrame()
    numeric = [c for c in ea.columns if c in eb.columns and c != "candidate"
               and not c.endswith(("_ci_low", "_ci_high")) and pd.api.types.is_numeric_dtype(ea[c])
               and pd.api.types.is_numeric_dtype(eb[c])]
    merged = ea[["candidate", *numeric]].merge(eb[["candidate", *numeric]], on="candidate", how="outer",
                                                suffixes=(" A", " B"))
    for c in numeric:
        merged[f"{c} Δ"] = merged[f"{c} B"] - merged[f"{c} A"]
    cols = ["candidate"] + [x for c in numeric for x in (f"{c} A", f"{c} B", f"{c} Δ")]
    return merged[cols]


def _per_layer_moves(a: ReportInputs, b: ReportInputs, n: int = 15) -> pd.DataFrame:
    if a.per_layer is None or b.per_layer is None or a.layer_metric != b.layer_metric:
        return pd.DataFrame()
    keys = ["candidate", "layer"]
    m = a.per_layer[keys + ["local", "accumulated"]].merge(
        b.per_layer[keys + ["local", "accumulated"]], on=keys, suffixes=(" A", " B"))
    m["accumulated Δ"] = m["accumulated B"] - m["accumulated A"]
    m["local Δ"] = m["local B"] - m["local A"]
    return m.reindex(m["accumulated Δ"].abs().sort_values(ascending=False).index).head(n)


def _plan_diff(a: ReportInputs, b: ReportInputs) -> pd.DataFrame:
    if a.plan is None or b.plan is None or "precision" not in a.plan.columns or "precision" not in b.plan.columns:
        return pd.DataFrame()
    key = "group" if "group" in a.plan.columns else a.plan.columns[0]
    if key not in b.plan.columns:
        return pd.DataFrame()
    m = a.plan[[key, "precision"]].merge(b.plan[[key, "precision"]], on=key, how="outer", suffixes=(" A", " B"))
    return m[m["precision A"] != m["precision B"]]


def _verdict_line(r: ReportInputs) -> str:
    v = r.verdict
    if v is None:
        return "no threshold"
    ci = f" [{_fmt(v.ci_low)}, {_fmt(v.ci_high)}]" if v.ci_low is not None else ""
    return f"{'PASS' if v.passed else 'FAIL'}: {v.candidate} {v.metric} = {_fmt(v.value)}{ci} ({v.threshold})"


def render_comparison(a: ReportInputs, b: ReportInputs, *, label_a: str = "A", label_b: str = "B") -> str:
    """Two experiments side by side: what changed (settings, hashes), what moved (metrics, layers, plan)."""
    intro = (f"<p><b>A</b> = <code>{esc(label_a)}</code> ({esc(a.title)}), "
             f"<b>B</b> = <code>{esc(label_b)}</code> ({esc(b.title)}). Δ = B − A.</p>")
    verdicts = _table(pd.DataFrame([{"run": "A", "verdict": _verdict_line(a)},
                                    {"run": "B", "verdict": _verdict_line(b)}]), merge_ci=False)
    body = (
        f'<section id="what-changed"><h2>What changed</h2>{intro}'
        f"{_table(_settings_diff(a, b), merge_ci=False)}</section>"
        f'<section id="verdicts"><h2>Verdicts</h2>{verdicts}</section>'
        f'<section id="end-to-end"><h2>End to end</h2>{_table(_end_to_end_side_by_side(a, b))}</section>'
        f'<section id="per-layer"><h2>Layers that moved most ({esc(a.layer_metric)}, accumulated)</h2>'
        f"{_table(_per_layer_moves(a, b))}</section>"
        f'<section id="plan"><h2>Precision plan differences</h2>{_table(_plan_diff(a, b), merge_ci=False)}</section>'
    )
    nav = [("what-changed", "What changed"), ("verdicts", "Verdicts"), ("end-to-end", "End to end"),
           ("per-layer", "Per layer"), ("plan", "Plan")]
    return _page(f"quantlab comparison: {a.title} vs {b.title}", "Two experiments side by side", nav, body)


def write_comparison(out_dir: Path, a: ReportInputs, b: ReportInputs, *, label_a: str = "A",
                     label_b: str = "B") -> Path:
    """Write ``out_dir/index.html`` with :func:`render_comparison`; returns its path."""
    return write_text(Path(out_dir) / "index.html", render_comparison(a, b, label_a=label_a, label_b=label_b))


# --------------------------------------------------------------------------- saving / loading the inputs

_FRAMES = ("end_to_end", "per_layer", "sensitivity", "trajectory", "plan")


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
                 "abs_values": h.abs_values, "note": h.note}
                for h in value
            ]
        elif f.name == "notes":
            meta["notes"] = list(value)
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
                      clipped=h.get("clipped", {}), abs_values=bool(h.get("abs_values")), note=h.get("note", ""))
        for h in meta.get("histograms", [])
    )
    kwargs["notes"] = tuple(meta.get("notes", []))
    for f in fields(ReportInputs):
        if f.name not in kwargs and f.name in meta:
            kwargs[f.name] = meta[f.name]
    if "end_to_end" not in kwargs:
        raise ExperimentError(f"{path}: the end-to-end table is missing; re-run the experiment")
    return ReportInputs(**kwargs)


def with_title(inputs: ReportInputs, title: str) -> ReportInputs:
    """A copy with another title (used when comparing runs)."""
    return replace(inputs, title=title)

"""The report's plots as PNG bytes: per-layer error, activation histograms, search trajectory, changed masks.

matplotlib's object API with the Agg canvas (``Figure`` + ``FigureCanvasAgg``):
no pyplot, no global backend switch in the caller's process. Names drawn in a
plot are pixels, not markup.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator, NullLocator

from ..compare.mask_examples import MaskExample
from .inputs import WORST_LAYERS_SHOWN, HistogramView, ReportInputs, check_per_layer, worst_layers
from .markup import fmt, isnan, short

__all__ = ["MASKS_SHOWN", "report_plots", "png", "figure", "histogram_area", "histogram_outline", "log_counts",
           "mask_plot", "shown_mask_examples"]

def png(fig: Any) -> bytes:
    """PNG bytes of a matplotlib Figure, rendered with the Agg canvas (no pyplot). The figures' constrained layout
    fits them already: ``bbox_inches="tight"`` drew each a second time to crop a few pixels."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, metadata={"Software": None})
    return buf.getvalue()


def figure(width: float, height: float) -> Any:
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig


def histogram_area(ax: Any, counts: np.ndarray, edges: np.ndarray, **style: Any) -> None:
    """A filled step histogram, the pixels of ``ax.stairs(counts, edges, fill=True)``: ``stairs`` makes one Patch
    whose path matplotlib's autoscaling walks bin by bin in Python (1-1.5 s an axis of 2048 bins, most of the time
    a report took); ``fill_between`` computes its limits on arrays."""
    counts = np.asarray(counts, dtype=float)
    ax.fill_between(edges, np.append(counts, counts[-1:]), step="post", lw=0, **style)


def histogram_outline(ax: Any, counts: np.ndarray, edges: np.ndarray, **style: Any) -> None:
    """The outline of a step histogram (``ax.stairs(counts, edges)`` without its end verticals), for the reason
    :func:`histogram_area` gives."""
    counts = np.asarray(counts, dtype=float)
    ax.step(edges, np.append(counts, counts[-1:]), where="post", **style)


def log_counts(ax: Any) -> None:
    """A log y axis with no minor ticks: over the many decades of a histogram's counts they were hundreds of tick
    objects an axis, a third of a report's drawing time, and no label the eye reads."""
    ax.set_yscale("log")
    ax.yaxis.set_minor_locator(NullLocator())




def per_layer_plot(inputs: ReportInputs, worst: pd.DataFrame) -> bytes:
    df = inputs.per_layer
    assert df is not None
    cands = list(dict.fromkeys(df["candidate"]))
    fig = figure(10, 2.6 * len(cands) + 0.4)
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
            y = row["local"] if not isnan(row["local"]) else row["accumulated"]
            if isnan(y):
                continue
            ax.annotate(str(rank), (row["order"], float(y)), xytext=(0, -12 if inputs.layer_metric_higher_is_better else 6),
                        textcoords="offset points", ha="center", fontsize=7, color="#2471a3")
        ax.set_title(short(str(cand), 80), fontsize=10, loc="left")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    axes[-1].set_xlabel("layer, in topological order (input → output)")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    return png(fig)


def histogram_plot(views: Sequence[HistogramView]) -> bytes:
    n = len(views)
    cols = 2 if n > 1 else 1
    rows = math.ceil(n / cols)
    fig = figure(10, 2.9 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    palette = ["#c0392b", "#27ae60", "#8e44ad", "#d68910", "#2471a3", "#17202a"]
    methods = sorted({m for v in views for m in v.ranges})
    color = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    styles = ["--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1)), "-"]
    for ax, view in zip(axes, views):
        edges = np.asarray(view.edges, dtype=float)
        counts = np.asarray(view.counts, dtype=float)
        histogram_area(ax, np.maximum(counts, 0), edges, color="#aeb6bf", alpha=0.9)
        if counts.max(initial=0) > 0:
            log_counts(ax)
        lo_x, hi_x = float(edges[0]), float(edges[-1])
        for i, m in enumerate(methods):
            if m not in view.ranges:
                continue
            lo, hi = view.ranges[m]
            frac = view.clipped.get(m)
            if view.abs_values:
                lab = f"{m}: amax {fmt(hi)}"
            elif abs(lo + hi) < 1e-12 * max(1.0, abs(hi)):
                lab = f"{m}: ±{fmt(hi)}"
            else:
                lab = f"{m}: [{fmt(lo)}, {fmt(hi)}]"
            if frac is not None:
                lab += f" (clips {frac * 100:.3g} %)"
            ls = styles[i % len(styles)]
            ax.axvline(hi, color=color[m], ls=ls, lw=1.5, label=lab)
            if not view.abs_values:
                ax.axvline(lo, color=color[m], ls=ls, lw=1.5)
            lo_x, hi_x = min(lo_x, lo if not view.abs_values else lo_x), max(hi_x, hi)
        span = hi_x - lo_x
        ax.set_xlim(lo_x - 0.03 * span, hi_x + 0.03 * span)
        ax.set_title(short(view.tensor, 60), fontsize=9, loc="left")
        ax.set_xlabel("|activation|" if view.abs_values else "activation value", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="upper right")
    for ax in axes[n:]:
        ax.set_visible(False)
    return png(fig)


def trajectory_plot(inputs: ReportInputs) -> bytes:
    t = inputs.trajectory
    assert t is not None
    fig = figure(10, 3.4)
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
                   label=f"threshold {inputs.verdict.op} {fmt(inputs.verdict.target)}")
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
    return png(fig)


_MASK_COLOURS = {"neither": (1.0, 1.0, 1.0), "both": (0.35, 0.35, 0.35), "reference only": (0.14, 0.44, 0.71),
                 "candidate only": (0.75, 0.22, 0.17)}
"""The overlay's colours: what both masks mark in grey, what the candidate lost in blue and added in red."""

MASKS_SHOWN = 6
"""Mask overlays drawn at most (the lowest IoU first)."""


def shown_mask_examples(examples: Sequence[MaskExample]) -> list[MaskExample]:
    """The examples worth a picture: a mask the candidate changed (IoU below 100), the lowest IoU first."""
    changed = [e for e in examples if e.iou < 100.0]
    return sorted(changed, key=lambda e: e.iou)[:MASKS_SHOWN]


def mask_plot(examples: Sequence[MaskExample]) -> bytes:
    """One panel per example: the reference's and the candidate's masks one over the other (or class maps:
    :func:`_class_overlay`)."""
    cols = min(len(examples), 3)
    rows = math.ceil(len(examples) / cols)
    aspect = max(e.reference.shape[0] / e.reference.shape[1] for e in examples)
    fig = figure(4.2 * cols, min(4.2 * aspect, 6.0) * rows + 0.5)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, e in zip(axes, examples):
        ax.imshow(_class_overlay(e) if e.classes else _mask_overlay(e), interpolation="nearest")
        score = "mIoU" if e.classes else "IoU"
        ax.set_title(f"{short(e.candidate, 24)} · {short(e.output, 24)}\n{short(e.key, 36)}: {score} {e.iou:.1f} %",
                     fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(examples):]:
        ax.set_axis_off()
    shown = [k for k in _MASK_COLOURS if k != "neither"] if any(not e.classes for e in examples) else []
    handles = [Patch(facecolor=_MASK_COLOURS[k], edgecolor="0.6", label=k) for k in shown]
    if any(e.classes for e in examples):
        handles.append(Patch(facecolor=_CLASS_CHANGED, edgecolor="0.6", label="class changed (pale: same class)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=8, frameon=False)
    return png(fig)


def _mask_overlay(e: MaskExample) -> np.ndarray:
    overlay = np.empty(e.reference.shape + (3,))
    r, c = e.reference, e.changed
    for where, colour in ((~r & ~c, "neither"), (r & c, "both"), (r & ~c, "reference only"),
                          (~r & c, "candidate only")):
        overlay[where] = _MASK_COLOURS[colour]
    return overlay


_CLASS_CHANGED = _MASK_COLOURS["candidate only"]
"""A pixel whose best class the candidate changed, in a class map's overlay (red: what changed, as in a mask's)."""


def _class_overlay(e: MaskExample) -> np.ndarray:
    """RGB ``[H, W, 3]``: the reference's class of each pixel in a pale colour (one of 9 hues, by class id) where
    the candidate picks the same class, red where it picks another."""
    palette = np.delete(np.asarray(colormaps["tab10"].colors), 3, axis=0)  # tab10 without its red
    pale = 0.5 * palette + 0.5  # blended with white: the changed pixels stand out
    overlay = pale[np.asarray(e.reference, dtype=np.int64) % len(pale)]
    overlay[e.reference != e.changed] = _CLASS_CHANGED
    return overlay


def report_plots(inputs: ReportInputs) -> dict[str, bytes]:
    """The report's plots as PNG bytes, by name (``per_layer``, ``histograms``, ``trajectory``, ``masks``)."""
    plots: dict[str, bytes] = {}
    if inputs.per_layer is not None and not inputs.per_layer.empty:
        check_per_layer(inputs.per_layer)
        worst = worst_layers(inputs.per_layer, inputs.layer_metric_higher_is_better, WORST_LAYERS_SHOWN)
        plots["per_layer"] = per_layer_plot(inputs, worst)
    if inputs.histograms:
        plots["histograms"] = histogram_plot(inputs.histograms)
    if inputs.trajectory is not None and not inputs.trajectory.empty:
        plots["trajectory"] = trajectory_plot(inputs)
    masks = shown_mask_examples(inputs.mask_examples)
    if masks:
        plots["masks"] = mask_plot(masks)
    return plots

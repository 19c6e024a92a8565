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
Package layout (each module reads only those above it)::

    inputs.py      ReportInputs, Verdict, HistogramView; saving / loading them beside the page
    markup.py      escaping, number formatting, tables, embedded images, the page frame and CSS
    plots.py       per-layer, histogram and trajectory plots (PNG bytes)
    sections.py    one HTML fragment per section
    page.py        render_report / write_report
    comparison.py  render_comparison / write_comparison (two runs side by side)
"""

from __future__ import annotations

from .comparison import render_comparison, write_comparison
from .inputs import (
    MAX_TABLE_ROWS,
    PER_LAYER_COLUMNS,
    REPORT_INPUTS_FILE,
    WORST_LAYERS_SHOWN,
    HistogramView,
    ReportInputs,
    Verdict,
    load_report_inputs,
    save_report_inputs,
    with_title,
    worst_layers,
)
from .markup import esc
from .page import render_report, write_report
from .plots import report_plots

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
    "with_title",
    "REPORT_INPUTS_FILE",
    "WORST_LAYERS_SHOWN",
    "MAX_TABLE_ROWS",
    "worst_layers",
    "esc",
]

"""The sweep's outputs: the table of every cell (Parquet + CSV), plots per model, one HTML page.

    reports/SWEEP/
    ├── index.html          the sweep report: a plot per metric, the table, links to each cell's report
    ├── sweep.parquet/.csv  one row per cell and output
    ├── plots/*.png
    └── cells/CELL/         each cell's own experiment report (index.html, stages/, results/)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..atomic import atomic_path, write_bytes, write_text
from ..report.markup import esc, img, page, table
from ..report.plots import figure, png
from .spec import SweepSpec

__all__ = ["write_sweep_report", "PLOTTED_METRICS"]

PLOTTED_METRICS = ("cosine", "top1_agreement", "sqnr_db", "top1_drop")
_SHOWN = ("cell", "model", "setting", "status", "passed", "output", "cosine", "top1_agreement", "top1",
          "top1_drop", "text_agreement", "cer", "mask_iou", "miou", "sqnr_db", "seconds", "attempts", "error")


def metric_plot(df: pd.DataFrame, metric: str) -> bytes | None:
    """One panel per model: the metric per cell setting, with its bootstrap interval when there is one."""
    ok = df[(df["status"] != "failed") & df.get(metric, pd.Series(dtype=float)).notna()] if metric in df else None
    if ok is None or ok.empty:
        return None
    models = list(dict.fromkeys(ok["model"]))
    fig = figure(10, 2.8 * len(models) + 0.3)
    axes = np.atleast_1d(fig.subplots(len(models), 1, squeeze=False)[:, 0])
    for ax, model in zip(axes, models):
        rows = ok[ok["model"] == model].drop_duplicates("cell")
        y = rows[metric].to_numpy(dtype=float)
        x = np.arange(len(rows))
        lo, hi = f"{metric}_ci_low", f"{metric}_ci_high"
        if lo in rows and hi in rows and rows[lo].notna().any():
            err = np.vstack([y - rows[lo].to_numpy(dtype=float), rows[hi].to_numpy(dtype=float) - y])
            ax.errorbar(x, y, yerr=np.nan_to_num(np.abs(err)), fmt="o", capsize=4, color="#2471a3")
        else:
            ax.plot(x, y, "o", color="#2471a3")
        ax.set_xticks(x, list(rows["setting"]), rotation=20, ha="right", fontsize=8)
        ax.set_title(str(model), loc="left", fontsize=10)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    return png(fig)


def _table_html(df: pd.DataFrame) -> str:
    shown = df[[c for c in _SHOWN if c in df.columns]].copy()
    links = "".join(f'<li><a href="{esc(r)}">{esc(c)}</a></li>' for c, r in
                    df.drop_duplicates("cell")[["cell", "report"]].itertuples(index=False) if r)
    return f"{table(shown, max_rows=500)}<h3>Each cell's own report</h3><ul>{links}</ul>"


def write_sweep_report(report_dir: Path, spec: SweepSpec, df: pd.DataFrame) -> Path:
    """Write the table (Parquet + CSV), the plots and ``index.html``; returns the page's path."""
    for suffix, write in ((".parquet", lambda p: df.to_parquet(p, index=False)),
                          (".csv", lambda p: df.to_csv(p, index=False))):
        with atomic_path(report_dir / f"sweep{suffix}") as tmp:
            write(tmp)
    sections = []
    for metric in PLOTTED_METRICS:
        plot = metric_plot(df, metric)
        if plot is None:
            continue
        write_bytes(report_dir / "plots" / f"{metric}.png", plot)
        sections.append(f'<section id="{esc(metric)}"><h2>{esc(metric)} per setting</h2>'
                        f"{img(plot, metric + ' per cell setting, per model')}</section>")
    failed = df[df["status"] == "failed"].drop_duplicates("cell")
    failures = "".join(f"<li><b>{esc(c)}</b>: {esc(e)}</li>" for c, e in failed[["cell", "error"]].itertuples(index=False))
    body = (f'<section id="cells"><h2>Cells</h2><p>{df["cell"].nunique()} cells over {len(spec.models)} model(s); '
            f"threshold <code>{esc(spec.threshold or 'none')}</code>. Bars are bootstrap confidence intervals.</p>"
            + (f"<p>Failed cells (the sweep went on):</p><ul>{failures}</ul>" if failures else "")
            + _table_html(df) + "</section>" + "".join(sections))
    nav = [("cells", "Cells")] + [(m, m) for m in PLOTTED_METRICS if f'id="{m}"' in body]
    return write_text(report_dir / "index.html", page(f"quantlab sweep: {spec.name}", "Every cell of the grid", nav, body))

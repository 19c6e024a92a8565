"""One experiment's report page: the sections in order, written with its plots."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..atomic import write_bytes, write_text
from .inputs import ReportInputs
from .coverage import coverage_section
from .markup import esc, page
from .plots import report_plots
from .sections import (
    changed_samples_section,
    end_to_end_section,
    environment_section,
    bodies_section,
    histogram_section,
    notes_section,
    per_layer_section,
    plan_section,
    sensitivity_section,
    trajectory_section,
    verdict_section,
)

__all__ = ["render_report", "write_report"]

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
    has_bodies = inputs.bodies is not None and not inputs.bodies.empty
    sections = [
        verdict_section(inputs),
        notes_section(inputs),
        end_to_end_section(inputs),
        changed_samples_section(inputs, plots),
        per_layer_section(inputs, plots),
        histogram_section(inputs, plots),
        bodies_section(inputs),
        coverage_section(inputs.coverage),
        sensitivity_section(inputs) if has_sens else "",
        trajectory_section(inputs, plots),
        plan_section(inputs),
        environment_section(inputs),
    ]
    nav = [("verdict", "Verdict"), ("end-to-end", "End to end"), ("per-layer", "Per layer"),
           ("histograms", "Histograms")] + ([("bodies", "Loop bodies")] if has_bodies else []) \
        + ([("coverage", "Coverage")] if inputs.coverage else [])
    if has_sens:
        nav.append(("sensitivity", "Sensitivity"))
    nav.append(("search", "Search"))
    if inputs.plan is not None and not inputs.plan.empty:
        nav.append(("plan", "Plan"))
    nav.append(("environment", "Environment"))
    return page(f"quantlab report: {inputs.title}", subtitle, nav, "".join(sections))


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

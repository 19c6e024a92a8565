"""Two experiments side by side (``quantlab report --compare A B``): what changed and what moved."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..atomic import write_json, write_text
from .inputs import ReportInputs
from .markup import esc, flatten, fmt, page, table

__all__ = ["render_comparison", "write_comparison"]

def _settings_diff(a: ReportInputs, b: ReportInputs) -> pd.DataFrame:
    fa, fb = flatten(a.reproducibility), flatten(b.reproducibility)
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
    ci = f" [{fmt(v.ci_low)}, {fmt(v.ci_high)}]" if v.ci_low is not None else ""
    return f"{'PASS' if v.passed else 'FAIL'}: {v.candidate} {v.metric} = {fmt(v.value)}{ci} ({v.threshold})"


def render_comparison(a: ReportInputs, b: ReportInputs, *, label_a: str = "A", label_b: str = "B") -> str:
    """Two experiments side by side: what changed (settings, hashes), what moved (metrics, layers, plan)."""
    intro = (f"<p><b>A</b> = <code>{esc(label_a)}</code> ({esc(a.title)}), "
             f"<b>B</b> = <code>{esc(label_b)}</code> ({esc(b.title)}). Δ = B − A.</p>")
    sha_a, sha_b = a.model.get("sha256"), b.model.get("sha256")
    if sha_a and sha_b and sha_a != sha_b:
        intro += (f'<p class="caveat">A and B are experiments on different models (sha256 {esc(str(sha_a)[:12])} '
                  f"and {esc(str(sha_b)[:12])}): their figures do not measure one model's quantization, and the "
                  "layer and plan tables pair only the names both models have.</p>")
    verdicts = table(pd.DataFrame([{"run": "A", "verdict": _verdict_line(a)},
                                    {"run": "B", "verdict": _verdict_line(b)}]), merge_ci=False)
    body = (
        f'<section id="what-changed"><h2>What changed</h2>{intro}'
        f"{table(_settings_diff(a, b), merge_ci=False)}</section>"
        f'<section id="verdicts"><h2>Verdicts</h2>{verdicts}</section>'
        f'<section id="end-to-end"><h2>End to end</h2>{table(_end_to_end_side_by_side(a, b))}</section>'
        f'<section id="per-layer"><h2>Layers that moved most ({esc(a.layer_metric)}, accumulated)</h2>'
        f"{table(_per_layer_moves(a, b))}</section>"
        f'<section id="plan"><h2>Precision plan differences</h2>{table(_plan_diff(a, b), merge_ci=False)}</section>'
    )
    nav = [("what-changed", "What changed"), ("verdicts", "Verdicts"), ("end-to-end", "End to end"),
           ("per-layer", "Per layer"), ("plan", "Plan")]
    return page(f"quantlab comparison: {a.title} vs {b.title}", "Two experiments side by side", nav, body)


def write_comparison(out_dir: Path, a: ReportInputs, b: ReportInputs, *, label_a: str = "A",
                     label_b: str = "B") -> Path:
    """Write ``out_dir/comparison.json`` (what was compared: marks the folder as quantlab's) and
    ``out_dir/index.html`` with :func:`render_comparison`; returns the page's path."""
    write_json(Path(out_dir) / "comparison.json", {"a": {"label": label_a, "title": a.title},
                                                  "b": {"label": label_b, "title": b.title}})
    return write_text(Path(out_dir) / "index.html", render_comparison(a, b, label_a=label_a, label_b=label_b))

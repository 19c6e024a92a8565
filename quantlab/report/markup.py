"""HTML building blocks: escaping, numbers for people, tables, embedded images, the page frame.

Every string that can come from a model or a user file is escaped here: with
:func:`html.escape` for text and ``DataFrame.to_html(escape=True)`` for tables.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .inputs import MAX_TABLE_ROWS

__all__ = ["esc", "fmt", "short", "isnan", "table", "kv_table", "flatten", "img", "page", "CSS"]

def esc(value: Any) -> str:
    """HTML-escaped text of anything (quotes too, so it is safe in attributes)."""
    return html.escape(str(value), quote=True)


def short(name: str, limit: int = 48) -> str:
    """A long model-supplied name shortened for a title or a terminal table (the files keep it whole).

    tf2onnx joins a fused node's names with ``;`` (300 characters): the first one names it. Past ``limit``,
    the start and the end are kept (``StatefulPartitionedCall/…/dense_1/MatMul``): a path's end says which
    layer, its start which block.
    """
    first, *rest = name.split(";")
    if rest and first:
        name = f"{first} (+{len(rest)})"
    if len(name) <= limit:
        return name
    head = (limit - 1) // 3
    return name[:head] + "…" + name[-(limit - 1 - head):]


def fmt(value: Any, digits: int = 4) -> str:
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
            for places in (6, 9):  # 0.9999996 at 6 places read "1."
                text = f"{v:.{places}f}".rstrip("0")
                if abs(float(text)) < 1:
                    return text
            return f"{'−' if v < 0 else ''}1 − {1 - abs(v):.1e}"
        return f"{v:.{digits}g}" if abs(v) >= 1 else f"{v:.{digits}f}".rstrip("0").rstrip(".") or "0"
    return str(value)


def merge_ci_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Columns ``X``, ``X_ci_low``, ``X_ci_high`` become one text column ``X`` = ``v [lo, hi]``."""
    out = pd.DataFrame(index=df.index)
    cols = list(df.columns)
    for col in cols:
        if col.endswith(("_ci_low", "_ci_high")) and col.rsplit("_ci_", 1)[0] in cols:
            continue
        lo, hi = f"{col}_ci_low", f"{col}_ci_high"
        if lo in cols and hi in cols:
            out[col] = [
                f"{fmt(v)} [{fmt(a)}, {fmt(b)}]" if not isnan(a) else fmt(v)
                for v, a, b in zip(df[col], df[lo], df[hi])
            ]
        else:
            out[col] = [fmt(v) for v in df[col]]
    return out


def isnan(v: Any) -> bool:
    try:
        return v is None or math.isnan(float(v))
    except (TypeError, ValueError):
        return False


def table(df: pd.DataFrame | None, *, max_rows: int = MAX_TABLE_ROWS, merge_ci: bool = True,
           caption: str = "") -> str:
    """An escaped HTML table (pandas ``to_html(escape=True)``), numbers formatted for people."""
    if df is None or df.empty:
        return '<p class="muted">(nothing to show)</p>'
    shown = df.head(max_rows)
    shown = merge_ci_columns(shown) if merge_ci else shown.map(fmt)
    body = shown.to_html(escape=True, index=False, border=0, classes="tbl", na_rep="—")
    more = ""
    if len(df) > max_rows:
        more = f'<p class="muted">… {len(df) - max_rows} more rows in the CSV/Parquet files next to this report.</p>'
    cap = f'<p class="caption">{esc(caption)}</p>' if caption else ""
    return f'<div class="tablewrap">{body}</div>{cap}{more}'


def kv_table(items: Mapping[str, Any]) -> str:
    """Two-column key/value table of flattened ``items`` (all escaped)."""
    flat = flatten(items)
    if not flat:
        return '<p class="muted">(nothing recorded)</p>'
    rows = "".join(f"<tr><th>{esc(k)}</th><td><code>{esc(v)}</code></td></tr>" for k, v in flat.items())
    return f'<div class="tablewrap"><table class="tbl kv">{rows}</table></div>'


def flatten(items: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in sorted(items.items(), key=lambda kv: str(kv[0])):
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)) and all(not isinstance(x, (Mapping, list, tuple)) for x in v):
            out[key] = ", ".join(str(x) for x in v)
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v, default=str)
        else:
            out[key] = str(v)
    return out


def img(png: bytes | None, alt: str) -> str:
    """An <img> embedding ``png`` as a base64 data URI."""
    if not png:
        return ""
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="plot" alt="{esc(alt)}" src="data:image/png;base64,{data}">'


CSS = """
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
.none .badge { background: #7f8c8d; }
.caveat { background: #fef5e7; border-left: 4px solid #d68910; padding: 8px 12px; }
.tablewrap { overflow-x: auto; margin: 8px 0; }
table.tbl { border-collapse: collapse; font-size: 13px; }
table.tbl th, table.tbl td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: left;
                             vertical-align: top; }
table.tbl td { max-width: 60ch; overflow-wrap: anywhere; }
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


def page(title: str, subtitle: str, nav: Sequence[tuple[str, str]], body: str) -> str:
    links = "".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t in nav)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
        f"<h1>{esc(title)}</h1><p class=\"subtitle\">{subtitle}</p><nav>{links}</nav>"
        f"{body}<footer>Written by quantlab. Self-contained: inline styles and embedded images, "
        "no scripts, no network.</footer></main></body></html>\n"
    )

"""The report's sections, each an HTML fragment built from :class:`ReportInputs` and the plots."""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from .inputs import MAX_TABLE_ROWS, WORST_LAYERS_SHOWN, ReportInputs, check_per_layer, worst_layers
from .markup import esc, fmt, img, kv_table, table
from .plots import shown_mask_examples

__all__ = ["verdict_section", "notes_section", "end_to_end_section", "per_layer_section", "histogram_section",
           "bodies_section", "sensitivity_section", "trajectory_section", "plan_section", "environment_section"]

def verdict_section(inputs: ReportInputs) -> str:
    v = inputs.verdict
    if v is None and inputs.unjudged:
        return ('<section id="verdict"><h2>Verdict</h2><p class="verdict none"><span class="badge">NOT JUDGED'
                f"</span> {esc(inputs.unjudged)}</p></section>")
    if v is None:
        return ('<section id="verdict"><h2>Verdict</h2><p class="verdict none">No threshold was set: '
                "the tables below describe the drift without a pass/fail verdict.</p></section>")
    cls = "pass" if v.passed else "fail"
    word = "PASS" if v.passed else "FAIL"
    ci = ""
    if v.ci_low is not None and v.ci_high is not None:
        ci = f" ({int(round(v.confidence * 100))} % CI {fmt(v.ci_low)} – {fmt(v.ci_high)})"
    sentence = (
        f"Candidate <b>{esc(v.candidate)}</b>: {esc(v.metric)} = <b>{fmt(v.value)}</b>{ci}; "
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


def end_to_end_section(inputs: ReportInputs) -> str:
    return (
        '<section id="end-to-end"><h2>End to end, per candidate</h2>'
        "<p>Each candidate's outputs against the FP32 ONNX reference on the validation set. "
        "Bracketed figures are bootstrap confidence intervals. Accuracy (<code>top1</code>, "
        "<code>top5</code>) and agreement with the reference's top-1 are in %; drops are in percentage "
        "points (reference minus candidate); <code>mcnemar_p</code> is the exact McNemar test between the "
        "reference's and the candidate's correctness: a small value means the accuracy difference is "
        "not noise. Outputs scored at every position (OCR, token logits) add <code>token_agreement</code> "
        "(positions whose best class is the reference's) and <code>sequence_agreement</code> (samples that "
        "agree at every position), segmentation maps <code>miou</code> (the mean over classes of the overlap of "
        "the candidate's class map with the reference's, %), and CTC outputs (<code>ctc_blank</code> set) <code>text_agreement</code> "
        "(samples whose greedy CTC text is the reference's) and <code>cer</code> (the character error rate "
        "against it, %); integer outputs (class ids, decoded tokens) add <code>exact_match</code> "
        "(samples whose output equals the reference's) and <code>element_match</code>; outputs a Sigmoid writes "
        "(a text detector's map, tags, voice activity) add the same two for the masks their probabilities mark "
        "(<code>p &gt; decision_threshold</code>, 0.5 by default) and <code>mask_iou</code> (the overlap of the "
        "candidate's mask with the reference's, %, over the samples where either marks anything). In sequence mode, "
        "<code>free_</code> columns are the free-running figures: every model reading back its own state, "
        "as deployed.</p>"
        f"{_candidates_list(inputs)}{table(_end_to_end_view(inputs.end_to_end))}</section>"
    )


def changed_samples_section(inputs: ReportInputs, plots: Mapping[str, bytes]) -> str:
    """The samples whose decision changed (a classifier's top-1, text read per position, integer outputs, masks),
    and the masks a candidate changed most, drawn."""
    df = inputs.changed_samples
    if df is None:
        return ""
    drawn = ""
    if plots.get("masks"):
        kinds = {e.classes for e in shown_mask_examples(inputs.mask_examples)}
        said = []
        if False in kinds:
            said.append("The sample whose mask each candidate changed most (the lowest <code>mask_iou</code>): "
                        "grey where both masks mark, blue what the candidate lost, red what it added.")
        if True in kinds:
            said.append("The sample whose segmentation each candidate changed most (the lowest <code>miou</code>): "
                        "each pixel in a pale colour of the reference's class, red where the candidate picks "
                        "another class.")
        drawn = f"<p>{' '.join(said)}</p>" + img(plots["masks"], "masks the candidates changed most")
    e2e = inputs.end_to_end
    positions_moved = "sequence_agreement" in e2e.columns and bool((e2e["sequence_agreement"] < 100).any())
    if df.empty and "text_agreement" in e2e.columns and positions_moved:
        body = ('<p class="muted">No candidate changed the text any validation sample reads. Some changed the '
                "best class at a few positions without changing the text (<code>token_agreement</code>, "
                "<code>sequence_agreement</code> below 100 in the table above).</p>")
    elif df.empty:
        body = '<p class="muted">No candidate changed a decision on any validation sample.</p>'
    else:
        body = table(df, caption="changed: how many samples that candidate's output changed in all (the furthest "
                                 "from the reference first; every sample is in per_sample.csv)")
    return ('<section id="changed-samples"><h2>Samples whose decision changed</h2>'
            "<p>Where a candidate's top-1 class, text read per position, integer output or mask differs from the "
            "reference's: the samples to look at first.</p>" + body + drawn + "</section>")


_END_TO_END_FIRST = ("candidate", "output", "samples", "top1_agreement", "text_agreement", "cer", "token_agreement",
                     "miou", "sequence_agreement", "mask_iou", "exact_match", "element_match", "top1", "ref_top1", "top1_drop",
                     "mcnemar_p", "cosine", "sqnr_db", "free_sqnr_db", "top5", "ref_top5", "top5_drop")


def _end_to_end_view(df: pd.DataFrame | None) -> pd.DataFrame | None:
    """The figures a reviewer decides on first (agreement, accuracy, drop, McNemar), then the rest."""
    if df is None:
        return None
    first = [c for c in _END_TO_END_FIRST if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]]


def per_layer_section(inputs: ReportInputs, plots: Mapping[str, bytes]) -> str:
    df = inputs.per_layer
    if df is None or df.empty:
        return ('<section id="per-layer"><h2>Per-layer error</h2><p class="muted">No per-layer comparison '
                "was recorded.</p></section>")
    check_per_layer(df)
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
        "<i>victim</i> of layers before it. Numbers on the plot are ranks in the table below. "
        "<i>input_sqnr_pred</i> is the SQNR its quantized inputs are predicted to keep with the candidate's ranges "
        "(from the calibration histograms): low there too, the input range is the cause; high there but low "
        "locally, the layer's weights or output range are.</p>"
        f"<p>Worst layers by local error:</p><ul>{''.join(names)}</ul>"
        f"{img(plots.get('per_layer'), 'per-layer ' + inputs.layer_metric + ', accumulated vs local')}"
        f"<h3>Worst {WORST_LAYERS_SHOWN} layers per candidate</h3>{table(shown)}</section>"
    )


def histogram_section(inputs: ReportInputs, plots: Mapping[str, bytes]) -> str:
    if not inputs.histograms:
        return ('<section id="histograms"><h2>Activation ranges of the worst tensors</h2>'
                '<p class="muted">No activation statistics were recorded.</p></section>')
    rows = []
    for v in inputs.histograms:
        for m in sorted(v.ranges):
            lo, hi = v.ranges[m]
            rows.append({"tensor": v.tensor, "calibrator": m, "low": lo, "high": hi,
                         "clipped %": 100 * v.clipped[m] if m in v.clipped else float("nan"),
                         "zeroed %": 100 * v.zeroed[m] if m in v.zeroed else float("nan"),
                         "SQNR dB (predicted)": v.sqnr_db.get(m, float("nan"))})
    notes = "".join(f"<li><code>{esc(v.tensor)}</code>: {esc(v.note)}</li>" for v in inputs.histograms if v.note)
    return (
        '<section id="histograms"><h2>Activation ranges of the worst tensors</h2>'
        "<p>Histogram of each tensor's values over the calibration set (log scale), with the clipping range "
        "each calibrator chose. Values beyond a line saturate in INT8; a wider range keeps outliers but "
        "spends resolution on them (coarser steps for everything else: <i>zeroed %</i> is the share of non-zero "
        "values under half a step, which INT8 reads as 0). This is why entropy often clips what minmax keeps. "
        "<i>SQNR dB (predicted)</i> weighs both by the values' energy: the SQNR this tensor keeps in INT8 with that "
        "range, in the unit of the comparison above.</p>"
        f"{img(plots.get('histograms'), 'activation histograms with each calibrator range')}"
        f"{'<ul>' + notes + '</ul>' if notes else ''}{table(pd.DataFrame(rows))}</section>"
    )


def bodies_section(inputs: ReportInputs) -> str:
    """The Loop/Scan bodies calibration ran step by step (a decoder's loop, a Scan RNN) and the If branches it ran: where their widest range and
    their noisiest predicted INT8 tensor are. Empty when the model has none."""
    if inputs.bodies is None or inputs.bodies.empty:
        return ""
    return ('<section id="bodies"><h2>Loop and Scan bodies</h2>'
            "<p>Calibration ran each body step by step, as its Loop or Scan does, and ranged its tensors. They are "
            "written in INT8 only on request (<code>quantlab build --int8-bodies</code>, <code>[candidates] "
            "int8_bodies = true</code>); otherwise the bodies stay float. Per method: the widest range and the lowest "
            "predicted INT8 SQNR inside each body.</p>" + table(inputs.bodies, merge_ci=False) + "</section>")


def sensitivity_section(inputs: ReportInputs) -> str:
    # one ranking kind per search: the other kind's columns are empty
    sens = inputs.sensitivity.dropna(axis=1, how="all") if inputs.sensitivity is not None else pd.DataFrame()
    margins = "margin_gain" in sens.columns
    why = ("For a top-1 threshold the ranking reads the <i>critical samples</i> (those all-INT8 flips and those "
           "whose FP32 top-1 lead is smallest): <i>margin_gain</i> is how much reverting the group alone shrank "
           "their top-1 margin shortfall (in FP32 logit standard deviations), <i>flips_fixed</i> the all-INT8 "
           "flips it alone undid, <i>pinned_step</i> when the search pinned it; the pinned groups come first."
           if margins else
           "Fusion groups ranked by the noise each makes as the only INT8 group (<i>isolated_sqnr_db</i>, lowest "
           "first): reverting groups alone did not add up (<i>impact_db</i> was not positive for many), so their "
           "INT8 errors interact; the search pins groups from the top of this list."
           if "isolated_sqnr_db" in sens.columns else
           "Fusion groups ranked by how much reverting them alone improves the output (most sensitive first); "
           "the search pins groups from the top of this list.")
    return (
        '<section id="sensitivity"><h2>Sensitivity ranking</h2>'
        f"<p>{why}</p>"
        f"{table(sens, max_rows=30)}</section>"
    )


def _trajectory_view(t: pd.DataFrame) -> pd.DataFrame:
    """The trajectory as a reviewer reads it: short plan hashes, the bookkeeping columns left to the CSV."""
    if "only_int8" in t.columns:  # an isolated ranking's rows pin every group but one: name that one
        alone = t["only_int8"].fillna("").astype(str)
        t = t.assign(pinned=t["pinned"].where(alone == "", "all but " + alone))
    view = t.drop(columns=[c for c in ("pins", "margin", "latency_ms", "only_int8") if c in t.columns
                           and (c != "latency_ms" or t[c].isna().all())])
    if "plan_hash" in view.columns:
        view = view.assign(plan_hash=view["plan_hash"].astype(str).str[:12])
    if "pinned" in view.columns:
        view = view.assign(pinned=view["pinned"].astype(str).str.replace(",", ", "))
    return view


def trajectory_section(inputs: ReportInputs, plots: Mapping[str, bytes]) -> str:
    t = inputs.trajectory
    if t is None or t.empty:
        why = ("the all-INT8 candidates already met the threshold or the search was off"
               if inputs.verdict is not None else inputs.unjudged or "no threshold was set")
        return (f'<section id="search"><h2>Sensitivity search</h2><p class="muted">No search ran ({esc(why)}).'
                "</p></section>")
    return (
        '<section id="search"><h2>Search trajectory</h2>'
        "<p>Each step evaluates one precision plan on the validation set: the metric with its confidence "
        "interval (left axis) and the share of fusion groups still in INT8 (bars, right axis).</p>"
        f"{img(plots.get('trajectory'), 'search trajectory: metric and INT8 share per step')}"
        f"{table(_trajectory_view(t))}</section>"
    )


def plan_section(inputs: ReportInputs) -> str:
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
        "<code>plan.json</code> next to this report). For every group the search pinned, "
        "<i>measured_impact</i> gives what got it pinned: its rank and how much reverting it alone "
        "raised the output SQNR on the ranking subset (for a top-1 threshold: the top-1 margins of the "
        "critical samples).</p>"
        f"{summary}{table(plan, max_rows=MAX_TABLE_ROWS)}</section>"
    )


def environment_section(inputs: ReportInputs) -> str:
    return (
        '<section id="environment"><h2>Environment and reproducibility</h2>'
        "<h3>Model</h3>" + kv_table(inputs.model) +
        "<h3>Hashes, settings and command</h3>" + kv_table(inputs.reproducibility) +
        "<h3>Versions</h3>" + kv_table(inputs.environment) + "</section>"
    )


def notes_section(inputs: ReportInputs) -> str:
    if not inputs.notes:
        return ""
    items = "".join(f"<li>{esc(n)}</li>" for n in inputs.notes)
    return f'<section id="notes"><h2>Notes</h2><ul class="notes">{items}</ul></section>'

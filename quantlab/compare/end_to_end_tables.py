"""The end-to-end table (one row per candidate x output) and the per-sample table, made once from what
:class:`.end_to_end.EndToEnd` kept: one pass's records or the shards' merged ones, the same code either way
(columns in :mod:`.result`).

Error figures come from the batches' sums added in batch order; means, minima and intervals are over the
samples (a paired bootstrap, exact where it collapses: :func:`.intervals.intervals`). Samples whose output had
another size than the reference's (a data-sized output) hold NaN: left out of the figures and of their
intervals, kept as rows of the per-sample table so every column stays aligned with the samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..metrics import errors_from_sums, mcnemar_exact_p
from .choices import CHOICE_COLUMNS
from .intervals import intervals
from .options import CompareOptions
from .result import (
    CLASSIFIER_COLUMNS,
    CTC_COLUMNS,
    END_TO_END_COLUMNS,
    LABEL_COLUMNS,
    MASK_COLUMNS,
    MATCH_COLUMNS,
    PER_SAMPLE_COLUMNS,
    POSITION_COLUMNS,
    SEGMENTATION_COLUMNS,
)

if TYPE_CHECKING:
    from .end_to_end import EndToEnd, OutputStats

__all__ = ["end_to_end_frames"]


def end_to_end_frames(e2e: EndToEnd, options: CompareOptions) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The end-to-end table (one row per candidate x output) and the per-sample table."""
    rows: list[dict[str, Any]] = []
    samples: list[pd.DataFrame] = []
    user_names = list(dict.fromkeys(k for c in e2e.user.values() for d in c for k in d))
    for name in e2e.candidates:
        user_cols = _user_columns(e2e, name, user_names)
        for o in e2e.outputs:
            row, sample = _row(e2e, name, o, user_cols, options)
            rows.append(row)
            samples.append(pd.DataFrame(sample))
    columns_order = _column_order(e2e, user_names)
    frame = pd.DataFrame(rows)
    for c in columns_order:
        if c not in frame.columns:
            frame[c] = math.nan
    frame = frame[columns_order + [c for c in frame.columns if c not in columns_order]]
    frame["samples"] = frame["samples"].astype("int64")
    frame["nan_count"] = frame["nan_count"].astype("int64")
    frame["shape_mismatch"] = frame["shape_mismatch"].astype("int64")
    per_sample = (pd.concat(samples, ignore_index=True) if samples
                  else pd.DataFrame(columns=list(PER_SAMPLE_COLUMNS)))
    return frame.reset_index(drop=True), per_sample


def _user_columns(e2e: EndToEnd, name: str, user_names: Sequence[str]) -> dict[str, np.ndarray]:
    """A candidate's user metric numbers per sample, one array per metric name (NaN where a call left it out)."""
    return {k: np.array([d.get(k, math.nan) for d in e2e.user[name]], dtype=np.float64) for k in user_names}


def _column_order(e2e: EndToEnd, user_names: Sequence[str]) -> list[str]:
    """The end-to-end table's columns in order: the common ones, then those the outputs call for (classifiers,
    choices, labels, user metrics); a row whose output has no use for one holds NaN there."""
    columns_order = list(END_TO_END_COLUMNS)
    if e2e.classifiers:
        columns_order += list(CLASSIFIER_COLUMNS)
    if e2e.positions:
        columns_order += [c for c in POSITION_COLUMNS if c not in columns_order]
    if e2e.segmentation:
        columns_order += list(SEGMENTATION_COLUMNS)
    if e2e.ctc:
        columns_order += list(CTC_COLUMNS)
    if len(e2e.choices) > len(e2e.positions):
        columns_order += list(MATCH_COLUMNS)
    if e2e.decided:
        columns_order += list(MASK_COLUMNS)
    if e2e.labels.accuracy:
        columns_order += list(LABEL_COLUMNS)
    for k in user_names:
        columns_order += [k, f"{k}_ci_low", f"{k}_ci_high"]
    return columns_order


def _row(e2e: EndToEnd, name: str, o: str, user_cols: Mapping[str, np.ndarray],
         options: CompareOptions) -> tuple[dict[str, Any], dict[str, Any]]:
    """One end-to-end row and the per-sample columns of one candidate output."""
    st = e2e.stats[(name, o)]
    err = errors_from_sums(st.sums())
    cos = np.concatenate(st.cosine) if st.cosine else np.zeros(0)
    kept = cos[~np.isnan(cos)] if st.mismatched else cos  # samples whose sizes differed are left out
    row: dict[str, Any] = {
        "candidate": name, "output": o, "samples": len(e2e.keys),
        "cosine": float(kept.mean()) if kept.size else math.nan,
        "cosine_min": float(kept.min()) if kept.size else math.nan,
        "sqnr_db": err["sqnr_db"], "max_abs": err["max_abs"], "mean_abs": err["mean_abs"],
        "rel_l2": err["rel_l2"], "nan_count": int(st.nonfinite), "shape_mismatch": int(st.mismatched),
    }
    columns: dict[str, np.ndarray] = {"cosine": kept}
    sample = {"candidate": name, "output": o, "sample": np.asarray(e2e.indices, dtype=np.int64),
              "key": list(e2e.keys), "cosine": cos, "sqnr_db": np.concatenate(st.sqnr),
              "max_abs": np.concatenate(st.max_abs)}
    if o in e2e.classifiers:
        _add_classifier_figures(e2e, o, st, row, columns, sample)
    if e2e.choices.get(o) == "values":  # ids and masks: equal or not (exact_match), their cosine means nothing
        row.update(dict.fromkeys(_SIMILARITY, math.nan))
        del columns["cosine"]
        sample.update(cosine=np.full(len(cos), np.nan), sqnr_db=np.full(len(cos), np.nan))
    elif st.widest == 1:  # one value per sample: its cosine is the sign agreement, 1 whatever the error
        row.update(cosine=math.nan, cosine_min=math.nan)
        del columns["cosine"]
        sample.update(cosine=np.full(len(cos), np.nan))
    apart: dict[str, np.ndarray] = {}  # choices where sizes differed: a sample of another length still counts
    if o in e2e.choices:
        _add_choice_figures(e2e, o, st, row, apart if st.mismatched else columns, sample)
    for name, per in (("mask_iou", st.iou), ("miou", st.miou)):  # NaN in some samples: an interval of its own
        if per:
            values = np.concatenate(per)
            row[name] = float(np.nanmean(values)) if values.size and not np.isnan(values).all() else math.nan
            apart[name] = values
            sample[name] = values
    for k, v in user_cols.items():
        row[k] = float(np.nanmean(v)) if v.size and not np.isnan(v).all() else math.nan
        columns[k] = v[~np.isnan(cos)] if st.mismatched else v  # paired with the kept samples
        sample[k] = v
    _add_intervals(row, columns, apart, options)
    return row, sample


def _add_intervals(row: dict[str, Any], columns: Mapping[str, np.ndarray], apart: Mapping[str, np.ndarray],
                   options: CompareOptions) -> None:
    """Each figure's ``_ci_low`` / ``_ci_high``: ``columns`` paired over the same samples, each of ``apart`` alone
    over the samples it has a number for."""
    cis = intervals(columns, options)
    for k, v in apart.items():
        cis.update(intervals({k: v[~np.isnan(v)]}, options))
    for k, (lo, hi) in cis.items():
        row[f"{k}_ci_low"], row[f"{k}_ci_high"] = lo, hi


def _add_classifier_figures(e2e: EndToEnd, o: str, st: OutputStats, row: dict[str, Any],
                            columns: dict[str, np.ndarray], sample: dict[str, Any]) -> None:
    """Top-1 agreement and, on the labelled output, accuracy, drops and McNemar's test."""
    ref = e2e.reference[o]
    rt1 = np.concatenate(ref.top1)
    ct1 = np.concatenate(st.top1)
    agree = (rt1 == ct1).astype(np.float64) * 100.0
    columns["top1_agreement"] = agree
    row["classes"] = e2e.classifiers[o]
    row["top1_agreement"] = float(agree.mean())
    sample.update(ref_top1_class=rt1, top1_class=ct1, top1_agree=agree > 0)
    if not (e2e.labels.accuracy and o == e2e.labels.label_output):
        return
    rc1 = np.concatenate(ref.correct1)
    cc1 = np.concatenate(st.correct1)
    rc5 = np.concatenate(ref.correct5)
    cc5 = np.concatenate(st.correct5)
    columns.update(ref_top1=rc1 * 100.0, top1=cc1 * 100.0, top1_drop=(rc1 * 1.0 - cc1) * 100.0)
    if e2e.classifiers[o] > 5:
        columns.update(ref_top5=rc5 * 100.0, top5=cc5 * 100.0, top5_drop=(rc5 * 1.0 - cc5) * 100.0)
    for k in ("ref_top1", "top1", "top1_drop", "ref_top5", "top5", "top5_drop"):
        row[k] = float(columns[k].mean()) if k in columns else math.nan
    b = int(np.count_nonzero(rc1 & ~cc1))
    c = int(np.count_nonzero(~rc1 & cc1))
    row.update(mcnemar_p=mcnemar_exact_p(b, c), ref_only_correct=b, cand_only_correct=c)
    sample.update(label=list(e2e.sample_labels), ref_correct=rc1, correct=cc1, ref_top5_correct=rc5,
                  top5_correct=cc5)


def _add_choice_figures(e2e: EndToEnd, o: str, st: OutputStats, row: dict[str, Any],
                        columns: dict[str, np.ndarray], sample: dict[str, Any]) -> None:
    """How often the candidate makes the reference's choices (:mod:`.choices`)."""
    part_name, whole_name, agree_name = CHOICE_COLUMNS[e2e.choices[o]]
    part = np.concatenate(st.parts) if st.parts else np.zeros(0)
    whole = np.concatenate(st.wholes) if st.wholes else np.zeros(0, dtype=bool)
    columns[part_name] = part
    columns[whole_name] = whole * 100.0
    if o in e2e.positions:
        row["classes"] = e2e.positions[o]
    row[part_name] = float(np.nanmean(part)) if part.size and not np.isnan(part).all() else math.nan
    row[whole_name] = float(whole.mean() * 100.0) if whole.size else math.nan
    sample.update({part_name: part, agree_name: whole})
    if o in e2e.ctc:
        same = np.concatenate(st.texts) if st.texts else np.zeros(0, dtype=bool)
        cer = np.concatenate(st.cer) if st.cer else np.zeros(0)
        columns.update(text_agreement=same * 100.0, cer=cer)
        row["text_agreement"] = float(same.mean() * 100.0) if same.size else math.nan
        row["cer"] = float(np.nanmean(cer)) if cer.size and not np.isnan(cer).all() else math.nan
        sample.update(text_agree=same, cer=cer)


_SIMILARITY = ("cosine", "cosine_min", "sqnr_db", "rel_l2")
"""Figures that treat an output as a signal: left out (NaN) for integer and boolean outputs, which keep max_abs
and mean_abs (a count off by one) and get exact_match / element_match instead."""

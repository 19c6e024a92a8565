"""The samples whose decision a candidate changed: what a reviewer opens first.

A per-sample table (:data:`quantlab.compare.PER_SAMPLE_COLUMNS` plus the flags of the outputs read as choices)
becomes one row per changed (candidate, output, sample), saying what changed::

    top1_agree = False       "top-1 281 -> 285"                     a classifier's best class
    sequence_agree = False   "92.5 % of positions agree"            text read per position (OCR, tokens)
                             "mIoU 81.2 %, 97.5 % of pixels agree"  a segmentation map
    text_agree = False       "text: CER 12.5 %"                     CTC text (compare --ctc-blank): it decides
                                                                    over sequence_agree where it was read
    exact_agree = False      "75 % of elements equal" / "another length"   ids, masks, decoded tokens
                             "mask: IoU 93.1 %, 99.6 % of elements agree"  a Sigmoid's probabilities' mask

the furthest from the reference first (by the character error rate of a CTC text, a mask's IoU or a
segmentation's mIoU, the % of positions or elements that agree; a changed top-1 by 100 x its cosine), at most
``shown`` per candidate.
"""

from __future__ import annotations

import math

import pandas as pd

__all__ = ["CHANGED_SAMPLES_SHOWN", "changed_samples"]

CHANGED_SAMPLES_SHOWN = 12
"""Changed samples listed per candidate in the report (all of them are in the per-sample files)."""

_FLAGS = ("top1_agree", "sequence_agree", "text_agree", "exact_agree")


def changed_samples(per_sample: pd.DataFrame | None, shown: int = CHANGED_SAMPLES_SHOWN) -> pd.DataFrame | None:
    """The changed samples (see the module docstring), with ``changed``: how many samples that candidate's output
    changed in all; None when no output is read as a choice."""
    if per_sample is None or per_sample.empty or not any(f in per_sample.columns for f in _FLAGS):
        return None
    if "text_agree" in per_sample.columns:  # CTC text read: other positions reading the same text changed nothing
        per_sample = per_sample.astype({"sequence_agree": object})
        per_sample.loc[per_sample["text_agree"].notna(), "sequence_agree"] = None
    flags = [f for f in _FLAGS if f in per_sample.columns]
    decided = per_sample[flags].notna().any(axis=1)
    changed = per_sample[decided & ~per_sample[flags].fillna(True).astype(bool).all(axis=1)].copy()
    columns = ["candidate", "output", "sample", "key", "change", "changed", "cosine"]
    if changed.empty:
        return pd.DataFrame(columns=columns)
    changed["change"] = [_what_changed(row) for row in changed.to_dict("records")]
    changed["changed"] = changed.groupby(["candidate", "output"], sort=False)["sample"].transform("size")
    changed = changed.assign(_worst=_how_far(changed)).sort_values("_worst", na_position="last", kind="stable")
    order = {c: i for i, c in enumerate(dict.fromkeys(per_sample["candidate"]))}
    changed = changed.sort_values("candidate", key=lambda c: c.map(order), kind="stable")
    return changed.groupby("candidate", sort=False).head(shown)[columns].reset_index(drop=True)


def _how_far(rows: pd.DataFrame) -> pd.Series:
    """Per row, a number that is lower the further the sample is from the reference's: 100 - its character error
    rate where its CTC text was read, else a mask's IoU or a segmentation's mIoU, else the % of positions or
    elements that agree where the output has them, else 100 x cosine (a changed top-1)."""
    far = pd.Series(100.0 * rows["cosine"].astype(float), index=rows.index)
    for part in ("element_match", "token_agreement", "mask_iou", "miou"):
        if part in rows.columns:
            far = rows[part].astype(float).where(rows[part].notna(), far)
    if "cer" in rows.columns:
        far = (100.0 - rows["cer"].astype(float)).where(rows["cer"].notna(), far)
    return far


def _what_changed(row: dict) -> str:
    if row.get("top1_agree") is False or row.get("top1_agree") == 0:
        return f"top-1 {_int(row.get('ref_top1_class'))} -> {_int(row.get('top1_class'))}"
    if row.get("text_agree") is False or row.get("text_agree") == 0:
        cer, positions = row.get("cer", math.nan), row.get("token_agreement", math.nan)
        return f"text: CER {cer:.1f} %, {positions:.1f} % of positions agree"
    if "sequence_agree" in row and row["sequence_agree"] is not None and not _nan(row["sequence_agree"]) \
            and not row["sequence_agree"]:
        positions, miou = row.get("token_agreement", math.nan), row.get("miou", math.nan)
        return (f"mIoU {miou:.1f} %, {positions:.1f} % of pixels agree" if not _nan(miou)
                else f"{positions:.1f} % of positions agree")
    share, iou = row.get("element_match", math.nan), row.get("mask_iou", math.nan)
    if not _nan(iou) and not _nan(share):
        return f"mask: IoU {iou:.1f} %, {share:.1f} % of elements agree"
    return "another length" if _nan(share) else f"{share:.1f} % of elements equal"


def _int(x: object) -> str:
    return "?" if x is None or _nan(x) else str(int(x))  # type: ignore[call-overload]


def _nan(x: object) -> bool:
    return isinstance(x, float) and math.isnan(x)

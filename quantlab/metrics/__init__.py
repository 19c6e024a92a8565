"""The comparator's numbers: pure numpy functions over arrays, testable alone.

    metrics/
    ├── errors.py      cosine, SQNR, rel_l2, max/mean |d| from streaming sums (numba kernels), per sample too
    ├── statistics.py  top-k classes, paired bootstrap and exact binomial intervals, exact McNemar test
    ├── text.py        greedy CTC decoding of per-position scores, edit distance, text agreement and CER
    └── masks.py       the masks probabilities threshold to, their overlap (IoU), a class map's mean IoU
"""

from __future__ import annotations

from .errors import (
    ErrorAccumulator,
    ErrorSums,
    as_float32,
    cosine,
    error_sums,
    errors_from_sums,
    per_sample_errors,
    per_sample_sums,
    rel_l2,
    sqnr_db,
)
from .statistics import (
    binomial_ci,
    bootstrap_ci,
    channel_spread,
    mcnemar_exact_p,
    mean_and_spread,
    near_zero_count,
    offset_db,
    topk,
    topk_correct,
    varying_share,
)
from .masks import counted_elements, decision_mask, marked_share, mask_iou, mean_class_iou
from .text import ctc_greedy, ctc_text_agreement, edit_distance

__all__ = [
    "ErrorAccumulator",
    "ErrorSums",
    "error_sums",
    "errors_from_sums",
    "per_sample_sums",
    "per_sample_errors",
    "cosine",
    "sqnr_db",
    "rel_l2",
    "topk",
    "topk_correct",
    "binomial_ci",
    "bootstrap_ci",
    "mcnemar_exact_p",
    "near_zero_count",
    "channel_spread",
    "mean_and_spread",
    "varying_share",
    "offset_db",
    "as_float32",
    "ctc_greedy",
    "ctc_text_agreement",
    "edit_distance",
    "decision_mask",
    "mask_iou",
    "marked_share",
    "mean_class_iou",
    "counted_elements",
]

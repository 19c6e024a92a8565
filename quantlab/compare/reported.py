"""Which end-to-end columns a comparison reports: the names a threshold may use, checked before any work
(``compare --fail-if``, ``search --threshold``, an experiment's ``threshold``)."""

from __future__ import annotations

from .free_running import FREE_MASK_FIGURES, FREE_RUNNING_FIGURES, free_column
from .result import (
    CLASSIFIER_COLUMNS,
    CTC_COLUMNS,
    END_TO_END_COLUMNS,
    LABEL_COLUMNS,
    MASK_COLUMNS,
    MATCH_COLUMNS,
    POSITION_COLUMNS,
    SEGMENTATION_COLUMNS,
)

__all__ = ["reported_metrics"]


def reported_metrics(*, classifiers: bool = True, labels: bool = True, positions: bool = True, ctc: bool = False,
                     exact: bool = True, masks: bool = True, segmentation: bool = True,
                     free_running: bool = True) -> set[str]:
    """The end-to-end metric columns of a comparison whose model has classifier outputs, labels to check them with,
    outputs scored per position (read as CTC text with ``ctc``; ``segmentation``: maps among them), integer
    outputs, probability outputs read as masks, and a sequence set (the free-running figures); every kind by
    default, as a file read before its model is known must allow."""
    known = set(END_TO_END_COLUMNS) - {"candidate", "output"}
    if classifiers:
        known |= set(CLASSIFIER_COLUMNS) | (set(LABEL_COLUMNS) if labels else set())
    if positions:
        known |= set(POSITION_COLUMNS) | (set(CTC_COLUMNS) if ctc else set())
        known |= set(SEGMENTATION_COLUMNS) if segmentation else set()
    if exact or masks:
        known |= set(MATCH_COLUMNS)
    if masks:
        known |= set(MASK_COLUMNS)
    if free_running:
        known |= {free_column(f) for f in FREE_RUNNING_FIGURES + (FREE_MASK_FIGURES if masks else ())}
    return known

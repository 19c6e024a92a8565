"""Masks read off probability outputs (what a threshold decides) and class maps, and how much two of them overlap.

A Sigmoid's outputs are independent probabilities (a text detector's map ``[N, 1, H, W]``, a voice-activity
probability ``[N, 1]``, multi-label tags ``[N, C]``, notes per frame ``[N, T, 88]``). What a user reads off them
is the mask ``p > threshold``: the text pixels a detector's boxes are drawn around, speech or not, the tags.
On a sparse map (text covers a few % of a page) most pixels are background in both masks, so the share of
pixels that agree reads near 100 % whatever happens to the text; the overlap of the two foregrounds does not::

    reference  . . # # # . .        agreement  6 of 7 pixels: 85.7 %
    candidate  . . # # . . .        IoU        |both| / |either| = 2 / 3: 66.7 %
"""

from __future__ import annotations

import numpy as np

__all__ = ["counted_elements", "decision_mask", "mask_iou", "marked_share", "mean_class_iou"]


def decision_mask(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """bool, same shape: ``p > threshold`` (NaN is never above it)."""
    with np.errstate(invalid="ignore"):
        return np.asarray(probabilities) > threshold


def counted_elements(shape: tuple[int, ...], valid: np.ndarray | None = None) -> np.ndarray:
    """bool ``[N, elements]``: which elements of an array of ``shape`` (samples on axis 0) count: all, or with
    ``valid`` (bool over the first two axes: the real positions, as :mod:`quantlab.compare.padding` gives) those at
    its valid positions, every element along the further axes."""
    n = shape[0] if shape else 1
    if valid is None:
        return np.ones((n, int(np.prod(shape[1:], dtype=np.int64))), dtype=bool)
    return np.broadcast_to(valid.reshape(valid.shape + (1,) * (len(shape) - 2)), shape).reshape(n, -1)


def marked_share(mask: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Per sample (axis 0) of a bool mask: the % of its elements (at ``valid`` positions, as :func:`mask_iou`)
    that it marks, float64 ``[N]`` (NaN for a sample without elements)."""
    n = mask.shape[0] if mask.ndim else 1
    m, counted = np.asarray(mask, dtype=bool).reshape(n, -1), counted_elements(mask.shape, valid)
    total = counted.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (m & counted).sum(axis=1) / np.maximum(total, 1) * 100.0, np.nan)


def mask_iou(reference: np.ndarray, candidate: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Per sample (axis 0) of two same-shape bool masks: ``|both| / |either|`` in %, float64 ``[N]``; NaN for a
    sample where neither mask holds anything (no foreground to overlap: such a sample says nothing of the
    overlap, and agreement counts it). ``valid`` (bool over the first two axes: the real positions, as
    :mod:`quantlab.compare.padding` gives) restricts both masks to the positions it marks."""
    if reference.shape != candidate.shape:
        raise ValueError(f"masks of shape {reference.shape} and {candidate.shape} do not pair up")
    n = reference.shape[0] if reference.ndim else 1
    r = np.asarray(reference, dtype=bool).reshape(n, -1)
    c = np.asarray(candidate, dtype=bool).reshape(n, -1)
    if valid is not None:
        counted = counted_elements(reference.shape, valid)
        r, c = r & counted, c & counted
    both = np.count_nonzero(r & c, axis=1)
    either = np.count_nonzero(r | c, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(either > 0, both / np.maximum(either, 1) * 100.0, np.nan)


def mean_class_iou(reference: np.ndarray, candidate: np.ndarray, classes: int) -> np.ndarray:
    """Per sample (axis 0) of two same-shape maps of class ids in ``[0, classes)`` (a segmentation's best class
    per pixel): the mean over the classes either map holds of ``|both| / |either|``, in %, float64 ``[N]`` (the
    mIoU of a segmentation benchmark, with the reference's map as ground truth). A class a few pixels wide that
    the candidate loses weighs as much as the background, which pixel agreement hides."""
    if reference.shape != candidate.shape:
        raise ValueError(f"maps of shape {reference.shape} and {candidate.shape} do not pair up")
    n = reference.shape[0] if reference.ndim else 1
    r = np.asarray(reference, dtype=np.int64).reshape(n, -1)
    c = np.asarray(candidate, dtype=np.int64).reshape(n, -1)
    out = np.full(n, np.nan)
    for i in range(n):
        confusion = np.bincount(r[i] * classes + c[i], minlength=classes * classes).reshape(classes, classes)
        both = np.diag(confusion)
        either = confusion.sum(axis=0) + confusion.sum(axis=1) - both
        held = either > 0
        if held.any():
            out[i] = float((both[held] / either[held]).mean() * 100.0)
    return out

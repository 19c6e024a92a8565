"""Text read off per-position scores: greedy CTC decoding and the edit distance between two readings.

An OCR recogniser's (or a speech model's) CTC scores ``[T, C]`` per sample are read by taking the best class at
each position, merging runs of the same class and dropping the blank class::

    best classes   - - h h - e - l l - l o o -      (blank "-")
    text           h e l l o

Two models whose best classes differ at some positions may still read the same text (a run one position
longer), so agreement position by position understates text agreement; and the blank, the best class at most
positions, makes the positions' agreement read high even when characters change.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ctc_greedy", "ctc_text_agreement", "edit_distance"]


def ctc_greedy(best: np.ndarray, blank: int) -> np.ndarray:
    """The labels greedy CTC decoding reads off one sample's best classes ``[T]``: runs merged, ``blank`` dropped
    (a blank between two equal labels keeps both: ``a - a`` reads ``a a``)."""
    b = np.asarray(best).ravel()
    keep = np.ones(b.size, dtype=bool)
    keep[1:] = b[1:] != b[:-1]
    return b[keep & (b != blank)]


def edit_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Levenshtein distance between two label sequences: the fewest insertions, deletions and substitutions
    (each 1) that turn ``a`` into ``b``.

    One row of the dynamic programme per label of ``a``; within a row the insertions chain left to right, which
    ``minimum.accumulate`` of ``row[j] - j`` resolves (``row[j] = j + min_{k <= j} (row[k] - k)``)."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.size == 0 or b.size == 0:
        return int(a.size + b.size)
    steps = np.arange(b.size + 1)
    row = steps.copy()
    for label in a:
        nxt = np.empty_like(row)
        nxt[0] = row[0] + 1
        nxt[1:] = np.minimum(row[1:] + 1, row[:-1] + (b != label))
        row = np.minimum.accumulate(nxt - steps) + steps
    return int(row[-1])


def ctc_text_agreement(reference: np.ndarray, candidate: np.ndarray, blank: int,
                       valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per sample of two ``[N, T]`` arrays of best classes: whether the candidate's greedy CTC text is the
    reference's (bool ``[N]``) and its character error rate against it in % (float64 ``[N]``: edit distance /
    the reference text's length x 100, above 100 when the candidate reads more than it; a reference that reads
    nothing: 0 when the candidate reads nothing too, else 100 per label read). ``valid`` (bool ``[N, T]``: the
    real positions, not padding) limits both readings to those positions."""
    ref, cand = np.asarray(reference), np.asarray(candidate)
    if ref.shape != cand.shape or ref.ndim != 2:
        raise ValueError(f"best classes of shape {ref.shape} and {cand.shape}: both must be the same [N, T]")
    same = np.zeros(ref.shape[0], dtype=bool)
    cer = np.zeros(ref.shape[0], dtype=np.float64)
    for i in range(ref.shape[0]):
        kept = slice(None) if valid is None else np.asarray(valid[i], dtype=bool)
        r, c = ctc_greedy(ref[i][kept], blank), ctc_greedy(cand[i][kept], blank)
        same[i] = r.size == c.size and bool((r == c).all())
        cer[i] = 0.0 if same[i] else edit_distance(r, c) / max(r.size, 1) * 100.0
    return same, cer

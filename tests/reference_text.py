"""Independent implementations of quantlab.metrics.text's numbers, for the tests to check it against: greedy CTC
decoding by ``itertools.groupby`` and the textbook edit-distance table."""

from __future__ import annotations

import itertools

import numpy as np


def ctc_text(best: np.ndarray, blank: int) -> list[int]:
    """Greedy CTC decoding: one label per run of equal best classes, the blank's runs dropped."""
    return [int(k) for k, _ in itertools.groupby(best.tolist()) if k != blank]


def levenshtein(a: list[int], b: list[int]) -> int:
    """The textbook dynamic programme over the full ``(len(a) + 1) x (len(b) + 1)`` table."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return d[len(a)][len(b)]

"""How far a data set's |x| distribution moved from the calibration set's: PSI with a block bootstrap, W1.

Population stability index over the coarse bins of :mod:`quantlab.coverage.bins`::

    PSI = sum_j (p_j - r_j) * ln(p_j / r_j)        p: this set, r: calibration (both floored at PSI_FLOOR)

Rule of thumb (credit scoring, where PSI comes from): < 0.1 no shift, 0.1-0.25
moderate, > 0.25 a different population. The interval resamples whole blocks of
samples (activations of one sample are correlated, so values are not
independent draws); ``psi_noise`` is what two sets of these sizes drawn from
one distribution would show, estimated from the same resamples (bootstrap
PSI of this set against itself, scaled by ``1 + n / n_calibration``, since PSI
noise goes as ``1/n`` on each side).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..histogram import HistogramState

__all__ = ["PSI_FLOOR", "DEFAULT_RESAMPLES", "DEFAULT_CONFIDENCE", "PsiEstimate", "psi", "psi_estimate",
           "wasserstein_relative"]

PSI_FLOOR = 1e-4
"""Proportions below this count as this much (an empty bin would make PSI infinite)."""

DEFAULT_RESAMPLES = 400
DEFAULT_CONFIDENCE = 0.95


def _shares(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=-1, keepdims=True)
    return np.maximum(counts / np.where(total > 0, total, 1.0), PSI_FLOOR)


def psi(counts: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """PSI of ``counts`` (``[..., bins]``) against reference shares ``[bins]``; one value per row."""
    p = _shares(counts)
    r = np.maximum(np.asarray(reference, dtype=np.float64), PSI_FLOOR)
    return np.sum((p - r) * np.log(p / r), axis=-1)


@dataclass(frozen=True)
class PsiEstimate:
    value: float
    ci_low: float
    ci_high: float
    noise: float


def psi_estimate(blocks: np.ndarray, reference: np.ndarray, calib_samples: int, samples: int, *,
                 resamples: int = DEFAULT_RESAMPLES, confidence: float = DEFAULT_CONFIDENCE,
                 rng: np.random.Generator | None = None, weights: np.ndarray | None = None) -> PsiEstimate:
    """PSI of the summed ``blocks`` with a percentile block-bootstrap interval and the noise level.

    ``weights`` (``[resamples, blocks]`` multinomial counts) may be passed so every
    tensor of a data set is resampled the same way; otherwise drawn from ``rng``.
    Fewer than two blocks: the interval and the noise are NaN.
    """
    total = blocks.sum(axis=0)
    value = float(psi(total, reference))
    n_blocks = blocks.shape[0]
    if n_blocks < 2 or resamples < 1:
        return PsiEstimate(value, math.nan, math.nan, math.nan)
    if weights is None:
        rng = rng if rng is not None else np.random.default_rng(0)
        weights = rng.multinomial(n_blocks, np.full(n_blocks, 1.0 / n_blocks), size=resamples)
    boot = weights @ blocks  # [resamples, bins]
    values = psi(boot, reference)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    self_psi = psi(boot, _shares(total))
    noise = float(np.mean(self_psi)) * (1.0 + samples / max(calib_samples, 1))
    return PsiEstimate(value, float(low), float(high), noise)


def wasserstein_relative(a: HistogramState, b: HistogramState, scale: float, points: int = 4096) -> float:
    """W1 distance between the |x| distributions of ``a`` and ``b``, in units of ``scale`` (the table's amax).

    Integrates ``|F_a - F_b|`` on a uniform grid up to the larger absmax;
    NaN when either is empty or ``scale`` is 0.
    """
    if a.count == 0 or b.count == 0 or scale <= 0.0:
        return math.nan
    top = max(a.absmax, b.absmax)
    if top == 0.0:
        return 0.0
    grid = np.linspace(0.0, top, points + 1)
    fa = a.cdf_at(grid) / a.count
    fb = b.cdf_at(grid) / b.count
    diff = np.abs(fa - fb)
    return float(np.sum((diff[1:] + diff[:-1]) * 0.5) * (top / points) / scale)

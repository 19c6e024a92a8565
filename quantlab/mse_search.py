"""The mse calibrator's search: the expected INT8 error of every candidate threshold, and its first minimum.

For a histogram ``h`` of ``n`` bins over ``[0, upper]`` (bin centres ``c_i``) and candidate thresholds
``t_k = upper * (k + 1) / candidates``, the error of ``t`` with step ``s = t / levels`` is::

    E(t) = s^2 / 12 * sum_{c_i <= t} h_i   +   sum_{c_i > t} h_i (c_i - t)^2
           (rounding, uniform in a step)       (clipping, at the bin centre)

summed bin by bin in that order (:func:`mse_errors`, the curve): O(candidates * n), 1 ms a tensor.
:func:`mse_argmin` needs only its first minimum. Suffix sums of ``h``, ``h c`` and ``h c^2`` give every
candidate's error in O(1) as ``S2 - 2 t S1 + t^2 S0`` (plus the rounding term), up to float64 rounding
that cancellation makes relative to the sum of the terms' magnitudes ``M``::

    every k:   A_k - slack * M_k <= E(t_k) <= A_k + slack * M_k     O(1) each
    kept k:    lower bound <= the smallest upper bound              E(t_k) exactly, the curve's own code
    result:    the first minimum of the exact values                 the curve's argmin, bit for bit

A candidate left out has its lower bound above some candidate's upper bound, so above the minimum: it is
neither the minimum nor a tie. Both sums round by at most ``2 (n + 5) * 2^-53`` of ``M`` (sums of
non-negative terms, then three products); the slack is far wider. Typically a handful of the 512
candidates need the exact error: the search costs ~2 % of the curve.
"""

from __future__ import annotations

import numpy as np

from .binning import compiled
from .methods import MSE_CANDIDATES, MSE_LEVELS

__all__ = ["mse_argmin", "mse_errors"]

_SLACK = 1e-9
"""Relative widening of the bounds, per 2048 bins (their float64 rounding is below 5e-13 there)."""


@compiled(nogil=True)
def _centres(n, upper):  # pragma: no cover - compiled
    centres = np.empty(n)
    for i in range(n):
        centres[i] = (i + 0.5) * upper / n
    return centres


@compiled(nogil=True)
def _error_at(hist, centres, t, levels):  # pragma: no cover - compiled
    """E(t), summed bin by bin: the one computation of an error that both the curve and the search use."""
    below = 0.0
    clipping = 0.0
    for i in range(hist.size):
        if centres[i] <= t:
            below += hist[i]
        else:
            d = centres[i] - t
            clipping += d * d * hist[i]
    return (t / levels) ** 2 / 12.0 * below + clipping


@compiled(nogil=True)
def _mse_curve(hist, upper, candidates, levels):  # pragma: no cover - compiled
    centres = _centres(hist.size, upper)
    out = np.empty(candidates)
    for k in range(candidates):
        out[k] = _error_at(hist, centres, upper * (k + 1) / candidates, levels)
    return out


@compiled(nogil=True)
def _mse_argmin(hist, upper, candidates, levels, slack):  # pragma: no cover - compiled
    """The index of the first minimum of :func:`_mse_curve` (see the module docstring)."""
    n = hist.size
    centres = _centres(n, upper)
    s0 = np.zeros(n + 1)  # suffix sums from bin i: h, h c, h c^2
    s1 = np.zeros(n + 1)
    s2 = np.zeros(n + 1)
    for i in range(n - 1, -1, -1):
        w = hist[i]
        s0[i] = s0[i + 1] + w
        s1[i] = s1[i + 1] + w * centres[i]
        s2[i] = s2[i + 1] + w * centres[i] * centres[i]
    total = s0[0]
    lows = np.empty(candidates)
    ceiling = np.inf
    j = 0  # bins 0..j-1 have centres <= t
    for k in range(candidates):
        t = upper * (k + 1) / candidates
        while j < n and centres[j] <= t:
            j += 1
        rounding = (t / levels) ** 2 / 12.0 * (total - s0[j])
        value = rounding + s2[j] - 2.0 * t * s1[j] + t * t * s0[j]
        width = slack * (rounding + s2[j] + 2.0 * t * s1[j] + t * t * s0[j])  # every term is >= 0
        lows[k] = value - width
        ceiling = min(ceiling, value + width)
    best = np.inf
    arg = 0
    for k in range(candidates):
        if lows[k] > ceiling:
            continue
        error = _error_at(hist, centres, upper * (k + 1) / candidates, levels)
        if error < best:
            best = error
            arg = k
    return arg


def _checked(hist: np.ndarray, upper: float, candidates: int, levels: int) -> np.ndarray:
    c = np.ascontiguousarray(hist, dtype=np.float64)
    if candidates < 1 or levels < 1:
        raise ValueError(f"candidates and levels must be >= 1, got {candidates} and {levels}")
    if not (np.isfinite(upper) and upper > 0):
        raise ValueError(f"upper must be a finite number > 0, got {upper}")
    return c


def mse_errors(hist: np.ndarray, upper: float, candidates: int = MSE_CANDIDATES,
               levels: int = MSE_LEVELS) -> np.ndarray:
    """E(t_k) for ``k = 0..candidates-1`` (the module docstring's curve; O(candidates * len(hist)))."""
    return _mse_curve(_checked(hist, upper, candidates, levels), float(upper), int(candidates), int(levels))


def mse_argmin(hist: np.ndarray, upper: float, candidates: int = MSE_CANDIDATES, levels: int = MSE_LEVELS) -> int:
    """``k`` of the first minimum of :func:`mse_errors`, bit for bit ``np.argmin(mse_errors(...))``, from the
    exact errors of the few candidates the bounds cannot rule out."""
    c = _checked(hist, upper, candidates, levels)
    slack = _SLACK * max(1.0, c.size / 2048)
    return int(_mse_argmin(c, float(upper), int(candidates), int(levels), slack))

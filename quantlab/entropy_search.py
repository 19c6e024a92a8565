"""The entropy calibrator's KL search: the divergence of every candidate threshold, and its first minimum.

For a histogram ``c`` of ``n`` bins and each candidate ``i`` in ``[start, n)``, ``KL(P_i || Q_i)`` as
:func:`quantlab.calibrators.amax_entropy` defines it. Prefix sums make the ``Q`` side ``O(levels)`` per
candidate; the smoothed ``P`` side, ``sum (c_j - e) log(c_j - e)`` over the non-empty bins below ``i - 1``
with an ``e`` that changes with ``i``, is ``O(i)``: all of it 1-2 M logarithms, 10-15 ms, per tensor.

:func:`entropy_argmin` needs only the first minimum. ``f(v) = v log v`` expands around each count as
``f(c - e) = f(c) - e (log c + 1) + R`` with ``0 <= R <= e^2 / (2 (c - e))`` for ``0 <= e < c``, so prefix
sums of ``c log c``, ``log c`` and ``1 / c`` bound every candidate's divergence in ``O(1)`` (plus the
exact ``Q`` side)::

    every i:   KL_low(i) <= KL(i) <= KL_high(i)              bounds, O(levels) each
    kept i:    KL_low(i) <= min over all i of KL_high        exact KL (the curve's own code), O(i) each,
                                                              in order, until no later KL_low is below the best
    result:    the first minimum of the exact values          the curve's argmin, bit for bit

A candidate left out has ``KL_low`` above some candidate's ``KL_high``, so above the minimum: it can be neither
the minimum nor a tie; the search stops once every later ``KL_low`` is at least the best exact value found (a
later candidate can then at most tie, and the first minimum wins ties). A curve that is 0 over a stretch (every
value in a bin of its own) stops at the stretch's first candidate. The bounds are widened by far more than their rounding. Typically a few dozen of the
~1,900 candidates need their exact ``P`` side.
"""

from __future__ import annotations

import math

import numpy as np

from .binning import compiled
from .methods import ENTROPY_LEVELS, ENTROPY_SMOOTHING

__all__ = ["entropy_argmin", "entropy_divergences"]

_SLACK = 1e-9
"""Relative widening of the divergence bounds (their float64 rounding is ~1e-13 relative)."""


@compiled(nogil=True)
def _sum_plogp(c, i, e):  # pragma: no cover - compiled
    """``sum (c_j - e) log(c_j - e)`` over the non-empty bins ``j < i - 1``; ``nan`` if one of them is <= e."""
    s = 0.0
    for j in range(i - 1):
        v = c[j]
        if v > 0:
            v -= e
            if v <= 0:
                return np.nan
            s += v * math.log(v)
    return s


@compiled(nogil=True)
def _sum_plogq(cum, cum_nz, i, levels, e_p, e_q):  # pragma: no cover - compiled
    """``(sum p_j log q_j over the non-empty bins j < i, log q of the last level)``; ``nan`` if a q is <= 0.

    The non-empty bins of level k share ``q = s_k / nz_k - e_q`` and carry
    ``p_j = c_j - e_p``: ``(s_k - nz_k * e_p) * log q`` per level, O(levels).
    The outliers folded into bin i-1 are added by the caller.
    """
    p_log_q = 0.0
    log_q_last = 0.0
    step, extra = i // levels, i % levels
    whole, rest = 0, 0  # (k + 1) * i == whole * levels + rest, stepped: 2 divisions a level took as long as the log
    b = 0
    for k in range(levels):
        a = b  # level k = bins [ceil(k*i/levels), ceil((k+1)*i/levels))
        whole += step
        rest += extra
        if rest >= levels:
            whole += 1
            rest -= levels
        b = whole + (1 if rest > 0 else 0)
        nz_k = cum_nz[b] - cum_nz[a]
        if nz_k > 0:
            s = cum[b] - cum[a]
            q = s / nz_k - e_q
            if q <= 0:
                return np.nan, 0.0
            log_q = math.log(q)
            p_log_q += (s - nz_k * e_p) * log_q
            if k == levels - 1:
                log_q_last = log_q
    return p_log_q, log_q_last


@compiled(nogil=True)
def _prefix_sums(c):  # pragma: no cover - compiled
    """Prefix sums over ``c``: counts, non-empty bins, ``c log c``, ``log c`` and ``1 / c`` of the non-empty
    bins, and the smallest non-empty count so far (inf before the first)."""
    n = c.size
    cum = np.zeros(n + 1)
    cum_nz = np.zeros(n + 1, np.int64)
    cum_clogc = np.zeros(n + 1)
    cum_logc = np.zeros(n + 1)
    cum_inv = np.zeros(n + 1)
    least = np.full(n + 1, np.inf)
    for j in range(n):
        v = c[j]
        cum[j + 1] = cum[j] + v
        cum_nz[j + 1] = cum_nz[j] + (1 if v > 0 else 0)
        cum_clogc[j + 1] = cum_clogc[j] + (v * math.log(v) if v > 0 else 0.0)
        cum_logc[j + 1] = cum_logc[j] + (math.log(v) if v > 0 else 0.0)
        cum_inv[j + 1] = cum_inv[j] + (1.0 / v if v > 0 else 0.0)
        least[j + 1] = min(least[j], v) if v > 0 else least[j]
    return cum, cum_nz, cum_clogc, cum_logc, cum_inv, least


@compiled(nogil=True)
def _smoothing(c, cum, cum_nz, i, eps):  # pragma: no cover - compiled
    """Candidate ``i``'s ``(outliers, e_p, e_q, p_last, folded_into_empty)``; ``e_p`` is nan when ``Q_i`` is all
    zero, or (``eps = 0``) has no mass where ``P_i`` has the outliers: then the divergence is infinite."""
    outliers = cum[c.size] - cum[i]  # mass at or above bin i, folded into bin i-1
    last = c[i - 1]
    nz = cum_nz[i]  # non-empty bins of Q_i (Q never has mass where the unfolded bins are empty)
    folded_into_empty = last == 0 and outliers > 0
    if nz == 0 or (folded_into_empty and eps == 0):
        return outliers, np.nan, 0.0, 0.0, folded_into_empty
    nz_p = nz + (1 if folded_into_empty else 0)
    e_p = eps * (i - nz_p) / nz_p  # what smoothing takes off each non-empty bin of P_i ...
    e_q = eps * (i - nz) / nz  # ... and of Q_i (it gives eps to each empty bin)
    return outliers, e_p, e_q, last + outliers - e_p, folded_into_empty


@compiled(nogil=True)
def _q_side(c, cum, cum_nz, i, levels, eps, e_p, e_q, p_last, outliers, folded_into_empty):  # pragma: no cover
    """``sum p_j log q_j`` of candidate ``i``, the outliers' term included; nan when a q is <= 0."""
    p_log_q, log_q_last = _sum_plogq(cum, cum_nz, i, levels, e_p, e_q)
    if not p_log_q == p_log_q:
        return np.nan
    if folded_into_empty:
        return p_log_q + p_last * math.log(eps)  # Q_i's bin i-1 is empty: smoothing gave it eps
    return p_log_q + outliers * log_q_last


@compiled(nogil=True)
def _kl_at(c, cum, cum_nz, cum_clogc, i, levels, eps):  # pragma: no cover - compiled
    """Smoothed KL(P_i || Q_i) of candidate ``i`` (inf where infinite or undefined): one point of the curve."""
    outliers, e_p, e_q, p_last, folded_into_empty = _smoothing(c, cum, cum_nz, i, eps)
    if not e_p == e_p:
        return np.inf
    last = c[i - 1]
    if eps == 0:
        p_log_p = cum_clogc[i - 1]
    else:
        p_log_p = _sum_plogp(c, i, e_p)
    if not p_log_p == p_log_p or (p_last <= 0 and last + outliers > 0):
        return np.inf  # a count below the smoothing amount (fractional counts only): P_i cannot be smoothed
    if last + outliers > 0:
        p_log_p += p_last * math.log(p_last)
    p_log_q = _q_side(c, cum, cum_nz, i, levels, eps, e_p, e_q, p_last, outliers, folded_into_empty)
    if not p_log_q == p_log_q:
        return np.inf
    # empty bins of P_i are empty in Q_i too: both hold eps, their terms cancel.
    # normalise: P sums to total, Q to total - outliers (smoothing keeps both sums)
    total = cum[c.size]
    kl = (p_log_p - p_log_q) / total - math.log(total) + math.log(total - outliers)
    return max(kl, 0.0)


@compiled(nogil=True)
def _kl_curve(c, levels, start, eps):  # pragma: no cover - compiled
    """Smoothed KL(P_i || Q_i) for i in [start, len(c)) (see :func:`entropy_divergences`); ``eps = 0``: unsmoothed."""
    cum, cum_nz, cum_clogc, _, _, _ = _prefix_sums(c)
    out = np.full(c.size - start, np.inf)
    for i in range(start, c.size):
        out[i - start] = _kl_at(c, cum, cum_nz, cum_clogc, i, levels, eps)
    return out


@compiled(nogil=True)
def _kl_bounds(c, cum, cum_nz, cum_clogc, cum_logc, cum_inv, least, i, levels, eps):  # pragma: no cover
    """(low, high) around candidate ``i``'s divergence (see the module docstring); (inf, inf) where it is
    infinite; (-inf, inf) where the expansion does not hold (then it is computed exactly)."""
    outliers, e_p, e_q, p_last, folded_into_empty = _smoothing(c, cum, cum_nz, i, eps)
    if not e_p == e_p:
        return np.inf, np.inf
    last = c[i - 1]
    if p_last <= 0 and last + outliers > 0:
        return np.inf, np.inf
    if e_p >= least[i - 1]:
        return np.inf, np.inf  # a non-empty count at or below e_p: P_i cannot be smoothed (v - e <= 0 exactly)
    if e_p > 0.5 * least[i - 1]:
        return -np.inf, np.inf
    k = i - 1
    low = cum_clogc[k] - e_p * (cum_logc[k] + cum_nz[k])
    spread = 0.5 * e_p * e_p * cum_inv[k] / (1.0 - e_p / least[k]) if cum_nz[k] > 0 else 0.0
    if last + outliers > 0:
        low += p_last * math.log(p_last)
    p_log_q = _q_side(c, cum, cum_nz, i, levels, eps, e_p, e_q, p_last, outliers, folded_into_empty)
    if not p_log_q == p_log_q:
        return np.inf, np.inf
    total = cum[c.size]
    rest = -p_log_q / total - math.log(total) + math.log(total - outliers)
    slack = _SLACK * (abs(low) + abs(p_log_q) + spread) / total + _SLACK * (abs(rest) + 1e-3)
    return low / total + rest - slack, (low + spread) / total + rest + slack


@compiled(nogil=True)
def _kl_argmin(c, levels, start, eps):  # pragma: no cover - compiled
    """``start`` + the index of the first minimum of :func:`_kl_curve`, or -1 when every candidate is infinite."""
    cum, cum_nz, cum_clogc, cum_logc, cum_inv, least = _prefix_sums(c)
    m = c.size - start
    lows = np.empty(m)
    ceiling = np.inf  # the smallest upper bound: the minimum is at most this
    for i in range(start, c.size):
        low, high = _kl_bounds(c, cum, cum_nz, cum_clogc, cum_logc, cum_inv, least, i, levels, eps)
        lows[i - start] = max(low, 0.0)
        ceiling = min(ceiling, max(high, 0.0))
    floor = np.empty(m + 1)  # floor[k]: the smallest lower bound from candidate start + k on
    floor[m] = np.inf
    for k in range(m - 1, -1, -1):
        floor[k] = min(floor[k + 1], lows[k])
    best = np.inf
    arg = -1
    for i in range(start, c.size):
        if best <= floor[i - start]:
            break  # no later candidate can be smaller, and a tie later is not the first minimum
        if lows[i - start] > ceiling or lows[i - start] == np.inf:
            continue
        kl = _kl_at(c, cum, cum_nz, cum_clogc, i, levels, eps)
        if kl < best:
            best = kl
            arg = i
    return arg


def _checked(hist: np.ndarray, levels: int, start_bin: int | None, eps: float) -> tuple[np.ndarray, int]:
    c = np.ascontiguousarray(hist, dtype=np.float64)
    start = levels if start_bin is None else int(start_bin)
    if start < levels or start >= c.size:
        raise ValueError(f"start_bin must be in [{levels}, {c.size}), got {start}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    return c, start


def entropy_divergences(hist: np.ndarray, levels: int = ENTROPY_LEVELS, start_bin: int | None = None,
                        eps: float = ENTROPY_SMOOTHING) -> np.ndarray:
    """KL divergence for every candidate threshold ``i`` in ``[start_bin, len(hist))``.

    Element ``i - start_bin`` is ``KL(P_i || Q_i)`` (natural log) as defined in
    :func:`quantlab.calibrators.amax_entropy`, with ``P_i`` and ``Q_i`` smoothed by ``eps`` counts
    (ONNX Runtime's ``smooth_distribution``; ``eps = 0``: unsmoothed, ``inf``
    where ``Q_i`` has no mass on a bin where ``P_i`` has some). ``inf`` where
    ``Q_i`` is empty. The whole curve costs ``O(len(hist)^2)`` when smoothed (15 ms for 2048 bins):
    for its minimum alone, :func:`entropy_argmin`.
    """
    c, start = _checked(hist, levels, start_bin, eps)
    return _kl_curve(c, int(levels), start, float(eps))


def entropy_argmin(hist: np.ndarray, levels: int = ENTROPY_LEVELS, start_bin: int | None = None,
                   eps: float = ENTROPY_SMOOTHING) -> int | None:
    """The candidate ``i`` of the first minimum of :func:`entropy_divergences` (``start_bin + argmin``), None when
    every candidate is infinite: the same ``i``, bit for bit, from a fraction of the exact divergences (see the
    module docstring)."""
    c, start = _checked(hist, levels, start_bin, eps)
    if eps == 0:  # unsmoothed, each candidate's P side is O(1) already: the bounds would only add work
        curve = _kl_curve(c, int(levels), start, 0.0)
        return start + int(np.argmin(curve)) if np.isfinite(curve).any() else None
    arg = int(_kl_argmin(c, int(levels), start, float(eps)))
    return None if arg < 0 else arg

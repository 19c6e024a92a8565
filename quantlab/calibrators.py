"""Calibration methods: turn a histogram of |x| into a symmetric INT8 clipping threshold ``amax``.

Pure numpy functions over histogram counts, testable alone. A histogram here
is ``hist`` (counts, int or float) of ``len(hist)`` equal bins over
``[0, upper]``; bin ``k`` spans ``[k*w, (k+1)*w)`` with ``w = upper / len(hist)``.
Every function returns ``amax`` as a Python float; ``scale = amax / 127``.

Exact zeros and the entropy method: after ReLU/ReLU6 a large share of the
values (20-90 % on EfficientNet-Lite0's ReLU6 outputs) is exactly 0, all in
bin 0. For a candidate ``i`` near ``levels`` each level is one bin, so ``Q``
copies that spike; for larger ``i`` a level spans ``i / levels`` bins and
``Q`` spreads the spike evenly over them, which costs about
``share_of_zeros * log(i / levels)`` of divergence (1.9 nats at ``i = 2047``
with 70 % zeros), far more than clipping the tail costs. The minimum then sits
at the smallest candidate whatever the tail looks like: on EfficientNet-Lite0,
amax = 0.44 for ReLU6 outputs reaching 6 (blocks 6-15), 14-21 % of their values
saturated, and all-INT8 logits with cosine 0.01 to FP32's (0.98 with the zeros
left out). Symmetric INT8 represents 0 exactly, so the zeros carry no
quantization error whatever the threshold and should not steer it
(pytorch-quantization's ``_compute_amax_entropy`` also defuses bin 0 on its
own: it sets ``bins[0] = bins[1]``).
"""

from __future__ import annotations

import math

import numpy as np

from .binning import compiled
from .methods import (
    DEFAULT_PERCENTILE,
    ENTROPY_BINS,
    ENTROPY_LEVELS,
    METHOD_NAMES,
    MSE_CANDIDATES,
    MSE_LEVELS,
    percentile_error,
)

__all__ = [
    "METHODS",
    "ENTROPY_BINS",
    "ENTROPY_LEVELS",
    "amax_minmax",
    "amax_percentile",
    "percentile_of_cumulative",
    "amax_entropy",
    "entropy_divergences",
    "amax_mse",
]

METHODS = METHOD_NAMES
"""Alias of :data:`quantlab.methods.METHOD_NAMES` (the registry) for modules that still import it from here."""


def amax_minmax(min_value: float, max_value: float) -> float:
    """``max(|min|, |max|)``: no clipping (ONNX Runtime MinMax with ``symmetric=True``)."""
    return float(max(abs(float(min_value)), abs(float(max_value))))


def _validate(hist: np.ndarray, upper: float) -> np.ndarray:
    hist = np.asarray(hist, dtype=np.float64)
    if hist.ndim != 1 or hist.size == 0:
        raise ValueError(f"hist must be a non-empty 1-D array, got shape {hist.shape}")
    if not np.isfinite(upper) or upper < 0:
        raise ValueError(f"upper must be finite and >= 0, got {upper}")
    if (hist < 0).any():
        raise ValueError("hist holds negative counts")
    return hist


def amax_percentile(hist: np.ndarray, upper: float, percentile: float = DEFAULT_PERCENTILE) -> float:
    """|x| below which ``percentile`` % of the values lie (linear within the bin that crosses it).

    ONNX Runtime's Percentile calibrator (symmetric) returns the left edge of
    the bin where the cumulative share reaches the percentile; this returns the
    interpolated point inside that bin, so the two agree within one bin.
    """
    problem = percentile_error(percentile)
    if problem:
        raise ValueError(problem)
    hist = _validate(hist, upper)
    return percentile_of_cumulative(np.concatenate([[0.0], np.cumsum(hist)]), float(hist.sum()), upper, percentile)


def percentile_of_cumulative(cum: np.ndarray, total: float, upper: float, percentile: float) -> float:
    """:func:`amax_percentile` from prefix sums ``cum = [0, h0, h0 + h1, ...]`` (float64) and ``total`` = ``sum(h)``.

    For callers that ask several percentiles of one histogram (the table's
    quantile summary): the prefix sums are computed once.
    """
    if total == 0 or upper == 0:
        return 0.0
    bins = cum.size - 1
    target = percentile / 100.0 * total
    k = int(np.searchsorted(cum, target, side="left"))  # first edge index with cum >= target
    k = min(max(k, 1), bins)
    lo, hi = cum[k - 1], cum[k]
    frac = 0.0 if hi == lo else (target - lo) / (hi - lo)
    return float((k - 1 + frac) * upper / bins)


@compiled(nogil=True)
def _kl_curve(c, levels, start):  # pragma: no cover - compiled
    """KL(P_i || Q_i) for i in [start, len(c)), from prefix sums: O(len(c) * levels)."""
    n = c.size
    cum = np.zeros(n + 1)
    cum_nz = np.zeros(n + 1, np.int64)
    cum_clogc = np.zeros(n + 1)
    for j in range(n):
        v = c[j]
        cum[j + 1] = cum[j] + v
        cum_nz[j + 1] = cum_nz[j] + (1 if v > 0 else 0)
        cum_clogc[j + 1] = cum_clogc[j] + (v * math.log(v) if v > 0 else 0.0)
    total = cum[n]
    out = np.empty(n - start)
    for i in range(start, n):
        outliers = total - cum[i]  # mass at or above bin i, folded into bin i-1
        last = c[i - 1]
        if last == 0 and outliers > 0:  # Q_i has no mass where P_i has the outliers
            out[i - start] = np.inf
            continue
        # sum_j p_j log q_j: the non-empty bins of level k share q = s_k / nz_k and carry p_j = c_j,
        # except bin i-1 (always in the last level), which also carries the outliers.
        p_log_q = 0.0
        log_q_last = 0.0
        for k in range(levels):
            a = -((-k * i) // levels)  # level k = bins [ceil(k*i/levels), ceil((k+1)*i/levels))
            b = -((-(k + 1) * i) // levels)
            nz = cum_nz[b] - cum_nz[a]
            if nz > 0:
                s = cum[b] - cum[a]
                log_q = math.log(s / nz)
                p_log_q += s * log_q
                if k == levels - 1:
                    log_q_last = log_q
        p_log_q += outliers * log_q_last
        p_last = last + outliers
        p_log_p = cum_clogc[i - 1] + (p_last * math.log(p_last) if p_last > 0 else 0.0)
        # normalise: P sums to total, Q to total - outliers
        kl = (p_log_p - p_log_q) / total - math.log(total) + math.log(total - outliers)
        out[i - start] = max(kl, 0.0)
    return out


def entropy_divergences(hist: np.ndarray, levels: int = ENTROPY_LEVELS, start_bin: int | None = None) -> np.ndarray:
    """KL divergence for every candidate threshold ``i`` in ``[start_bin, len(hist))``.

    Element ``i - start_bin`` is ``KL(P_i || Q_i)`` (natural log) as defined in
    :func:`amax_entropy`; ``inf`` where ``Q_i`` has no mass on a bin where
    ``P_i`` has some. Prefix sums make each candidate ``O(levels)``, not ``O(i)``.
    """
    c = np.ascontiguousarray(hist, dtype=np.float64)
    n = c.size
    start = levels if start_bin is None else int(start_bin)
    if start < levels or start >= n:
        raise ValueError(f"start_bin must be in [{levels}, {n}), got {start}")
    return _kl_curve(c, int(levels), start)


def amax_entropy(
    hist: np.ndarray,
    upper: float,
    *,
    levels: int = ENTROPY_LEVELS,
    start_bin: int | None = None,
    zeros: float = 0.0,
) -> float:
    """TensorRT's entropy (KL-divergence) calibration threshold, optionally without the exact zeros.

    Reference: Szymon Migacz, "8-bit Inference with TensorRT", GTC 2017
    (on-demand.gputechconf.com/gtc/2017/presentation/s7310-8-bit-inference-with-tensorrt.pdf).
    ``hist`` is the histogram of |x| over ``[0, upper]`` (TensorRT: 2048 bins,
    ``upper = absmax``; quantlab passes 2048 bins made of whole fine bins of its
    streaming histogram, ``absmax <= upper < 1.25 * absmax``, see
    ``HistogramState.coarsen``: the minimum of the KL curve is flat in sparse
    tails, so interpolated re-binning would move it by several percent). For
    every candidate ``i`` from ``levels`` (128) up to ``len(hist) - 1``:

    - ``P`` = the first ``i`` bins, with every count at or above bin ``i``
      (the outliers) added to bin ``i - 1``; normalised;
    - ``Q`` = the first ``i`` bins (without outliers) merged into ``levels``
      levels (bin ``j`` goes to level ``floor(j * levels / i)``, an even split
      when ``i`` is not a multiple of ``levels``), each level's mass then
      spread evenly over its non-empty bins (empty bins stay 0); normalised;
    - ``divergence[i] = KL(P || Q) = sum_j P_j log(P_j / Q_j)``.

    The threshold is ``(m + 0.5) * bin_width`` for the ``m`` with the smallest
    divergence (the first one on ties). No smoothing is applied: a candidate
    whose ``Q`` has no mass where ``P`` has some (bin ``i - 1`` empty but
    outliers folded into it) has infinite divergence. If every candidate is
    infinite, or the histogram has fewer than ``levels + 1`` bins, ``upper`` is returned.

    ``zeros``: how many of the ``hist[0]`` values are exactly 0.0; they are
    taken out of bin 0 before the search (pytorch-quantization's
    ``HistogramCalibrator(skip_zeros=True)``). ``zeros=0`` is the published
    algorithm; why quantlab leaves them out is in the module docstring.
    """
    hist = _validate(hist, upper)
    if not 0.0 <= zeros <= hist[0]:
        raise ValueError(f"zeros must be in [0, hist[0]] = [0, {hist[0]:g}], got {zeros}")
    if zeros:
        hist = hist.copy()
        hist[0] -= zeros
    if hist.sum() == 0 or upper == 0:
        return 0.0
    if hist.size <= levels:
        return float(upper)
    kl = entropy_divergences(hist, levels, start_bin)
    if not np.isfinite(kl).any():
        return float(upper)
    start = levels if start_bin is None else int(start_bin)
    m = start + int(np.argmin(kl))
    return float((m + 0.5) * upper / hist.size)


@compiled(nogil=True)
def _mse_errors(hist, upper, candidates, levels):  # pragma: no cover - compiled
    """Expected squared error for each candidate threshold (see :func:`amax_mse`); O(candidates * bins)."""
    n = hist.size
    centres = np.empty(n)
    for i in range(n):
        centres[i] = (i + 0.5) * upper / n
    out = np.empty(candidates)
    for k in range(candidates):
        t = upper * (k + 1) / candidates
        below = 0.0
        clipping = 0.0
        for i in range(n):
            if centres[i] <= t:
                below += hist[i]
            else:
                d = centres[i] - t
                clipping += d * d * hist[i]
        out[k] = (t / levels) ** 2 / 12.0 * below + clipping
    return out


def amax_mse(hist: np.ndarray, upper: float, *, candidates: int = MSE_CANDIDATES, levels: int = MSE_LEVELS) -> float:
    """Threshold minimising the expected squared INT8 error of |x| (clipping + rounding).

    For a threshold ``t`` with step ``s = t / levels``, a value below ``t``
    costs ``s**2 / 12`` (uniform rounding error) and a value above costs
    ``(x - t)**2`` (clipping), with ``x`` at its bin centre. Candidates are
    ``upper * k / candidates`` for ``k = 1..candidates``; the smallest error wins
    (the first one on ties). The errors are summed bin by bin in a compiled loop
    (0.01 s per tensor instead of 0.1 s with a [candidates, bins] numpy array).
    """
    hist = _validate(hist, upper)
    if hist.sum() == 0 or upper == 0:
        return 0.0
    errors = _mse_errors(hist, float(upper), int(candidates), int(levels))
    return float(upper * (int(np.argmin(errors)) + 1) / candidates)

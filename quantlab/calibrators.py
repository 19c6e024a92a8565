"""Calibration methods: turn a histogram of |x| into a symmetric INT8 clipping threshold ``amax``.

Pure numpy functions over histogram counts, testable alone. A histogram here
is ``hist`` (counts, int or float) of ``len(hist)`` equal bins over
``[0, upper]``; bin ``k`` spans ``[k*w, (k+1)*w)`` with ``w = upper / len(hist)``.
Every function returns ``amax`` as a Python float; ``scale = amax / 127``.

Entropy and point masses. TensorRT's KL search (:func:`amax_entropy`) goes
wrong whenever one value holds a large share of a tensor, and where a tail is
sparse. quantlab's rule, in three parts:

1. Exact zeros are left out (``zeros=``). After ReLU/ReLU6, 20-90 % of the
   values are exactly 0, all in bin 0. For a candidate ``i`` near ``levels``
   each level is one bin, so ``Q`` copies that spike; for larger ``i`` ``Q``
   spreads it over ``i / levels`` bins, which costs about
   ``share * log(i / levels)`` (1.9 nats at ``i = 2047`` with 70 % zeros),
   far more than clipping a tail costs: on EfficientNet-Lite0 amax = 0.44 for
   ReLU6 outputs reaching 6, 14-21 % of their values saturated, all-INT8
   cosine 0.01. Symmetric INT8 represents 0 exactly, so zeros carry no error
   whatever the threshold (pytorch-quantization's ``skip_zeros``).
2. Point masses: a bin holding more than ``ENTROPY_POINT_MASS`` (1 %) of the
   non-zero values is cut to the height of its larger neighbour before the
   search (it costs the same ``share * log(width)`` as the zeros did), and no
   candidate may leave more than that share at or above its kept range. So a
   plateau (HardSigmoid at 1.0, ReLU6 at 6.0, a conv's bias over constant
   padding or background) is always inside amax, and a tensor of a few
   distinct or near-constant values (LayerNorm's ReduceMean/Sqrt, a pooled
   SE vector: one value per token or channel) never gets a range below its
   values. Why the bound: ``P`` folds the saturated values into its last bin,
   so KL weighs a value clipped from 100 to 1.01 like one at 1.01, and when
   every value has its own bin, ``P`` and ``Q`` agree whatever is clipped
   (KL = 0 at the smallest candidate). That is sound for a thin tail and not
   for a share of the data: a saturated share above 1 % would itself be a
   point mass at amax. Measured before this rule (TensorRT's search, zeros
   out): HardSigmoid gate 99.6 % saturated, LayerNorm variance and standard
   deviation 99.6 %, EfficientNet-Lite0 stem conv 6.5 % (amax 7.1 of 82: a
   bias over the zero padding), 3 of its 95 tensors above 1 %; after: none.
3. Smoothing as ONNX Runtime, MXNet and TVM do (``smooth_distribution``,
   ``ENTROPY_SMOOTHING`` = 1e-4 counts to each empty bin of ``P`` and of
   ``Q``, taken evenly off their non-empty bins). Unsmoothed, a candidate
   whose last kept bin is empty while outliers fold into it has infinite KL,
   so in a sparse tail only the few occupied bins near the maximum can win: a
   residual stream with its bulk below 14 and 0.02 % of values at 180-210 got
   amax 202.9 (= absmax; INT8 step 1.6). Smoothed, folding ``o`` of ``T``
   values into an empty bin costs about ``(o / T) * log(o / 1e-4)`` nats
   (0.003 for 8 of 32768 values): amax 14.2; a tail of 0.13 % costs 0.016,
   more than quantizing the bulk coarsely (0.012), and is kept.

Everything is float64 arithmetic in a fixed order: same histogram, same bits.
``robust=False`` gives the published algorithm (no smoothing, no point-mass
rule) for comparison with TensorRT's own calibrator.
"""

from __future__ import annotations


import numpy as np

from .entropy_search import entropy_argmin, entropy_divergences
from .mse_search import mse_argmin
from .methods import (
    DEFAULT_PERCENTILE,
    ENTROPY_BINS,
    ENTROPY_LEVELS,
    ENTROPY_POINT_MASS,
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
    "without_point_masses",
    "saturation_bound",
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


def without_point_masses(hist: np.ndarray, share: float = ENTROPY_POINT_MASS) -> np.ndarray:
    """``hist`` with every point mass cut down to the larger of its two neighbours (a copy).

    A point mass is a bin holding more than ``share`` of all the counts. Its
    neighbours are read in ``hist`` as given, so two adjacent point masses are
    each cut to the other's height.
    """
    hist = np.asarray(hist, dtype=np.float64)
    out = hist.copy()
    total = hist.sum()
    if hist.size < 2 or total == 0:
        return out
    left = np.concatenate([[0.0], hist[:-1]])
    right = np.concatenate([hist[1:], [0.0]])
    spike = hist > share * total
    out[spike] = np.minimum(hist[spike], np.maximum(left, right)[spike])
    return out


def saturation_bound(hist: np.ndarray, start: int, share: float = ENTROPY_POINT_MASS) -> np.ndarray:
    """For each candidate ``i`` in ``[start, len(hist))``: does it leave at most ``share`` of the counts above bin ``i - 1``?"""
    hist = np.asarray(hist, dtype=np.float64)
    above = np.cumsum(hist[::-1])[::-1]  # above[i] = sum(hist[i:])
    return above[start:] <= share * hist.sum()


def amax_entropy(
    hist: np.ndarray,
    upper: float,
    *,
    levels: int = ENTROPY_LEVELS,
    start_bin: int | None = None,
    zeros: float = 0.0,
    robust: bool = True,
) -> float:
    """Entropy (KL-divergence) calibration threshold: TensorRT's search, made robust to point masses.

    Migacz, "8-bit Inference with TensorRT", GTC 2017 (s7310-8-bit-inference-with-tensorrt.pdf). ``hist``: |x| over ``[0, upper]`` (TensorRT: 2048 bins up to absmax; quantlab:
    2048 bins of whole fine bins, ``absmax <= upper < 1.25 * absmax``, see
    ``HistogramState.coarsen``: re-binning would move a flat minimum). For
    every candidate ``i`` from ``levels`` (128) up to ``len(hist) - 1``:

    - ``P`` = the first ``i`` bins, every count at or above bin ``i`` (the outliers) added to bin ``i - 1``;
    - ``Q`` = the first ``i`` bins (without outliers) merged into ``levels`` levels (bin ``j`` goes to level
      ``floor(j * levels / i)``), each level's mass spread evenly over its non-empty bins (empty bins stay 0);
    - ``robust``: both smoothed as ONNX Runtime / MXNet / TVM do
      (``smooth_distribution``: each empty bin gets ``ENTROPY_SMOOTHING`` counts,
      taken evenly off the non-empty ones); then normalised;
    - ``divergence[i] = KL(P || Q) = sum_j P_j log(P_j / Q_j)``.

    The threshold is ``(m + 0.5) * bin_width`` for the ``m`` with the smallest
    divergence (the first one on ties). ``robust`` (default) adds the point-mass
    rule of the module docstring: bins holding more than ``ENTROPY_POINT_MASS``
    of the counts are cut to their neighbours' height before the search, and
    only candidates leaving at most that share above them are eligible.
    ``robust=False``: the published algorithm (unsmoothed: infinite where bin
    ``i - 1`` is empty but outliers fold into it; every candidate eligible).
    ``upper`` when no candidate is eligible and finite, or ``len(hist) <= levels``.

    ``zeros``: how many ``hist[0]`` values are exactly 0.0, taken out first (pytorch-quantization's
    ``skip_zeros``; why: module docstring).
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
    start = levels if start_bin is None else int(start_bin)
    if not robust:
        m = entropy_argmin(hist, levels, start, eps=0.0)
    else:  # the eligible candidates are [first, len(hist)): the share above i only falls as i grows
        eligible = saturation_bound(hist, start)
        if not eligible.any():
            return float(upper)
        start += int(np.argmax(eligible))
        m = entropy_argmin(without_point_masses(hist), levels, start)
    if m is None:
        return float(upper)
    return float((m + 0.5) * upper / hist.size)


def amax_mse(hist: np.ndarray, upper: float, *, candidates: int = MSE_CANDIDATES, levels: int = MSE_LEVELS) -> float:
    """Threshold minimising the expected squared INT8 error of |x| (clipping + rounding).

    For a threshold ``t`` with step ``s = t / levels``, a value below ``t``
    costs ``s**2 / 12`` (uniform rounding error) and a value above costs
    ``(x - t)**2`` (clipping), with ``x`` at its bin centre. Candidates are
    ``upper * k / candidates`` for ``k = 1..candidates``; the smallest error wins
    (the first one on ties): :func:`quantlab.mse_search.mse_argmin`, the argmin of the error curve bit for bit
    from the exact errors of a few candidates.
    """
    hist = _validate(hist, upper)
    if hist.sum() == 0 or upper == 0:
        return 0.0
    return float(upper * (mse_argmin(hist, upper, candidates, levels) + 1) / candidates)

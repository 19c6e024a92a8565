"""Statistics on samples: class rankings, confidence intervals and tests.

End to end: :func:`topk` from logits, :func:`bootstrap_ci`
(percentile bootstrap, paired: one set of resampled sample indices for every figure, from
a seeded generator, so the same data and seed give the same interval) and
:func:`mcnemar_exact_p` (exact two-sided McNemar test on the discordant pairs, binomial
with p = 1/2, in log space: no scipy).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

__all__ = ["topk", "topk_correct", "bootstrap_ci", "binomial_ci", "mcnemar_exact_p", "near_zero_count"]


# --------------------------------------------------------------------------- classification


def topk(logits: np.ndarray, k: int) -> np.ndarray:
    """[N, k] class indices of the ``k`` largest scores per row, best first (ties: lower index first).

    ``logits`` is [N, C]; NaN scores rank last. A stable sort, so the result is deterministic.
    """
    x = np.asarray(logits)
    if x.ndim != 2:
        raise ValueError(f"top-k needs [N, C] scores, got shape {x.shape}")
    k = min(int(k), x.shape[1])
    scores = np.where(np.isnan(x), -np.inf, x.astype(np.float64, copy=False))
    if k == 1:
        return np.argmax(scores, axis=1)[:, None]
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """bool [N]: the label is among the ``k`` best classes of each row."""
    top = topk(logits, k)
    lab = np.asarray(labels).reshape(-1, 1)
    return (top == lab).any(axis=1)


# --------------------------------------------------------------------------- statistics


def bootstrap_ci(
    columns: Mapping[str, np.ndarray],
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    block: int = 256,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of the mean of every column, paired.

    Every column has one value per sample (same length N). Each resample draws
    N sample indices with replacement from ``np.random.default_rng(seed)`` and
    takes every column's mean over the same indices, so a difference column
    (e.g. reference minus candidate correctness) gets the interval of the paired
    difference. Resamples are drawn ``block`` at a time: memory is O(block · N).
    Columns holding NaN get (nan, nan). ``resamples = 0`` gives (nan, nan).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    names = list(columns)
    if not names:
        return {}
    data = np.stack([np.asarray(columns[k], dtype=np.float64).reshape(-1) for k in names], axis=1)
    n = data.shape[0]
    if n == 0 or resamples <= 0:
        return {k: (math.nan, math.nan) for k in names}
    rng = np.random.default_rng(seed)
    means = np.empty((resamples, len(names)), dtype=np.float64)
    done = 0
    while done < resamples:
        m = min(block, resamples - done)
        idx = rng.integers(0, n, size=(m, n))
        # mean over resampled rows: counts per sample times data, exact in float64 for 0/1 data
        for j in range(m):
            counts = np.bincount(idx[j], minlength=n).astype(np.float64)
            means[done + j] = counts @ data / n
        done += m
    alpha = (1.0 - confidence) / 2.0
    lo = np.quantile(means, alpha, axis=0)
    hi = np.quantile(means, 1.0 - alpha, axis=0)
    out: dict[str, tuple[float, float]] = {}
    for j, k in enumerate(names):
        if np.isnan(data[:, j]).any():
            out[k] = (math.nan, math.nan)
        else:
            out[k] = (float(lo[j]), float(hi[j]))
    return out


def _binomial_tail_at_least(k: int, n: int, p: float) -> float:
    """P[X >= k] for X ~ Binomial(n, p), summed in log space (exact to float64 for any n)."""
    if k <= 0:
        return 1.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    i = np.arange(k, n + 1, dtype=np.float64)
    first = math.lgamma(n + 1.0) - math.lgamma(k + 1.0) - math.lgamma(n - k + 1.0)  # log C(n, k)
    steps = np.log(n - i[:-1]) - np.log(i[:-1] + 1.0)  # C(n, i+1) = C(n, i) * (n - i) / (i + 1)
    log_terms = np.concatenate([[first], first + np.cumsum(steps)]) + i * math.log(p) + (n - i) * math.log1p(-p)
    top = float(log_terms.max())
    return float(min(1.0, math.exp(top) * float(np.exp(log_terms - top).sum())))


def binomial_ci(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson (exact) interval of a proportion: ``successes`` of ``n`` samples, as fractions in [0, 1].

    The bootstrap collapses to a point when every sample agrees (12 of 12: "100 [100, 100]"), which would let a
    gate pass on a dozen samples; the exact interval of 12 of 12 is [0.735, 1]. Each end solves its binomial
    tail equation by bisection (60 halvings: float64's resolution); ``n = 0`` gives (nan, nan).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    k, n = int(successes), int(n)
    if n <= 0:
        return math.nan, math.nan
    if not 0 <= k <= n:
        raise ValueError(f"successes must be in [0, {n}], got {k}")
    alpha = (1.0 - confidence) / 2.0

    def solve(at_least: int, target: float) -> float:  # the p where P[X >= at_least] (increasing in p) = target
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2.0
            lo, hi = (mid, hi) if _binomial_tail_at_least(at_least, n, mid) < target else (lo, mid)
        return (lo + hi) / 2.0

    low = 0.0 if k == 0 else solve(k, alpha)  # P[X >= k | low] = alpha/2
    high = 1.0 if k == n else solve(k + 1, 1.0 - alpha)  # P[X <= k | high] = alpha/2
    return low, high


def mcnemar_exact_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts.

    ``b``: samples the reference gets right and the candidate wrong; ``c``: the
    reverse. Under the null hypothesis (same accuracy) each discordant sample is
    a fair coin: p = min(1, 2 · P[X <= min(b, c)]) with X ~ Binomial(b + c, 1/2).
    No discordant sample gives p = 1. Computed in log space (sums of
    log-binomial terms with a log-sum-exp), exact to float64 for any counts.
    """
    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    i = np.arange(k + 1, dtype=np.float64)
    # log C(n, i) by the recurrence C(n, i+1) = C(n, i) * (n - i) / (i + 1)
    steps = np.log(n - i[:-1]) - np.log(i[:-1] + 1.0) if k > 0 else np.zeros(0)
    log_terms = np.concatenate([[0.0], np.cumsum(steps)]) - n * math.log(2.0)
    top = float(log_terms.max())
    log_tail = top + math.log(float(np.exp(log_terms - top).sum()))
    return float(min(1.0, 2.0 * math.exp(log_tail)))


def near_zero_count(energy: np.ndarray, share: float = 1e-6) -> int:
    """How many samples' sums of squares are under ``share`` of the median of the positive ones (a norm under
    1/1000 of the median by default): their per-sample cosine measures noise. 0 when none is positive."""
    energy = np.asarray(energy, dtype=np.float64)
    positive = energy[energy > 0]
    return int(np.count_nonzero(energy < share * float(np.median(positive)))) if positive.size else 0


def mean_and_spread(x: np.ndarray) -> list[tuple[float, float]]:
    """[(mean, standard deviation)] of the finite values of a float array (float64 sums); [] for fewer than two
    (one value has no spread: a batch of one sample of CLIP's 1 x 1 logits is no constant output)."""
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating) or arr.size < 2:
        return []
    live = arr[np.isfinite(arr)].astype(np.float64)
    return [(float(live.mean()), float(live.std()))] if live.size >= 2 else []


def offset_db(mean: float, std: float) -> float:
    """What an output's constant offset alone is worth as SQNR (dB): its power over its spread's,
    ``10 log10((mean^2 + std^2) / std^2)``; inf for a constant output."""
    return math.inf if std == 0 else 10.0 * math.log10((mean * mean + std * std) / (std * std))


def varying_share(x: np.ndarray) -> list[float]:
    """[the share of a float array's power (sum of squares) that differs between samples]: its values minus their
    per-element mean over axis 0 (the samples), squared and summed, over its values squared and summed; [] for
    fewer than two samples or no power. Near 0, the output is (nearly) the same vector for every input: an
    EfficientNet with a dead head (logits 0.03 +- 1e-4 per class: 1e-5), a dead MobileViT (1e-12), a detector's
    box priors. With ``n`` samples the per-element mean absorbs 1/n of the varying power."""
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating) or arr.ndim == 0 or arr.shape[0] < 2:
        return []
    live = arr.astype(np.float64)
    live = live[np.isfinite(live).reshape(len(live), -1).all(axis=1)]  # whole samples: the means stay paired
    if len(live) < 2:
        return []
    total = float(np.sum(live * live))
    if total <= 0.0:
        return []
    centred = live - live.mean(axis=0, keepdims=True)
    return [float(np.sum(centred * centred)) / total]


def channel_spread(x: np.ndarray, ratio: float = 100.0, max_size: int = 512) -> list[tuple[int, float, float]]:
    """(axis, largest, smallest) for each axis of a ``[N, A, B]`` output (samples on axis 0) along which the
    indices' largest |x| differ ``ratio`` times or more (smallest over the non-zero ones), for axes of 3 to
    ``max_size`` indices: a detector's rows of box coordinates in pixels beside scores in [0, 1]. Cosine and SQNR
    over such an output weigh the large rows only. [] for other ranks."""
    arr = np.asarray(x)
    if arr.ndim != 3 or not np.issubdtype(arr.dtype, np.floating) or arr.size == 0:
        return []
    out = []
    for axis in (1, 2):
        if not 3 <= arr.shape[axis] <= max_size:
            continue
        peak = np.nanmax(np.where(np.isfinite(arr), np.abs(arr), np.nan), axis=tuple(a for a in (0, 1, 2)
                                                                                     if a != axis))
        live = peak[np.isfinite(peak) & (peak > 0)]
        if live.size >= 2 and live.max() >= ratio * live.min():
            out.append((axis, float(live.max()), float(live.min())))
    return out


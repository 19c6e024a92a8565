"""Calibration methods against independent references.

The entropy reference below is written directly from the GTC 2017 slides
(Migacz, "8-bit Inference with TensorRT", slides "Calibration" / "Candidate
distribution Q"), one candidate at a time, building P and Q explicitly; it
shares no code with quantlab.calibrators, which uses prefix sums. quantlab
leaves exact zeros out by default (``zeros=``, pytorch-quantization's
skip_zeros); the reference gets the same zero-free histogram, built from the
samples without their zeros.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from quantlab.calibrators import (
    amax_entropy,
    amax_minmax,
    amax_mse,
    amax_percentile,
    entropy_divergences,
)
from quantlab.histogram import AbsHistogram


def reference_kl_curve(hist: np.ndarray, levels: int = 128) -> dict[int, float]:
    """KL(P||Q) per candidate i, straight from the slides."""
    hist = np.asarray(hist, dtype=np.float64)
    out = {}
    for i in range(levels, hist.size):
        reference_p = hist[:i].copy()
        reference_p[i - 1] += hist[i:].sum()  # outliers folded into the last kept bin
        level_of_bin = (np.arange(i) * levels) // i  # merge i bins into `levels` levels
        level_mass = np.bincount(level_of_bin, weights=hist[:i], minlength=levels)
        nonzero = hist[:i] != 0
        level_nonzero = np.bincount(level_of_bin, weights=nonzero, minlength=levels)
        candidate_q = np.zeros(i)
        candidate_q[nonzero] = level_mass[level_of_bin[nonzero]] / level_nonzero[level_of_bin[nonzero]]
        p = reference_p / reference_p.sum()
        q = candidate_q / candidate_q.sum()
        if np.any((p > 0) & (q == 0)):
            out[i] = np.inf
            continue
        keep = p > 0
        out[i] = float(np.sum(p[keep] * np.log(p[keep] / q[keep])))
    return out


def reference_entropy_amax(samples: np.ndarray, upper: float | None = None, bins: int = 2048) -> float:
    """Histogram of |x| over [0, upper] (default absmax), 2048 bins; threshold (m + 0.5) * width at the min KL."""
    a = np.abs(samples.astype(np.float64))
    upper = float(a.max()) if upper is None else upper
    hist, _ = np.histogram(a, bins=bins, range=(0.0, upper))
    curve = reference_kl_curve(hist)
    m = min(curve, key=lambda i: (curve[i], i))
    return (m + 0.5) * upper / bins


def streaming_histogram_upper(absmax: float, fine_bins: int = 2**14, bins: int = 2048) -> float:
    """The range quantlab's 2048-bin entropy histogram covers, from its documented definition:
    fine bins of width R / fine_bins with R the smallest power of two above absmax, grouped g at a time,
    g the smallest integer with bins * g fine bins reaching past absmax."""
    r = 2.0 ** math.frexp(absmax)[1]
    width = r / fine_bins
    group = math.ceil((math.floor(absmax / width) + 1) / bins)
    return bins * group * width


def _distributions() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    n = 200_000
    return {
        "gaussian": rng.normal(0, 1, n),
        "laplace": rng.laplace(0, 1, n),
        "student_t3": rng.standard_t(3, n),
        "relu_gaussian": np.maximum(rng.normal(0.2, 1, n), 0),
        "relu6_mostly_zero": np.clip(rng.normal(-1.3, 2.5, n), 0, 6),  # ~70 % exact zeros, spike at 6
    }


DISTRIBUTIONS = _distributions()


def _assert_same_curve(hist: np.ndarray) -> None:
    ours = entropy_divergences(hist)
    ref = reference_kl_curve(hist)
    ref_arr = np.array([ref[i] for i in range(128, 2048)])
    finite = np.isfinite(ref_arr)
    np.testing.assert_array_equal(np.isfinite(ours), finite)
    np.testing.assert_allclose(ours[finite], ref_arr[finite], rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_entropy_equals_reference_on_the_same_zero_free_histogram(name):
    """Default (zeros skipped): quantlab gets the histogram and its zero count, the reference the zero-free samples."""
    x = DISTRIBUTIONS[name]
    absmax = float(np.abs(x).max())
    zeros = int((x == 0).sum())
    hist, _ = np.histogram(np.abs(x), bins=2048, range=(0.0, absmax))
    zero_free, _ = np.histogram(np.abs(x[x != 0]), bins=2048, range=(0.0, absmax))
    np.testing.assert_array_equal(zero_free[1:], hist[1:])
    assert zero_free[0] == hist[0] - zeros
    _assert_same_curve(zero_free)
    expected = reference_entropy_amax(x[x != 0], absmax)
    assert amax_entropy(hist, absmax, zeros=zeros) == pytest.approx(expected, rel=1e-12)
    assert amax_entropy(zero_free, absmax) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", ["gaussian", "relu_gaussian", "relu6_mostly_zero"])
def test_entropy_keeping_zeros_equals_reference_on_the_full_histogram(name):
    """zeros=0: TensorRT's published algorithm exactly, zeros in bin 0 (``--entropy-keep-zeros``)."""
    x = DISTRIBUTIONS[name]
    absmax = float(np.abs(x).max())
    hist, _ = np.histogram(np.abs(x), bins=2048, range=(0.0, absmax))
    _assert_same_curve(hist)
    assert amax_entropy(hist, absmax) == pytest.approx(reference_entropy_amax(x), rel=1e-12)


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_entropy_from_streaming_histogram_equals_reference_on_samples(name):
    """Streaming 2**14-bin histogram (13 batches) -> 2048 coarse bins -> threshold == reference on raw samples
    (without their exact zeros; with them for zeros=0)."""
    x = DISTRIBUTIONS[name].astype(np.float32)
    h = AbsHistogram()
    for chunk in np.array_split(x, 13):
        h.update(chunk)
    s = h.state()
    assert s.zeros == int((x == 0).sum())
    hist, upper = s.coarsen(2048)
    absmax = float(np.abs(x).max())
    assert upper == streaming_histogram_upper(absmax)
    assert absmax <= upper < 1.25 * absmax + upper / 2048
    ours = amax_entropy(hist, upper, zeros=s.zeros)
    assert ours == pytest.approx(reference_entropy_amax(x[x != 0], upper), rel=1e-12)
    assert amax_entropy(hist, upper) == pytest.approx(reference_entropy_amax(x, upper), rel=1e-12)
    if name in ("laplace", "student_t3"):
        assert ours < 0.9 * absmax  # heavy tails get clipped


@pytest.mark.parametrize("name, tail", [
    ("relu6", lambda rng, n: np.clip(rng.normal(-1.3, 2.5, n), 0, 6)),
    ("relu_laplace", lambda rng, n: np.maximum(rng.laplace(-0.8, 1.0, n), 0)),
])
def test_entropy_no_longer_clips_the_tail_of_mostly_zero_relu_outputs(name, tail):
    """~70-80 % exact zeros + a long tail (ReLU6 / ReLU outputs of EfficientNet's late blocks).

    Kept in bin 0, the zeros put the KL minimum at the smallest candidate (128.5
    bins of 2048): 12-25 % of the values saturate. Left out, the tail is kept.
    """
    x = tail(np.random.default_rng(11), 200_000).astype(np.float32)
    h = AbsHistogram()
    h.update(x)
    s = h.state()
    assert 0.65 < s.zero_fraction < 0.85
    hist, upper = s.coarsen(2048)
    kept = amax_entropy(hist, upper)  # TensorRT's algorithm as published
    skipped = amax_entropy(hist, upper, zeros=s.zeros)
    assert kept == pytest.approx(128.5 * upper / 2048)  # the smallest candidate, whatever the tail
    assert np.mean(x > kept) > 0.10
    assert np.mean(x > skipped) < 0.001
    assert skipped > 0.8 * s.absmax


def test_entropy_is_ill_conditioned_in_sparse_tails_which_is_why_bins_are_not_interpolated():
    """Documents the published algorithm: a 1 % wider histogram range moves the Gaussian threshold by > 3 %."""
    x = DISTRIBUTIONS["gaussian"]
    absmax = float(np.abs(x).max())
    a = reference_entropy_amax(x, absmax)
    b = reference_entropy_amax(x, absmax * 1.01)
    assert abs(a - b) / a > 0.03


def test_entropy_clips_heavy_tails_more_than_light_ones():
    ratios = {}
    for name, x in DISTRIBUTIONS.items():
        absmax = float(np.abs(x).max())
        hist, _ = np.histogram(np.abs(x), 2048, range=(0, absmax))
        ratios[name] = amax_entropy(hist, absmax) / absmax
    assert ratios["student_t3"] < ratios["laplace"] < 1.0
    assert ratios["student_t3"] < ratios["gaussian"]


def test_entropy_edge_cases():
    assert amax_entropy(np.zeros(2048), 1.0) == 0.0
    assert amax_entropy(np.ones(2048), 0.0) == 0.0
    hist = np.zeros(2048)
    hist[0], hist[-1] = 10, 1  # bin i-1 empty for every candidate that has outliers: all infinite
    assert amax_entropy(hist, 4.0) == 4.0
    assert amax_entropy(np.ones(64), 2.0) == 2.0  # fewer bins than levels
    with pytest.raises(ValueError):
        amax_entropy(np.array([1.0, -1.0]), 1.0)
    only_zeros = np.zeros(2048)
    only_zeros[0] = 50
    assert amax_entropy(only_zeros, 1.0, zeros=50) == 0.0
    with pytest.raises(ValueError, match="zeros"):
        amax_entropy(only_zeros, 1.0, zeros=51)
    with pytest.raises(ValueError, match="zeros"):
        amax_entropy(only_zeros, 1.0, zeros=-1)


def test_minmax():
    assert amax_minmax(-3.5, 2.0) == 3.5
    assert amax_minmax(0.0, 0.25) == 0.25


def test_percentile_matches_numpy_within_a_bin():
    x = np.abs(DISTRIBUTIONS["laplace"])
    upper = 16.0
    hist, _ = np.histogram(x, bins=4096, range=(0, upper))
    for p in (50.0, 99.0, 99.99):
        assert abs(amax_percentile(hist, upper, p) - np.percentile(x, p)) <= upper / 4096
    assert amax_percentile(hist, upper, 100.0) <= upper
    assert amax_percentile(np.zeros(8), 1.0) == 0.0
    with pytest.raises(ValueError, match="percentile"):
        amax_percentile(hist, upper, 0.0)


def test_mse_against_brute_force_quantization_error():
    """The chosen threshold is near the one minimising the real INT8 round-trip error on the samples."""
    x = np.abs(DISTRIBUTIONS["laplace"])
    absmax = float(x.max())
    hist, _ = np.histogram(x, 2048, range=(0, absmax))
    ours = amax_mse(hist, absmax)

    def real_error(t: float) -> float:
        s = t / 127
        return float(np.mean((x - np.clip(np.round(x / s), 0, 127) * s) ** 2))

    grid = absmax * np.arange(1, 257) / 256
    best = grid[np.argmin([real_error(t) for t in grid])]
    assert real_error(ours) <= 1.05 * real_error(best)
    assert 0.1 * absmax < ours < absmax


def _mse_reference(hist: np.ndarray, upper: float, candidates: int = 512, levels: int = 127) -> tuple:
    """The [candidates, bins] numpy formulation amax_mse replaced: (threshold, errors, thresholds)."""
    centres = (np.arange(hist.size) + 0.5) * upper / hist.size
    t = upper * np.arange(1, candidates + 1) / candidates
    below = centres[None, :] <= t[:, None]
    rounding = (t / levels) ** 2 / 12.0 * (below * hist[None, :]).sum(axis=1)
    clipping = (np.where(below, 0.0, (centres[None, :] - t[:, None]) ** 2) * hist[None, :]).sum(axis=1)
    errors = rounding + clipping
    return float(t[int(np.argmin(errors))]), errors, t


@pytest.mark.parametrize("seed", range(4))
def test_mse_kernel_equals_the_numpy_formulation(seed):
    """Same threshold as the dense numpy version; sums run in another order, so a near-tie (errors equal to
    ~1e-12 relative, float64 rounding of 2048-term sums) may pick the neighbour with the same error."""
    rng = np.random.default_rng(seed)
    for _ in range(25):
        hist = rng.integers(0, 1000, 2048).astype(np.float64) * (rng.random(2048) < rng.random())
        hist[rng.integers(1, 2048):] = 0
        hist[0] += 1
        upper = float(rng.uniform(0.01, 100.0))
        ref, errors, t = _mse_reference(hist, upper)
        ours = amax_mse(hist, upper)
        k = int(np.argmin(np.abs(t - ours)))
        assert ours == ref or errors[k] <= errors.min() * (1 + 1e-12)


def test_percentile_from_prefix_sums_equals_amax_percentile():
    from quantlab.calibrators import percentile_of_cumulative

    rng = np.random.default_rng(5)
    hist = rng.integers(0, 50, 4096).astype(np.float64)
    cum = np.concatenate([[0.0], np.cumsum(hist)])
    for p in (50.0, 99.0, 99.99, 100.0, 1e-3):
        assert percentile_of_cumulative(cum, float(hist.sum()), 7.5, p) == amax_percentile(hist, 7.5, p)

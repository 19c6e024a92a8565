"""Calibration methods against independent references.

The entropy reference below is written directly from its definition: the GTC
2017 slides (Migacz, "8-bit Inference with TensorRT", slides "Calibration" /
"Candidate distribution Q") for P and Q, ONNX Runtime's / MXNet's
``smooth_distribution`` for the smoothing, and the point-mass rule of
quantlab.calibrators' docstring; one candidate at a time, building P and Q
explicitly, no prefix sums. It shares no code with quantlab.calibrators.
quantlab leaves exact zeros out by default (``zeros=``, pytorch-quantization's
skip_zeros); the reference gets the same zero-free histogram.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import models
from quantlab.calibrate import calibrate
from quantlab.calibrators import (
    amax_entropy,
    amax_minmax,
    amax_mse,
    amax_percentile,
    entropy_divergences,
)
from quantlab.data import from_arrays
from quantlab.graph import model_from_proto
from quantlab.histogram import AbsHistogram
from quantlab.methods import ENTROPY_POINT_MASS, ENTROPY_SMOOTHING

EPS = 1e-4  # ONNX Runtime's / MXNet's / TVM's smooth_distribution default, restated
SHARE = 0.01  # the point-mass share of quantlab.calibrators' docstring, restated


def reference_smooth(p: np.ndarray, eps: float = EPS) -> np.ndarray | None:
    """ONNX Runtime's smooth_distribution (float64): eps to every empty bin, taken evenly off the others."""
    empty = p == 0
    if empty.all():
        return None
    out = p.astype(np.float64) + np.where(empty, eps, -eps * empty.sum() / (~empty).sum())
    return None if (out <= 0).any() else out


def reference_kl_curve(hist: np.ndarray, levels: int = 128, eps: float = EPS) -> dict[int, float]:
    """KL(P||Q) per candidate i, straight from the slides; P and Q smoothed first unless eps == 0."""
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
        if eps:
            reference_p, candidate_q = reference_smooth(reference_p, eps), reference_smooth(candidate_q, eps)
            if reference_p is None or candidate_q is None:
                out[i] = np.inf
                continue
        p = reference_p / reference_p.sum()
        q = candidate_q / candidate_q.sum()
        if np.any((p > 0) & (q == 0)):
            out[i] = np.inf
            continue
        keep = p > 0
        out[i] = float(np.sum(p[keep] * np.log(p[keep] / q[keep])))
    return out


def reference_without_point_masses(hist: np.ndarray, share: float = SHARE) -> np.ndarray:
    """Every bin holding more than `share` of the counts, cut to the height of its larger neighbour."""
    hist = np.asarray(hist, dtype=np.float64)
    out = hist.copy()
    for k in range(hist.size):
        if hist[k] > share * hist.sum():
            neighbours = [hist[j] for j in (k - 1, k + 1) if 0 <= j < hist.size]
            out[k] = min(hist[k], max(neighbours))
    return out


def reference_robust_curve(hist: np.ndarray, levels: int = 128) -> dict[int, float]:
    """The smoothed curve of the histogram without point masses; inf for a candidate leaving > SHARE above it."""
    hist = np.asarray(hist, dtype=np.float64)
    curve = reference_kl_curve(reference_without_point_masses(hist), levels)
    return {i: (v if hist[i:].sum() <= SHARE * hist.sum() else np.inf) for i, v in curve.items()}


def threshold_of(curve: dict[int, float], upper: float, bins: int = 2048) -> float:
    """(m + 0.5) * width at the first minimum; upper when no candidate is finite."""
    finite = {i: v for i, v in curve.items() if np.isfinite(v)}
    if not finite:
        return upper
    m = min(finite, key=lambda i: (finite[i], i))
    return (m + 0.5) * upper / bins


def reference_entropy_amax(samples: np.ndarray, upper: float | None = None, bins: int = 2048,
                           robust: bool = True) -> float:
    """Histogram of |x| over [0, upper] (default absmax), 2048 bins; threshold at the min of the curve."""
    a = np.abs(samples.astype(np.float64))
    upper = float(a.max()) if upper is None else upper
    hist, _ = np.histogram(a, bins=bins, range=(0.0, upper))
    curve = reference_robust_curve(hist) if robust else reference_kl_curve(hist, eps=0.0)
    return threshold_of(curve, upper, bins)


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


def _assert_same_curve(hist: np.ndarray, eps: float = EPS) -> dict[int, float]:
    """Fast curve == reference: the same infinite candidates; finite values within float64 rounding
    (the fast one sums in another order: relative 1e-9 of terms of size ~1 is far above 2048 * 2**-52).
    Returns the reference curve."""
    ours = entropy_divergences(hist, eps=eps)
    ref = reference_kl_curve(hist, eps=eps)
    ref_arr = np.array([ref[i] for i in range(128, hist.size)])
    finite = np.isfinite(ref_arr)
    np.testing.assert_array_equal(np.isfinite(ours), finite)
    np.testing.assert_allclose(ours[finite], ref_arr[finite], rtol=1e-9, atol=1e-12)
    return ref


def test_the_tests_restate_the_registry_constants():
    assert (ENTROPY_SMOOTHING, ENTROPY_POINT_MASS) == (EPS, SHARE)


def test_reference_smoothing_is_onnxruntimes():
    from onnxruntime.quantization.quant_utils import smooth_distribution

    rng = np.random.default_rng(3)
    for _ in range(20):
        p = rng.integers(0, 50, 300).astype(np.float64) * (rng.random(300) < 0.4)
        p[rng.integers(0, 300)] += 1
        np.testing.assert_allclose(reference_smooth(p), smooth_distribution(p), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
@pytest.mark.parametrize("eps", [EPS, 0.0])
def test_entropy_curve_equals_reference_on_the_same_zero_free_histogram(name, eps):
    """quantlab gets the histogram and its zero count, the reference the zero-free samples (eps = 0: unsmoothed)."""
    x = DISTRIBUTIONS[name]
    absmax = float(np.abs(x).max())
    zeros = int((x == 0).sum())
    hist, _ = np.histogram(np.abs(x), bins=2048, range=(0.0, absmax))
    zero_free, _ = np.histogram(np.abs(x[x != 0]), bins=2048, range=(0.0, absmax))
    assert zero_free[0] == hist[0] - zeros
    _assert_same_curve(zero_free, eps)
    expected = reference_entropy_amax(x[x != 0], absmax, robust=bool(eps))
    assert amax_entropy(hist, absmax, zeros=zeros, robust=bool(eps)) == pytest.approx(expected, rel=1e-12)


def _random_histograms(seed: int, count: int = 6) -> list[np.ndarray]:
    """Dense, sparse (mostly empty bins), spiky (a few bins with 2-60 % of the counts) and fractional ones."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        hist = rng.integers(0, 1000, 2048).astype(np.float64) * (rng.random(2048) < rng.random() ** 2)
        hist[rng.integers(200, 2048):] = 0
        hist[rng.integers(0, 50)] += 1
        if k % 3 == 1:
            for spike in rng.integers(0, 2048, rng.integers(1, 4)):
                hist[spike] += rng.uniform(0.02, 0.6) * hist.sum()
        if k % 3 == 2:
            hist *= rng.uniform(0.5, 3.0)  # fractional counts (re-binned histograms)
        out.append(hist)
    return out


@pytest.mark.parametrize("seed", range(2))
def test_entropy_curve_and_threshold_equal_reference_on_random_and_spiky_histograms(seed):
    for hist in _random_histograms(seed):
        _assert_same_curve(hist)
        unsmoothed = _assert_same_curve(hist, 0.0)
        upper = 7.0
        assert amax_entropy(hist, upper) == pytest.approx(threshold_of(reference_robust_curve(hist), upper),
                                                          rel=1e-12)
        assert amax_entropy(hist, upper, robust=False) == pytest.approx(threshold_of(unsmoothed, upper), rel=1e-12)


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_entropy_from_streaming_histogram_equals_reference_on_samples(name):
    """Streaming 2**14-bin histogram (13 batches) -> 2048 coarse bins -> threshold == reference on raw samples
    (without their exact zeros)."""
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
    assert amax_entropy(hist, upper, robust=False) == pytest.approx(
        reference_entropy_amax(x, upper, robust=False), rel=1e-12)
    assert s.fraction_above(ours) <= SHARE
    if name in ("laplace", "student_t3"):
        assert ours < 0.9 * absmax  # heavy tails get clipped


@pytest.mark.parametrize("name, tail", [
    ("relu6", lambda rng, n: np.clip(rng.normal(-1.3, 2.5, n), 0, 6)),
    ("relu_laplace", lambda rng, n: np.maximum(rng.laplace(-0.8, 1.0, n), 0)),
])
def test_entropy_no_longer_clips_the_tail_of_mostly_zero_relu_outputs(name, tail):
    """~70-80 % exact zeros + a long tail (ReLU6 / ReLU outputs of EfficientNet's late blocks).

    Kept in bin 0 by the published algorithm, the zeros put the KL minimum at the
    smallest candidate (128.5 bins of 2048): 12-25 % of the values saturate.
    Left out (or, kept, cut down as a point mass), the tail is kept.
    """
    x = tail(np.random.default_rng(11), 200_000).astype(np.float32)
    h = AbsHistogram()
    h.update(x)
    s = h.state()
    assert 0.65 < s.zero_fraction < 0.85
    hist, upper = s.coarsen(2048)
    published = amax_entropy(hist, upper, robust=False)  # TensorRT's algorithm as published
    assert published == pytest.approx(128.5 * upper / 2048)  # the smallest candidate, whatever the tail
    assert np.mean(x > published) > 0.10
    for amax in (amax_entropy(hist, upper, zeros=s.zeros), amax_entropy(hist, upper)):
        assert np.mean(x > amax) < 0.001
        assert amax > 0.8 * s.absmax


def _histogram(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    h = AbsHistogram()
    h.update(values.astype(np.float32))
    s = h.state()
    hist, upper = s.coarsen(2048)
    return hist, upper, s.absmax


@pytest.mark.parametrize("plateau", [0.02, 0.3, 0.979])
def test_a_plateau_at_the_top_is_never_saturated(plateau):
    """HardSigmoid / ReLU6 outputs: a share piled at exactly the maximum (test_hardsigmoid_plateau_model
    shows the published search saturating such a plateau)."""
    rng = np.random.default_rng(5)
    n = 100_000
    x = rng.uniform(0.0, 1.0, n) ** 2
    x[: int(plateau * n)] = 1.0
    hist, upper, absmax = _histogram(x)
    amax = min(amax_entropy(hist, upper), absmax)
    assert amax == absmax == 1.0


def test_an_inner_spike_is_represented_and_does_not_pin_the_threshold():
    """A repeated constant inside the range (a bias over constant background): amax stays above it and
    the tail above it is kept as it is without the spike."""
    rng = np.random.default_rng(6)
    x = np.abs(rng.laplace(0, 1.0, 100_000))
    spiked = x.copy()
    spiked[:30_000] = 2.5
    hist, upper, absmax = _histogram(spiked)
    amax = amax_entropy(hist, upper)
    assert amax > 2.5 and np.mean(spiked > amax) <= SHARE


@pytest.mark.parametrize("values", [
    np.full(1000, 0.7),
    np.repeat([0.9, 1.0, 1.05, 1.1, 1.3], 200),
    np.random.default_rng(8).normal(1.0, 0.01, 256),
    np.random.default_rng(9).uniform(0.7, 1.4, 128),
])
def test_few_distinct_or_near_constant_values_never_get_a_range_below_them(values):
    values = values.astype(np.float32)
    hist, upper, absmax = _histogram(values)
    amax = min(amax_entropy(hist, upper), absmax)
    assert np.mean(values > amax) <= SHARE
    assert amax >= values.min()


def test_a_sparse_tail_is_a_choice_not_forced_by_infinite_candidates():
    """Bulk below 14, 0.02 % of the values at 180-210 and nothing between. Unsmoothed, every candidate in
    the gap is infinite and amax lands in the tail; smoothed, the gap is eligible and the bulk wins."""
    rng = np.random.default_rng(10)
    x = rng.normal(0, 3, 50_000).clip(-13.5, 13.5)
    x[:10] = rng.uniform(180, 210, 10)
    hist, upper, absmax = _histogram(x)
    published = entropy_divergences(hist, eps=0.0)
    smoothed = entropy_divergences(hist)
    gap = slice(int(14 / upper * 2048) + 2 - 128, int(179 / upper * 2048) - 128)
    assert np.isinf(published[gap]).all() and np.isfinite(smoothed).all()
    assert amax_entropy(hist, upper, robust=False) > 170
    assert 13.5 <= amax_entropy(hist, upper) < 20


def test_entropy_is_ill_conditioned_in_sparse_tails_which_is_why_bins_are_not_interpolated():
    """Documents the published algorithm: a 1 % wider histogram range moves the Gaussian threshold by > 3 %."""
    x = DISTRIBUTIONS["gaussian"]
    absmax = float(np.abs(x).max())
    a = reference_entropy_amax(x, absmax, robust=False)
    b = reference_entropy_amax(x, absmax * 1.01, robust=False)
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
    hist[0], hist[-1] = 10, 1  # published: bin i-1 empty for every candidate with outliers: all infinite
    assert amax_entropy(hist, 4.0, robust=False) == 4.0
    assert amax_entropy(hist, 4.0) == 4.0  # robust: the top value is 1/11 of the values, a point mass
    assert amax_entropy(np.ones(64), 2.0) == 2.0  # fewer bins than levels
    with pytest.raises(ValueError):
        amax_entropy(np.array([1.0, -1.0]), 1.0)
    with pytest.raises(ValueError, match="eps"):
        entropy_divergences(np.ones(2048), eps=1.0)
    only_zeros = np.zeros(2048)
    only_zeros[0] = 50
    assert amax_entropy(only_zeros, 1.0, zeros=50) == 0.0
    with pytest.raises(ValueError, match="zeros"):
        amax_entropy(only_zeros, 1.0, zeros=51)
    with pytest.raises(ValueError, match="zeros"):
        amax_entropy(only_zeros, 1.0, zeros=-1)


def test_entropy_is_byte_reproducible():
    for hist in _random_histograms(4, 3):
        assert {amax_entropy(hist.copy(), 3.0).hex() for _ in range(3)} == {amax_entropy(hist, 3.0).hex()}
        assert entropy_divergences(hist).tobytes() == entropy_divergences(hist.copy()).tobytes()


# --------------------------------------------------------------------------- real models through calibrate


def _calibrated(builder, samples: int = 32):
    proto = builder()
    feeds = models.random_inputs(proto, samples, seed=1)
    result = calibrate(model_from_proto(proto), from_arrays(feeds), "entropy", batch_size=8)
    return proto, feeds, result


def _published(state) -> float:
    hist, upper = state.coarsen(2048)
    return min(amax_entropy(hist, upper, zeros=state.zeros, robust=False), state.absmax)


def test_hardsigmoid_plateau_model():
    """The squeeze-excite gate is ~90 % exactly 1.0: the published search saturated > 95 % of it."""
    _, _, result = _calibrated(models.hardsigmoid_plateau_net)
    table, stats = result.tables["entropy"], result.statistics
    gate = stats.tensors["gate"]
    assert gate.absmax == 1.0 and gate.fraction_above(_published(gate)) > 0.95  # the failure, reproduced
    for name in ("gate", "out"):
        assert table.ranges[name].amax >= 1.0
    for name, r in table.ranges.items():
        assert r.clipped_fraction <= SHARE, name
    assert not [n for n in table.notes if n.startswith("WARNING entropy")]


def test_layernorm_decomposed_model():
    """ReduceMean / Sqrt outputs hold one value per token: the published search put amax below all of them."""
    _, _, result = _calibrated(models.layernorm_decomposed_net)
    table, stats = result.tables["entropy"], result.statistics
    for name in ("var", "var_eps", "std"):
        state = stats.tensors[name]
        assert state.fraction_above(_published(state)) > 0.95  # the failure, reproduced
        assert table.ranges[name].amax >= state.quantile(0.99)
    for name, r in table.ranges.items():
        assert r.clipped_fraction <= SHARE, name


def test_sparse_tail_residual_model():
    """Residual stream: bulk below 14, 0.02 % at 180-210. Published: amax at the absolute max (INT8 step 1.6)."""
    _, feeds, result = _calibrated(models.sparse_tail_residual_net)
    table, stats = result.tables["entropy"], result.statistics
    stream = stats.tensors["stream"]
    bulk = stats.tensors["bulk"].absmax
    assert _published(stream) > 0.9 * stream.absmax > 10 * bulk  # the failure, reproduced
    assert bulk <= table.ranges["stream"].amax < 1.5 * bulk
    assert 0 < table.ranges["stream"].clipped_fraction <= 0.001
    for name, r in table.ranges.items():
        assert r.clipped_fraction <= SHARE, name


def test_cross_check_with_onnxruntime_entropy_calibrator(tmp_path):
    """ONNX Runtime's entropy calibrator (smoothed, 4095 signed bins, 255 levels: symmetric INT8) on the same
    feeds. Where it is comparable (a sparse tail, no point mass) it also clips the tail to the bulk; on the
    HardSigmoid plateau, smoothing alone does not help: it saturates most of the gate, quantlab none.
    (No attention masks here: ONNX Runtime's histograms fail on float32.min, quantlab excludes them.)"""
    import onnx
    from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, create_calibrator

    class Reader(CalibrationDataReader):
        def __init__(self, feeds: dict) -> None:
            n = next(iter(feeds.values())).shape[0]
            self.items = iter([{k: v[i:i + 8] for k, v in feeds.items()} for i in range(0, n, 8)])

        def get_next(self) -> dict | None:
            return next(self.items, None)

    def ort_amax(proto, feeds, name: str, op_type: str) -> float:
        onnx.save(proto, tmp_path / "m.onnx")
        cal = create_calibrator(tmp_path / "m.onnx", [op_type], augmented_model_path=str(tmp_path / "aug.onnx"),
                                calibrate_method=CalibrationMethod.Entropy,
                                extra_options={"symmetric": True, "num_bins": 4095, "num_quantized_bins": 255})
        cal.collect_data(Reader(feeds))
        histograms = cal.collector.histogram_dict  # its KL search is slow pure Python: only the tensor compared
        for other in [k for k in histograms if k != name]:
            del histograms[other]
        return float(cal.compute_data().data[name].range_value[1])

    proto, feeds, result = _calibrated(models.sparse_tail_residual_net)
    ours = result.tables["entropy"].ranges["stream"].amax
    ort = ort_amax(proto, feeds, "stream", "Add")
    bulk = result.statistics.tensors["bulk"].absmax
    assert 0.8 * bulk < ort < 1.5 * bulk and abs(ours - ort) < 0.2 * bulk
    proto, feeds, result = _calibrated(models.hardsigmoid_plateau_net)
    gate = result.statistics.tensors["gate"]
    assert gate.fraction_above(ort_amax(proto, feeds, "gate", "HardSigmoid")) > 0.5
    assert result.tables["entropy"].ranges["gate"].clipped_fraction == 0.0


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


def _edge_histograms() -> list[np.ndarray]:
    """Histograms where the bounds of quantlab.entropy_search are loose or the curve is flat: every value in a
    bin of its own (KL 0 over a stretch), fractional counts below the smoothing amount, a few non-empty bins
    (a large smoothing share per bin), one bin, and counts in the billions (rounding of large sums)."""
    rng = np.random.default_rng(11)
    own_bins = np.zeros(2048)
    own_bins[rng.choice(2048, 40, replace=False)] = 1.0
    tiny = rng.random(2048) * 1e-3 * (rng.random(2048) < 0.3)
    tiny[:5] = 1.0
    few = np.zeros(2048)
    few[[3, 700, 1500, 2047]] = [5, 1, 1, 2]
    one = np.zeros(2048)
    one[1000] = 7.0
    huge = np.round(rng.lognormal(18, 2, 2048)) * (rng.random(2048) < 0.6)
    plateau = np.full(2048, 3.0)
    return [own_bins, tiny, few, one, huge, plateau]


@pytest.mark.parametrize("seed", range(3))
def test_entropy_argmin_is_the_curves_first_minimum_bit_for_bit(seed):
    """The pruned search (bounds, then exact divergences near the minimum) returns the candidate np.argmin picks
    on the whole curve: on random, spiky, fractional and edge-case histograms, from every start, both
    smoothings."""
    from quantlab.entropy_search import entropy_argmin

    hists = _random_histograms(seed + 10, 12) + (_edge_histograms() if seed == 0 else [])
    hists += [np.histogram(np.abs(v), bins=2048)[0].astype(np.float64) for v in DISTRIBUTIONS.values()]
    checked = 0
    for hist in hists:
        for start in (128, 300, 1500):
            for eps in (EPS, 0.0, 0.01):
                curve = entropy_divergences(hist, start_bin=start, eps=eps)
                want = start + int(np.argmin(curve)) if np.isfinite(curve).any() else None
                assert entropy_argmin(hist, start_bin=start, eps=eps) == want, (start, eps)
                checked += want is not None
    assert checked > 50  # most cases have a finite minimum: the comparison is not vacuous

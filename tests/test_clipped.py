"""quantlab.clipped: one binning of x gives the histograms of x and of Relu(x) / Clip(x, 0, h), exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from quantlab.clipped import ClippedPair, NotDerivable, derivable_limit
from quantlab.histogram import AbsHistogram

BINS = 1 << 14


def _direct(batches: list[np.ndarray], h: float) -> tuple[AbsHistogram, AbsHistogram]:
    hx, hy = AbsHistogram(BINS), AbsHistogram(BINS)
    for b in batches:
        hx.update(b)
        hy.update(np.minimum(np.maximum(b, np.float32(0.0)), np.float32(h)))
    return hx, hy


def _derived(batches: list[np.ndarray], h: float) -> ClippedPair:
    pair = ClippedPair(h, BINS, 1e30)
    for b in batches:
        pair.update(b)
    return pair


@pytest.mark.parametrize("h", [6.0, math.inf, 0.5, 7.3, 8.0, 1e-3, 100.0])
@pytest.mark.parametrize("scale", [0.01, 3.0, 1000.0])
def test_both_histograms_equal_binning_x_and_clip_x_directly(h, scale):
    rng = np.random.default_rng(int(scale * 10) + int(min(h, 1e6) * 7))
    # ranges that grow from batch to batch, small batches (below BINS values) and chunk-sized ones
    batches = [(rng.standard_normal(n) * scale * (k + 1)).astype(np.float32)
               for k, n in enumerate([5, 40_000, 70_000, 3, 20_000])]
    hx, hy = _direct(batches, h)
    pair = _derived(batches, h)
    assert pair.state() == hx.state()
    assert pair.clipped_state() == hy.state()


@pytest.mark.parametrize("batches", [
    [np.zeros(100, np.float32), -np.ones(50_000, np.float32)],  # y all zero: its range stays 0
    [-np.linspace(1, 5, 30_000, dtype=np.float32)],  # no positive value
    [np.linspace(0, 1e-3, 30_000, dtype=np.float32), np.linspace(-9, 9, 30_001, dtype=np.float32)],
    [np.full(20_000, 6.0, np.float32), np.full(20_000, 5.99, np.float32)],  # values at and just below h
])
def test_edge_cases_equal_direct_binning(batches):
    for h in (6.0, math.inf):
        hx, hy = _direct(batches, h)
        pair = _derived(batches, h)
        assert pair.state() == hx.state()
        assert pair.clipped_state() == hy.state()


def test_statistics_do_not_depend_on_how_the_values_are_split():
    x = (np.random.default_rng(3).standard_normal(90_000) * 4).astype(np.float32)
    whole, pieces = _derived([x], 6.0), _derived(np.array_split(x, 7), 6.0)
    assert whole.state() == pieces.state() and whole.clipped_state() == pieces.clipped_state()


@pytest.mark.parametrize("values", [
    np.array([1.0, -0.0], np.float32),  # max(-0.0, 0) is -0.0 or +0.0 depending on the kernel
    np.array([1.0, np.nan], np.float32),
    np.array([1.0, np.inf], np.float32),
    np.array([1.0, 1e31], np.float32),  # huge: left out of x, but would it be of y?
    np.array([1.0, 2.0]),  # float64: not the compiled float32 path
    np.array([1e-40, 1e-41], np.float32),  # denormal range: bins / range overflows float32
])
def test_values_that_make_y_ambiguous_are_refused(values):
    with pytest.raises(NotDerivable):
        ClippedPair(6.0, BINS, 1e30).update(values)


def test_derivable_limit():
    assert derivable_limit(6.0, 1e30) == 8.0
    assert derivable_limit(8.0, 1e30) == 16.0  # strictly above h
    assert derivable_limit(math.inf, 1e30) == math.inf
    assert derivable_limit(0.0, 1e30) is None
    assert derivable_limit(-1.0, 1e30) is None
    assert derivable_limit(3e38, 1e30) is None  # y at h would be a huge value, left out
    with pytest.raises(ValueError, match="cannot be derived"):
        ClippedPair(0.0, BINS, 1e30)

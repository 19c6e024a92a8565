"""quantlab.mse_search: the pruned search returns the error curve's first minimum, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from quantlab.calibrators import amax_mse
from quantlab.mse_search import mse_argmin, mse_errors


def _dense_errors(hist: np.ndarray, upper: float, candidates: int, levels: int = 127) -> np.ndarray:
    """The [candidates, bins] numpy formulation, written from the definition (another summation order)."""
    centres = (np.arange(hist.size) + 0.5) * upper / hist.size
    t = upper * np.arange(1, candidates + 1) / candidates
    below = centres[None, :] <= t[:, None]
    rounding = (t / levels) ** 2 / 12.0 * (below * hist[None, :]).sum(axis=1)
    clipping = (np.where(below, 0.0, (centres[None, :] - t[:, None]) ** 2) * hist[None, :]).sum(axis=1)
    return rounding + clipping


def _histograms(seed: int) -> list[np.ndarray]:
    """Random, heavy-tailed, sparse, flat, fractional and exponential histograms, some with an empty top."""
    rng = np.random.default_rng(seed)
    out = []
    for kind in range(6):
        for n in (16, 300, 2048, 4096):
            if kind == 0:
                h = rng.integers(0, 1000, n).astype(np.float64) * (rng.random(n) < rng.random())
            elif kind == 1:
                h = np.round(rng.lognormal(10, 3, n)) * (rng.random(n) < 0.5)
            elif kind == 2:
                h = np.zeros(n)
                h[rng.integers(0, n, 3)] = rng.integers(1, 5, 3)
            elif kind == 3:
                h = np.full(n, 3.0)
            elif kind == 4:
                h = rng.random(n) * 1e-3
            else:
                h = np.exp(-np.arange(n) / rng.uniform(1, n)) * 1e9
            if rng.random() < 0.5:
                h[rng.integers(1, n):] = 0
            h[0] += 1
            out.append(h)
    return out


@pytest.mark.parametrize("seed", range(3))
def test_mse_argmin_is_the_curves_first_minimum_bit_for_bit(seed):
    rng = np.random.default_rng(100 + seed)
    for hist in _histograms(seed):
        for candidates in (7, 512, 1000):
            upper = float(10 ** rng.uniform(-20, 20))
            curve = mse_errors(hist, upper, candidates)
            assert mse_argmin(hist, upper, candidates) == int(np.argmin(curve)), (hist.size, candidates, upper)


def test_edge_histograms_match_the_curve():
    """All values in the lowest bin (the error rises with t from the first candidate), all in the top bin
    (clipping them a little beats a wider step), and one bin: the search agrees with the curve."""
    for where in (0, 2047, 1000):
        hist = np.zeros(2048)
        hist[where] = 10.0
        assert mse_argmin(hist, 1.0) == int(np.argmin(mse_errors(hist, 1.0)))
    hist = np.zeros(2048)
    hist[0] = 10.0
    assert mse_argmin(hist, 1.0) == 0
    assert mse_argmin(np.array([4.0]), 2.0, 512) == int(np.argmin(mse_errors(np.array([4.0]), 2.0, 512)))


def test_the_curve_is_the_definition():
    """The compiled curve equals the dense formulation to float64 rounding (its sums run in another order)."""
    for hist in _histograms(7)[:8]:
        want = _dense_errors(hist, 3.5, 512)
        np.testing.assert_allclose(mse_errors(hist, 3.5, 512), want, rtol=1e-11, atol=1e-300)


def test_amax_mse_reads_the_search():
    hist = np.round(np.random.default_rng(3).lognormal(8, 2, 2048))
    assert amax_mse(hist, 6.0) == 6.0 * (int(np.argmin(mse_errors(hist, 6.0))) + 1) / 512


@pytest.mark.parametrize(("upper", "candidates", "levels"), [(0.0, 512, 127), (np.inf, 512, 127), (1.0, 0, 127),
                                                            (1.0, 512, 0)])
def test_bad_arguments_are_refused(upper, candidates, levels):
    with pytest.raises(ValueError, match="must be"):
        mse_argmin(np.ones(16), upper, candidates, levels)

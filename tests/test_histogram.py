"""Streaming |x| histogram: exact against numpy, independent of batch size/order, robust to masks and NaN."""

from __future__ import annotations

import math

import numpy as np
import pytest

from quantlab.histogram import AbsHistogram, HistogramState, power_of_two_above


def _feed(values: np.ndarray, chunk: int, bins: int = 1024) -> HistogramState:
    h = AbsHistogram(bins)
    for i in range(0, values.size, chunk):
        h.update(values[i:i + chunk])
    return h.state()


def _mixed(seed: int = 0, n: int = 50_000) -> np.ndarray:
    """Values whose range grows over the stream: small first, a far outlier late, exact zeros."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, n).astype(np.float32)
    x[: n // 4] *= 1e-3
    x[n // 2] = 917.25
    x[::97] = 0.0
    return x


@pytest.mark.parametrize("x, expected", [(0.3, 0.5), (0.5, 1.0), (1.0, 2.0), (3.0, 4.0), (1e-40, 2.0**-132)])
def test_power_of_two_above_is_strictly_above(x, expected):
    assert power_of_two_above(x) == expected


def test_counts_equal_numpy_histogram_over_final_range():
    x = _mixed()
    state = _feed(x, 1000)
    absmax = float(np.abs(x).max())
    assert state.upper == power_of_two_above(absmax) == 1024.0
    expected, _ = np.histogram(np.abs(x.astype(np.float64)), bins=1024, range=(0, state.upper))
    np.testing.assert_array_equal(state.counts, expected)
    assert state.min == float(x.min()) and state.max == float(x.max())
    assert state.count == x.size and state.absmax == absmax


@pytest.mark.parametrize("chunk", [1, 7, 333, 50_000])
def test_bit_identical_whatever_the_batch_size(chunk):
    x = _mixed(1, 20_000)
    whole = _feed(x, x.size)
    part = _feed(x, chunk)
    np.testing.assert_array_equal(part.counts, whole.counts)
    assert (part.upper, part.min, part.max, part.count) == (whole.upper, whole.min, whole.max, whole.count)


def test_order_and_merge_do_not_change_the_result():
    x = _mixed(2, 20_000)
    forward = _feed(x, 500)
    backward = _feed(x[::-1].copy(), 500)
    np.testing.assert_array_equal(forward.counts, backward.counts)
    a, b = AbsHistogram(1024), AbsHistogram(1024)
    a.update(x[:3000])  # small range
    b.update(x[3000:])  # holds the outlier: larger range
    a.merge(b)
    np.testing.assert_array_equal(a.state().counts, forward.counts)
    c = AbsHistogram.from_state(_feed(x[3000:], 100))
    c.merge(_feed(x[:3000], 100))
    np.testing.assert_array_equal(c.state().counts, forward.counts)


def test_huge_and_nonfinite_values_are_counted_not_binned():
    x = np.array([0.5, -2.0, np.nan, np.inf, -np.inf, np.finfo(np.float32).min, 3e30, -1e30, 1.5], np.float32)
    h = AbsHistogram(64)
    h.update(x)
    s = h.state()
    assert (s.count, s.nonfinite, s.huge) == (3, 3, 3)
    assert (s.min, s.max, s.upper) == (-2.0, 1.5, 4.0)
    assert s.excluded == {"nonfinite": 3, "huge": 3}
    assert int(s.counts.sum()) == 3


def test_all_zero_then_values_keeps_range_from_values_only():
    h = AbsHistogram(16)
    h.update(np.zeros(10, np.float32))
    assert h.state().upper == 0.0 and h.state().counts[0] == 10 and h.state().absmax == 0.0
    h.update(np.array([0.3], np.float32))
    s = h.state()
    assert s.upper == 0.5  # the zeros did not force a range of 1.0
    assert s.counts[0] == 10 and s.counts[int(0.3 * 16 / 0.5)] == 1


def test_float16_and_float64_inputs():
    x = np.linspace(-3, 3, 101)
    a, b = AbsHistogram(256), AbsHistogram(256)
    a.update(x.astype(np.float16))
    b.update(x.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(a.state().counts, b.state().counts)
    c = AbsHistogram(256)
    c.update(x.reshape(1, 101, 1))  # float64, any shape
    assert c.state().count == 101 and c.state().max == 3.0


def test_rebin_interpolates_within_fine_bins_and_conserves_mass():
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, 100_000).astype(np.float32)
    h = AbsHistogram(4096)
    h.update(x)
    s = h.state()
    absmax = s.absmax
    coarse = s.rebin_to(2048, absmax)
    assert coarse.sum() == pytest.approx(x.size)
    direct, _ = np.histogram(np.abs(x), 2048, range=(0, absmax))
    # every coarse edge falls inside one fine bin: error at most one fine bin's count per edge
    fine_max = s.counts.max()
    assert np.abs(coarse - direct).max() <= 2 * fine_max


def test_quantile_and_fraction_above_match_numpy():
    rng = np.random.default_rng(4)
    x = rng.standard_t(3, 200_000).astype(np.float32)
    h = AbsHistogram()
    h.update(x)
    s = h.state()
    width = s.upper / s.bins
    for q in (0.5, 0.99, 0.9999):
        assert abs(s.quantile(q) - np.quantile(np.abs(x), q)) <= width
    t = float(np.quantile(np.abs(x), 0.999))
    assert s.fraction_above(t) == pytest.approx(np.mean(np.abs(x) > t), abs=2e-5)
    assert s.fraction_above(s.absmax) == 0.0


def test_bins_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        AbsHistogram(1000)
    with pytest.raises(ValueError, match="power of two"):
        AbsHistogram(2**31)
    with pytest.raises(ValueError, match="merge"):
        AbsHistogram(16).merge(AbsHistogram(32))


def test_range_grows_by_many_doublings_exactly():
    h = AbsHistogram(8)
    h.update(np.array([1e-6], np.float32))
    h.update(np.array([1e6], np.float32))
    s = h.state()
    assert s.upper == power_of_two_above(1e6)
    assert s.counts[0] == 1 and s.counts[int(1e6 * 8 / s.upper)] == 1
    assert math.log2(s.upper).is_integer()


def test_coarsen_groups_whole_fine_bins_exactly():
    rng = np.random.default_rng(5)
    x = rng.laplace(0, 1, 30_000).astype(np.float32)
    s = _feed(x, 4096, bins=2**14)
    counts, upper = s.coarsen(2048)
    absmax = float(np.abs(x).max())
    assert absmax <= upper < 1.25 * absmax + upper / 2048
    expected, _ = np.histogram(np.abs(x.astype(np.float64)), bins=2048, range=(0, upper))
    np.testing.assert_array_equal(counts, expected)
    # too few fine bins to group: interpolated over [0, absmax] instead, mass kept
    small = _feed(x, 4096, bins=1024)
    counts, upper = small.coarsen(2048)
    assert upper == absmax and counts.sum() == pytest.approx(x.size)
    assert AbsHistogram(64).state().coarsen(16)[1] == 0.0


def test_states_compare_by_value():
    x = _mixed(6, 1000)
    assert _feed(x, 10) == _feed(x, 1000)
    assert _feed(x, 10) != _feed(x[:-1], 10)


def test_exact_zeros_are_counted_whatever_the_batch_size_order_and_merge():
    x = _mixed(7, 20_000)
    x[5::301] = -0.0  # negative zero is a zero too
    x[3] = np.float32(1e-30)  # tiny but not zero: bin 0, not a zero
    expected = int((x == 0).sum())
    for chunk in (1, 13, x.size):
        s = _feed(x, chunk)
        assert s.zeros == expected and s.zero_fraction == pytest.approx(expected / x.size)
        assert int(s.counts[0]) > s.zeros  # the tiny value and the 1e-3-scaled values below one bin share bin 0
    a, b = AbsHistogram(1024), AbsHistogram(1024)
    a.update(x[:5000])
    b.update(x[5000:])
    a.merge(b.state())
    assert a.state() == _feed(x, 777)
    assert AbsHistogram.from_state(a.state()).state().zeros == expected


def test_zeros_before_any_range_and_non_usable_values():
    h = AbsHistogram(16)
    h.update(np.zeros(10, np.float32))  # no range yet: every value takes the slow branch
    h.update(np.array([0.0, np.nan, np.inf, -3e30, 0.3], np.float32))
    s = h.state()
    assert (s.zeros, s.count, s.nonfinite, s.huge) == (11, 12, 2, 1)
    assert s.counts[0] == 11


def test_without_zeros_and_zeros_as_a_point_mass():
    rng = np.random.default_rng(9)
    x = np.maximum(rng.normal(0, 1, 40_000), 0).astype(np.float32)  # ~half exact zeros
    s = _feed(x, 4096, bins=256)
    zeros = int((x == 0).sum())
    assert s.zeros == zeros
    nz = s.without_zeros()
    assert nz.zeros == 0 and nz.count == x.size - zeros and nz.counts[0] == s.counts[0] - zeros
    assert (nz.min, nz.max, nz.upper) == (s.min, s.max, s.upper)
    expected, _ = np.histogram(x[x != 0], bins=256, range=(0, s.upper))
    np.testing.assert_array_equal(nz.counts, expected)
    assert s.without_zeros().without_zeros() == nz and nz.without_zeros() is nz
    # the zeros sit at 0, not spread over bin 0: half a bin in, all of them and half of the rest are below
    half = s.upper / s.bins / 2
    assert s.cdf_at(0.0) == 0.0
    assert s.cdf_at(half) == pytest.approx(zeros + (s.counts[0] - zeros) / 2)
    assert s.cdf_at(s.absmax) == pytest.approx(x.size)
    with pytest.raises(ValueError, match="zeros"):
        HistogramState(counts=np.array([1, 2]), upper=1.0, min=0.0, max=0.9, count=3, zeros=2)


# --------------------------------------------------------------------------- compiled kernels (quantlab.binning)


def _reference(values: np.ndarray, bins: int, huge: float = 1e30) -> dict:
    """Value-by-value semantics in numpy: usable = finite and |x| < huge; min/max = first occurrence in data order."""
    x = values.astype(np.float64)
    usable = np.isfinite(x) & (np.abs(x) < huge)
    u = x[usable]
    out = {"count": int(u.size), "nonfinite": int((~np.isfinite(x)).sum()),
           "huge": int((np.isfinite(x) & (np.abs(x) >= huge)).sum()), "zeros": int((u == 0).sum())}
    absmax = float(np.abs(u).max()) if u.size else 0.0
    upper = power_of_two_above(absmax) if absmax > 0 else 0.0
    counts = np.zeros(bins, np.int64)
    if upper > 0:
        np.add.at(counts, np.floor(np.abs(u) * (bins / upper)).astype(np.int64), 1)
    else:
        counts[0] = u.size
    out.update(counts=counts, upper=upper)
    if u.size:  # the first value equal to the extreme (so -0.0 or 0.0 as they come)
        out["min"] = float(u[np.flatnonzero(u == u.min())[0]])
        out["max"] = float(u[np.flatnonzero(u == u.max())[0]])
    return out


def _kernel_inputs(seed: int) -> list[np.ndarray]:
    """Arrays over several 16 Ki-value chunks: growing ranges, runs of +-0.0, NaN/inf/huge in some chunks only."""
    from quantlab.binning import CHUNK

    rng = np.random.default_rng(seed)
    n = 3 * CHUNK + 123
    relu = np.maximum(rng.normal(0, 1, n), 0).astype(np.float32)
    relu[rng.random(n) < 0.2] = -0.0
    growing = (rng.normal(0, 1, n) * np.logspace(-6, 3, n)).astype(np.float32)
    masked = rng.normal(0, 3, n).astype(np.float32)
    masked[[5, CHUNK + 7, 2 * CHUNK + 9]] = [np.nan, -np.inf, np.finfo(np.float32).min]
    negative = -np.abs(rng.normal(0, 1, n)).astype(np.float32)
    negative[CHUNK + 1:] = rng.choice(np.array([0.0, -0.0], np.float32), n - CHUNK - 1)
    attention = rng.normal(0, 3, (n // 128 + 1) * 128).astype(np.float32).reshape(-1, 128)
    attention[:, 90:] = np.finfo(np.float32).min  # padded keys: a run of masked scores in every row
    attention = attention.ravel()[:n]
    attention[rng.random(n) < 0.05] = rng.choice(np.array([0.0, -0.0, -np.inf, np.nan], np.float32), 1)[0]
    attention[rng.random(n) < 0.01] = -0.0
    attention[rng.random(n) < 0.01] = 0.0
    attention[CHUNK:2 * CHUNK] = -np.inf  # a chunk with nothing usable
    return [relu, growing, masked, negative, np.zeros(n, np.float32), masked.astype(np.float64), attention]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("split", [1, 3, 5000])
def test_kernels_equal_value_by_value_reference(seed, split):
    for values in _kernel_inputs(seed):
        h = AbsHistogram(4096)
        for part in np.array_split(values, split):
            h.update(part)
        state, ref = h.state(), _reference(values, 4096)
        np.testing.assert_array_equal(state.counts, ref["counts"])
        assert (state.upper, state.count, state.nonfinite, state.huge, state.zeros) == (
            ref["upper"], ref["count"], ref["nonfinite"], ref["huge"], ref["zeros"])
        if ref["count"]:
            assert (state.min, state.max) == (ref["min"], ref["max"])
            assert math.copysign(1, state.min) == math.copysign(1, ref["min"])  # which zero, when the min is 0
            assert math.copysign(1, state.max) == math.copysign(1, ref["max"])


@pytest.mark.parametrize("huge", [0.5, 2.0, 1e30])
@pytest.mark.parametrize("split", [1, 7, 5000])
def test_chunks_with_values_left_out_equal_the_reference_at_any_huge_threshold(huge, split):
    """A low ``huge`` leaves many values out in every chunk (the masked-chunk kernel throughout); 5000 parts
    are smaller than the bins, so they bin straight into the counts."""
    for values in _kernel_inputs(2)[1:]:
        h = AbsHistogram(4096, huge_threshold=huge)
        for part in np.array_split(values, split):
            h.update(part)
        state, ref = h.state(), _reference(values, 4096, huge)
        np.testing.assert_array_equal(state.counts, ref["counts"])
        assert (state.upper, state.count, state.nonfinite, state.huge, state.zeros) == (
            ref["upper"], ref["count"], ref["nonfinite"], ref["huge"], ref["zeros"])
        if ref["count"]:
            assert (state.min, state.max) == (ref["min"], ref["max"])
            assert math.copysign(1, state.min) == math.copysign(1, ref["min"])
            assert math.copysign(1, state.max) == math.copysign(1, ref["max"])


def test_signed_zero_extremes_follow_data_order_across_chunks():
    from quantlab.binning import CHUNK

    x = np.zeros(2 * CHUNK + 10, np.float32)
    x[CHUNK + 3] = -0.0  # +0.0 comes first: min and max are +0.0
    h = AbsHistogram(64)
    h.update(x)
    assert math.copysign(1, h.state().min) == 1.0 and math.copysign(1, h.state().max) == 1.0
    y = x.copy()
    y[0] = -0.0  # now -0.0 comes first
    h = AbsHistogram(64)
    h.update(y)
    assert math.copysign(1, h.state().min) == -1.0 and math.copysign(1, h.state().max) == -1.0


def test_merge_pairs_and_huge_bits():
    from quantlab.binning import huge_bits, merge_pairs

    counts = np.arange(16, dtype=np.int64)
    for doublings in range(7):
        expected = counts.copy()
        for _ in range(min(doublings, 4)):
            expected = np.concatenate([expected.reshape(-1, 2).sum(axis=1), np.zeros(8, np.int64)])
        np.testing.assert_array_equal(merge_pairs(counts, doublings), expected)
    for huge in (1e30, 1.0, 3.5, 1e-30, 1e300):
        limit = huge_bits(huge)
        with np.errstate(over="ignore"):  # 1e300 is inf in float32
            near = np.float32(huge)
        probes = np.array([near, np.nextafter(near, np.float32(0)), np.nextafter(near, np.float32(np.inf)),
                           np.inf, np.nan], np.float32)
        flagged = (probes.view(np.int32) & 0x7FFFFFFF) >= limit
        expected = ~np.isfinite(probes) | (np.abs(probes.astype(np.float64)) >= huge)
        np.testing.assert_array_equal(flagged, expected)


def test_kernels_compile_where_numba_cannot_cache():
    """cache=True fails at decoration when no cache folder is usable; the kernels then compile per process."""
    from quantlab.binning import compiled

    namespace: dict = {}
    exec("def add_one(x):\n    return x + 1\n", namespace)  # no source file: numba has nowhere to cache it
    assert compiled(nogil=True)(namespace["add_one"])(41) == 42


def test_float64_denormals_and_huge_values_bin_without_overflow():
    """Uninitialised float64 memory (an ONNX test input): denormals near 1e-310 next to 9e223. The bin
    scale ``bins / upper`` overflows for such a range; the values must still land in the table."""
    a = np.array([[6.94648680255427e-310, 2.103873e-316, 9.017663435556133e+223],
                  [6.9463770964045e-310, 0.0, 1.2988305250790147e+219]])
    h = AbsHistogram(2048, 1e30)
    h.update(a)
    assert (h.count, h.huge, h.zeros) == (4, 2, 1)
    assert h.max == 6.94648680255427e-310 and 0 < h.upper <= 2 * h.max
    assert int(h.counts.sum()) == 4 and h.counts[-1] == 0


@pytest.mark.parametrize("bins", [2, 4096, 2**16])
def test_kernels_equal_reference_where_the_float32_scale_is_not_exact(bins):
    """bins / R outside float32's normal powers of two (subnormal or enormous ranges) takes the float64 product."""
    from quantlab.binning import CHUNK

    rng = np.random.default_rng(7)
    n = CHUNK + 99  # one chunk through the int32 tables, the rest too
    cases = [rng.normal(0, 1, n) * scale for scale in (1e-42, 1e-39, 1e-36, 1e36, 5e37)]
    cases.append(np.concatenate([rng.normal(0, 1, n) * 1e-40, rng.normal(0, 1, n) * 1e10]))  # R grows 50 decades
    for values in cases:
        values = values.astype(np.float32)
        h = AbsHistogram(bins, huge_threshold=float(np.finfo(np.float32).max) * 2)
        h.update(values)
        state, ref = h.state(), _reference(values, bins, huge=float(np.finfo(np.float32).max) * 2)
        np.testing.assert_array_equal(state.counts, ref["counts"])
        assert (state.upper, state.count, state.zeros) == (ref["upper"], ref["count"], ref["zeros"])


@pytest.mark.parametrize("first", [0.0, -0.0])
def test_update_values_in_another_order_keeps_the_first_zero_of_the_layout(first):
    """A zero min/max is the first zero in data order; pieces in storage order must not change which one."""
    rng = np.random.default_rng(4)
    x = np.abs(rng.normal(size=(3, 5, 7)).astype(np.float32))  # min is a zero once zeros are put in
    x.flat[11] = first  # the first zero in data order
    x.flat[40::17] = -0.0
    x.flat[60::13] = 0.0  # the last zero (flat index 99) is +0.0
    order = np.arange(x.size)[::-1]  # storage order: the last zero comes first
    pieces = (x.ravel()[order[:50]], x.ravel()[order[50:]])
    want, got = AbsHistogram(), AbsHistogram()
    want.update(x)
    got.update_values(pieces, lambda: x)
    assert got.state() == want.state()
    assert math.copysign(1.0, got.state().min) == math.copysign(1.0, first)
    nonneg = -x  # max is zero now: the same rule
    want, got = AbsHistogram(), AbsHistogram()
    want.update(nonneg)
    got.update_values((nonneg.ravel()[order],), lambda: nonneg)
    assert got.state() == want.state()
    assert math.copysign(1.0, got.state().max) == math.copysign(1.0, want.state().max)


def test_the_reused_partial_tables_are_zero_between_updates_and_change_nothing():
    """A histogram passes the same int32 scratch to every update: it must come back zero (range growth too)."""
    rng = np.random.default_rng(9)
    arrays = [rng.normal(0, s, 3 * 2048 + 5).astype(np.float32) for s in (0.1, 5.0, 0.01, 300.0)]
    reused = AbsHistogram(2048)
    for a in arrays:
        reused.update(a)
        assert reused._tables is not None and not reused._tables.any()
    fresh = AbsHistogram(2048)
    for a in arrays:  # in parts smaller than the bins: straight into the counts, never the scratch
        for part in np.array_split(a, len(a) // 1000 + 1):
            fresh.update(part)
    assert fresh._tables is None
    assert reused.state() == fresh.state()

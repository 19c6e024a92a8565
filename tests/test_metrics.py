from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from quantlab.metrics import (
    ErrorAccumulator,
    bootstrap_ci,
    cosine,
    error_sums,
    errors_from_sums,
    mcnemar_exact_p,
    per_sample_errors,
    per_sample_sums,
    rel_l2,
    sqnr_db,
    topk,
    topk_correct,
)


def _pair(n=10_000, seed=0, noise=0.01, dtype=np.float32):
    rng = np.random.default_rng(seed)
    r = rng.normal(0, 2, n).astype(np.float32)
    c = (r + rng.normal(0, noise, n)).astype(dtype)
    return r, c


def _direct(r, c):
    """The definitions, in float64 numpy (independent of the numba kernels)."""
    r64, c64 = r.astype(np.float64).ravel(), c.astype(np.float64).ravel()
    d = c64 - r64
    return {
        "cosine": float(r64 @ c64 / np.sqrt((r64 @ r64) * (c64 @ c64))),
        "sqnr_db": float(10 * np.log10((r64 @ r64) / (d @ d))),
        "max_abs": float(np.abs(d).max()),
        "mean_abs": float(np.abs(d).mean()),
        "rel_l2": float(np.sqrt((d @ d) / (r64 @ r64))),
    }


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1001])
def test_error_metrics_match_float64_definitions(n, dtype):
    r, c = _pair(n, seed=n, dtype=dtype)
    got = errors_from_sums(error_sums(r, c))
    want = _direct(r, c)
    for k, v in want.items():
        # max |d| is taken on the float32 difference (one rounding); the sums are float64
        assert got[k] == pytest.approx(v, rel=1e-6 if k == "max_abs" else 1e-9, abs=1e-12), k
    assert got["nan_count"] == 0
    assert cosine(r, c) == pytest.approx(want["cosine"], rel=1e-12)
    assert sqnr_db(r, c) == pytest.approx(want["sqnr_db"], rel=1e-9)
    assert rel_l2(r, c) == pytest.approx(want["rel_l2"], rel=1e-9)


def test_streaming_over_batches_equals_one_shot_in_any_split():
    r, c = _pair(50_000, seed=3)
    r, c = r.reshape(50, 1000), c.reshape(50, 1000)
    one = ErrorAccumulator()
    one.update(r, c)
    for splits in ([10, 20, 20], [1] * 50, [49, 1]):
        acc = ErrorAccumulator()
        start = 0
        for s in splits:
            acc.update(r[start:start + s], c[start:start + s])
            start += s
        for k, v in one.result().items():
            assert acc.result()[k] == pytest.approx(v, rel=1e-12), (splits, k)
    assert one.elements == 50_000


def test_float64_accumulation_keeps_tiny_errors_visible():
    # 1e6 values near 1000 with errors of 1e-4: float32 sums would lose the error entirely
    rng = np.random.default_rng(1)
    r = (1000 + rng.normal(0, 1, 1_000_000)).astype(np.float32)
    c = r + np.float32(1e-4) * np.sign(rng.normal(size=r.size)).astype(np.float32)
    got = errors_from_sums(error_sums(r, c))
    assert got["sqnr_db"] == pytest.approx(_direct(r, c)["sqnr_db"], abs=1e-6)
    assert 1 - got["cosine"] < 1e-12


def test_non_finite_candidate_values_are_counted_and_poison_the_figures():
    r, c = _pair(100, seed=2)
    c[[3, 50]] = np.nan
    c[70] = np.inf
    s = error_sums(r, c)
    assert s.nonfinite == 3 and s.ref_nonfinite == 0
    got = errors_from_sums(s)
    assert got["nan_count"] == 3
    assert math.isnan(got["cosine"]) and math.isnan(got["sqnr_db"]) and math.isnan(got["max_abs"])
    ref_bad = error_sums(c, r)
    assert ref_bad.ref_nonfinite == 3


def test_edge_cases_zero_and_identical_tensors():
    z = np.zeros(10, np.float32)
    x = np.arange(10, dtype=np.float32)
    assert errors_from_sums(error_sums(z, z)) == {"cosine": 1.0, "sqnr_db": math.inf, "max_abs": 0.0,
                                                  "mean_abs": 0.0, "rel_l2": 0.0, "nan_count": 0}
    assert cosine(z, x) == 0.0 and sqnr_db(z, x) == -math.inf and rel_l2(z, x) == math.inf
    assert sqnr_db(x, x) == math.inf and cosine(x, -x) == -1.0
    with pytest.raises(ValueError, match="shapes differ"):
        error_sums(x, x[:5])
    assert errors_from_sums(error_sums(z[:0], z[:0]))["nan_count"] == 0


def test_per_sample_rows():
    r, c = _pair(6 * 40, seed=5)
    r, c = r.reshape(6, 4, 10), c.reshape(6, 4, 10)
    rows = per_sample_errors(per_sample_sums(r, c))
    for i in range(6):
        want = _direct(r[i], c[i])
        assert rows["cosine"][i] == pytest.approx(want["cosine"], rel=1e-12)
        assert rows["sqnr_db"][i] == pytest.approx(want["sqnr_db"], rel=1e-9)
        assert rows["max_abs"][i] == pytest.approx(want["max_abs"], rel=1e-6)


def test_topk_is_deterministic_with_ties_and_nan():
    logits = np.array([[1.0, 3.0, 3.0, 0.0, np.nan, 2.0],
                       [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                       [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]], dtype=np.float32)
    assert topk(logits, 1)[:, 0].tolist() == [1, 0, 0]
    assert topk(logits, 3).tolist() == [[1, 2, 5], [0, 1, 2], [0, 1, 2]]
    assert topk(logits, 10).shape == (3, 6)
    assert topk(logits, 6)[0, -1] == 4  # NaN ranks last
    assert topk_correct(logits, np.array([2, 3, 5]), 3).tolist() == [True, False, False]
    assert topk_correct(logits, np.array([2, 3, 5]), 6).tolist() == [True, True, True]
    with pytest.raises(ValueError):
        topk(logits[0], 1)


def _mcnemar_exact(b, c):
    n, k = b + c, min(b, c)
    tail = Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2 ** n)
    return float(min(Fraction(1), 2 * tail))


@pytest.mark.parametrize("b,c", [(0, 0), (1, 0), (10, 0), (3, 7), (7, 3), (12, 12), (40, 25), (600, 540),
                                 (1000, 1)])
def test_mcnemar_matches_exact_rational_computation(b, c):
    assert mcnemar_exact_p(b, c) == pytest.approx(_mcnemar_exact(b, c), rel=1e-9, abs=1e-300)


def test_mcnemar_known_values_and_symmetry():
    assert mcnemar_exact_p(10, 0) == pytest.approx(2 * 0.5 ** 10)
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(5, 5) == 1.0
    assert mcnemar_exact_p(30, 12) == mcnemar_exact_p(12, 30)
    big = mcnemar_exact_p(50_000, 49_000)  # log space: no overflow for large counts
    assert 0.0 < big < 0.01
    with pytest.raises(ValueError):
        mcnemar_exact_p(-1, 2)


def test_bootstrap_is_seeded_paired_and_close_to_the_normal_interval():
    rng = np.random.default_rng(0)
    n = 2000
    ref = (rng.random(n) < 0.8).astype(float)
    cand = ref.copy()
    flip = rng.choice(n, 60, replace=False)
    cand[flip] = 1 - cand[flip]
    cols = {"ref": ref, "cand": cand, "drop": ref - cand, "same": ref - ref}
    a = bootstrap_ci(cols, resamples=2000, seed=7)
    b = bootstrap_ci(cols, resamples=2000, seed=7)
    c = bootstrap_ci(cols, resamples=2000, seed=8)
    assert a == b and a != c
    assert a["same"] == (0.0, 0.0)                       # paired: identical columns never differ
    p = ref.mean()
    half = 1.96 * math.sqrt(p * (1 - p) / n)
    lo, hi = a["ref"]
    assert lo < p < hi
    assert lo == pytest.approx(p - half, abs=0.006) and hi == pytest.approx(p + half, abs=0.006)
    d = (ref - cand)
    se = d.std() / math.sqrt(n)
    assert a["drop"][0] == pytest.approx(d.mean() - 1.96 * se, abs=0.004)
    # the paired interval of the difference is much narrower than the unpaired one would be
    assert a["drop"][1] - a["drop"][0] < 0.5 * 2 * 1.96 * math.sqrt(2 * p * (1 - p) / n)


def test_bootstrap_edge_cases():
    out = bootstrap_ci({"x": np.array([1.0, np.nan, 0.0])}, resamples=50)
    assert all(math.isnan(v) for v in out["x"])
    assert all(math.isnan(v) for v in bootstrap_ci({"x": np.ones(4)}, resamples=0)["x"])
    assert bootstrap_ci({"x": np.ones(4)}, resamples=100)["x"] == (1.0, 1.0)
    with pytest.raises(ValueError):
        bootstrap_ci({"x": np.ones(3)}, confidence=1.5)


def test_where_the_reference_is_not_finite_the_figures_leave_it_out():
    """An attention mask's -inf (held by the candidate as -inf, or clamped to float16's -65504): left out of
    every figure (it made them all NaN) and counted apart; the candidate's NaN/inf where the reference is
    finite is what ``nonfinite`` counts."""
    from quantlab.metrics import error_sums, errors_from_sums, per_sample_sums

    rng = np.random.default_rng(0)
    r = rng.normal(size=(3, 40)).astype(np.float32)
    c = (r + rng.normal(0, 0.01, r.shape)).astype(np.float32)
    r[:, 30:] = -np.inf
    c[:, 30:] = -np.inf
    c[1, 30:] = -65504.0
    r[0, 29] = c[0, 29] = np.nan
    finite = error_sums(r[:, :29], c[:, :29]) + error_sums(r[1:, 29], c[1:, 29])
    masked = error_sums(r, c)
    assert masked.n == finite.n == 3 * 29 + 2 and masked.nonfinite == 0 and masked.ref_nonfinite == 31
    for f in ("srr", "scc", "src", "sdd", "sad", "max_abs"):
        assert math.isclose(getattr(masked, f), getattr(finite, f), rel_tol=1e-12), f
    assert np.isfinite(errors_from_sums(masked)["cosine"]) and errors_from_sums(masked)["nan_count"] == 0
    rows = per_sample_sums(r, c)
    assert np.isfinite(rows).all()
    np.testing.assert_allclose(rows[1, :5], per_sample_sums(r[1:2, :30], c[1:2, :30])[0, :5])
    c[2, 31] = np.nan  # where the reference is -inf: left out with it
    c[2, 0] = np.inf   # where the reference is finite: counted
    assert error_sums(r, c).nonfinite == 1 and errors_from_sums(error_sums(r, c))["nan_count"] == 1
    assert error_sums(np.full(4, -np.inf, np.float32), np.zeros(4, np.float32)).n == 0


def test_a_huge_finite_mask_in_the_reference_is_left_out_like_inf():
    """HF/T5 masks are (1 - m) * finfo(float32).min: finite, so they stayed in the sums and every masked tensor
    of an FP16 candidate (holding -65504) read cosine 1.0, SQNR 0 dB, max_abs 3.4e38: the worst layer of the
    report. Values with |x| >= 1e30 (calibration's sentinel threshold) are left out as -inf is."""
    from quantlab.metrics import error_sums, errors_from_sums, per_sample_sums

    rng = np.random.default_rng(1)
    r = rng.normal(size=(4, 50)).astype(np.float32)
    c = (r + rng.normal(0, 0.01, r.shape)).astype(np.float32)
    clean = errors_from_sums(error_sums(r[:, :40], c[:, :40]))
    r[:, 40:] = np.finfo(np.float32).min
    c[:, 40:] = -65504.0
    masked = error_sums(r, c)
    assert masked.n == 160 and masked.ref_nonfinite == 40
    got = errors_from_sums(masked)
    for k in ("cosine", "sqnr_db", "max_abs", "rel_l2"):
        assert math.isclose(got[k], clean[k], rel_tol=1e-12), k
    assert got["sqnr_db"] > 30
    rows = per_sample_sums(r, c)
    np.testing.assert_allclose(rows, per_sample_sums(r[:, :40], c[:, :40]), rtol=1e-12)
    big = np.full(8, 1e29, np.float32)  # large but below the threshold: kept
    assert error_sums(big, big).n == 8 and error_sums(big, big).ref_nonfinite == 0


def test_binomial_ci_is_clopper_pearson():
    """The exact interval of a proportion, against scipy's beta quantiles (an independent implementation) and the
    closed forms at 0 and n (``(alpha/2) ** (1/n)``)."""
    from quantlab.metrics import binomial_ci

    beta = pytest.importorskip("scipy.stats").beta
    for k, n, conf in ((0, 12, 0.95), (12, 12, 0.95), (5, 20, 0.9), (3, 1000, 0.95), (49_000, 50_000, 0.99),
                       (1, 1, 0.95), (7, 9, 0.5)):
        lo, hi = binomial_ci(k, n, conf)
        a = (1 - conf) / 2
        want_lo = beta.ppf(a, k, n - k + 1) if k > 0 else 0.0
        want_hi = beta.ppf(1 - a, k + 1, n - k) if k < n else 1.0
        assert lo == pytest.approx(want_lo, rel=1e-9, abs=1e-12) and hi == pytest.approx(want_hi, rel=1e-9, abs=1e-12)
    assert binomial_ci(12, 12)[0] == pytest.approx(0.025 ** (1 / 12), rel=1e-12)
    assert all(math.isnan(v) for v in binomial_ci(0, 0))
    with pytest.raises(ValueError):
        binomial_ci(13, 12)


def test_near_zero_count_counts_samples_far_below_the_median_energy():
    from quantlab.metrics import near_zero_count

    energy = np.array([1.0, 2.0, 0.5, 1e-9, 0.0, 3.0])  # two samples ~1e-4.5 and 0 of the median's norm
    assert near_zero_count(energy) == 2
    assert near_zero_count(np.array([1.0, 1.1, 0.9])) == 0
    assert near_zero_count(np.zeros(4)) == 0  # nothing positive: no median to compare with


def test_channel_spread_finds_a_detectors_boxes_beside_its_scores():
    """YOLOv8's output [N, 4 + classes, anchors]: boxes in pixels (0..320) beside scores (0..1), so cosine and
    SQNR read the boxes only (an ORT-quantized NudeNet with 6 % of its detections right had cosine 0.999)."""
    from quantlab.metrics import channel_spread

    rng = np.random.default_rng(0)
    head = np.concatenate([rng.uniform(0, 320, (2, 4, 600)), rng.uniform(0, 0.9, (2, 6, 600))], axis=1)
    assert [(a, round(top)) for a, top, _ in channel_spread(head)] == [(1, 320)]
    assert channel_spread(rng.normal(0, 1, (2, 16, 600))) == []  # features of one scale
    assert channel_spread(rng.normal(0, 1, (2, 16))) == []  # not [N, A, B]
    dead = rng.normal(0, 1, (2, 16, 600))
    dead[:, 3] = 0.0  # an all-zero row is not a scale
    assert channel_spread(dead) == []


def test_ctc_greedy_merges_runs_and_drops_the_blank():
    from quantlab.metrics import ctc_greedy

    assert ctc_greedy(np.array([0, 0, 3, 3, 0, 5, 0, 7, 7, 0, 7, 2, 2, 0]), 0).tolist() == [3, 5, 7, 7, 2]
    assert ctc_greedy(np.array([4, 4, 1, 4]), 4).tolist() == [1]  # the blank may be the last class
    assert ctc_greedy(np.array([], dtype=np.int32), 0).tolist() == []
    assert ctc_greedy(np.zeros(9, np.int32), 0).tolist() == []


def test_edit_distance_matches_the_textbook_programme():
    """The row-wise numpy programme against the full table on random label sequences (and the classic pair)."""
    from reference_text import levenshtein

    from quantlab.metrics import edit_distance

    assert edit_distance(np.frombuffer(b"kitten", np.uint8), np.frombuffer(b"sitting", np.uint8)) == 3
    rng = np.random.default_rng(0)
    for _ in range(300):
        a = rng.integers(0, 4, rng.integers(0, 12)).tolist()
        b = rng.integers(0, 4, rng.integers(0, 12)).tolist()
        assert edit_distance(np.array(a), np.array(b)) == levenshtein(a, b), (a, b)


def test_ctc_text_agreement_reads_only_the_valid_positions():
    from quantlab.metrics import ctc_text_agreement

    ref = np.array([[0, 1, 1, 0, 2, 0], [0, 3, 0, 3, 0, 0], [0, 0, 0, 0, 0, 0], [0, 3, 0, 3, 0, 0]])
    cand = np.array([[1, 1, 0, 0, 2, 2], [0, 3, 3, 3, 0, 4], [0, 5, 5, 0, 6, 0], [0, 3, 0, 3, 0, 4]])
    same, cer = ctc_text_agreement(ref, cand, 0)
    assert same.tolist() == [True, False, False, False]  # other positions, the same text "1 2"
    np.testing.assert_allclose(cer, [0.0, 50.0, 200.0, 50.0])  # "3 3" vs "3 4"; "" vs "5 6"; "3 3" vs "3 3 4"
    valid = np.array([[True] * 6, [True] * 6, [True] * 6, [True] * 5 + [False]])
    same, cer = ctc_text_agreement(ref, cand, 0, valid)  # the padded position's 4 is not read
    assert same.tolist() == [True, False, False, True]
    np.testing.assert_allclose(cer, [0.0, 50.0, 200.0, 0.0])
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        ctc_text_agreement(ref, cand[:, :3], 0)


def test_mean_and_spread_needs_two_values():
    """One value has no spread: CLIP's 1 x 1 logits of a batch of one were called a constant output."""
    from quantlab.metrics import mean_and_spread

    assert mean_and_spread(np.array([[-7.6]], np.float32)) == []
    assert mean_and_spread(np.array([np.inf, 2.0], np.float32)) == []  # one finite value
    assert mean_and_spread(np.array([2.0, 2.0, np.nan], np.float32)) == [(2.0, 0.0)]
    assert mean_and_spread(np.array([1, 2], np.int64)) == []


def test_varying_share_is_the_power_that_differs_between_samples():
    """Rows of one vector plus a small per-sample part: the share is that part's power over the whole."""
    from quantlab.metrics import varying_share

    rng = np.random.default_rng(0)
    prior = rng.normal(0, 1, (1, 64))
    x = prior + 0.01 * rng.normal(0, 1, (8, 64))
    centred = x - x.mean(axis=0)
    assert varying_share(x) == pytest.approx([float((centred ** 2).sum() / (x ** 2).sum())])
    assert varying_share(x)[0] < 2e-4 and varying_share(rng.normal(0, 1, (8, 64)))[0] > 0.5
    assert varying_share(np.repeat(prior, 4, axis=0)) == [0.0]
    assert varying_share(prior) == [] and varying_share(np.zeros((3, 4))) == []
    with_nan = np.vstack([x, np.full((1, 64), np.nan)])  # a sample with a NaN is left out whole
    assert varying_share(with_nan) == pytest.approx(varying_share(x))

"""Calibration coverage: shifts are flagged, the same distribution is not, merged statistics equal one pass."""

from __future__ import annotations

import json
import math

import models
import numpy as np
import onnx
import pytest

from quantlab.calibrate import calibrate
from quantlab.cli import main
from quantlab.coverage import (
    CoverageOptions,
    check_coverage,
    load_coverage,
    merge_states,
    merge_statistics,
    parse_gate,
)
from quantlab.coverage.bins import bin_per_sample, tensor_bins
from quantlab.coverage.blocks import BlockCounts, SampleScore, WorstSamples
from quantlab.coverage.distance import psi
from quantlab.data import from_arrays
from quantlab.errors import CalibrationError, ThresholdError
from quantlab.graph import model_from_proto
from quantlab.histogram import AbsHistogram
from quantlab.stats import collect_statistics

MODEL = model_from_proto(models.conv_net())


def draw(n: int, seed: int, *, scale: float = 1.0, noise: float = 0.0, mode: float = 0.0) -> dict[str, np.ndarray]:
    """Images with a per-sample brightness and contrast (samples differ, as photos do).

    ``scale`` multiplies every input, ``noise`` adds Gaussian noise of that std, ``mode`` is the share of
    samples from a mode calibration never saw (a bright, saturated first channel).
    """
    rng = np.random.default_rng(seed)
    contrast = rng.uniform(0.6, 1.4, (n, 1, 1, 1))
    offset = rng.uniform(-0.3, 0.3, (n, 1, 1, 1))
    x = offset + contrast * rng.normal(0.0, 1.0, (n, 3, 16, 16))
    x = x * scale + noise * rng.normal(0.0, 1.0, x.shape)
    unseen = np.arange(n) < round(mode * n)
    x[unseen, 0] = 3.0 + 0.5 * rng.normal(0.0, 1.0, (int(unseen.sum()), 16, 16))
    return {"input": x.astype(np.float32)}


@pytest.fixture(scope="module")
def calibration():
    result = calibrate(MODEL, from_arrays(draw(128, 0), name="calib"), ["entropy", "minmax"])
    return result


def _check(calibration, feeds, method="entropy", gate=None, seed=0):
    data = from_arrays(feeds, name="check")
    return check_coverage(MODEL, [data], calibration.tables[method], calibration.statistics,
                          options=CoverageOptions(gate=gate, seed=seed, resamples=200))


# ───────────────────────── shifts flagged, no shift not flagged ─────────────────────────


@pytest.mark.parametrize("shift", [{"scale": 1.6}, {"noise": 1.0}, {"mode": 0.25}], ids=["scaled", "noise", "mode"])
def test_synthetic_shift_is_flagged(calibration, shift):
    result = _check(calibration, draw(128, 1, **shift))
    verdict = result.verdict()
    assert verdict["fails"], verdict
    assert verdict["failing_tensors"], "the failing tensors are named"
    assert result.summary["psi_excess_max"] > 0.1  # 8x the largest value of 20 unshifted draws
    assert result.summary["saturated_excess_max"] > 0.01


def test_unseen_mode_names_its_samples(calibration):
    result = _check(calibration, draw(128, 1, mode=0.1))  # samples 0..12 come from the unseen mode
    worst = [s["key"] for s in result.datasets[0].worst_samples[:10]]
    unseen = {f"check[{i}]" for i in range(13)}
    assert set(worst) <= unseen, worst
    assert result.datasets[0].worst_samples[0]["tensors_outside"] >= 1


def test_a_set_far_below_the_calibrated_range_is_zeroed_and_can_be_gated(calibration):
    """The other end of saturation: a set 50x quieter than calibration (night audio, a dark camera) keeps its values
    inside the range but under half an INT8 step, where they round to 0. ``zeroed`` counts them (checked against
    the values themselves, up to one fine bin's share), ``zeroed_excess`` is the rise over calibration, and a gate
    may name it."""
    same = _check(calibration, draw(128, 1), method="minmax")
    quiet = _check(calibration, draw(128, 1, scale=0.02), method="minmax")
    row = {r["tensor"]: r for r in quiet.datasets[0].rows}["input"]
    x = np.abs(draw(128, 1, scale=0.02)["input"])
    x = x[x != 0]
    amax = calibration.tables["minmax"].ranges["input"].amax
    assert row["zeroed"] == pytest.approx(np.mean(x < 0.5 * amax / 127), abs=0.02)
    assert row["zeroed_calib"] == pytest.approx(calibration.tables["minmax"].ranges["input"].zeroed_fraction)
    assert quiet.summary["zeroed_excess_max"] > 0.2 > same.summary["zeroed_excess_max"]
    assert _gate(quiet, "zeroed_excess_max>0.2") and not _gate(same, "zeroed_excess_max>0.2")
    assert quiet.verdict()["fails"] and not same.verdict()["fails"]  # the default gate has it too
    # the same shift weighed by energy, in dB: the SQNR the range keeps on the quiet values, as quantizing them gives
    q = np.clip(np.rint(x / (amax / 127)), -127, 127) * (amax / 127)
    assert row["sqnr"] == pytest.approx(10 * np.log10(np.sum(x.astype(np.float64) ** 2) / np.sum((x - q) ** 2)),
                                        abs=0.1)
    assert row["sqnr_calib"] == pytest.approx(calibration.tables["minmax"].ranges["input"].predicted_sqnr_db)
    same_row = {r["tensor"]: r for r in same.datasets[0].rows}["input"]
    assert row["sqnr_drop"] > 20 > 1 > abs(same_row["sqnr_drop"])
    assert _gate(quiet, "sqnr_drop_max>6") and not _gate(same, "sqnr_drop_max>6")


def test_minmax_saturation_counts_values_beyond_the_calibration_range(calibration):
    same = _check(calibration, draw(128, 1), method="minmax")
    scaled = _check(calibration, draw(128, 1, scale=2.0), method="minmax")
    row = {r["tensor"]: r for r in scaled.datasets[0].rows}["input"]
    x = np.abs(draw(128, 1, scale=2.0)["input"])
    amax = calibration.tables["minmax"].ranges["input"].amax
    assert row["saturated"] == pytest.approx(np.mean(x > amax), abs=1e-12)
    assert row["saturated_samples"] == pytest.approx(np.mean((x > amax).reshape(128, -1).any(axis=1)))
    assert max(r["saturated"] for r in same.datasets[0].rows) < 1e-3
    assert scaled.summary["saturated_max"] > 0.01
    assert parse_gate("saturated_max>0.01") and _gate(scaled, "saturated_max>0.01")
    assert _gate(scaled, "saturated_max>0.99 | saturated_max>0.01") and not _gate(scaled, "saturated_max>0.99")
    assert not _gate(same, "saturated_max>0.01")


def _gate(result, text):
    return type(result)(result.datasets, text, result.table, result.calibration).verdict()["fails"]


def test_same_distribution_false_alarm_rate(calibration):
    """20 fresh draws of the calibration distribution: the default gate must stay quiet (rate measured)."""
    alarms = []
    excess = []
    for seed in range(1, 21):
        result = _check(calibration, draw(128, 100 + seed), seed=seed)
        alarms.append(result.verdict()["fails"])
        excess.append(result.summary["psi_excess_max"])
        assert result.summary["outside_samples_max"] < 0.1 and result.summary["saturated_excess_max"] < 0.01
    rate = float(np.mean(alarms))
    print(f"false-alarm rate {rate:.2f} over 20 seeds; psi_excess_max up to {max(excess):.4f}")
    assert rate <= 0.05
    assert max(excess) < 0.05



def test_outside_surprise_is_the_exact_chance_for_exchangeable_samples():
    """C(m, k) / C(n + m, k): the chance that at least k of m new samples exceed the largest of n calibration
    samples, whatever the distribution; checked against 40,000 simulated draws (exponential maxima)."""
    from quantlab.coverage.gate import outside_surprise

    n, m = 16, 12
    rng = np.random.default_rng(0)
    calib_max = rng.exponential(size=(40_000, n)).max(axis=1)
    beyond = (rng.exponential(size=(40_000, m)) > calib_max[:, None]).sum(axis=1)
    for k in (1, 2, 3, 4):
        exact = 10 ** -outside_surprise(k, m, n, 1)
        assert exact == pytest.approx(math.comb(m, k) / math.comb(n + m, k), rel=1e-12)
        assert np.mean(beyond >= k) == pytest.approx(exact, rel=0.08, abs=2e-3)
    assert outside_surprise(0, m, n, 50) == 0.0 and outside_surprise(3, m, n, 50) == 0.0  # 0.067 x 50: capped
    assert outside_surprise(12, 12, 16, 50) > 5  # every new sample beyond: about 3e-8 x 50


def test_small_sets_of_the_same_distribution_are_not_flagged_and_shifted_ones_are():
    """16 calibration and 12 checked samples: the old default (outside_samples_max>0.2) flagged same-distribution
    draws most of the time (3 of 12 beyond the calibration max happens with chance 0.067 in each tensor); the
    default gate weighs the set sizes."""
    small = calibrate(MODEL, from_arrays(draw(16, 0), name="calib"), ["entropy"])
    alarms, old_alarms = [], []
    for seed in range(10):
        result = _check(small, draw(12, 200 + seed), seed=seed)
        alarms.append(result.verdict()["fails"])
        old_alarms.append(_gate(result, "outside_samples_max>0.2"))
    assert sum(alarms) == 0 and sum(old_alarms) >= 3, (alarms, old_alarms)
    shifted = _check(small, draw(12, 300, scale=1.6))
    assert shifted.verdict()["fails"] and shifted.summary["outside_surprise_max"] > 2


def test_bootstrap_interval_covers_the_point_and_narrows_with_samples(calibration):
    small = _check(calibration, draw(32, 5)).datasets[0].rows
    large = _check(calibration, draw(256, 5)).datasets[0].rows
    for rows in (small, large):
        for r in rows:
            assert r["psi_ci_low"] <= r["psi_ci_high"]
    def width(rows):
        return np.median([r["psi_ci_high"] - r["psi_ci_low"] for r in rows])

    assert width(large) < width(small)


def test_gate_language(calibration):
    with pytest.raises(ThresholdError, match="unknown metric"):
        parse_gate("top1_drop>0.5")
    result = _check(calibration, draw(16, 3), gate="psi_max>100")
    assert not result.verdict()["fails"]
    assert _gate(result, "saturated_samples_max>=0")  # holds: gate fails
    one = _check(calibration, draw(1, 3), gate="psi_ci_low_max>0.25")  # one sample: no interval
    assert math.isnan(one.summary["psi_ci_low_max"])
    assert one.verdict()["fails"] and one.verdict()["unknown"]


# ───────────────────────── reducers ─────────────────────────


def test_bins_per_sample_match_numpy():
    rng = np.random.default_rng(0)
    acc = AbsHistogram(1024)
    acc.update(rng.normal(0, 1, 5000))
    acc.update(np.zeros(500))
    bins = tensor_bins(acc.state(), amax=2.0)
    batch = rng.normal(0, 1.5, (4, 300)).astype(np.float32)
    batch[0, :10] = 0.0
    batch[1, :3] = [np.nan, np.inf, -1e31]
    got = bin_per_sample(batch, bins, huge=1e30)
    ax = np.abs(batch.astype(np.float64))
    for i in range(4):
        row = ax[i][np.isfinite(ax[i]) & (ax[i] < 1e30)]
        # above edge e: |x| > e, or |x| >= e at the decile edges (fine histogram edges: bins [lo, hi) there)
        above = [np.sum(row >= e) if f else np.sum(row > e) for e, f in zip(bins.edges, bins.from_edge)]
        want = [np.sum(row == 0)] + [a - b for a, b in zip(above[:-1], above[1:])] + [above[-1]]
        assert got[i].tolist() == want
    assert bins.reference.sum() == pytest.approx(1.0)
    assert bins.edges[bins.first_saturated - 1] == 2.0
    assert psi(bins.reference * 1e6, bins.reference) == pytest.approx(0.0, abs=1e-12)


def test_block_counts_stay_bounded_and_exact():
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 50, (100, 5))
    blocks = BlockCounts(5, max_blocks=8)
    for start in range(0, 100, 7):
        blocks.add(rows[start:start + 7])
    assert blocks.size == 16 and blocks.used().shape == (7, 5)
    assert np.array_equal(blocks.total(), rows.sum(axis=0))
    assert np.array_equal(blocks.used()[0], rows[:16].sum(axis=0))


def test_worst_samples_keep_the_highest():
    worst = WorstSamples(3)
    for i, share in enumerate([0.1, 0.5, 0.0, 0.9, 0.3]):
        worst.push(SampleScore(share, 1, f"s{i}", "t"))
    assert [s.key for s in worst.result()] == ["s3", "s1", "s4"]


# ───────────────────────── merged statistics ─────────────────────────


def _pieces(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 0.01, 3000)
    b = rng.normal(0, 7.0, 2000)
    b[:100] = 0.0
    c = np.concatenate([rng.standard_t(2, 1000) * 50, [np.nan, np.inf, 1e31, -0.0]])
    return [np.zeros(10), a, b, c]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merged_states_equal_one_pass_over_the_union(seed):
    pieces = _pieces(seed)
    one = AbsHistogram(2048)
    for p in pieces:
        one.update(p)
    parts = []
    for p in pieces:
        h = AbsHistogram(2048)
        h.update(p)
        parts.append(h.state())
    assert merge_states(parts) == one.state()
    assert merge_states(parts[::-1]) == one.state()  # the order of the parts does not matter


def test_merged_statistics_equal_one_pass_over_the_union():
    a, b = draw(24, 1), draw(16, 2, scale=5.0)  # b has far wider ranges: A's histograms must double up
    union = {"input": np.concatenate([a["input"], b["input"]])}

    def stats(feeds):
        n = feeds["input"].shape[0]
        return collect_statistics(MODEL, lambda: ({"input": feeds["input"][i:i + 8]} for i in range(0, n, 8)),
                                  threads=1)

    merged = merge_statistics([stats(a), stats(b)])
    one = stats(union)
    assert merged.names == one.names and merged.samples == one.samples == 40
    for name in one.names:
        assert merged[name] == one[name], name
    assert any(stats(a)[n].upper != stats(b)[n].upper for n in one.names)


def test_merge_refuses_other_models_and_tensor_sets(calibration):
    other = collect_statistics(model_from_proto(models.conv_net(seed=1)), lambda: [draw(4, 0)], threads=1)
    with pytest.raises(CalibrationError, match="another model"):
        merge_statistics([calibration.statistics, other], labels=["a.npz", "b.npz"])
    few = collect_statistics(MODEL, lambda: [draw(4, 0)], tensors=["relu1"], threads=1)
    with pytest.raises(CalibrationError, match="different tensors"):
        merge_statistics([calibration.statistics, few])


# ───────────────────────── files and the command ─────────────────────────


def _manifest(folder, name, feeds):
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{name}.npy", feeds["input"])
    path = folder / f"{name}.toml"
    path.write_text(f'name = "{name}"\nshuffle = false\n[[source]]\nkind = "npy"\npath = "{name}.npy"\n'
                    'batched = true\n[inputs]\ninput = "array"\n')
    return path


def test_cli_gate_exit_codes_and_files(tmp_path, capsys):
    model = tmp_path / "model.onnx"
    onnx.save(models.conv_net(), model)
    data = tmp_path / "data"
    calib = _manifest(data, "calib", draw(64, 0))
    same = _manifest(data, "same", draw(64, 1))
    bright = _manifest(data, "bright", draw(64, 2, scale=1.8))
    assert main(["calibrate", str(model), "--calib", str(calib), "--method", "minmax", "--no-progress",
                 "--out", str(tmp_path / "cal")]) == 0
    table = str(tmp_path / "cal" / "calib_minmax.json")
    assert main(["coverage", str(model), "--table", table, "--data", str(same), "--out", str(tmp_path / "c1")]) == 0
    code = main(["coverage", str(model), "--table", table, "--data", str(same), "--data", str(bright),
                 "--fail-if", "saturated_max>0.01", "--out", str(tmp_path / "c2")])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL" in out and "bright" in out
    doc = json.loads((tmp_path / "c2" / "coverage.json").read_text())
    assert doc["verdict"]["fails"] and {f["dataset"] for f in doc["verdict"]["failing_tensors"]} == {"bright"}
    rerun = ["coverage", str(model), "--table", table, "--data", str(same), "--data", str(bright), "--out",
             str(tmp_path / "c2")]
    assert main(rerun) == 1  # its own output is replaced; the default gate flags bright (70 % of samples beyond)
    (tmp_path / "c2" / "notes.txt").write_text("mine")
    assert main(rerun) == 2 and (tmp_path / "c2" / "notes.txt").read_text() == "mine"
    assert main(["coverage", str(model), "--table", table, "--data", str(same), "--data", str(bright),
                 "--fail-if", "saturated_max>0.01", "--out", str(tmp_path / "c2b")]) == 1
    loaded = load_coverage(tmp_path / "c2b")
    assert [d.name for d in loaded.datasets] == ["same", "bright"]
    assert loaded.datasets[1].statistics is not None and loaded.datasets[1].statistics.samples == 64
    assert main(["coverage", str(model), "--table", table, "--data", str(same), "--fail-if", "top1>1",
                 "--out", str(tmp_path / "c3")]) == 2
    assert not (tmp_path / "c3").exists()
    # --fail-if repeated: fails when any one holds (the second misspelt: refused before any work)
    capsys.readouterr()
    either = ["coverage", str(model), "--table", table, "--data", str(same), "--data", str(bright)]
    assert main([*either, "--fail-if", "saturated_max>0.99", "--out", str(tmp_path / "c4")]) == 0
    assert main([*either, "--fail-if", "saturated_max>0.99", "--fail-if", "saturated_max>0.01",
                 "--out", str(tmp_path / "c5")]) == 1
    doc = json.loads((tmp_path / "c5" / "coverage.json").read_text())
    assert doc["gate"] == "saturated_max>0.99 | saturated_max>0.01" and doc["verdict"]["fails"]
    assert load_coverage(tmp_path / "c5").verdict()["fails"]
    assert main([*either, "--fail-if", "saturated_max>0.99", "--fail-if", "satur>1", "--out",
                 str(tmp_path / "c6")]) == 2
    assert "satur" in capsys.readouterr().err and not (tmp_path / "c6").exists()


def test_cli_coverage_names_inputs_of_sizes_calibration_did_not_cover(tmp_path, capsys):
    """A classifier for any image size calibrated on 16 px and checked on 24 px: the ranges of its sums over the
    larger image were never measured. `compare --calib` said so; `coverage` (the command asked about the
    calibration set) did not. A set of the calibrated size gets no such note."""
    proto = models.any_size_classifier()
    proto.graph.input[0].name = proto.graph.node[0].input[0] = "input"
    onnx.save(proto, tmp_path / "model.onnx")
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    calib = _manifest(data, "calib", {"input": rng.normal(0, 1, (16, 3, 16, 16)).astype(np.float32)})
    same = _manifest(data, "same", {"input": rng.normal(0, 1, (8, 3, 16, 16)).astype(np.float32)})
    large = _manifest(data, "large", {"input": rng.normal(0, 1, (8, 3, 24, 24)).astype(np.float32)})
    assert main(["calibrate", str(tmp_path / "model.onnx"), "--calib", str(calib), "--method", "minmax",
                 "--no-progress", "--out", str(tmp_path / "cal")]) == 0
    main(["coverage", str(tmp_path / "model.onnx"), "--table", str(tmp_path / "cal" / "calib_minmax.json"),
          "--data", str(same), "--data", str(large), "--no-progress", "--out", str(tmp_path / "cov")])
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "where calibration covered" in line]
    assert notes == ["note: large: input 'input': its samples of sizes [3, 24, 24] where calibration covered "
                     "[3, 16, 16]: the ranges of tensors whose values grow with the size (attention over more "
                     "positions, sums over a larger image) were not measured on such sizes; calibrate on samples of "
                     "every size the model will see"]


def test_cli_coverage_checks_what_an_int8_plan_may_quantize_unless_asked_for_all(tmp_path, capsys):
    """NudeNet at 416 failed standalone coverage on 72 shape-determined tensors (the anchor grid) and on the FP32
    box decoding, which no INT8 plan quantizes, while `quantlab run` (its candidates' tensors) said covered."""
    from quantlab.stats import scope_tensors

    proto = models.conv_net()
    onnx.save(proto, tmp_path / "model.onnx")
    calib = _manifest(tmp_path / "data", "calib", draw(32, 0))
    same = _manifest(tmp_path / "data", "same", draw(16, 1))
    assert main(["calibrate", str(tmp_path / "model.onnx"), "--calib", str(calib), "--method", "minmax",
                 "--no-progress", "--out", str(tmp_path / "cal")]) == 0
    table = str(tmp_path / "cal" / "calib_minmax.json")
    checked = {}
    for scope in ("quantizable", "all"):
        assert main(["coverage", str(tmp_path / "model.onnx"), "--table", table, "--data", str(same), "--tensors",
                     scope, "--out", str(tmp_path / scope)]) == 0
        checked[scope] = {r["tensor"] for r in load_coverage(tmp_path / scope).datasets[0].rows}
    quantizable = set(scope_tensors(model_from_proto(proto).proto, "quantizable"))
    assert checked["quantizable"] == quantizable and quantizable < checked["all"]
    capsys.readouterr()


# ───────────────────────── quantlab run ─────────────────────────


def test_experiment_runs_coverage_and_reports_it(tmp_path):
    from quantlab.experiment import load_experiment, run_experiment
    from quantlab.report import load_report_inputs

    onnx.save(models.conv_net(), tmp_path / "model.onnx")
    for name, feeds in (("calib", draw(48, 0)), ("val", draw(32, 1)), ("night", draw(32, 2, scale=2.0))):
        _manifest(tmp_path, name, feeds)
    (tmp_path / "e.toml").write_text(
        'name = "cov"\n[model]\npath = "model.onnx"\n[data]\ncalibration = "calib.toml"\nvalidation = "val.toml"\n'
        '[calibrate]\nmethods = ["minmax"]\n[candidates]\nfp16 = false\n[search]\nenabled = false\n'
        '[report]\ncoverage_gate = "saturated_max>0.01"\n[[coverage]]\ndata = "night.toml"\n')
    result = run_experiment(load_experiment(tmp_path / "e.toml"), reports_dir=tmp_path / "reports")
    assert any(s.name == "coverage" for s in result.stages)
    assert any("coverage (minmax): FLAGGED" in m for m in result.messages)
    view = load_report_inputs(tmp_path / "reports" / "cov").coverage
    assert view["fails"] and [s["name"] for s in view["sets"]] == ["val", "night"]
    assert view["sets"][0]["flagged"] == 0 < view["sets"][1]["flagged"]
    assert view["worst_tensors"][0]["dataset"] == "night" and view["histograms"]
    from quantlab.coverage import load_coverage
    from quantlab.experiment import load_written
    from quantlab.graph import load_model

    stages = tmp_path / "reports" / "cov" / "stages"
    written = load_written(stages / "build-int8-minmax", load_model(tmp_path / "model.onnx"))
    quantized = {t for t, q in written.provenance.quantized_inputs.items() if q["kind"] == "activation"}
    checked = {r["tensor"] for r in load_coverage(stages / "coverage" / "coverage").rows}
    from quantlab.table import read_table

    table = read_table(stages / "calibrate" / "table-minmax.json")
    assert checked == quantized and checked < set(table.ranges)  # only what the INT8 candidate quantizes
    page = result.index_html.read_text()
    assert 'id="coverage"' in page and "Calibration coverage" in page and "night.npy[" in page
    assert "<th>sqnr_drop</th>" in page and "<th>zeroed</th>" in page  # both ends of the range, in the table
    again = run_experiment(load_experiment(tmp_path / "e.toml"), reports_dir=tmp_path / "reports")
    assert [s.reused for s in again.stages if s.name == "coverage"] == [True]


def test_recalibrate_from_two_statistics_files_equals_calibrating_on_the_union(tmp_path):
    from quantlab.atomic import write_json
    from quantlab.coverage import recalibrate
    from quantlab.stats import save_statistics

    a, b = draw(40, 1), draw(24, 2, scale=3.0)
    paths = []
    for name, feeds in (("a", a), ("b", b)):
        part = calibrate(MODEL, from_arrays(feeds, name=name), ["entropy", "minmax"])
        paths.append(save_statistics(part.statistics, tmp_path / name / "statistics.npz"))
        write_json(tmp_path / name / "data_summary.json", part.data.as_dict())
    union = calibrate(MODEL, from_arrays({"input": np.concatenate([a["input"], b["input"]])}, name="ab"),
                      ["entropy", "minmax"])
    again = recalibrate(MODEL, paths, ["entropy", "minmax"])
    for method in ("entropy", "minmax"):
        assert again.tables[method].ranges == union.tables[method].ranges, method
    assert again.data.count == 64 and again.data.sample_hashes == union.data.sample_hashes
    got, want = again.data.input("input"), union.data.input("input")
    assert (got.min, got.max, got.values) == (want.min, want.max, want.values)
    assert got.mean == pytest.approx(want.mean, rel=1e-9, abs=1e-12) and got.std == pytest.approx(want.std, rel=1e-9)
    with pytest.raises(CalibrationError, match="another model"):
        recalibrate(model_from_proto(models.conv_net(seed=3)), paths, "minmax")


def test_cli_calibrate_from_merged_statistics(tmp_path):
    """calibrate --stats A --stats B (no model run) writes the tables calibrate --calib A∪B writes."""
    model = tmp_path / "model.onnx"
    onnx.save(models.conv_net(), model)
    data = tmp_path / "data"
    a, b = draw(32, 1), draw(24, 2, scale=3.0)
    sets = {"a": _manifest(data, "a", a), "b": _manifest(data, "b", b),
            "ab": _manifest(data, "ab", {"input": np.concatenate([a["input"], b["input"]])})}
    for name, manifest in sets.items():
        assert main(["calibrate", str(model), "--calib", str(manifest), "--method", "all", "--no-progress",
                     "--out", str(tmp_path / name)]) == 0
    assert main(["calibrate", str(model), "--stats", str(tmp_path / "a" / "statistics.npz"), "--stats",
                 str(tmp_path / "b" / "statistics.npz"), "--method", "all", "--out", str(tmp_path / "merged")]) == 0
    for method in ("entropy", "minmax", "percentile", "mse"):
        got = json.loads((tmp_path / "merged" / f"calib_{method}.json").read_text())
        want = json.loads((tmp_path / "ab" / f"calib_{method}.json").read_text())
        assert got["tensors"] == want["tensors"], method
    summary = json.loads((tmp_path / "merged" / "data_summary.json").read_text())
    assert summary["count"] == 56 and set(summary["sample_hashes"]) == set(
        json.loads((tmp_path / "ab" / "data_summary.json").read_text())["sample_hashes"])
    # the sample shapes the sources' tables record are kept: build takes its engine profiles from them (SegFormer's
    # merged 64 px + 96 px table held none, and TensorRT-RTX failed on a guessed 1..32 px profile)
    merged_set = json.loads((tmp_path / "merged" / "calib_minmax.json").read_text())["calib_set"]
    union_set = json.loads((tmp_path / "ab" / "calib_minmax.json").read_text())["calib_set"]
    assert merged_set["input_shapes"] == union_set["input_shapes"] and merged_set["batch_axes"] == {"input": 0}
    for table in (tmp_path / "b").glob("calib_*.json"):
        table.unlink()  # a source whose shapes are unknown: the table claims none, and says so
    assert main(["calibrate", str(model), "--stats", str(tmp_path / "a" / "statistics.npz"), "--stats",
                 str(tmp_path / "b" / "statistics.npz"), "--method", "minmax", "--out", str(tmp_path / "m2")]) == 0
    blind = json.loads((tmp_path / "m2" / "calib_minmax.json").read_text())
    assert "input_shapes" not in blind["calib_set"]
    assert any("no sample shapes are known" in n and "give --shapes" in n for n in blind["notes"])
    assert main(["calibrate", str(model), "--stats", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "x")]) == 2
    assert main(["calibrate", str(model), "--calib", str(sets["a"]), "--stats", str(tmp_path / "a" / "statistics.npz"),
                 "--out", str(tmp_path / "y")]) == 2


def test_results_do_not_depend_on_batch_slicing_or_threads():
    """Relu only: its outputs are exact whatever batch ORT sees, so any difference would be the reducers'."""
    from quantlab.backends import get_backend
    from quantlab.coverage.collect import coverage_pass, table_bins

    relu = model_from_proto(models.relu_net(["N", 3, 16, 16]))
    cal = calibrate(relu, from_arrays(draw(64, 0)), ["entropy"])
    feeds = draw(40, 4, scale=1.3)
    bins = table_bins(cal.tables["entropy"], cal.statistics)

    def run(batch: int, **kw):
        batches = ({"input": feeds["input"][i:i + batch]} for i in range(0, 40, batch))
        return coverage_pass(relu, batches, bins, backend=get_backend("ort"), fine_bins=cal.statistics.bins,
                             huge_threshold=cal.statistics.huge_threshold, max_blocks=8, **kw)

    one = run(40, threads=1, run_budget_bytes=1)  # one sample per model run
    other = run(16, threads=2)
    for name, tally in one.tallies.items():
        twin = other.tallies[name]
        assert np.array_equal(tally.blocks.used(), twin.blocks.used()), name
        assert tally.fine.state() == twin.fine.state(), name
        assert (tally.saturated_samples, tally.outside_samples) == (twin.saturated_samples, twin.outside_samples)
    assert one.worst == other.worst and one.samples == other.samples == 40
    assert sum(t.saturated_samples for t in one.tallies.values()) > 0  # the shift shows, so equality means something


def test_tensors_without_a_sample_axis_weigh_the_same_as_in_the_statistics_pass():
    """A position-table slice and a scalar input: the coverage pass's fine histograms count them once per
    sample, as the statistics pass does, so they merge with the calibration set's whatever the batch size."""
    from quantlab.backends import get_backend
    from quantlab.coverage.collect import coverage_pass, table_bins

    model = model_from_proto(models.position_table_net())
    rng = np.random.default_rng(1)
    data = from_arrays({"x": rng.normal(size=(12, 5, 8)).astype(np.float32),
                        "temperature": np.array(0.7, np.float32)}, batch_axes={"temperature": None})
    cal = calibrate(model, data, ["minmax"], batch_size=4)
    bins = table_bins(cal.tables["minmax"], cal.statistics)
    assert {"positions", "table", "temperature"} <= set(bins)
    for batch in (1, 3, 12):
        result = coverage_pass(model, data.batches(batch), bins, backend=get_backend("ort"),
                               fine_bins=cal.statistics.bins, huge_threshold=cal.statistics.huge_threshold)
        for name in bins:
            assert result.tallies[name].fine.state() == cal.statistics[name], (batch, name)


def test_tensors_without_a_sample_axis_count_for_every_sample_of_batches_of_any_size():
    """A run of several samples computes a position-table slice once for all of them; a run of one sample
    holds it as that sample's. Each sample saw it either way, so its per-sample rows (bootstrap blocks,
    saturation scores) are the same for batches of 1, 4 and 11 of 12 samples (not 5: the slice is [5, 8], and
    a shared tensor with an axis of the run's size is taken as per sample, see quantlab.stats.sample_weights); before, only the runs of one
    sample gave rows, the tensors ended with fewer blocks than the rest and the bootstrap crashed."""
    from quantlab.backends import get_backend
    from quantlab.coverage.collect import coverage_pass, table_bins

    model = model_from_proto(models.position_table_net())
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 5, 8)).astype(np.float32)
    calib = from_arrays({"x": x[:6], "temperature": np.array(0.7, np.float32)}, batch_axes={"temperature": None})
    cal = calibrate(model, calib, ["minmax"], batch_size=3)
    bins = table_bins(cal.tables["minmax"], cal.statistics)
    data = from_arrays({"x": x * 1.5, "temperature": np.array(0.9, np.float32)},
                       batch_axes={"temperature": None})
    blocks = {}
    for batch in (1, 4, 11):
        result = coverage_pass(model, data.batches(batch), bins, backend=get_backend("ort"),
                               fine_bins=cal.statistics.bins, huge_threshold=cal.statistics.huge_threshold)
        for name in ("positions", "table", "temperature"):
            assert result.tallies[name].blocks.samples == 12, (batch, name)
        blocks[batch] = {t: tally.blocks.used().copy() for t, tally in result.tallies.items()}
        assert blocks[batch]["temperature"].sum() == 12  # one value per sample
    for name in ("positions", "table", "temperature", "out"):
        np.testing.assert_array_equal(blocks[1][name], blocks[11][name], err_msg=name)
        np.testing.assert_array_equal(blocks[4][name], blocks[11][name], err_msg=name)
    checked = check_coverage(model, [data], cal.tables["minmax"], cal.statistics,
                             options=CoverageOptions(resamples=50, batch_size=11))
    rows = {row["tensor"]: row for row in checked.datasets[0].rows}
    assert rows["temperature"]["outside_samples"] == 1.0  # 0.9 > 0.7: every sample saw it
    assert np.isfinite(rows["positions"]["psi_ci_low"])


def test_values_on_a_few_exact_points_bin_as_calibration_saw_them():
    """A YOLO's strides tensor holds only 8, 16 and 32: deciles interpolated inside the fine bin of 8.0 put the
    calibration's mass over edges 8.0005, 8.001, ... while every sample's 8.0 fell in one bin, so the
    calibration set checked against itself gave PSI 6.3 and `coverage --fail-if` failed."""
    strides = np.repeat(np.array([8.0, 16.0, 32.0], np.float32), [1600, 400, 100])
    acc = AbsHistogram(2048)
    acc.update(strides)
    bins = tensor_bins(acc.state(), amax=32.0)
    counts = bin_per_sample(strides.reshape(1, -1), bins, huge=1e30)[0]
    np.testing.assert_allclose(counts / counts.sum(), bins.reference, atol=1e-12)
    assert psi(counts.astype(np.float64), bins.reference) == pytest.approx(0.0, abs=1e-9)
    rng = np.random.default_rng(0)  # and a continuous tensor binned per sample matches its calibration too
    x = rng.normal(0, 1, 20000).astype(np.float32)
    acc = AbsHistogram(2048)
    acc.update(x)
    bins = tensor_bins(acc.state(), amax=2.5)
    counts = bin_per_sample(x.reshape(1, -1), bins, huge=1e30)[0]
    np.testing.assert_allclose(counts / counts.sum(), bins.reference, atol=1e-9)


def test_a_flattened_tensor_is_checked_per_sample_too():
    """A BERT's tf2onnx export flattens [N, S, H] to [N*S, H] before each MatMul: in a batch of several samples
    those rows could not be told apart, so 32 of 33 quantized tensors got no per-sample figure (values 0,
    saturated NaN, PSI 6.9) and the report said "COVERED, 0 flagged". The pass now runs one sample at a time
    then, and says so; the figures equal a run with batch size 1."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "rows"], ["flat"], name="flatten_tokens"),
         helper.make_node("MatMul", ["flat", "w"], ["h"], name="dense"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Reshape", ["r", "back"], ["y"], name="unflatten")], "flat_bert",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 8])],
        [numpy_helper.from_array(rng.normal(0, 0.5, (8, 8)).astype(np.float32), "w"),
         numpy_helper.from_array(np.array([-1, 8], np.int64), "rows"),
         numpy_helper.from_array(np.array([-1, 6, 8], np.int64), "back")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    cal = calibrate(model, from_arrays({"x": rng.normal(0, 1, (32, 6, 8)).astype(np.float32)}), ["entropy"])
    shifted = {"x": (1.8 * rng.normal(0, 1, (12, 6, 8))).astype(np.float32)}

    def check(batch_size):
        return check_coverage(model, [from_arrays(shifted, name="check")], cal.tables["entropy"], cal.statistics,
                              options=CoverageOptions(seed=0, resamples=50, batch_size=batch_size))

    batched, single = check(4), check(1)
    rows = {r["tensor"]: r for r in batched.datasets[0].rows}
    assert rows["flat"]["values"] == 12 * 48 and rows["h"]["values"] == 12 * 48
    assert all(math.isfinite(r["psi"]) for r in rows.values())
    assert any("one sample at a time" in n for n in batched.datasets[0].notes)
    assert [r["psi"] for r in batched.datasets[0].rows] == [r["psi"] for r in single.datasets[0].rows]


def test_a_flattened_tensor_of_a_model_that_fixes_its_batch_above_1_is_pooled_not_run_alone():
    """Swin exported at batch 2 flattens its windows to [N*nW, ...]: the pass fell back to one sample per run, which
    the model refuses ("Got: 1 Expected: 2"), and `quantlab run` failed at its coverage stage. Such tensors now
    count in the ranges checked (their values all seen), not in the per-sample scores, with a note."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "rows"], ["flat"], name="flatten_tokens"),
         helper.make_node("MatMul", ["flat", "w"], ["h"], name="dense"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Reshape", ["r", "back"], ["y"], name="unflatten")], "flat_fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6, 8])],
        [numpy_helper.from_array(rng.normal(0, 0.5, (8, 8)).astype(np.float32), "w"),
         numpy_helper.from_array(np.array([-1, 8], np.int64), "rows"),
         numpy_helper.from_array(np.array([2, 6, 8], np.int64), "back")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    calib = {"x": rng.normal(0, 1, (32, 6, 8)).astype(np.float32)}
    cal = calibrate(model, from_arrays(calib), ["entropy"], batch_size=2)
    shifted = {"x": (1.8 * rng.normal(0, 1, (12, 6, 8))).astype(np.float32)}
    result = check_coverage(model, [from_arrays(shifted, name="check")], cal.tables["entropy"], cal.statistics,
                            options=CoverageOptions(seed=0, resamples=50, batch_size=2))
    rows = {r["tensor"]: r for r in result.datasets[0].rows}
    assert rows["flat"]["values"] == 12 * 48 and rows["h"]["values"] == 12 * 48  # every value checked
    assert any("fixes its batch above 1" in n and "'flat'" in n for n in result.datasets[0].notes)
    # the same figures as the dynamic-batch twin run one sample at a time: each sample's rows, split in order
    graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    graph.initializer[2].CopyFrom(numpy_helper.from_array(np.array([-1, 6, 8], np.int64), "back"))
    twin = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    twin_cal = calibrate(twin, from_arrays(calib), ["entropy"], batch_size=2)
    single = check_coverage(twin, [from_arrays(shifted, name="check")], twin_cal.tables["entropy"], twin_cal.statistics,
                            options=CoverageOptions(seed=0, resamples=50, batch_size=1))
    assert [r["psi"] for r in result.datasets[0].rows] == [r["psi"] for r in single.datasets[0].rows]


def test_an_experiment_whose_validation_sizes_were_never_calibrated_does_not_just_say_covered(tmp_path):
    """Wav2Vec2 validated at 12000 samples, calibrated at 4000-8000: `run` said "calibration coverage: covered"
    a line after the note that the lengths went beyond calibration. The gate judges the values it sees; the message
    now says sizes were never calibrated."""
    from quantlab.experiment import load_experiment, run_experiment

    proto = models.any_size_classifier()
    proto.graph.input[0].name = proto.graph.node[0].input[0] = "input"
    onnx.save(proto, tmp_path / "model.onnx")
    rng = np.random.default_rng(0)
    _manifest(tmp_path, "calib", {"input": rng.normal(0, 1, (16, 3, 16, 16)).astype(np.float32)})
    _manifest(tmp_path, "val", {"input": 0.5 * rng.normal(0, 1, (8, 3, 24, 24)).astype(np.float32)})
    (tmp_path / "e.toml").write_text(
        'name = "sizes"\n[model]\npath = "model.onnx"\n[data]\ncalibration = "calib.toml"\nvalidation = "val.toml"\n'
        '[calibrate]\nmethods = ["minmax"]\n[candidates]\nfp16 = false\n[search]\nenabled = false\n')
    result = run_experiment(load_experiment(tmp_path / "e.toml"), reports_dir=tmp_path / "reports")
    (line,) = [m for m in result.messages if m.startswith("calibration coverage (minmax)")]
    assert "covered" in line and "some sizes were never calibrated: val: input 'input': its samples of sizes" in line


def test_the_calibration_set_saturates_no_more_than_itself_when_amax_sits_within_half_a_step_of_a_plateau():
    """Rendered text lines are ~96 % white pixels at exactly 1.0; mse put the input's amax at 0.99854. Those pixels
    are above amax, yet within half a step of it, so the table's clipped_fraction (error-bearing saturation) does not
    count them: compared with it, the calibration set checked against itself saturated 96 % "in excess". Both sides
    now count |x| > amax alike."""
    from dataclasses import replace

    rng = np.random.default_rng(7)
    x = np.where(rng.uniform(size=(16, 3, 16, 16)) < 0.96, 1.0, rng.uniform(-1, 1, (16, 3, 16, 16)))
    feeds = {"input": x.astype(np.float32)}
    result = calibrate(MODEL, from_arrays(feeds, name="pages"), ["minmax"])
    table = result.tables["minmax"]
    plateau = replace(table.ranges["input"], amax=0.99854)
    table = replace(table, ranges={**table.ranges, "input": plateau})
    report = check_coverage(MODEL, [from_arrays(feeds, name="pages")], table, result.statistics,
                            options=CoverageOptions(resamples=50))
    row = next(r for r in report.datasets[0].rows if r["tensor"] == "input")
    assert row["saturated"] > 0.9 and row["saturated_calib"] == pytest.approx(row["saturated"], abs=1e-4)
    assert abs(row["saturated_excess"]) < 1e-4  # the histogram interpolates within its last fine bin


def test_an_experiment_checks_the_coverage_of_the_table_behind_its_verdict(tmp_path):
    """Coverage was judged on the first INT8 candidate's table whatever the verdict chose: a minmax table stretched
    by one outlier sample was checked while the report released percentile's. The check now reads the verdict's."""
    from quantlab.experiment import load_experiment, run_experiment

    onnx.save(models.conv_net(), tmp_path / "model.onnx")
    calib = draw(48, 0)
    calib["input"][0] *= 40.0  # one outlier sample: minmax's ranges 40x too wide, percentile's barely moved
    _manifest(tmp_path, "calib", calib)
    _manifest(tmp_path, "val", draw(32, 1))
    (tmp_path / "e.toml").write_text(
        'name = "judged"\nthreshold = "sqnr_db>=0"\n[model]\npath = "model.onnx"\n[data]\ncalibration = '
        '"calib.toml"\nvalidation = "val.toml"\n[calibrate]\nmethods = ["minmax", "percentile"]\npercentile = 99.9\n'
        '[candidates]\nfp16 = false\nint8 = ["minmax", "percentile"]\n[search]\nenabled = false\n')
    result = run_experiment(load_experiment(tmp_path / "e.toml"), reports_dir=tmp_path / "reports")
    assert result.verdict is not None and result.verdict.candidate == "int8-percentile"
    (line,) = [m for m in result.messages if m.startswith("calibration coverage")]
    assert line.startswith("calibration coverage (percentile)")

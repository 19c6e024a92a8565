"""One-pass statistics: cross-checked with ONNX Runtime's calibrators, batch-size invariant, bounded memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx
import pytest
from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, create_calibrator

import models
from quantlab.backends import get_backend
from quantlab.calibrators import amax_minmax, amax_percentile
from quantlab.errors import CalibrationError, DataError
from quantlab.graph import activation_names, model_from_proto
from quantlab.stats import (
    collect_statistics,
    load_statistics,
    plan_groups,
    save_statistics,
)

N_SAMPLES = 24


def _feeds(name: str, n: int = N_SAMPLES, seed: int = 1) -> dict[str, np.ndarray]:
    return models.random_inputs(models.ALL_BUILDERS[name](), n, seed=seed)


_batches = models.batch_factory


class _Reader(CalibrationDataReader):
    def __init__(self, feeds: dict[str, np.ndarray], size: int) -> None:
        self._it = iter(_batches(feeds, size)())

    def get_next(self):
        return next(self._it, None)


def _ort_ranges(tmp_path, model, feeds, method, **extra):
    path = tmp_path / "model.onnx"
    onnx.save(model.proto, path)
    calibrator = create_calibrator(
        path, augmented_model_path=str(tmp_path / "augmented.onnx"), calibrate_method=method,
        extra_options={"symmetric": True, **extra},
    )
    calibrator.collect_data(_Reader(feeds, 8))
    data = calibrator.compute_data()
    return {name: (float(np.ravel(td.range_value[0])[0]), float(np.ravel(td.range_value[1])[0])) for name, td in data.items()}


@pytest.mark.parametrize("name", ["conv_net", "residual_net", "concat_net", "mlp_attention"])
def test_minmax_equals_onnxruntime_minmax(tmp_path, name):
    model = model_from_proto(models.ALL_BUILDERS[name]())
    feeds = _feeds(name)
    # ORT's calibrators run with graph optimisations off; so does this run, for bit-equal activations
    # (with them on, a fused/re-laid-out Conv may differ by a float32 ulp).
    stats = collect_statistics(model, _batches(feeds, 8), backend=get_backend("ort", optimization="none"))
    ort = _ort_ranges(tmp_path, model, feeds, CalibrationMethod.MinMax)
    assert set(ort) <= set(stats.names)
    compared = 0
    for tensor, (lo, hi) in ort.items():
        state = stats[tensor]
        if state.huge or state.nonfinite:
            assert hi >= 1e30  # ORT stretches the range over the mask; quantlab excludes it (tested below)
            continue
        assert amax_minmax(state.min, state.max) == hi == -lo, tensor
        compared += 1
    assert compared >= 5


@pytest.mark.parametrize("name", ["conv_net", "residual_net", "concat_net"])
def test_percentile_within_one_onnxruntime_bin(tmp_path, name, capsys):
    model = model_from_proto(models.ALL_BUILDERS[name]())
    feeds = _feeds(name, 32)
    stats = collect_statistics(model, _batches(feeds, 8), backend=get_backend("ort", optimization="none"))
    ort = _ort_ranges(tmp_path, model, feeds, CalibrationMethod.Percentile, num_bins=2048, percentile=99.99)
    for tensor, (_, hi) in ort.items():
        state = stats[tensor]
        ours = min(amax_percentile(state.counts, state.upper, 99.99), state.absmax)
        ort_bin = state.absmax / 2048  # ORT: 2048 bins over [0, absmax] (all batches in one histogram)
        # ORT also clips its threshold to the signed max, a quirk for tensors whose |min| > max
        ours_like_ort = min(ours, state.max)
        assert abs(ours_like_ort - hi) <= ort_bin, (tensor, ours, hi, ort_bin)


def _assert_same_statistics(a, b):
    assert a.names == b.names and a.samples == b.samples
    for name in a.names:
        x, y = a[name], b[name]
        np.testing.assert_array_equal(x.counts, y.counts, err_msg=name)
        assert (x.upper, x.min, x.max, x.count, x.huge, x.nonfinite, x.zeros) == (
            y.upper, y.min, y.max, y.count, y.huge, y.nonfinite, y.zeros), name


def test_statistics_do_not_depend_on_batch_size():
    model = model_from_proto(models.residual_net())
    feeds = _feeds("residual_net", 21)
    runs = [collect_statistics(model, _batches(feeds, size)) for size in (1, 7, 21)]
    assert [r.batches for r in runs] == [21, 3, 1]
    _assert_same_statistics(runs[0], runs[1])
    _assert_same_statistics(runs[0], runs[2])


def test_huge_mask_values_are_excluded_and_counted():
    model = model_from_proto(models.mlp_attention())
    feeds = _feeds("mlp_attention", 16)
    stats = collect_statistics(model, _batches(feeds, 5))
    mask = feeds["mask"]
    n_masked = int((mask <= -1e30).sum())
    assert stats["mask"].huge == n_masked and stats["mask"].absmax == 0.0
    # scores + float32.min: every masked key column of every query row is huge
    seq = feeds["x"].shape[1]
    assert stats["masked"].huge == n_masked * seq
    # the unmasked positions hold exactly the scores: a subset of their values, none of the mask
    assert stats["masked"].count == stats["scores"].count - stats["masked"].huge
    assert stats["masked"].absmax <= stats["scores"].absmax < 1e3
    assert int(stats["masked"].counts.sum()) == stats["masked"].count
    assert stats["probs"].huge == 0 and stats["probs"].max <= 1.0


def test_groups_when_over_memory_budget_give_the_same_statistics():
    model = model_from_proto(models.conv_net())
    feeds = _feeds("conv_net", 12)
    seen: list[int] = []
    one = collect_statistics(model, _batches(feeds, 4))
    split = collect_statistics(model, _batches(feeds, 4), memory_budget_bytes=40_000,
                               on_batch=lambda b: seen.append(b["input"].shape[0]))
    assert one.passes == 1 and split.passes > 2
    assert seen == [4, 4, 4]  # on_batch runs on the first pass only
    _assert_same_statistics(one, split)


def test_plan_groups_respects_budget_and_order():
    groups = plan_groups({"a": 10, "b": 30, "c": None, "d": 5, "e": 100}, 40)
    assert groups == [["a", "b"], ["c"], ["d"], ["e"]]
    assert [t for g in groups for t in g] == ["a", "b", "c", "d", "e"]


def test_peak_memory_does_not_grow_with_sample_count():
    model = model_from_proto(models.conv_net(size=32))

    def stream(n_batches: int):
        def gen():
            for i in range(n_batches):  # batches are made on the fly: only the statistics can accumulate
                yield models.random_inputs(models.conv_net(size=32), 8, seed=i)
        return gen

    collect_statistics(model, stream(2))  # warm up numba and ORT
    peaks = []
    for n in (4, 40):
        tracemalloc.start()
        collect_statistics(model, stream(n))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] <= 1.10 * peaks[0] + 256 * 1024, peaks


def test_save_and_load_round_trip(tmp_path):
    model = model_from_proto(models.mlp_attention())
    stats = collect_statistics(model, _batches(_feeds("mlp_attention", 8), 4))
    path = save_statistics(stats, tmp_path / "statistics.npz")
    back = load_statistics(path)
    _assert_same_statistics(stats, back)
    assert back.model_sha256 == model.sha256 and back.huge_threshold == stats.huge_threshold
    assert back["mask"].huge == stats["mask"].huge
    with np.load(path, allow_pickle=False) as data:  # plain arrays only
        assert set(data.files) >= {"counts", "metadata"}


def test_exact_zeros_of_relu_outputs_are_counted(tmp_path):
    model = model_from_proto(models.conv_net())
    feeds = _feeds("conv_net", 12)
    stats = collect_statistics(model, _batches(feeds, 5))
    runner = get_backend("ort").build(model.proto, outputs=["relu1"])
    try:
        relu1 = runner.run(feeds, ["relu1"])["relu1"]
    finally:
        runner.close()
    zeros = int((relu1 == 0).sum())
    assert 0.2 * relu1.size < zeros < relu1.size  # a ReLU output: many exact zeros
    assert stats["relu1"].zeros == zeros
    assert stats["input"].zeros == int((feeds["input"] == 0).sum())
    back = load_statistics(save_statistics(stats, tmp_path / "s.npz"))
    assert back["relu1"].zeros == zeros


def test_files_without_zero_counts_still_load(tmp_path):
    """Statistics written before the exact-zero count existed load with zeros = 0 (entropy then keeps zeros)."""
    model = model_from_proto(models.conv_net())
    stats = collect_statistics(model, _batches(_feeds("conv_net", 4), 4))
    path = save_statistics(stats, tmp_path / "new.npz")
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files if k != "zeros"}
    old = tmp_path / "old.npz"
    np.savez_compressed(old, **arrays)
    back = load_statistics(old)
    assert stats["relu1"].zeros > 0 and back["relu1"].zeros == 0
    np.testing.assert_array_equal(back["relu1"].counts, stats["relu1"].counts)
    arrays["zeros"] = np.full(len(stats.names), 10**12, np.int64)  # more zeros than values: corrupt
    np.savez_compressed(old, **arrays)
    with pytest.raises(CalibrationError, match="inconsistent"):
        load_statistics(old)


def test_load_rejects_other_files(tmp_path):
    bad = tmp_path / "x.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(CalibrationError, match="x.npz"):
        load_statistics(bad)
    other = tmp_path / "other.npz"
    np.savez(other, a=np.zeros(3))
    with pytest.raises(CalibrationError, match="not a quantlab statistics file"):
        load_statistics(other)
    with pytest.raises(CalibrationError, match="no such"):
        load_statistics(tmp_path / "missing.npz")


def test_errors_name_the_problem():
    model = model_from_proto(models.conv_net())
    feeds = _feeds("conv_net", 4)
    with pytest.raises(CalibrationError, match="'nope'"):
        collect_statistics(model, _batches(feeds, 2), tensors=["relu1", "nope"])
    with pytest.raises(DataError, match="no batches"):
        collect_statistics(model, lambda: iter([]))
    calls = []

    def shrinking():
        calls.append(1)
        return _batches(feeds, 2)() if len(calls) == 1 else _batches({k: v[:2] for k, v in feeds.items()}, 2)()

    with pytest.raises(DataError, match="same data"):
        collect_statistics(model, shrinking, memory_budget_bytes=1)


def test_default_tensors_are_the_activations():
    proto = models.concat_net()
    model = model_from_proto(proto)
    stats = collect_statistics(model, _batches(_feeds("concat_net", 4), 4))
    assert stats.names == activation_names(model.proto)
    assert stats.samples == 4 and stats.backend["library"] == "onnxruntime"


def test_prefetch_keeps_order_and_stops_with_the_pass():
    """Batches are made one ahead in a thread: on_batch sees them in order, an error surfaces at its batch,
    and no prefetch thread outlives collect_statistics (normal end or error)."""
    import threading

    model = model_from_proto(models.conv_net())
    feeds = _feeds("conv_net", 24)
    seen = []
    stats = collect_statistics(model, _batches(feeds, 4), on_batch=lambda item: seen.append(item["input"][0, 0, 0, 0]))
    assert seen == [feeds["input"][i, 0, 0, 0] for i in range(0, 24, 4)] and stats.batches == 6

    def failing():
        for i, batch in enumerate(_batches(feeds, 4)()):
            if i == 3:
                raise DataError("batch 3 is unreadable")
            yield batch

    with pytest.raises(DataError, match="batch 3"):
        collect_statistics(model, failing)
    bad = [{"input": feeds["input"][:4]}] + [{"wrong_name": feeds["input"][:4]}] * 50  # the model run fails
    with pytest.raises(Exception):  # noqa: B017 - whichever error the second batch raises, the thread must end
        collect_statistics(model, lambda: iter(bad))
    assert not [t for t in threading.enumerate() if t.name == "quantlab-prefetch"]


def test_large_batches_run_in_slices_with_the_same_statistics():
    from quantlab.stats import samples_per_run

    model = model_from_proto(models.conv_net())
    feeds = _feeds("conv_net", 12)
    whole = collect_statistics(model, _batches(feeds, 12))
    sliced = collect_statistics(model, _batches(feeds, 12), run_budget_bytes=1)  # one sample per model run
    _assert_same_statistics(whole, sliced)
    assert sliced.batches == 1 and sliced.passes == 1
    assert samples_per_run(model, {"a": 800, "b": 200}, 8, 250) == 2
    assert samples_per_run(model, {"a": 800, "b": None}, 8, 400) == 2  # unknown counts as the largest
    assert samples_per_run(model, {"a": 800}, 8, 1) == 1 and samples_per_run(model, {"a": 8}, 8, 10**9) == 8
    fixed = onnx.ModelProto()
    fixed.CopyFrom(models.conv_net())
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 8  # a fixed batch cannot be sliced
    assert samples_per_run(model_from_proto(fixed), {"a": 800}, 8, 100) == 8


def _widened(model, width: int, n: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of ``text_recognizer`` (image [N, 3, 48, W]) at this width."""
    image = np.random.default_rng(seed).normal(0, 1, (n, 3, 48, width)).astype(np.float32)
    return {"image": image}


def test_a_wider_batch_runs_in_fewer_samples_per_run_and_the_estimate_bounds_the_truth():
    """Text lines of other widths: the run size of the first batch would let a 4x wider batch hold 4x
    the budget. Each shape gets its own run size; where the graph's symbols cannot tell the sizes (here:
    none of them), the first batch's sizes grow with the square of the input growth, an upper bound."""
    from quantlab.stats import RunRows, resolved_sizes

    model = model_from_proto(models.text_recognizer())
    names = [t for t in activation_names(model.proto) if t not in model.input_names]
    narrow, wide = _widened(model, 32, 8), _widened(model, 128, 8)
    names = [t for t, v in resolved_sizes(model, names, narrow).items() if v is not None]  # sized by inference
    first = resolved_sizes(model, names, narrow)
    budget = sum(first.values()) // 2  # half the first batch: runs of 4 samples
    plan = RunRows(model, names, budget, narrow, 8, first)
    assert plan(narrow, 8) == 4
    exact = resolved_sizes(model, names, wide)
    estimate = plan.sizes(wide, 8)
    assert all(estimate[t] >= exact[t] for t in names)  # an upper bound of the truth
    rows = plan(wide, 8)
    assert rows == 1 and rows * sum(exact.values()) / 8 <= budget  # the truth then fits the budget
    assert plan.sizes(_widened(model, 16, 8), 8) == {t: v for t, v in first.items()}  # smaller: the first's sizes


def test_batches_of_other_widths_give_the_same_statistics_however_they_are_sliced():
    model = model_from_proto(models.text_recognizer())
    batches = [_widened(model, w, 3, seed=i) for i, w in enumerate((32, 96, 24, 64))]
    whole = collect_statistics(model, lambda: iter(batches))
    sliced = collect_statistics(model, lambda: iter(batches), run_budget_bytes=1)  # one sample per run
    _assert_same_statistics(whole, sliced)


def test_overlapped_threads_give_the_same_statistics_as_one_thread():
    """Run k reduced on the pool while run k+1 computes: per-tensor order is kept, so nothing changes."""
    model = model_from_proto(models.residual_net())
    feeds = _feeds("residual_net", 21)
    serial = collect_statistics(model, _batches(feeds, 7), threads=1, run_budget_bytes=1)
    for threads in (2, 3):
        overlapped = collect_statistics(model, _batches(feeds, 7), threads=threads, run_budget_bytes=1)
        _assert_same_statistics(serial, overlapped)
    assert serial.backend["details"]["spinning"] is False  # the collection's session leaves the cores to the kernels


def test_a_failing_reduction_is_raised_and_stops_the_pass():
    import threading

    model = model_from_proto(models.conv_net())
    feeds = _feeds("conv_net", 8)

    class Broken:
        def build(self, proto, outputs=None, cache_dir=None):
            runner = get_backend("ort").build(proto, outputs=outputs)

            class Runner:
                def run(self, part, names):
                    out = runner.run(part, names)
                    return {**out, names[0]: np.array([["not a number"]])}  # no float: update() raises

                def close(self):
                    pass

            return Runner()

        def build_values(self, proto, outputs):
            return self.build(proto, outputs=outputs)

    with pytest.raises(ValueError, match="not a number"):
        collect_statistics(model, _batches(feeds, 2), backend=Broken(), threads=2)
    assert not [t for t in threading.enumerate() if t.name.startswith("quantlab-stats")]


def test_reshaped_tensors_share_their_source_statistics_and_match_a_direct_histogram():
    """Reshape/Unsqueeze outputs are not run out of the model again; their statistics are still theirs."""
    from quantlab.histogram import AbsHistogram
    from quantlab.stats.collect import value_sources

    model = model_from_proto(models.dynamic_attention())
    names = activation_names(model.proto)
    sources = value_sources(model, names)
    aliased = [t for t in names if sources[t] != t]
    assert aliased and all(t in names or t in model.input_names for t in sources.values())
    producers = {n.output[0]: n.op_type for n in model.proto.graph.node}
    assert not any(producers.get(t) == "Transpose" for t in aliased)  # a transpose reorders: its own statistics
    feeds = models.random_inputs(model.proto, 12, seed=5)
    batches = _batches(feeds, 4)
    stats = collect_statistics(model, batches)
    runner = get_backend("ort").build(model.proto, outputs=aliased)
    for t in aliased:
        direct = AbsHistogram()
        for b in batches():
            direct.update(runner.run(b, [t])[t])
        assert stats.tensors[t] == direct.state(), t


def test_tensors_without_a_sample_axis_count_once_per_sample_whatever_the_batch_size():
    """A position-table slice or a scalar input is computed (fed) once per model run for all its samples:
    it counts once per sample, so batch size and slicing change nothing (before, 3 runs of 20 samples
    counted it 3 times, 20 single-sample runs 20 times)."""
    from quantlab.data import from_arrays
    from quantlab.graph.samples import carries_samples

    model = model_from_proto(models.position_table_net(hidden=6, max_len=16))
    rng = np.random.default_rng(0)
    n, seq = 20, 5  # positions [5, 6]: no run (8, 8, 4; 3 ... 2) has 5 or 6 rows to fool the runtime check
    data = from_arrays({"x": rng.normal(size=(n, seq, 6)).astype(np.float32),
                        "temperature": np.array(0.7, np.float32)}, batch_axes={"temperature": None})
    names = ["x", "temperature", "table", "positions", "y", "out", "flat"]
    assert carries_samples(model, {"temperature": None}, names) == {
        "x": True, "temperature": False, "table": False, "positions": False, "y": True, "out": True, "flat": True}
    runs = {size: collect_statistics(model, lambda size=size: data.batches(size), tensors=names)
            for size in (1, 3, 8)}
    runs["sliced"] = collect_statistics(model, lambda: data.batches(8), tensors=names, run_budget_bytes=1)
    for other in (3, 8, "sliced"):
        _assert_same_statistics(runs[1], runs[other])
    stats = runs[8]
    assert stats["table"].count == n * 16 * 6 and stats["positions"].count == n * seq * 6
    assert stats["temperature"].count == n and stats["x"].count == n * seq * 6
    assert stats["flat"].count == n * seq * 6  # [rows * S, 6]: no axis of the run's size, still per sample


def test_sample_weights_weigh_only_what_the_samples_do_not_change():
    from quantlab.stats import sample_weights

    outputs = {t: np.zeros((7, 16)) for t in ("batched", "table", "unknown")}
    outputs["zeros_like_mask"] = np.zeros((4, 7))  # ConstantOfShape(Shape(mask)): shared values, batched shape
    carries = {"batched": True, "table": False, "zeros_like_mask": False}
    assert sample_weights(outputs, 4, carries) == {"table": 4}
    assert sample_weights(outputs, 1, carries) == {}



def test_a_weighted_update_equals_that_many_updates():
    from quantlab.clipped import ClippedPair
    from quantlab.histogram import AbsHistogram

    rng = np.random.default_rng(3)
    first = rng.normal(0, 0.5, 5000).astype(np.float32)
    wider = np.concatenate([rng.normal(0, 40, 3000), [0.0, -0.0, np.inf, -3e38]]).astype(np.float32)  # grows R
    for make in (lambda: AbsHistogram(1024), lambda: ClippedPair(6.0, 1024, 1e30)):
        once, repeated = make(), make()
        arrays = (first, wider) if isinstance(once, AbsHistogram) else (first, np.abs(wider[:3000]))
        for array in arrays:
            once.update(array, 3)
            for _ in range(3):
                repeated.update(array)
        assert once.state() == repeated.state()
        if isinstance(once, ClippedPair):
            assert once.clipped_state() == repeated.clipped_state()
        with pytest.raises(ValueError, match="weight"):
            once.update(first, 0)

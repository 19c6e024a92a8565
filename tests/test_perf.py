"""Latency measurement and ``quantlab perf``: real ONNX Runtime runs, sane statistics."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import pytest

import models
from quantlab.backends import get_backend
from quantlab.backends.base import Runner
from quantlab.cli import main
from quantlab.errors import InputMismatchError
from quantlab.graph import model_from_proto
from quantlab.perf import (
    LatencyResult,
    check_feeds_fit,
    feed_batch_size,
    latency_from_samples,
    measure_latency,
    random_feeds,
)


class _CountingRunner(Runner):
    """Wraps a real ORT runner and counts calls (the measured work is still ONNX Runtime)."""

    def __init__(self, inner: Runner) -> None:
        self.inner = inner
        self.input_names, self.output_names = inner.input_names, inner.output_names
        self.calls = 0

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        self.calls += 1
        return self.inner.run(feeds, outputs)


def _ort_runner(model: onnx.ModelProto) -> Runner:
    return get_backend("ort", threads=1).build(model)


def test_latency_statistics_are_ordered_and_consistent():
    model = models.residual_net()
    runner = _CountingRunner(_ort_runner(model))
    feeds = models.random_inputs(model, batch=4)
    result = measure_latency(runner, feeds, warmup=3, iterations=40)
    assert isinstance(result, LatencyResult)
    assert runner.calls == 43
    assert (result.batch_size, result.iterations, result.warmup) == (4, 40, 3)
    assert 0 < result.min_ms <= result.p50_ms <= result.p90_ms <= result.p99_ms <= result.max_ms
    assert result.min_ms <= result.mean_ms <= result.max_ms
    # throughput counts wall time between runs too: at most batch/mean, and not far below it
    ideal = result.batch_size * 1000.0 / result.mean_ms
    assert 0.5 * ideal <= result.throughput_per_s <= ideal * 1.0001
    assert set(result.as_dict()) >= {"mean_ms", "p99_ms", "throughput_per_s"}


def test_duration_keeps_timing_past_the_iteration_count():
    model = models.conv_net()
    runner = _CountingRunner(_ort_runner(model))
    t0 = time.perf_counter()
    result = measure_latency(runner, models.random_inputs(model, batch=1), warmup=0, iterations=2, duration_s=0.2)
    assert time.perf_counter() - t0 >= 0.2
    assert result.iterations == runner.calls > 2


def test_latency_from_samples_matches_numpy_percentiles():
    rng = np.random.default_rng(0)
    seconds = rng.gamma(2.0, 0.001, size=1000)
    res = latency_from_samples(seconds, wall_seconds=float(seconds.sum()) * 1.1, batch_size=8, warmup=5)
    ms = seconds * 1000
    assert res.p50_ms == pytest.approx(float(np.median(ms)))
    assert res.p99_ms == pytest.approx(float(np.sort(ms)[989] + 0.01 * (np.sort(ms)[990] - np.sort(ms)[989])))
    assert res.mean_ms == pytest.approx(float(ms.mean()))
    assert res.throughput_per_s == pytest.approx(8 * 1000 / (seconds.sum() * 1.1))


def test_bad_measurement_arguments():
    runner = _ort_runner(models.conv_net())
    feeds = models.random_inputs(models.conv_net(), batch=1)
    with pytest.raises(ValueError, match="iterations"):
        measure_latency(runner, feeds, iterations=0)
    with pytest.raises(InputMismatchError, match="batch size"):
        feed_batch_size({"a": np.zeros((2, 3)), "b": np.zeros((3, 3))})


def test_random_feeds_resolve_dynamic_batch_and_types():
    model = model_from_proto(models.mlp_attention())
    feeds = random_feeds(model, batch_size=3, seed=7)
    assert feeds["x"].shape == (3, 8, 16) and feeds["x"].dtype == np.float32
    assert feeds["mask"].shape == (3, 1, 8)
    again = random_feeds(model, batch_size=3, seed=7)
    assert all(np.array_equal(feeds[k], again[k]) for k in feeds)
    assert not np.array_equal(random_feeds(model, 3, seed=8)["x"], feeds["x"])
    out = get_backend("ort").build(model.proto).run(feeds)
    assert out["out"].shape == (3, 8, 16)


def test_random_feeds_need_named_non_batch_dims():
    proto = models.mlp_attention()
    for inp in proto.graph.input:
        inp.type.tensor_type.shape.dim[1].dim_param = "seq"
    # keep the graph consistent: the output's seq dim is symbolic too
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "seq"
    model = model_from_proto(proto)
    with pytest.raises(InputMismatchError, match=r"axis 1 \('seq'\).*quantlab perf --dim seq=128 \(from Python"):
        random_feeds(model, batch_size=2)
    feeds = random_feeds(model, batch_size=2, dims={"seq": 8})
    assert feeds["x"].shape == (2, 8, 16)


def test_every_missing_dim_is_named_at_once():
    """A decoder step with a decoder and an encoder length asked for one --dim per run: both are named at once."""
    proto = models.mlp_attention()
    names = ["dec_seq", "enc_seq"]
    for inp, name in zip(proto.graph.input, names * len(proto.graph.input)):
        inp.type.tensor_type.shape.dim[1].dim_param = name
    model = model_from_proto(proto)
    assert [s.shape[1] for s in model.inputs] == names  # x and its mask, each with its own length
    with pytest.raises(InputMismatchError, match=r"'dec_seq' .*'enc_seq' .*--dim dec_seq=128 --dim enc_seq=128"):
        random_feeds(model, batch_size=2)


def test_cli_perf_measures_ort_lists_unavailable_and_writes_json(tmp_path, capsys):
    path = tmp_path / "residual.onnx"
    onnx.save(models.residual_net(), path)
    out_json = tmp_path / "perf.json"
    code = main(["perf", str(path), "--backend", "all", "--batch-size", "2", "--warmup", "2",
                 "--iterations", "10", "--threads", "1", "--json", str(out_json), "--no-progress"])  # as every command
    assert code == 0
    printed = capsys.readouterr().out
    assert "p99 ms" in printed and "samples/s" in printed
    data = json.loads(out_json.read_text())
    ort_rows = [r for r in data["results"] if r["backend"]["name"] == "ort"]
    assert len(ort_rows) == 1
    lat = ort_rows[0]["latency"]
    assert lat["batch_size"] == 2 and lat["iterations"] == 10
    assert lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"]
    measured = {r["backend"]["name"] for r in data["results"]}
    skipped = {u["backend"] for u in data["unavailable"]}
    assert measured | skipped == {"ort", "tensorrt", "tensorrt-rtx"}
    for item in data["unavailable"]:
        assert item["reason"]
        assert f"{item['backend']}: not measured" in printed
    assert data["model"]["sha256"] and "onnxruntime" in data["tool_versions"]


def test_cli_perf_specific_unavailable_backend_fails_clearly(tmp_path, capsys):
    path = tmp_path / "conv.onnx"
    onnx.save(models.conv_net(), path)
    pytest.importorskip("tensorrt_rtx_bindings")
    from quantlab.backends.tensorrt import cuda_device

    if cuda_device().available:
        pytest.skip("a GPU is present: tensorrt-rtx runs here")
    code = main(["perf", str(path), "--backend", "tensorrt-rtx", "--iterations", "1"])
    assert code == 3  # no GPU / missing backend: an environment problem
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err or "cuda-python" in err


def test_cli_perf_rejects_bad_arguments(tmp_path):
    path = tmp_path / "conv.onnx"
    onnx.save(models.conv_net(), path)
    assert main(["perf", str(path), "--batch-size", "0"]) == 2
    assert main(["perf", str(path), "--dim", "seq"]) == 2


def _int8_ort_form(tmp_path, reduce_range: bool):
    """residual_net written in ONNX Runtime's Q/DQ form from MinMax ranges of a few random batches."""
    from quantlab.graph import activation_names
    from quantlab.plan import uniform_plan
    from quantlab.quantize import WriteOptions, write_model
    from quantlab.table import CalibrationTable, TensorRange

    model = model_from_proto(models.residual_net())
    names = [n for n in activation_names(model.proto) if n not in model.input_names]
    runner = get_backend("ort").build(model.proto, outputs=names)
    feeds = models.random_inputs(model.proto, 4, seed=0)
    values = {**feeds, **runner.run(feeds)}
    ranges = {n: TensorRange(amax=float(np.abs(v).max()), min=float(v.min()), max=float(v.max()))
              for n, v in values.items()}
    written = write_model(model, uniform_plan("int8"), CalibrationTable("minmax", ranges, model.sha256),
                          WriteOptions(target="ort", reduce_range=reduce_range))
    path = tmp_path / f"int8_rr{int(reduce_range)}.onnx"
    onnx.save(written.proto, path)
    return path


def test_cli_perf_records_which_int8_kernels_ort_ran(tmp_path, capsys):
    from quantlab.backends.ort import int8_dot_saturates

    common = ["--backend", "ort", "--warmup", "1", "--iterations", "3", "--threads", "1"]
    full = _int8_ort_form(tmp_path, reduce_range=False)
    for flag, expected in (("auto", not int8_dot_saturates()), ("on", True), ("off", False)):
        out_json = tmp_path / f"perf_{flag}.json"
        assert main(["perf", str(full), *common, "--qdq-fusion", flag, "--json", str(out_json)]) == 0
        row = json.loads(out_json.read_text())["results"][0]
        assert row["backend"]["details"]["qdq_fusion_used"] is expected, flag
        assert ("ran the Q/DQ model unfused" in capsys.readouterr().out) is (not expected)
    small = _int8_ort_form(tmp_path, reduce_range=True)
    out_json = tmp_path / "perf_rr.json"
    assert main(["perf", str(small), *common, "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["results"][0]["backend"]["details"]["qdq_fusion_used"] is True


def test_a_dimension_of_10_12_is_refused_before_allocating_naming_input_shape_and_bytes(tmp_path, capsys):
    model = model_from_proto(models.relu_net(["N", 3, 10**12, 8]))
    with pytest.raises(InputMismatchError) as err:
        random_feeds(model, batch_size=1)
    text = str(err.value)
    assert "input 'input' (float32)" in text and "[1, 3, 1000000000000, 8]" in text
    assert "96000000000000 bytes" in text and "87.3 TiB" in text
    assert "fixed dims alone do not fit" in text and "--batch-size" not in text  # no batch size can help
    path = tmp_path / "huge.onnx"
    onnx.save(models.relu_net(["N", 3, 10**12, 8]), path)
    assert main(["perf", str(path), "--backend", "ort", "--iterations", "1"]) == 2
    err_text = capsys.readouterr().err
    assert str(path) in err_text and "96000000000000 bytes" in err_text and "Traceback" not in err_text


def test_a_fixed_batch_of_10_12_is_refused_and_says_the_batch_is_fixed():
    model = model_from_proto(models.relu_net([10**12, 3]))
    with pytest.raises(InputMismatchError, match=r"fixes its batch at 1000000000000.*re-export"):
        check_feeds_fit(model, batch_size=4)


def test_feeds_that_fit_only_at_a_smaller_batch_say_which_sizes_to_lower():
    proto = models.mlp_attention()
    for inp in proto.graph.input:
        inp.type.tensor_type.shape.dim[1].dim_param = "seq"
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "seq"
    model = model_from_proto(proto)
    # x [N, seq, 16] + mask [N, seq, 8] float32, each value drawn as float64 first; out [N, seq, 16] float32
    need = check_feeds_fit(model, 2, {"seq": 8}, available=10**9)
    assert need == 2 * 8 * 16 * (4 + 8) + 2 * 8 * 8 * (4 + 8) + 2 * 8 * 16 * 4
    with pytest.raises(InputMismatchError) as err:
        check_feeds_fit(model, 2, {"seq": 8}, available=need - 1)
    assert "a smaller --batch-size than 2" in str(err.value) and "seq=8" in str(err.value)
    assert "5.5 KiB available" in str(err.value) and need == 5632


def test_cli_perf_times_the_first_batch_of_a_data_set(tmp_path, capsys):
    """Random data times other work where the values decide it (VITS fed padding id 0 made half its waveform):
    --data times the first batch of a manifest, at the data's own sizes (no --dim), a batch no larger than the
    set, and says and records what it timed."""
    proto = models.any_size_classifier()
    onnx.save(proto, tmp_path / "any.onnx")
    images = np.random.default_rng(0).normal(0, 1, (3, 3, 20, 28)).astype(np.float32)
    np.savez(tmp_path / "val.npz", image=images)
    (tmp_path / "val.toml").write_text('role = "validation"\n[[source]]\nkind = "npz"\npath = "val.npz"\n'
                                       'batched = true\n')
    common = ["perf", str(tmp_path / "any.onnx"), "--backend", "ort", "--warmup", "1", "--iterations", "3",
              "--threads", "1"]
    assert main([*common, "--batch-size", "4", "--data", str(tmp_path / "val.toml"), "--json",
                 str(tmp_path / "p.json")]) == 0
    assert f"batch 3, warm-up 1, iterations 3, the first batch of {tmp_path / 'val.toml'})" in capsys.readouterr().out
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["settings"]["feeds"] == {"image": [[3, 3, 20, 28], "float32"]} and doc["settings"]["batch_size"] == 3
    assert doc["results"][0]["latency"]["batch_size"] == 3
    assert main([*common, "--data", str(tmp_path / "val.toml"), "--dim", "H=8"]) == 2  # one or the other
    assert "--dim sizes random data" in capsys.readouterr().err
    assert main([*common]) == 2  # random data needs the sizes the data gave
    # a model that mixes the samples of a batch: its time follows the batch, which --data says
    onnx.save(models.until_converged(), tmp_path / "loop.onnx")
    np.savez(tmp_path / "rows.npz", input=np.random.default_rng(1).normal(0, 1, (4, 16)).astype(np.float32))
    (tmp_path / "rows.toml").write_text('role = "validation"\n[[source]]\nkind = "npz"\npath = "rows.npz"\n'
                                        'batched = true\n')
    capsys.readouterr()
    assert main(["perf", str(tmp_path / "loop.onnx"), "--backend", "ort", "--warmup", "0", "--iterations", "2",
                 "--batch-size", "4", "--data", str(tmp_path / "rows.toml")]) == 0
    assert "gives a sample other outputs in a batch than alone" in capsys.readouterr().err


def test_random_feeds_put_the_batch_on_every_axis_its_symbol_names():
    """A GRU's state h0 [2, batch, 48] beside feats [batch, 16, time]: perf asked for --dim batch=128, then timed
    batch 4 while it said batch 1 (throughput off 4x). The batch symbol takes the batch size wherever it is; a
    --dim for it is refused, and so is random data for a model whose 'batch' is on no input's axis 0."""
    from onnx import TensorProto, helper

    from quantlab.errors import InputMismatchError
    from quantlab.graph import model_from_proto

    def gru(x_shape: list) -> object:
        graph = helper.make_graph(
            [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]) if x_shape[0] == "batch" else
             helper.make_node("Identity", ["x"], ["xt"]),
             helper.make_node("GRU", ["xt", "W", "R", "", "", "h0"], ["y", "hn"], hidden_size=4)], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape),
             helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, "batch", 4])],
            [helper.make_tensor_value_info("hn", TensorProto.FLOAT, [1, "batch", 4])],
            [onnx.numpy_helper.from_array(np.zeros((1, 12, 3), np.float32), "W"),
             onnx.numpy_helper.from_array(np.zeros((1, 12, 4), np.float32), "R")])
        return model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))

    batch_first = gru(["batch", "time", 3])
    feeds = random_feeds(batch_first, 4, dims={"time": 5})
    assert feeds["x"].shape == (4, 5, 3) and feeds["h0"].shape == (1, 4, 4)
    with pytest.raises(InputMismatchError, match="'batch' is the batch .* give --batch-size"):
        random_feeds(batch_first, 4, dims={"time": 5, "batch": 2})
    with pytest.raises(InputMismatchError, match="'batch' names a batch but is not on axis 0 .* --data MANIFEST"):
        random_feeds(gru(["time", "batch", 3]), 4, dims={"batch": 2})


def test_a_model_that_fixes_its_batch_at_2_is_timed_at_2(tmp_path, capsys):
    """Swin exported at batch 2 ran on [2, ...] feeds but was reported as batch 1, its samples/s halved; a
    --batch-size the fixed batch refuses is refused instead of reported."""
    proto = models.residual_net()
    for vi in list(proto.graph.input) + list(proto.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = 2
    path = tmp_path / "static2.onnx"
    onnx.save(proto, path)
    out_json = tmp_path / "perf.json"
    assert main(["perf", str(path), "--backend", "ort", "--warmup", "1", "--iterations", "5", "--threads", "1",
                 "--json", str(out_json), "--no-progress"]) == 0
    assert "fixes its batch at 2: batch size 2" in capsys.readouterr().err
    (row,) = json.loads(out_json.read_text())["results"]
    assert row["latency"]["batch_size"] == 2
    assert row["latency"]["throughput_per_s"] > 1000.0 / row["latency"]["p99_ms"]  # two samples per run
    assert main(["perf", str(path), "--backend", "ort", "--batch-size", "4", "--iterations", "1"]) == 2
    assert "fixes its batch at 2" in capsys.readouterr().err


def test_a_run_on_random_data_that_fails_suggests_timing_real_data(tmp_path, capsys):
    """A Llama decode step wants its attention mask one longer than its past: perf's own suggestion (--dim
    total_len=128 --dim past_len=128) failed with ONNX Runtime's bare error. The failure now says what random data
    cannot know and to time real samples with --data."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Concat", ["past", "x"], ["present"], name="cache", axis=1),
         helper.make_node("ReduceMean", ["present", "last"], ["per_pos"], name="pool", keepdims=0),
         helper.make_node("Add", ["per_pos", "mask"], ["y"], name="masked")], "decode_step",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8]),
         helper.make_tensor_value_info("past", TensorProto.FLOAT, ["N", "past_len", 8]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", "total_len"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "total_len"])],
        [onnx.numpy_helper.from_array(np.array([2], np.int64), "last")])
    path = tmp_path / "step.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    assert main(["perf", str(path), "--backend", "ort", "--iterations", "1", "--dim", "past_len=4",
                 "--dim", "total_len=4"]) != 0
    err = capsys.readouterr().err
    assert "a cache's total length = its past + 1" in err and "--data MANIFEST" in err
    assert main(["perf", str(path), "--backend", "ort", "--iterations", "1", "--dim", "past_len=4",
                 "--dim", "total_len=5"]) == 0

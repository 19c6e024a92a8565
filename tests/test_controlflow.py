"""Ifs with a constant condition are inlined (quantlab.controlflow); the rest of control flow stays float, listed.

The voice-activity test model keeps its weights as Constant nodes inside the two
branches of ``If(sr == 16000)``; inlined, the taken branch's tensors are calibrated
and get Q/DQ, and the written model still parses and builds with TensorRT-RTX.
"""

from __future__ import annotations

import dataclasses

import models
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantlab.calibrate import table_from_statistics
from quantlab.controlflow import (
    RECORD_KEY,
    bind_inputs,
    control_flow_notes,
    float_subgraph_tensors,
    inline_constant_ifs,
    resolve_static_control_flow,
)
from quantlab.errors import ModelError
from quantlab.fingerprint import sha256_file
from quantlab.graph import activation_names, load_model, model_from_proto
from quantlab.plan import uniform_plan
from quantlab.quantize import WriteOptions, write_model
from quantlab.stats import collect_statistics


def _feeds(batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input": rng.normal(0, 1, (batch, 64)).astype(np.float32),
            "state": rng.normal(0, 0.5, (2, batch, 128)).astype(np.float32)}


_run = models.run_ort


@pytest.mark.parametrize("rate, branch", [(16000, "then_branch"), (8000, "else_branch")])
def test_constant_condition_if_is_inlined_with_the_same_outputs(rate, branch):
    proto = models.voice_activity(sample_rate=rate)
    inlined, done = inline_constant_ifs(proto)
    onnx.checker.check_model(inlined, full_check=True)
    assert [d.branch for d in done] == [branch] and done[0].sources == ("sr", "sr_16k")
    ops = [n.op_type for n in inlined.graph.node]
    assert "If" not in ops and "Constant" not in ops and "Equal" not in ops  # condition cone removed too
    tag = "16k" if rate == 16000 else "8k"
    assert {f"w_{tag}", f"b_{tag}"} <= {i.name for i in inlined.graph.initializer}  # weights as initializers
    feeds = _feeds(3, 0)
    before, after = _run(proto, feeds), _run(inlined, feeds)
    for name in ("prob", "stateN"):
        np.testing.assert_array_equal(before[name], after[name])  # the same nodes run on the same values
    assert {f"mm_{tag}", f"pre_{tag}", "enc"} <= set(activation_names(model_from_proto(inlined).proto))
    recorded, _ = resolve_static_control_flow(proto)
    assert control_flow_notes(recorded) == (done[0].note(),) and RECORD_KEY in {p.key for p in recorded.metadata_props}


def test_a_condition_decided_by_a_dynamic_dim_says_so():
    """torch writes ``if x.size(0) == 1: squeeze`` as If(Equal(Gather(Shape(x), 0), 1)) (Silero VAD's LSTM): the
    note said "depends on the data", yet the values play no part and TensorRT builds it only with the dim fixed."""
    then_branch = helper.make_graph([helper.make_node("Squeeze", ["x", "zero"], ["s"])], "then", [],
                                    [helper.make_tensor_value_info("s", TensorProto.FLOAT, None)])
    else_branch = helper.make_graph([helper.make_node("Identity", ["x"], ["i"])], "else", [],
                                    [helper.make_tensor_value_info("i", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "zero"], ["n"]),
             helper.make_node("Equal", ["n", "one"], ["single"]),
             helper.make_node("If", ["single"], ["y"], name="squeeze_if", then_branch=then_branch,
                              else_branch=else_branch)]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([1], np.int64), "one")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    reason = float_subgraph_tensors(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))["s"]
    assert "depends on the shape of 'x' (a dynamic dim), not on values" in reason and "--shapes" in reason


def test_condition_from_the_data_is_left_and_its_tensors_listed():
    free = _data_driven_vad()
    out, done = inline_constant_ifs(free)
    assert done == () and out is free
    left = float_subgraph_tensors(out)
    assert set(left) == {"mm_16k", "pre_16k", "enc_16k", "mm_8k", "pre_8k", "enc_8k"}
    assert "condition depends on the data" in left["enc_8k"]
    note = control_flow_notes(out)[0]
    assert note.startswith("6 tensor(s) left in float") and "by_sample_rate" in note
    # the value the data always feeds, bound as a constant: inlined
    _, done = inline_constant_ifs(bind_inputs(free, {"sr": np.array(8000, np.int64)}))
    assert [d.branch for d in done] == ["else_branch"]
    with pytest.raises(ModelError, match="'rate'"):
        bind_inputs(free, {"rate": np.array(1)})


def _branch(name: str, nodes: list[onnx.NodeProto], out: str) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, [2])])


def test_nested_ifs_and_names_two_branches_share():
    """The first If's branch holds another constant If; the second If's branch reuses the name 'u' the
    first one brought into the main graph, so the second inlining renames it 'second/u'."""
    inner = helper.make_node("If", ["flag"], ["y"], name="inner",
                             then_branch=_branch("it", [helper.make_node("Neg", ["x"], ["n"], name="neg")], "n"),
                             else_branch=_branch("ie", [helper.make_node("Identity", ["x"], ["s"], name="s")], "s"))
    first_then = _branch("ft", [helper.make_node("Relu", ["x"], ["u"], name="relu"), inner,
                                helper.make_node("Add", ["y", "u"], ["r"], name="add")], "r")
    second_then = _branch("st", [helper.make_node("Sigmoid", ["x"], ["u"], name="sig"),
                                 helper.make_node("Neg", ["u"], ["v"], name="neg2")], "v")
    other = _branch("oe", [helper.make_node("Identity", ["x"], ["w"], name="w")], "w")
    graph = helper.make_graph(
        [helper.make_node("Not", ["off"], ["on"], name="not"),
         helper.make_node("If", ["on"], ["z1"], name="first", then_branch=first_then, else_branch=other),
         helper.make_node("If", ["on"], ["z2"], name="second", then_branch=second_then, else_branch=other),
         helper.make_node("Mul", ["z1", "z2"], ["out"], name="mul")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])],
        initializer=[numpy_helper.from_array(np.array(False), "off"), numpy_helper.from_array(np.array(False), "flag")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    inlined, done = inline_constant_ifs(proto)
    onnx.checker.check_model(inlined, full_check=True)
    assert [(d.node, d.branch) for d in done] == [("first", "then_branch"), ("inner", "else_branch"),
                                                  ("second", "then_branch")]
    assert "If" not in {n.op_type for n in inlined.graph.node}
    assert "second/u" in {t for n in inlined.graph.node for t in n.output}
    assert {"relu", "add", "sig", "neg2"} <= {n.name for n in inlined.graph.node}  # names kept where free
    x = {"x": np.array([-1.5, 2.0], np.float32)}
    np.testing.assert_array_equal(_run(proto, x)["out"], _run(inlined, x)["out"])


def _data_driven_vad() -> onnx.ModelProto:
    """voice_activity with ``sr`` a real input (no initializer): its If cannot be inlined."""
    proto = models.voice_activity()
    del proto.graph.initializer[[i.name for i in proto.graph.initializer].index("sr")]
    return proto


def _calibrated_int8(proto: onnx.ModelProto, extra: dict[str, np.ndarray] | None = None):
    model = model_from_proto(proto, label="voice_activity")
    stats = collect_statistics(model, lambda: [{**_feeds(4, s), **(extra or {})} for s in range(3)])
    table = table_from_statistics(stats, "minmax")
    return model, table, write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))


def test_inlined_branch_is_calibrated_written_and_recorded_in_provenance(tmp_path):
    onnx.save(models.voice_activity(), tmp_path / "vad.onnx")
    loaded = load_model(tmp_path / "vad.onnx")  # loading inlines (quantlab.graph.load)
    assert "If" not in {n.op_type for n in loaded.proto.graph.node}
    assert loaded.sha256 == sha256_file(tmp_path / "vad.onnx")  # tables still name the file as given
    inlined = loaded.proto
    _, table, written = _calibrated_int8(inlined)
    assert {"mm_16k", "pre_16k", "enc"} <= set(table.ranges)  # enc_16k computes under the If output name
    dq_of = {n.input[0] for n in written.proto.graph.node if n.op_type == "DequantizeLinear"}
    assert any(t.startswith("w_16k") for t in dq_of)  # the branch weight is quantized
    assert any("by_sample_rate" in n and "then_branch inlined" in n for n in written.provenance.notes)
    feeds = _feeds(2, 7)
    got, want = _run(written.proto, feeds), _run(inlined, feeds)
    assert np.abs(got["prob"] - want["prob"]).max() < 0.05  # INT8 error on a probability, not a wrong branch


def test_written_models_with_and_without_inlining_build_with_tensorrt_rtx():
    """Loading inlines the constant If; with ``sr`` fed by the data the If stays, its tensors float."""
    backend = _rtx()
    from quantlab.shapes import ShapeLog, profiles_from_data

    log = ShapeLog()
    for s, batch in enumerate((4, 4, 2)):
        log.observe(_feeds(batch, s))
    shapes = profiles_from_data({"input": (-1, 64), "state": (2, -1, 128)}, log)
    assert shapes["state"].as_lists() == [[2, 2, 128], [2, 4, 128], [2, 4, 128]]  # axis 1 not the batch: data's range
    per_input = profiles_from_data({"input": (-1, 64), "state": (2, -1, 128)}, log, {"input": 0, "state": 1})
    assert per_input["state"].min == (2, 1, 128) and per_input["input"].min == (1, 64)
    _, table, inlined = _calibrated_int8(models.voice_activity())  # model_from_proto inlines the If
    assert "mm_16k" in table.ranges and "If" not in {n.op_type for n in inlined.proto.graph.node}
    sr = {"sr": np.array(16000, np.int64)}
    _, table, kept = _calibrated_int8(_data_driven_vad(), sr)
    assert "mm_16k" not in table.ranges and "If" in {n.op_type for n in kept.proto.graph.node}
    assert any("6 tensor(s) left in float" in n for n in kept.provenance.notes)
    for written in (inlined, kept):
        engine = backend.build_engine(written.proto, shapes=shapes, label="voice_activity")
        assert len(engine) > 10_000


def test_static_loop_is_unrolled_calibrated_and_builds_with_tensorrt_rtx():
    proto = models.refinement_loop(trips=3)
    out, done = resolve_static_control_flow(proto)
    onnx.checker.check_model(out, full_check=True)
    assert [(d.node, d.trips) for d in done] == [("refine", 3)]
    assert "Loop" not in {n.op_type for n in out.graph.node}
    x = {"input": np.random.default_rng(1).normal(0, 1, (2, 16)).astype(np.float32)}
    before, after = _run(proto, x), _run(out, x)
    for name in ("refined", "steps"):
        np.testing.assert_allclose(after[name], before[name], rtol=1e-6, atol=1e-6)
    model = model_from_proto(out, label="refinement_loop")
    stats = collect_statistics(model, lambda: [{"input": np.random.default_rng(s).normal(0, 1, (4, 16))
                                                .astype(np.float32)} for s in range(2)])
    table = table_from_statistics(stats, "minmax")
    assert {f"refine/{i}/pre" for i in range(3)} <= set(table.ranges)  # every iteration calibrated
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    assert any("trip count 3 (static), unrolled" in n for n in written.provenance.notes)
    backend = _rtx()
    assert len(backend.build_engine(written.proto, shapes=_batch_range("input", 16),
                                    label="refinement_loop")) > 10_000


def test_loops_the_data_drives_or_too_long_stay_float_with_the_reason():
    long_loop = models.refinement_loop(trips=100)
    out, done = resolve_static_control_flow(long_loop)
    assert done == () and out is long_loop
    left = float_subgraph_tensors(out)
    assert set(left) == {"mixed", "pre", "h_out", "step"}  # not the bool continue condition
    assert "trip count 100 is above the unrolling limit 64" in left["pre"]
    by_data = models.refinement_loop()
    shape = helper.make_node("Shape", ["input"], ["in_shape"], name="in_shape", start=0, end=1)
    squeeze = helper.make_node("Squeeze", ["in_shape"], ["batch_trips"], name="batch_trips")
    by_data.graph.node.insert(0, squeeze)
    by_data.graph.node.insert(0, shape)
    by_data.graph.node[3].input[0] = "batch_trips"
    assert resolve_static_control_flow(by_data)[1] == ()
    assert "trip count set by the data" in float_subgraph_tensors(by_data)["pre"]
    assert any(n.startswith("4 tensor(s) left in float, inside the body of Loop 'refine'")
               for n in control_flow_notes(by_data))


def _rtx():
    trt = pytest.importorskip("quantlab.backends.tensorrt")
    try:
        return trt.TensorRTBackend("tensorrt-rtx")
    except Exception as exc:  # noqa: BLE001 - any missing piece of TensorRT-RTX: skip, saying why
        pytest.skip(f"TensorRT-RTX is not usable here: {exc}")


def _batch_range(name: str, width: int):
    from quantlab.shapes import parse_shapes

    return parse_shapes(f"{name}:1x{width},4x{width},8x{width}")


def test_bind_inlines_the_if_a_data_fed_input_decides_through_the_cli(tmp_path, capfd):
    """Silero's case: ``sr`` is a real input the data always feeds 16000. ``--bind sr=16000`` on calibrate,
    build and compare makes it a constant, so the If is inlined and its 16 kHz branch calibrated, written
    INT8 and compared; the model hash covers the binding; a bad --bind is one clear error."""
    import json

    from quantlab.cli import main

    free = models.voice_activity()
    del free.graph.initializer[[i.name for i in free.graph.initializer].index("sr")]
    onnx.save(free, tmp_path / "vad.onnx")
    assert "If" in {n.op_type for n in load_model(tmp_path / "vad.onnx").proto.graph.node}
    bound = load_model(tmp_path / "vad.onnx", bind={"sr": 16000})
    assert "If" not in {n.op_type for n in bound.proto.graph.node} and "sr" not in bound.input_names
    assert bound.sha256 != sha256_file(tmp_path / "vad.onnx")
    rng = np.random.default_rng(0)
    folder = tmp_path / "chunks"
    folder.mkdir()
    for i in range(6):
        np.savez(folder / f"c{i}.npz", input=rng.normal(size=64).astype(np.float32),
                 state=rng.normal(0, 0.5, (2, 128)).astype(np.float32))
    (tmp_path / "set.toml").write_text('shuffle = false\n[source]\nkind = "npz"\npath = "chunks"\n[inputs]\n'
                                       'input = "input"\nstate = { field = "state", batch_axis = 1 }\n')
    capfd.readouterr()
    assert main(["calibrate", str(tmp_path / "vad.onnx"), "--calib", str(tmp_path / "set.toml"), "--bind",
                 "sr=16000", "--method", "minmax", "--no-progress", "--out", str(tmp_path / "cal")]) == 0
    table = json.loads((tmp_path / "cal" / "calib_minmax.json").read_text())
    assert "mm_16k" in table["tensors"] and "mm_8k" not in table["tensors"]
    assert table["calib_set"]["bind"] == {"sr": 16000}
    capfd.readouterr()  # building without the --bind: the error says which one the table needs
    assert main(["build", str(tmp_path / "vad.onnx"), "--table", str(tmp_path / "cal" / "calib_minmax.json"),
                 "--precision", "int8", "--out", str(tmp_path / "unbound")]) == 2
    assert "calibrated on it with --bind sr=16000 (none here)" in capfd.readouterr().err
    assert not (tmp_path / "unbound").exists()
    assert main(["build", str(tmp_path / "vad.onnx"), "--bind", "sr=16000", "--table",
                 str(tmp_path / "cal" / "calib_minmax.json"), "--precision", "int8", "--out", str(tmp_path / "b")]) == 0
    prov = json.loads((tmp_path / "b" / "provenance.json").read_text())
    assert any("'sr' bound to 16000" in n for n in prov["notes"])
    written = onnx.load(tmp_path / "b" / "model.onnx")
    assert any(n.op_type == "DequantizeLinear" and n.input[0].startswith("w_16k") for n in written.graph.node)
    capfd.readouterr()
    assert main(["compare", str(tmp_path / "vad.onnx"), str(tmp_path / "b"), "--bind", "sr=16000", "--data",
                 str(tmp_path / "set.toml"), "--no-progress", "--out", str(tmp_path / "cmp")]) == 0
    capfd.readouterr()
    assert main(["calibrate", str(tmp_path / "vad.onnx"), "--calib", str(tmp_path / "set.toml"), "--bind",
                 "rate=16000", "--no-progress", "--out", str(tmp_path / "bad")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot bind 'rate'" in err[0] and "sr" in err[0]


def test_experiment_bind_reaches_the_run_and_bad_values_name_the_key(tmp_path):
    """``[model] bind = { sr = 16000 }``: quantlab run calibrates and writes the inlined 16 kHz branch."""
    import json

    from quantlab.errors import ExperimentError
    from quantlab.experiment import load_experiment, run_experiment

    free = models.voice_activity()
    del free.graph.initializer[[i.name for i in free.graph.initializer].index("sr")]
    onnx.save(free, tmp_path / "vad.onnx")
    rng = np.random.default_rng(1)
    for role in ("calibration", "validation"):
        folder = tmp_path / role
        folder.mkdir()
        for i in range(6):
            np.savez(folder / f"c{i}.npz", input=rng.normal(size=64).astype(np.float32),
                     state=rng.normal(0, 0.5, (2, 128)).astype(np.float32))
        (tmp_path / f"{role}.toml").write_text(
            f'role = "{role}"\nshuffle = false\n[source]\nkind = "npz"\npath = "{role}"\n[inputs]\n'
            'input = "input"\nstate = { field = "state", batch_axis = 1 }\n')
    text = ('name = "vad"\nthreshold = "cosine>=0.9"\n[model]\npath = "vad.onnx"\n{bind}\n[data]\n'
            'calibration = "calibration.toml"\nvalidation = "validation.toml"\n[calibrate]\nmethods = ["minmax"]\n'
            '[candidates]\nfp16 = false\n[search]\nenabled = false\n')
    (tmp_path / "vad.toml").write_text(text.format(bind="bind = { sr = 16000 }"))
    config = load_experiment(tmp_path / "vad.toml")
    assert config.bind == (("sr", 16000),)
    run_experiment(config, reports_dir=tmp_path / "reports")
    table = json.loads(next((tmp_path / "reports").rglob("table-minmax.json")).read_text())
    assert "mm_16k" in table["tensors"]
    (tmp_path / "bad.toml").write_text(text.format(bind='bind = { sr = "16k" }'))
    with pytest.raises(ExperimentError, match=r"bind.*bind = \{ sr = 16000 \}"):
        load_experiment(tmp_path / "bad.toml")


def _vad_with_sr_fed(tmp_path, rates: list[int]):
    """The voice-activity model with ``sr`` a real input, and a data set feeding it (no batch axis)."""
    import quantlab as ql

    free = models.voice_activity()
    del free.graph.initializer[[i.name for i in free.graph.initializer].index("sr")]
    onnx.save(free, tmp_path / "vad.onnx")
    rng = np.random.default_rng(0)
    folder = tmp_path / "chunks"
    folder.mkdir()
    for i, rate in enumerate(rates):
        np.savez(folder / f"c{i}.npz", input=rng.normal(size=64).astype(np.float32),
                 state=rng.normal(0, 0.5, (2, 128)).astype(np.float32), sr=np.array(rate, np.int64))
    (tmp_path / "set.toml").write_text('shuffle = false\n[source]\nkind = "npz"\npath = "chunks"\n[inputs]\n'
                                       'input = "input"\nstate = { field = "state", batch_axis = 1 }\n'
                                       'sr = { field = "sr", batch_axis = "none" }\n')
    return load_model(tmp_path / "vad.onnx"), ql.open_dataset(tmp_path / "set.toml")


def test_an_if_the_data_always_decides_alike_gets_a_bind_hint_in_the_tables(tmp_path):
    """Without --bind, the If on ``sr == 16000`` stays (its branch in float); the data fed 16000 every
    time, so every table says which --bind would inline it, and that bind does."""
    from quantlab.calibrate import calibrate
    from quantlab.controlflow import bind_hints, deciding_inputs

    model, data = _vad_with_sr_fed(tmp_path, [16000] * 4)
    assert deciding_inputs(model.proto) == {"sr": ("If 'by_sample_rate'",)}
    result = calibrate(model, data, ["minmax", "entropy"], batch_size=2)
    for table in result.tables.values():
        hints = [n for n in table.notes if "--bind sr=16000" in n]
        assert len(hints) == 1 and "If 'by_sample_rate'" in hints[0] and "all 4 calibration samples" in hints[0]
    bound = load_model(tmp_path / "vad.onnx", bind={"sr": 16000})
    assert deciding_inputs(bound.proto) == {} and not bind_hints(bound.proto, {"sr": 16000}, 4)
    # an input that is not constant, or an If also decided by another input, gets no hint
    assert bind_hints(model.proto, {}, 4) == ()
    assert bind_hints(model.proto, {"state": 0.0}, 4) == ()


def test_no_bind_hint_when_the_data_feeds_several_values(tmp_path):
    from quantlab.calibrate import calibrate

    model, data = _vad_with_sr_fed(tmp_path, [16000, 16000, 8000, 8000])
    result = calibrate(model, data, "minmax", batch_size=2)
    assert not any("--bind" in n for n in result.tables["minmax"].notes)


def test_a_loop_whose_trip_count_is_an_input_gets_an_unroll_hint():
    """``trips`` made a graph input (a model that takes its step count): the Loop stays, and binding
    the count the data always fed resolves it (it is then unrolled)."""
    from quantlab.controlflow import bind_hints, deciding_inputs
    from quantlab.graph import model_from_proto

    proto = models.refinement_loop(trips=3)
    del proto.graph.initializer[[i.name for i in proto.graph.initializer].index("trips")]
    proto.graph.input.append(onnx.helper.make_tensor_value_info("trips", onnx.TensorProto.INT64, []))
    model = model_from_proto(proto)
    assert "Loop" in {n.op_type for n in model.proto.graph.node}
    assert deciding_inputs(model.proto) == {"trips": ("Loop 'refine'",)}
    (hint,) = bind_hints(model.proto, {"trips": 3}, 10)
    assert "--bind trips=3" in hint and "unrolled" in hint and "bind = { trips = 3 }" in hint
    bound = model_from_proto(bind_inputs(proto, {"trips": np.array(3, np.int64)}))
    assert "Loop" not in {n.op_type for n in bound.proto.graph.node}


def test_the_cli_prints_the_bind_hint_once_for_all_methods(tmp_path, capfd):
    from quantlab.cli import main

    _vad_with_sr_fed(tmp_path, [16000] * 4)
    capfd.readouterr()
    assert main(["calibrate", str(tmp_path / "vad.onnx"), "--calib", str(tmp_path / "set.toml"), "--method", "all",
                 "--no-progress", "--out", str(tmp_path / "cal")]) == 0
    out = capfd.readouterr().out
    assert out.count("--bind sr=16000") == 1


def _layers_inside_an_if(tmp_path):
    """Every layer inside an ``If`` on a data input, as optimum's merged decoders are (``use_cache_branch``)."""
    import quantlab as ql

    rng = np.random.default_rng(1)

    def branch(tag: str) -> onnx.GraphProto:
        w = numpy_helper.from_array(rng.normal(0, 0.3, (4, 6)).astype(np.float32))
        return helper.make_graph([helper.make_node("Constant", [], [f"w_{tag}"], name=f"w_{tag}", value=w),
                                  helper.make_node("MatMul", ["x", f"w_{tag}"], [f"y_{tag}"], name=f"mm_{tag}")],
                                 tag, [], [helper.make_tensor_value_info(f"y_{tag}", TensorProto.FLOAT, ["N", 6])])

    graph = helper.make_graph(
        [helper.make_node("Equal", ["mode", "one"], ["cached"], name="cached"),
         helper.make_node("If", ["cached"], ["y"], name="use_cache", then_branch=branch("with"),
                          else_branch=branch("without"))], "merged",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("mode", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
        [numpy_helper.from_array(np.array(1, np.int64), "one")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, tmp_path / "merged.onnx")
    folder = tmp_path / "rows"
    folder.mkdir()
    for i in range(6):
        np.savez(folder / f"r{i}.npz", x=rng.normal(size=4).astype(np.float32), mode=np.array(1, np.int64))
    (tmp_path / "rows.toml").write_text('shuffle = false\n[source]\nkind = "npz"\npath = "rows"\n[inputs]\n'
                                        'x = "x"\nmode = { field = "mode", batch_axis = "none" }\n')
    return ql.open_dataset(tmp_path / "rows.toml")


def test_int8_candidates_with_no_qdq_get_a_warning_naming_the_input_to_bind(tmp_path):
    """An optimum-style merged decoder keeps every layer inside an If on a data input: without a bind the INT8
    candidates hold no Q/DQ, compute in float32, and passed at sqnr_db = inf without a word. quantlab run now
    says so and names the input to bind; bound, the branch is inlined and quantized, and nothing is said."""
    from quantlab.calibrate import calibrate
    from quantlab.experiment import parse_experiment
    from quantlab.experiment.stages import float_candidates_note
    from quantlab.plan import uniform_plan
    from quantlab.quantize import WriteOptions, write_model

    data = _layers_inside_an_if(tmp_path)
    model = load_model(tmp_path / "merged.onnx")
    config = parse_experiment('[model]\npath = "merged.onnx"\n[data]\ncalibration = "rows.toml"\n'
                              'validation = "rows.toml"\n[candidates]\nint8 = ["minmax"]\n', source=tmp_path / "e.toml")
    table = calibrate(model, data, "minmax", batch_size=2).tables["minmax"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    note = float_candidates_note(model, {"int8-minmax": written}, config)
    assert note is not None and note.startswith("WARNING int8-minmax: no tensor got a Q/DQ or float16")
    assert "'mode' decides If 'use_cache'" in note and "bind = { NAME = VALUE }" in note
    from quantlab.experiment.stages import simulated_candidates

    fp16 = write_model(model, uniform_plan("fp16"), None, WriteOptions(target="tensorrt"))
    assert simulated_candidates({"fp16": fp16}, config) == ["fp16"]  # its branches compute in float16
    bound = load_model(tmp_path / "merged.onnx", bind={"mode": 1})
    assert not [n for n in bound.proto.graph.node if n.op_type == "If"] and bound.bound == ("mode",)
    from quantlab.errors import InputMismatchError

    with pytest.raises(InputMismatchError, match=r"gives input 'mode', which is bound .*Leave it out of the data set"):
        calibrate(bound, data, "minmax", batch_size=2)
    (tmp_path / "rows_bound.toml").write_text((tmp_path / "rows.toml").read_text().replace(
        'mode = { field = "mode", batch_axis = "none" }\n', ""))
    import quantlab as ql

    bound_table = calibrate(bound, ql.open_dataset(tmp_path / "rows_bound.toml"), "minmax").tables["minmax"]
    quantized = write_model(bound, uniform_plan("int8"), bound_table, WriteOptions(target="tensorrt"))
    assert float_candidates_note(bound, {"int8-minmax": quantized}, config) is None


def test_a_boolean_input_binds_to_true_or_false(tmp_path):
    """optimum's use_cache_branch is a bool: --bind use_cache_branch=true and bind = { use_cache_branch = true }
    were refused as 'not a number'."""
    from quantlab.cli import bind_arg
    from quantlab.experiment import parse_experiment

    assert bind_arg("use_cache_branch=true") == ("use_cache_branch", True)
    assert bind_arg("use_cache_branch=false") == ("use_cache_branch", False)
    for name in ("m.onnx", "c.toml", "v.toml"):
        (tmp_path / name).write_text("x")
    config = parse_experiment('[model]\npath = "m.onnx"\nbind = { use_cache_branch = true }\n[data]\n'
                              'calibration = "c.toml"\nvalidation = "v.toml"\n', source=tmp_path / "e.toml")
    assert dict(config.bind) == {"use_cache_branch": True}


def test_a_truncated_batch_cuts_each_input_on_its_own_batch_axis(tmp_path):
    """compare with max_samples cut the last batch on axis 0 of every input: an LSTM's state [2, N, H] became
    [1, N, H]... and the run stopped ('a batch must hold 1 samples on axis 0 of every input'). The search's
    bias-correction check evaluates the first samples so, and LSTM/GRU experiments failed."""
    from quantlab.calibrate import calibrate
    from quantlab.compare import CompareOptions, compare
    from quantlab.plan import uniform_plan
    from quantlab.quantize import WriteOptions, write_model

    model, data = _vad_with_sr_fed(tmp_path, [16000] * 5)
    table = calibrate(model, data, "minmax", batch_size=2).tables["minmax"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    whole = compare(model, {"int8": written}, data.select([0, 1, 2]), CompareOptions(batch_size=2, bootstrap=0,
                                                                                      per_layer=False))
    cut = compare(model, {"int8": written}, data, CompareOptions(batch_size=2, max_samples=3, per_layer=False,
                                                                 bootstrap=0))
    assert cut.end_to_end["samples"].tolist() == whole.end_to_end["samples"].tolist() == [3, 3]
    np.testing.assert_allclose(cut.end_to_end["sqnr_db"], whole.end_to_end["sqnr_db"], rtol=1e-9)


def _run_merged(tmp_path, capsys, extra: str = "", folder: str = "r") -> tuple[int, str]:
    """``quantlab run --fail-on-verdict`` of the merged model of :func:`_layers_inside_an_if` (minmax INT8 and FP16,
    sqnr_db >= 25); ``extra``: more ``[candidates]`` lines. (exit code, what it printed)."""
    from quantlab.cli import main

    if not (tmp_path / "merged.onnx").exists():
        _layers_inside_an_if(tmp_path)
    (tmp_path / "e.toml").write_text('name = "merged"\nthreshold = "sqnr_db>=25"\n[model]\npath = "merged.onnx"\n'
                                     '[data]\ncalibration = "rows.toml"\nvalidation = "rows.toml"\n'
                                     '[calibrate]\nmethods = ["minmax"]\n[candidates]\nint8 = ["minmax"]\n'
                                     f'{extra}[search]\nenabled = false\n[report]\ncoverage = false\n')
    code = main(["run", str(tmp_path / "e.toml"), "--reports-dir", str(tmp_path / folder), "--quiet",
                 "--fail-on-verdict"])
    return code, capsys.readouterr().out


def test_run_with_every_layer_inside_an_if_judges_only_what_computes_in_int8_or_fp16(tmp_path, capsys):
    """Without a bind (and without ``int8_bodies``) the INT8 candidate computes in float32: the run said 'PASS ...
    sqnr_db = inf' of it. It now names it in a WARNING with the input to bind and leaves it out of the verdict; the
    FP16 candidate, whose branches compute in float16, is judged (it too was called float32, its float16 being
    inside the If)."""
    code, out = _run_merged(tmp_path, capsys)
    assert code == 0, out
    assert "verdict: PASS: fp16: sqnr_db = " in out
    assert "WARNING int8-minmax: no tensor got a Q/DQ or float16" in out and "'mode' decides" in out
    code, out = _run_merged(tmp_path, capsys, "fp16 = false\n", "r2")  # INT8 alone: no verdict, the gate fails
    assert code == 1, out
    assert "verdict: NONE: no candidate computes in INT8 or FP16, so 'sqnr_db>=25' was not checked" in out


def test_run_with_int8_bodies_measures_the_branches_and_has_a_verdict(tmp_path, capsys):
    """The same merged model with ``int8_bodies = true``: the branch the data takes is calibrated and written INT8,
    and the run judges it (it said NONE, seeing no Q/DQ in the main graph)."""
    code, out = _run_merged(tmp_path, capsys, "int8_bodies = true\nfp16 = false\n")
    assert code == 0, out
    assert "verdict: PASS: int8-minmax" in out and "no tensor got a Q/DQ or float16" not in out
    assert "INT8 inside control flow ([candidates] int8_bodies): the bodies of 'use_cache'" in out


def test_compute_left_float_in_a_loop_body_is_counted_and_the_run_warns_of_it(tmp_path):
    """A scripted RNN kept 4 of its 6 MatMuls (96 % of the MACs) in a Scan body: the run said "PASS: int8-entropy"
    with no word that INT8 covered 4 % of the model. The note counts the layers left float and warns when they are
    at least half; an unrolled loop leaves none."""
    from quantlab.controlflow import compute_layers_in_bodies, compute_layers_outside
    from quantlab.experiment.spec import parse_experiment
    from quantlab.experiment.stages import float_bodies_note

    long_loop = model_from_proto(models.refinement_loop(trips=100), label="loop")
    assert compute_layers_in_bodies(long_loop.proto) == {"Loop 'refine'": 1}
    assert compute_layers_outside(long_loop.proto) == 0
    for name in ("m.onnx", "rows.toml"):
        (tmp_path / name).write_text("")  # the configuration only checks they exist
    toml = ('[model]\npath = "m.onnx"\n[data]\ncalibration = "rows.toml"\nvalidation = "rows.toml"\n'
            '[candidates]\nint8 = ["minmax"]\n')
    note = float_bodies_note(long_loop, parse_experiment(toml, source=tmp_path / "e.toml"))
    assert note is not None and note.startswith("WARNING 1 of 1 Conv/MatMul/Gemm layers sit inside control-flow")
    assert "Loop 'refine' (1)" in note
    config = parse_experiment(toml, source=tmp_path / "e.toml")
    assert float_bodies_note(long_loop, dataclasses.replace(config, int8=(), fp16=True)) is None  # nothing INT8
    unrolled = model_from_proto(models.refinement_loop(), label="unrolled")  # a static trip count: unrolled at load
    assert compute_layers_in_bodies(unrolled.proto) == {}
    assert float_bodies_note(unrolled, parse_experiment(toml, source=tmp_path / "e.toml")) is None


@pytest.mark.parametrize("form", ["gather", "slice"])
def test_a_loop_over_a_fixed_axis_of_the_input_is_unrolled(form):
    """torch.jit.script writes ``for t in range(x.shape[1])`` as a Loop whose trip count is Gather(Shape(x), 1)
    (or Shape with start/end): over an axis the model fixes, that is a static trip count, whatever the batch
    dim (it had been left float: "trip count set by the data")."""
    proto = models.refinement_loop(trips=16)  # input [N, 16]: axis 1 is fixed
    if form == "slice":
        shape = helper.make_node("Shape", ["input"], ["in_shape"], name="in_shape", start=1, end=2)
        pick = helper.make_node("Squeeze", ["in_shape"], ["width_trips"], name="width_trips")
    else:
        proto.graph.initializer.append(numpy_helper.from_array(np.array(1, np.int64), "axis_one"))
        shape = helper.make_node("Shape", ["input"], ["in_shape"], name="in_shape")
        pick = helper.make_node("Gather", ["in_shape", "axis_one"], ["width_trips"], name="width_trips", axis=0)
    proto.graph.node.insert(0, pick)
    proto.graph.node.insert(0, shape)
    loop = next(n for n in proto.graph.node if n.op_type == "Loop")
    loop.input[0] = "width_trips"
    out, done = resolve_static_control_flow(proto)
    assert [d.note() for d in done] and "16" in done[0].note()
    assert not any(n.op_type == "Loop" for n in out.graph.node)
    feeds = {"input": np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)}
    for name, value in _run(proto, feeds).items():
        np.testing.assert_allclose(_run(out, feeds)[name], value, rtol=1e-6, atol=1e-6)
    by_batch = models.refinement_loop()  # the batch axis is symbolic: the data decides, as before
    by_batch.graph.node.insert(0, helper.make_node("Squeeze", ["n_shape"], ["n_trips"], name="n_trips"))
    by_batch.graph.node.insert(0, helper.make_node("Shape", ["input"], ["n_shape"], name="n_shape", start=0, end=1))
    next(n for n in by_batch.graph.node if n.op_type == "Loop").input[0] = "n_trips"
    assert resolve_static_control_flow(by_batch)[1] == ()


def test_a_loop_continuing_on_an_outer_constant_is_unrolled_with_torch_style_names():
    """torch.jit.script's for-loop continues on ``Identity(<a Constant true of the main graph>)``: the body's
    condition folds only with the outer scope's constants (it had stayed a loop, its body float: "the body's
    continue condition depends on the data", even with ``--bind steps=12``). torch's names start with a slash:
    the copies read ``/Loop/0/mix``, not ``/Loop/0//mix``."""
    proto = models.refinement_loop(trips=4)
    loop = next(n for n in proto.graph.node if n.op_type == "Loop")
    body = next(a.g for a in loop.attribute if a.name == "body")
    keep = next(n for n in body.node if n.name == "keep_going")
    keep.input[0] = "/Constant_1_output_0"  # outer scope, as torch writes it
    proto.graph.node.insert(0, helper.make_node("Constant", [], ["/Constant_1_output_0"], name="/Constant_1",
                                                value=numpy_helper.from_array(np.array(True))))
    for n in body.node:
        n.output[:] = [f"/{o}" if o not in ("cond_out", "h_out", "step") else o for o in n.output]
        n.input[:] = [f"/{i}" if i in ("mixed", "pre", "w_step") else i for i in n.input]
        n.name = f"/{n.name}"
    loop.name = "/Loop"
    out, done = resolve_static_control_flow(proto)
    assert [d.note() for d in done] == ["Loop '/Loop': trip count 4 (static), unrolled into 4 copies of its body "
                                        "before statistics and writing"]
    names = {o for n in out.graph.node for o in n.output}
    assert "/Loop/0/mixed" in names and "/Loop/3/pre" in names and not any("//" in t for t in names)
    onnx.checker.check_model(out, full_check=True)
    feeds = {"input": np.random.default_rng(1).normal(size=(2, 16)).astype(np.float32)}
    for name, value in _run(proto, feeds).items():
        np.testing.assert_allclose(_run(out, feeds)[name], value, rtol=1e-6, atol=1e-6)


def test_a_scripted_while_loop_gets_the_trip_limit_its_counter_sets_and_builds_with_tensorrt_rtx():
    """torch's ``while i < 5 and not done``: trip count INT64_MAX, the ``and`` an If on ``i + 1 < 5``. The data
    decides the loop (not unrolled), but its counter stops it by step 5 whatever the data: that is its trip limit
    now (the same outputs), and with its list a scan output TensorRT-RTX builds it (it refused: "cannot infer the
    shape of scan output ... since no trip limit was set", and before that: sequence ops)."""
    from quantlab.folding import ConstantFolder
    from quantlab.loops import trip_bound

    proto = models.scripted_while_loop(limit=5)
    out, done = resolve_static_control_flow(proto)
    notes = [d.note() for d in done]
    assert any(n.startswith("Loop '/Loop': the list its body appends 'h_out' to each step is a scan output")
               for n in notes)
    assert "Loop '/Loop': its condition stops it within 5 steps whatever the data (a counter it carries), so its " \
           "trip limit is set to 5 (TensorRT sizes scan outputs from it; the same outputs)" in notes
    onnx.checker.check_model(out, full_check=True)
    x = {"x": np.random.default_rng(3).normal(0, 1, (3, 4)).astype(np.float32)}
    before, after = _run(proto, x), _run(out, x)
    assert before["out"].shape == (3, 5, 4)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    assert len(_rtx().build_engine(out, shapes=_batch_range("x", 4), label="scripted while loop")) > 10_000
    # no counter, no bound: a loop the data alone stops keeps its trip count
    unbounded = models.scripted_while_loop(limit=5)
    body = next(a.g for a in next(n for n in unbounded.graph.node if n.op_type == "Loop").attribute)
    next(n for n in body.node if n.name == "/count").input[1] = "h_in_sum"  # the counter now follows the data
    body.node.insert(0, helper.make_node("ReduceSum", ["h_in"], ["h_in_sum_f"], name="/sum", keepdims=0))
    body.node.insert(1, helper.make_node("Cast", ["h_in_sum_f"], ["h_in_sum"], name="/sum_int", to=TensorProto.INT64))
    loop = next(n for n in unbounded.graph.node if n.op_type == "Loop")
    assert trip_bound(loop, ConstantFolder(unbounded.graph, unbounded), unbounded) is None


def test_tensors_of_a_loop_nested_in_a_loop_left_a_loop_are_named():
    """An RNN-T's symbol loop inside its frame loop holds every Gemm; the frame loop's trip count comes from the
    data, so both stay loops and float. The inner body's tensors were never named: 'int8 on 100 %' and a note
    on the outer body's three tensors only."""
    rng = np.random.default_rng(0)
    inner = helper.make_graph(
        [helper.make_node("Identity", ["c_i"], ["c_o"], name="keep_inner"),
         helper.make_node("MatMul", ["h_i", "w"], ["mixed"], name="mix"),
         helper.make_node("Tanh", ["mixed"], ["h_o"], name="tanh")], "symbols",
        [helper.make_tensor_value_info("k", TensorProto.INT64, []), helper.make_tensor_value_info("c_i", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_i", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("c_o", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_o", TensorProto.FLOAT, ["N", 4])])
    outer = helper.make_graph(
        [helper.make_node("Identity", ["c_j"], ["c_p"], name="keep_outer"),
         helper.make_node("Loop", ["three", "", "g_j"], ["g_p"], name="symbol_loop", body=inner)], "frames",
        [helper.make_tensor_value_info("j", TensorProto.INT64, []), helper.make_tensor_value_info("c_j", TensorProto.BOOL, []),
         helper.make_tensor_value_info("g_j", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("c_p", TensorProto.BOOL, []),
         helper.make_tensor_value_info("g_p", TensorProto.FLOAT, ["N", 4])])
    nodes = [helper.make_node("Shape", ["x"], ["n"], name="n", start=0, end=1),
             helper.make_node("Squeeze", ["n"], ["frames"], name="frames"),
             helper.make_node("Loop", ["frames", "", "x"], ["y"], name="frame_loop", body=outer)]
    graph = helper.make_graph(nodes, "nested", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(np.array(3, np.int64), "three"),
                               numpy_helper.from_array(rng.normal(0, 0.5, (4, 4)).astype(np.float32), "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto, full_check=True)
    left = float_subgraph_tensors(proto)
    assert left["mixed"] == ("inside Loop 'symbol_loop', nested inside the body of Loop 'frame_loop', not "
                             "unrolled: trip count set by the data")
    assert {"mixed", "h_o", "g_p"} <= set(left)
    assert any(n.startswith("2 tensor(s) left in float, inside Loop 'symbol_loop', nested inside the body of Loop "
                            "'frame_loop'") for n in control_flow_notes(proto))


def test_values_a_loop_carries_unchanged_are_read_from_outside_it():
    """paddle2onnx carries a loop's weights through it (SLANet: 16 of 23 carried values): they were calibrated
    as activations and listed among the widest tensors. Hoisted, the loop computes the same outputs (its final
    weight is still an output and still read after the loop), and only real activations are calibrated."""
    proto = models.loop_carrying_weights()
    out, done = resolve_static_control_flow(proto)
    onnx.checker.check_model(out, full_check=True)
    assert [(d.node, d.names) for d in done] == [("refine", ("w", "b"))]
    loop = next(n for n in out.graph.node if n.op_type == "Loop")
    assert list(loop.input[2:]) == ["h0"] and list(loop.output) == ["refined", "steps"]
    x = {"input": np.random.default_rng(2).normal(0, 1, (3, 16)).astype(np.float32)}
    before, after = _run(proto, x), _run(out, x)
    assert before["steps"].shape[0] > 1  # the loop ran more than once
    for name in ("head", "w_final", "steps"):
        np.testing.assert_array_equal(after[name], before[name])
    model = model_from_proto(proto, label="loop_carrying_weights")  # loading hoists too
    assert "b_final" not in activation_names(model.proto)  # w_final: the Identity of w that keeps the output
    assert any("2 carried value(s) its body passes through unchanged (w, b" in n for n in control_flow_notes(model.proto))


def test_a_while_loop_whose_and_tests_the_data_first_gets_its_counters_trip_limit():
    """torch writes ``while not done and i < 5`` as If(not done, then: i < 5, else: False): the If's condition is
    the data's, so the bound was missed (trip count 2**63-1; TensorRT-RTX: "no trip limit was set"). Both branches
    stop the loop by step 5, so that is its limit."""
    from quantlab.folding import ConstantFolder
    from quantlab.loops import trip_bound

    proto = models.scripted_while_loop(limit=5)
    loop = next(n for n in proto.graph.node if n.op_type == "Loop")
    body = next(a.g for a in loop.attribute if a.name == "body")
    gate = next(n for n in body.node if n.op_type == "If")
    bool_out = [helper.make_tensor_value_info("/go_on", TensorProto.BOOL, [])]
    data_first = helper.make_node(
        "If", ["/alive"], ["cond_out"], name="/and",
        then_branch=helper.make_graph([helper.make_node("Less", ["i_out", "/limit"], ["/go_on"], name="/below")],
                                      "then", [], bool_out),
        else_branch=helper.make_graph([helper.make_node("Identity", ["/false"], ["/go_on"], name="/stop")],
                                      "else", [], bool_out))
    kept = [n for n in body.node if n.name not in ("/below", "/and")]
    del body.node[:]
    body.node.extend(kept[:3] + [helper.make_node("ReduceMax", ["h_out"], ["/top"], name="/top", keepdims=0),
                                 helper.make_node("Less", ["/top", "floor"], ["/sunk"], name="/sunk"),
                                 helper.make_node("Not", ["/sunk"], ["/alive"], name="/alive"),
                                 data_first] + kept[3:])
    assert gate.op_type == "If"
    onnx.checker.check_model(proto)
    assert trip_bound(loop, ConstantFolder(proto.graph, proto), proto) == 5
    out, done = resolve_static_control_flow(proto)
    assert any("its condition stops it within 5 steps whatever the data" in d.note() for d in done)
    x = {"x": np.random.default_rng(3).normal(0, 1, (3, 4)).astype(np.float32)}
    for name, value in _run(proto, x).items():
        np.testing.assert_array_equal(_run(out, x)[name], value)

"""stats.bodies: Loop/Scan bodies calibrated step by step, checked against ONNX Runtime's own loop, and If branches as
the data takes them, checked against the branch inlined; their INT8 writing."""

from __future__ import annotations

import dataclasses
import json

import models
import numpy as np
import pandas as pd
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantlab.backends import get_backend
from quantlab.calibrate import calibrate
from quantlab.compare import CompareOptions, compare
from quantlab.data import from_arrays
from quantlab.graph import model_from_proto
from quantlab.histogram import DEFAULT_BINS, AbsHistogram
from quantlab.plan import PrecisionPlan, uniform_plan
from quantlab.quantize import WriteOptions, write_model
from quantlab.stats.bodies import calibrated_bodies, collect_body_statistics
from quantlab.table import read_table, write_table


def _sequences(n: int, seed: int, steps: int = 7, features: int = 6, width: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, steps, features)).astype(np.float32), "h0": np.zeros((n, width), np.float32)}


def _with_body_tensors_as_scan_outputs(proto: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """The same model whose Loop/Scan also returns ``tensors`` of every step, stacked (ONNX Runtime runs the loop)."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    node = next(n for n in proto.graph.node if n.op_type in ("Loop", "Scan"))
    body = next(a.g for a in node.attribute if a.name == "body")
    for t in tensors:
        body.node.append(helper.make_node("Identity", [t], [f"{t}_step"]))
        body.output.append(helper.make_tensor_value_info(f"{t}_step", TensorProto.FLOAT, None))
        node.output.append(f"{t}_stack")
        proto.graph.output.append(helper.make_tensor_value_info(f"{t}_stack", TensorProto.FLOAT, None))
    return proto


def _token_rnn_rank1() -> onnx.ModelProto:
    """token_rnn with the loop's condition a [1] tensor, as paddle2onnx writes it (SLANet)."""
    proto = models.token_rnn()
    go = next(i for i in proto.graph.initializer if i.name == "go")
    go.CopyFrom(numpy_helper.from_array(np.array([True]), "go"))
    body = next(a.g for n in proto.graph.node if n.op_type == "Loop" for a in n.attribute if a.name == "body")
    for vi in (body.input[1], body.output[0]):
        vi.type.tensor_type.shape.ClearField("dim")
        vi.type.tensor_type.shape.dim.add().dim_value = 1
    return proto


@pytest.mark.parametrize("build", [models.token_rnn, _token_rnn_rank1, models.scan_rnn,
                                   lambda: models.scan_rnn(reverse=True)],
                         ids=["loop", "loop-rank1-condition", "scan", "scan-backwards"])
def test_body_statistics_equal_those_of_the_steps_onnx_runtime_runs(build):
    """Every step's body tensors, as ONNX Runtime's own Loop/Scan computes them (returned as extra scan outputs),
    binned alike: the same counts, min and max to the bit."""
    proto = build()
    model = model_from_proto(proto)
    (body,) = calibrated_bodies(model)
    width = 12 if body.node.op_type == "Loop" else 10
    batches = [_sequences(4, seed, width=width) for seed in range(3)]
    states, notes = collect_body_statistics(model, batches, get_backend("ort"), 2048, 1e30)
    assert notes == ()
    produced = [t for t in body.tensors if t not in {i.name for i in body.model.graph.input}]
    assert "h_out" in produced and not any(t.startswith("w_") for t in body.tensors)  # weights are not activations
    import onnxruntime as ort

    session = ort.InferenceSession(_with_body_tensors_as_scan_outputs(proto, produced).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    expected = {t: AbsHistogram(2048, 1e30) for t in produced}
    for feeds in batches:
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
        for t in produced:
            for step in got[f"{t}_stack"]:
                expected[t].update(step)
    for t in produced:
        mine, theirs = states[body.owner][t], expected[t].state()
        assert (mine.count, mine.min, mine.max) == (theirs.count, theirs.min, theirs.max), t
        assert np.array_equal(mine.counts, theirs.counts), t


def _token_rnn_with_a_growing_trace() -> onnx.ModelProto:
    """token_rnn whose Loop also carries a trace that grows a column a step, its body input typed by the first step
    ([N, 0]), as torch's exporter types a token accumulator (``out = cat([out, tok])``)."""
    proto = models.token_rnn()
    loop = next(n for n in proto.graph.node if n.op_type == "Loop")
    body = next(a.g for a in loop.attribute if a.name == "body")
    body.input.append(helper.make_tensor_value_info("trace_in", TensorProto.FLOAT, ["N", 0]))
    body.node.extend([
        helper.make_node("Slice", ["h_out", "zero1", "one1", "one1"], ["h_first"], name="first_unit"),
        helper.make_node("Concat", ["trace_in", "h_first"], ["trace_out"], name="grow", axis=1)])
    body.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), "zero1"),
                             numpy_helper.from_array(np.array([1], np.int64), "one1")])
    body.output.insert(2, helper.make_tensor_value_info("trace_out", TensorProto.FLOAT, ["N", None]))
    proto.graph.node.insert(0, helper.make_node("Slice", ["h0", "zero0", "zero0", "one0"], ["trace0"], name="empty"))
    proto.graph.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), "zero0"),
                                    numpy_helper.from_array(np.array([1], np.int64), "one0")])
    loop.input.append("trace0")
    loop.output.append("trace")
    proto.graph.output.append(helper.make_tensor_value_info("trace", TensorProto.FLOAT, ["N", None]))
    onnx.checker.check_model(proto)
    return proto


def test_a_loop_carrying_a_value_that_grows_each_step_is_calibrated_and_written_int8(tmp_path):
    """A greedy decoder's body carries its tokens so far, typed [N, 0] by the export: the body model was built with
    that fixed size, refused the second step ([N, 1]) and the body stayed uncalibrated and float."""
    model = model_from_proto(_token_rnn_with_a_growing_trace())
    states, notes = collect_body_statistics(model, [_sequences(4, 0)], get_backend("ort"), 2048, 1e30)
    assert notes == ()
    assert {"h_out", "recurrent", "trace_in"} <= set(states["over_tokens"])
    table = calibrate(model, from_arrays(_sequences(16, 0)), "minmax", batch_size=8).tables["minmax"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt", int8_bodies=True))
    assert "QuantizeLinear" in _body_ops(written)
    result = compare(model, {"int8": written}, from_arrays(_sequences(8, 1), role="validation"),
                     CompareOptions(batch_size=8, per_layer=False, bootstrap=0))
    assert (result.end_to_end["sqnr_db"] > 25).all()


@pytest.fixture(scope="module")
def rnn_table():
    model = model_from_proto(models.token_rnn())
    return model, calibrate(model, from_arrays(_sequences(32, 0)), "minmax", batch_size=8).tables["minmax"]


def _body_ops(written) -> list[str]:
    loop = next(n for n in written.proto.graph.node if n.op_type == "Loop")
    return [n.op_type for n in next(a.g for a in loop.attribute if a.name == "body").node]


@pytest.mark.parametrize("target", ["tensorrt", "ort"])
def test_an_int8_plan_writes_the_calibrated_body_in_int8_and_it_stays_accurate(rnn_table, target, tmp_path):
    """The recurrent MatMul inside the Loop gets its Q/DQ (it had stayed float in every INT8 model); the table keeps
    the body's ranges through JSON; INT8 measured against FP32 on ONNX Runtime stays accurate."""
    model, table = rnn_table
    assert set(table.bodies["over_tokens"]) >= {"h_in", "recurrent", "h_out"}
    assert any("Loop/Scan step by step" in n for n in table.notes)
    write_table(table, tmp_path / "t.json")
    assert read_table(tmp_path / "t.json").bodies == table.bodies
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target=target, int8_bodies=True))
    assert "QuantizeLinear" in _body_ops(written) and "MatMul" in _body_ops(written)
    assert any("is written INT8 with its calibrated ranges" in n for n in written.provenance.notes)
    assert not any("left in float, inside the body" in n for n in written.provenance.notes)
    result = compare(model, {"int8": written}, from_arrays(_sequences(16, 1), role="validation"),
                     CompareOptions(batch_size=8, per_layer=False, bootstrap=0))
    assert result.end_to_end.iloc[0]["sqnr_db"] > 25


def test_int8_bodies_are_asked_for_under_an_int8_plan_and_need_the_body_ranges(rnn_table):
    model, table = rnn_table
    default = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    assert "QuantizeLinear" not in _body_ops(default)  # opt-in: the search cannot revert a body
    fp16 = write_model(model, uniform_plan("fp16"), table, WriteOptions(target="tensorrt", int8_bodies=True))
    assert "QuantizeLinear" not in _body_ops(fp16)  # only under an int8 plan
    assert any("compute their bodies in float16 too: 'over_tokens'" in n for n in fp16.provenance.notes)
    assert not any("left in float" in n for n in fp16.provenance.notes)  # said of INT8 plans only
    older = write_model(model, uniform_plan("int8"), dataclasses.replace(table, bodies={}),
                        WriteOptions(target="tensorrt", int8_bodies=True))
    assert "QuantizeLinear" not in _body_ops(older)
    assert any("left in float, inside the body of Loop 'over_tokens'" in n for n in older.provenance.notes)
    mixed = write_model(model, PrecisionPlan(default="int8", fallback="fp16"), table,
                        WriteOptions(target="tensorrt", int8_bodies=True))
    ops = _body_ops(mixed)
    assert "QuantizeLinear" in ops and "Cast" in ops  # INT8 where it can be, the rest of the body in the fallback


def test_the_per_layer_table_gives_a_loop_the_precision_its_body_computes_in(rnn_table, tmp_path):
    """The Loop's row said fp32 (its group's fallback) while its body ran INT8: a reader of the table took the loop
    for float. The provenance records what the bodies were written in, through its JSON, and the row reads it."""
    from quantlab.compare import load_candidate
    from quantlab.quantize import save_written

    model, table = rnn_table
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt", int8_bodies=True))
    assert written.provenance.group_precision["over_tokens"] == "fp32"
    assert dict(written.provenance.body_precision) == {"over_tokens": "int8"}
    save_written(written, tmp_path / "b")
    reloaded = load_candidate(tmp_path / "b", model)
    assert dict(reloaded.provenance.body_precision) == {"over_tokens": "int8"}
    result = compare(model, {"int8": reloaded}, from_arrays(_sequences(8, 1), role="validation"),
                     CompareOptions(batch_size=8, bootstrap=0))
    rows = result.per_layer[result.per_layer["group"] == "over_tokens"]
    assert len(rows) and set(rows["precision"]) == {"int8"}
    # local mode cuts the Loop out with its body, its outer reads (xp) fed the reference's values: the body's own
    # error, not what it inherits from the INT8 embedding (it was skipped: "a subgraph that cannot be cut out")
    local = rows[rows["mode"] == "local"]["sqnr_db"]
    accumulated = rows[rows["mode"] == "accumulated"]["sqnr_db"]
    assert len(local) == 1 and np.isfinite(local.iloc[0]) and local.iloc[0] > accumulated.iloc[0]
    assert "over_tokens" in set(result.worst_layers(candidate="int8")["group"])
    plain = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    assert dict(plain.provenance.body_precision) == {}


@pytest.mark.parametrize("pinned", ["fp16", "fp32"])
def test_a_loop_pinned_to_a_float_precision_keeps_its_body_float_under_int8_bodies(rnn_table, pinned):
    """An override of the Loop's group to fp16 was ignored: --int8-bodies wrote the body's MatMul INT8 all the same
    (the fp16 only for what has no INT8 form). A group the plan pins or overrides keeps the precision asked."""
    model, table = rnn_table
    plan = PrecisionPlan(default="int8", overrides={"over_tokens": pinned})
    written = write_model(model, plan, table, WriteOptions(target="tensorrt", int8_bodies=True))
    ops = _body_ops(written)
    assert "MatMul" in ops and "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
    assert ("Cast" in ops) == (pinned == "fp16")  # an fp16 pin: the body in float16
    assert written.provenance.group_precision["over_tokens"] == pinned


def test_an_effective_plan_writes_the_int8_body_again_and_a_pinned_loop_has_its_own_hash(rnn_table):
    """The effective plan (a build's or a search's plan.json) overrode the Loop's group with the fp32 it had fallen
    back to: rebuilt from it, --int8-bodies wrote the body float, and that model had the INT8-body model's plan
    hash. Without a control-flow group the hash is the assignment's digest as before."""
    from quantlab.plan import resolve_plan

    model, table = rnn_table
    options = WriteOptions(target="tensorrt", int8_bodies=True)
    resolved = resolve_plan(uniform_plan("int8"), model.proto)
    effective = resolve_plan(resolved.to_plan(), model.proto)
    assert effective.plan_hash() == resolved.plan_hash() and "over_tokens" not in resolved.to_plan().overrides
    rebuilt = write_model(model, effective, table, options)
    assert dict(rebuilt.provenance.body_precision) == {"over_tokens": "int8"} and "QuantizeLinear" in _body_ops(rebuilt)
    pinned = resolved.with_pins({"over_tokens": "fp32"})
    assert pinned.precision.digest() == resolved.precision.digest() and pinned.plan_hash() != resolved.plan_hash()
    assert "QuantizeLinear" not in _body_ops(write_model(model, pinned, table, options))
    flat = resolve_plan(uniform_plan("int8"), models.conv_net())
    assert flat.plan_hash() == flat.precision.digest()


def test_the_search_pins_a_loop_whose_int8_body_costs_the_threshold(rnn_table, tmp_path):
    """Under int8_bodies a Loop's INT8 body was out of the search's reach: with its recurrent input's range planted an
    eighth of the calibrated one (a quiet calibration set), all-INT8 reads 4 dB and pinning the MatMuls around it
    cannot help. The search ranks the Loop's group with the quantizable ones and pins it: the body is written in
    float16, the rest stays INT8."""
    from quantlab.search import SearchOptions, search

    model, table = rnn_table
    body = dict(table.bodies["over_tokens"])
    h = body["h_in"]
    body["h_in"] = dataclasses.replace(h, amax=h.amax / 8, min=h.min / 8, max=h.max / 8)
    narrow = dataclasses.replace(table, bodies={**table.bodies, "over_tokens": body})
    result = search(model, narrow, from_arrays(_sequences(16, 1), role="validation"),
                    SearchOptions(threshold="sqnr_db>=38", int8_bodies=True, batch_size=8, probe_samples=8),
                    workdir=tmp_path)
    traj = result.trajectory
    assert not traj["passed"].iloc[0] and traj["int8_fraction"].iloc[0] == 1.0  # 3 groups: embed, Loop, head
    assert result.met and result.to_dict()["pinned"] == {"over_tokens": "fp16"}
    assert traj["int8_fraction"].iloc[-1] == pytest.approx(2 / 3)
    assert dict(result.final.provenance.body_precision) == {"over_tokens": "fp16"}
    assert result.final.provenance.group_precision["embed"] == "int8"


def test_tensorrt_rtx_builds_an_int8_loop_body(rnn_table):
    rtx = pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed")
    assert rtx is not None
    from quantlab.backends.tensorrt import TensorRTBackend
    from quantlab.shapes import ShapeRange

    model, table = rnn_table
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt", int8_bodies=True))
    shapes = {"x": ShapeRange("x", (1, 7, 6), (8, 7, 6), (8, 7, 6)),
              "h0": ShapeRange("h0", (1, 12), (8, 12), (8, 12))}
    engine = TensorRTBackend("tensorrt-rtx").build_engine(written.proto, shapes=shapes, label="int8 loop body")
    assert isinstance(engine, bytes) and len(engine) > 10_000


def test_the_cli_calibrates_the_body_and_builds_it_int8_when_asked(tmp_path, capsys):
    from quantlab.cli import main
    from quantlab.experiment.spec import parse_experiment
    from quantlab.experiment.stages import _write_options

    onnx.save(models.token_rnn(), tmp_path / "rnn.onnx")
    np.savez(tmp_path / "seq.npz", **_sequences(16, 0))
    (tmp_path / "seq.toml").write_text('[[source]]\nkind = "npz"\npath = "seq.npz"\nbatched = true\n')
    assert main(["calibrate", str(tmp_path / "rnn.onnx"), "--calib", str(tmp_path / "seq.toml"), "--method",
                 "minmax", "--out", str(tmp_path / "cal"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Loop/Scan step by step" in printed and "over_tokens" in printed.split("control-flow bodies calibrated")[-1]
    table = str(tmp_path / "cal" / "calib_minmax.json")
    for flags, expected in (([], False), (["--int8-bodies"], True)):
        out = tmp_path / f"b{len(flags)}"
        assert main(["build", str(tmp_path / "rnn.onnx"), "--table", table, "--out", str(out), "--no-progress",
                     *flags]) == 0
        notes = json.loads((out / "provenance.json").read_text())["notes"]
        assert any("is written INT8 with its calibrated ranges" in n for n in notes) is expected
    assert main(["build", str(tmp_path / "rnn.onnx"), "--table", table, "--out", str(tmp_path / "f"),
                 "--precision", "fp16", "--int8-bodies", "--no-progress"]) == 2  # nothing to write INT8: said
    assert "--int8-bodies" in capsys.readouterr().err and not (tmp_path / "f").exists()
    (tmp_path / "e.toml").write_text('[model]\npath = "rnn.onnx"\n[data]\ncalibration = "seq.toml"\n'
                                     'validation = "seq.toml"\n[candidates]\nint8 = ["minmax"]\nint8_bodies = true\n')
    config = parse_experiment((tmp_path / "e.toml").read_text(), source=tmp_path / "e.toml")
    assert config.int8_bodies and _write_options(config, None).int8_bodies and config.settings()["int8_bodies"]


def _rnn_with_a_loud_inside() -> onnx.ModelProto:
    """token_rnn whose body scales its recurrent term by 1e5 and back: a value float16 cannot hold, that neither
    enters nor leaves the body (the guard on the loop's boundary cannot see it)."""
    from onnx import numpy_helper

    proto = models.token_rnn()
    body = next(a.g for n in proto.graph.node if n.op_type == "Loop" for a in n.attribute if a.name == "body")
    nodes = list(body.node)
    at = next(i for i, n in enumerate(nodes) if n.name == "add_step")
    loud = [helper.make_node("Constant", [], ["up"], value=numpy_helper.from_array(np.array(1e5, np.float32))),
            helper.make_node("Constant", [], ["down"], value=numpy_helper.from_array(np.array(1e-5, np.float32))),
            helper.make_node("Mul", ["recurrent", "up"], ["loud"], name="loud"),
            helper.make_node("Mul", ["loud", "down"], ["quiet"], name="quiet")]
    nodes[at].input[1] = "quiet"
    del body.node[:]
    body.node.extend(nodes[:at] + loud + nodes[at:])
    return proto


def test_a_float16_body_keeps_the_nodes_its_calibrated_ranges_put_beyond_float16_in_float32():
    model = model_from_proto(_rnn_with_a_loud_inside())
    table = calibrate(model, from_arrays(_sequences(16, 0)), "minmax", batch_size=8).tables["minmax"]
    assert table.bodies["over_tokens"]["loud"].max > 65504
    options = WriteOptions(fp16_simulation=True)
    guarded = write_model(model, uniform_plan("fp16"), table, options)
    blind = write_model(model, uniform_plan("fp16"), dataclasses.replace(table, bodies={}), options)
    result = compare(model, {"guarded": guarded, "blind": blind}, from_arrays(_sequences(16, 1), role="validation"),
                     CompareOptions(batch_size=8, per_layer=False, bootstrap=0)).end_to_end.set_index("candidate")
    assert result.loc["guarded", "sqnr_db"] > 30
    assert not result.loc["blind", "sqnr_db"] > 30  # inf in float16 inside the body: the outputs break


def test_an_experiment_with_int8_bodies_runs_end_to_end_and_says_the_bodies_stay_int8(tmp_path):
    """calibrate -> build (INT8 bodies) -> compare -> search -> report on the token RNN; a search that pins every
    quantizable group still has the INT8 body, and its line says so instead of "this plan is the FP16 model"."""
    from quantlab.experiment import load_experiment, run_experiment
    from quantlab.experiment.stages import search_notes

    onnx.save(models.token_rnn(), tmp_path / "rnn.onnx")
    for name, n, seed, role in (("calib", 32, 0, "calibration"), ("val", 16, 1, "validation")):
        np.savez(tmp_path / f"{name}.npz", **_sequences(n, seed))
        (tmp_path / f"{name}.toml").write_text(f'role = "{role}"\n[[source]]\nkind = "npz"\npath = "{name}.npz"\n'
                                               'batched = true\n')
    (tmp_path / "e.toml").write_text(
        'name = "rnn"\nthreshold = "sqnr_db>=45"\n[model]\npath = "rnn.onnx"\n[data]\ncalibration = "calib.toml"\n'
        'validation = "val.toml"\n[calibrate]\nmethods = ["minmax"]\n[candidates]\nint8 = ["minmax"]\n'
        'int8_bodies = true\n')
    result = run_experiment(load_experiment(tmp_path / "e.toml"), reports_dir=tmp_path / "reports")
    assert result.index_html.is_file()
    build = tmp_path / "reports" / "rnn" / "stages" / "build-int8-minmax"
    notes = json.loads((build / "provenance.json").read_text())["notes"]
    assert any("is written INT8 with its calibrated ranges" in n for n in notes)
    assert not any("Conv/MatMul/Gemm layers sit inside control-flow" in m for m in result.messages)
    assert any(m.startswith("INT8 inside control flow") and "'over_tokens'" in m for m in result.messages)
    plan = pd.read_parquet(tmp_path / "reports" / "rnn" / "results" / "plan.parquet").set_index("group")
    assert plan.loc["over_tokens", "reason"].endswith("its body INT8 ([candidates] int8_bodies)")
    assert "body INT8" not in plan.loc["head", "reason"]
    summary = {"pinned": {"embed": "fp16", "head": "fp16"}, "quantizable_groups": 2, "int8_fraction": 0.0}
    line = search_notes(summary, int8_bodies=True)[0]
    assert "bodies it did not pin stay INT8" in line and "FP16 model" not in line
    assert "this plan is the FP16 model" in search_notes(summary)[0]


def test_a_body_range_predicted_to_keep_little_sqnr_is_named_in_the_table_notes():
    from quantlab.calibrate import table_from_statistics
    from quantlab.stats import Statistics

    bulk = np.random.default_rng(0).normal(size=100_000).astype(np.float32)
    loud = AbsHistogram(2048, 1e30)
    loud.update(np.concatenate([bulk, np.float32([1000.0])]))  # one outlier sets minmax's step: the bulk rounds to 0
    calm = AbsHistogram(2048, 1e30)
    calm.update(bulk)
    stats = Statistics(tensors={}, samples=1, batches=1, model_sha256="m", bins=2048, huge_threshold=1e30, passes=1,
                       backend={})
    table = table_from_statistics(stats, "minmax", versions={}, bodies={"decoder": {"h": loud.state(),
                                                                                     "x": calm.state()}})
    assert table.bodies["decoder"]["h"].predicted_sqnr_db < 15 < table.bodies["decoder"]["x"].predicted_sqnr_db
    (note,) = [n for n in table.notes if "predicted to keep under 15 dB" in n]
    assert "'decoder/h'" in note and "decoder/x" not in note


def _vad_data_decides() -> onnx.ModelProto:
    """The voice-activity model with ``sr`` an input: its If (an encoder per sample rate) is decided by the data."""
    proto = models.voice_activity()
    del proto.graph.initializer[[i.name for i in proto.graph.initializer].index("sr")]
    return proto


def _chunks(n: int, seed: int, rate: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input": rng.normal(size=(n, 64)).astype(np.float32),
            "state": rng.normal(0, 0.5, (2, n, 128)).astype(np.float32), "sr": np.array(rate, np.int64)}


def test_if_branch_statistics_equal_those_of_the_branch_inlined():
    """Each batch runs the branch its condition takes; the branch's statistics equal those of the model with that
    branch inlined (the sample rate bound), run over the batches that took it: counts, min and max to the bit."""
    from quantlab.controlflow import bind_inputs
    from quantlab.stats import collect_statistics

    proto = _vad_data_decides()
    model = model_from_proto(proto)
    bodies = calibrated_bodies(model)
    assert [(b.owner, b.attr) for b in bodies] == [("by_sample_rate", "then_branch"), ("by_sample_rate", "else_branch")]
    batches = [_chunks(4, 0, 16000), _chunks(3, 1, 8000), _chunks(4, 2, 16000)]
    states, notes = collect_body_statistics(model, batches, get_backend("ort"), DEFAULT_BINS, 1e30)
    assert notes == ()
    assert {key: set(tensors) for key, tensors in states.items()} == {
        f"by_sample_rate/{branch}": {f"{t}_{k}" for t in ("mm", "pre", "enc")}
        for branch, k in (("then_branch", "16k"), ("else_branch", "8k"))}
    for rate, tag, branch in ((16000, "16k", "then_branch"), (8000, "8k", "else_branch")):
        inlined = model_from_proto(bind_inputs(proto, {"sr": np.array(rate, np.int64)}))
        assert "If" not in {n.op_type for n in inlined.proto.graph.node}
        took = [{k: v for k, v in b.items() if k != "sr"} for b in batches if int(b["sr"]) == rate]
        names = {f"mm_{tag}": f"mm_{tag}", f"pre_{tag}": f"pre_{tag}", f"enc_{tag}": "enc"}  # inlined: the If's output
        expected = collect_statistics(inlined, lambda took=took: took, tensors=list(names.values())).tensors
        for t, there in names.items():
            mine, theirs = states[f"by_sample_rate/{branch}"][t], expected[there]
            assert (mine.count, mine.min, mine.max) == (theirs.count, theirs.min, theirs.max), t
            assert np.array_equal(mine.counts, theirs.counts), t


def _if_ops(written, branch: str) -> list[str]:
    node = next(n for n in written.proto.graph.node if n.op_type == "If")
    return [n.op_type for n in next(a.g for a in node.attribute if a.name == branch).node]


@pytest.fixture(scope="module")
def vad_table():
    model = model_from_proto(_vad_data_decides())
    return model, _minmax_table(model, [_chunks(4, s, rate) for s, rate in enumerate((16000, 8000, 16000, 8000))])


def _minmax_table(model, batches):
    """The minmax table of the main graph's statistics and the bodies' (as quantlab.calibrate makes it)."""
    from quantlab.calibrate import table_from_statistics
    from quantlab.stats import collect_statistics

    stats = collect_statistics(model, lambda: batches)
    bodies, _ = collect_body_statistics(model, batches, get_backend("ort"), stats.bins, stats.huge_threshold)
    return table_from_statistics(stats, "minmax", bodies=bodies)


def test_int8_bodies_write_both_if_branches_and_tensorrt_rtx_builds_them(vad_table):
    """Both branches get their Q/DQ with their own ranges, named apart (TensorRT refused a second
    ``by_sample_rate/input/QuantizeLinear``); the model stays accurate at either rate on ONNX Runtime, and
    TensorRT-RTX parses and builds it."""
    model, table = vad_table
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt", int8_bodies=True))
    for branch in ("then_branch", "else_branch"):
        assert "QuantizeLinear" in _if_ops(written, branch) and "MatMul" in _if_ops(written, branch)
    assert sum("branch of 'by_sample_rate' is written INT8" in n for n in written.provenance.notes) == 2
    assert not any("left in float, inside If" in n for n in written.provenance.notes)
    names = [n.name for g in (a.g for n in written.proto.graph.node if n.op_type == "If" for a in n.attribute)
             for n in g.node]
    assert len(names) == len(set(names))
    from quantlab.backends.ort import OrtBackend

    exact = OrtBackend(qdq_fusion=False)  # Q/DQ as written: the same figures on a CPU with or without VNNI
    reference, quantized = exact.build(model.proto), exact.build(written.proto)
    for rate in (16000, 8000):
        feeds = _chunks(8, 9, rate)
        want, got = reference.run(feeds, ["prob"])["prob"], quantized.run(feeds, ["prob"])["prob"]
        assert 10 * np.log10(np.sum(want ** 2) / np.sum((want - got) ** 2)) > 25, rate
    rtx = pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed")
    assert rtx is not None
    from quantlab.backends.tensorrt import TensorRTBackend
    from quantlab.shapes import ShapeRange

    shapes = {"input": ShapeRange("input", (1, 64), (4, 64), (8, 64)),
              "state": ShapeRange("state", (2, 1, 128), (2, 4, 128), (2, 8, 128))}
    engine = TensorRTBackend("tensorrt-rtx").build_engine(written.proto, shapes=shapes, label="int8 if branches")
    assert isinstance(engine, bytes) and len(engine) > 10_000


def test_a_branch_the_data_never_took_stays_float_and_says_so():
    model = model_from_proto(_vad_data_decides())
    table = _minmax_table(model, [_chunks(4, s, 16000) for s in range(2)])
    assert set(table.bodies) == {"by_sample_rate/then_branch"}
    assert set(table.bodies["by_sample_rate/then_branch"]) == {"mm_16k", "pre_16k", "enc_16k"}
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt", int8_bodies=True))
    assert "QuantizeLinear" in _if_ops(written, "then_branch")
    assert "QuantizeLinear" not in _if_ops(written, "else_branch")
    assert any("else branch of 'by_sample_rate' stays float: calibration never ran it" in n
               for n in written.provenance.notes)


def test_an_if_branch_too_large_to_expose_in_one_run_stays_float_and_says_what_to_do(monkeypatch):
    """A merged decoder's branch is the whole decoder: all its tensors exposed at once grow with the batch. Beyond
    the memory budget the branch is not run (no gigabytes allocated) and the note says what to change."""
    import quantlab.stats.bodies as bodies_module

    monkeypatch.setattr(bodies_module, "DEFAULT_MEMORY_BUDGET", 100_000)  # 3 tensors of 4 x 128 floats: 6 KB a batch
    model = model_from_proto(_vad_data_decides())
    states, notes = collect_body_statistics(model, [_chunks(4, 0, 16000)], get_backend("ort"), DEFAULT_BINS, 1e30)
    assert states["by_sample_rate/then_branch"]
    monkeypatch.setattr(bodies_module, "DEFAULT_MEMORY_BUDGET", 5_000)
    states, notes = collect_body_statistics(model, [_chunks(4, 0, 16000)], get_backend("ort"), DEFAULT_BINS, 1e30)
    assert states == {}
    (note,) = notes
    assert "'by_sample_rate/then_branch'" in note and "would hold" in note and "--batch-size" in note


def test_branches_that_define_the_same_names_are_calibrated_and_written_apart():
    """Two decoders exported alike name their tensors alike: the table keeps each branch's ranges under its own key,
    so the 8 kHz encoder's ranges are not merged into the 16 kHz one's."""
    from quantlab.folding import rename_node

    proto = _vad_data_decides()
    node = next(n for n in proto.graph.node if n.op_type == "If")
    other = next(a.g for a in node.attribute if a.name == "else_branch")
    same = {f"{t}_8k": f"{t}_16k" for t in ("mm", "pre", "enc")}
    renamed = [rename_node(n, same) for n in other.node]
    del other.node[:]
    other.node.extend(renamed)
    other.output[0].name = "enc_16k"
    model = model_from_proto(proto)
    table = _minmax_table(model, [_chunks(4, 0, 16000), _chunks(4, 1, 8000)])
    then, other_ranges = table.bodies["by_sample_rate/then_branch"], table.bodies["by_sample_rate/else_branch"]
    assert set(then) == set(other_ranges) == {"mm_16k", "pre_16k", "enc_16k"}
    assert then["mm_16k"].amax != other_ranges["mm_16k"].amax  # other weights (scale 0.2 and 0.3): other ranges
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt", int8_bodies=True))
    for branch in ("then_branch", "else_branch"):
        assert "QuantizeLinear" in _if_ops(written, branch)


def test_a_model_whose_qdq_all_sit_in_if_branches_is_compared_as_written(vad_table, tmp_path):
    """The comparison runs TensorRT-form candidates with Q/DQ as written (the search's and TensorRT's maths, on any
    CPU); it looked for Q/DQ in the main graph only, so a model INT8 only inside its branches (an optimum-style
    merged decoder) ran ORT's fused kernels instead, which saturate on a CPU without VNNI."""
    import quantlab as ql
    from quantlab.compare.candidates import simulates_tensorrt
    from quantlab.plan.groups import fusion_groups

    model, table = vad_table
    main_groups = {g.name: "fp32" for g in fusion_groups(model.proto) if g.anchor_op != "If"}
    plan = PrecisionPlan(default="int8", overrides=main_groups)
    written = write_model(model, plan, table, WriteOptions(target="tensorrt", int8_bodies=True))
    assert not any(n.op_type == "DequantizeLinear" for n in written.proto.graph.node)
    assert "QuantizeLinear" in _if_ops(written, "then_branch")
    assert simulates_tensorrt([written]) and simulates_tensorrt([model_from_proto(written.proto, label="bare")])
    folder = tmp_path / "chunks"
    folder.mkdir()
    for i, rate in enumerate((16000, 16000, 8000, 8000)):
        one = _chunks(1, 20 + i, rate)
        np.savez(folder / f"c{i}.npz", input=one["input"][0], state=one["state"][:, 0], sr=one["sr"])
    (tmp_path / "set.toml").write_text('role = "validation"\nshuffle = false\n[source]\nkind = "npz"\n'
                                       'path = "chunks"\n[inputs]\ninput = "input"\n'
                                       'state = { field = "state", batch_axis = 1 }\n'
                                       'sr = { field = "sr", batch_axis = "none" }\n')
    result = compare(model, {"int8": written}, ql.open_dataset(tmp_path / "set.toml"),
                     CompareOptions(batch_size=2, per_layer=False, bootstrap=0))
    assert result.environment["backend"]["details"]["qdq_fusion"] is False
    assert result.end_to_end.set_index("output").loc["prob", "sqnr_db"] > 25


def test_a_branch_is_sized_by_inference_once_and_again_only_when_its_estimate_passes_the_budget(monkeypatch):
    """A decoder's data changes shape every step: later shapes are estimated from the first batch's size (grown by
    the square of the outer values), and inferred only near the budget. The branch's 3 tensors hold 1536 bytes a
    sample: 3 KB at 2 samples; 4 samples are estimated at 12 KB and are 6 KB."""
    import quantlab.stats.bodies as bodies_module

    calls = []
    real = bodies_module._branch_bytes
    monkeypatch.setattr(bodies_module, "_branch_bytes", lambda body, outer: calls.append(1) or real(body, outer))
    model = model_from_proto(_vad_data_decides())
    batches = [_chunks(2, 0, 16000), _chunks(2, 1, 16000), _chunks(4, 2, 16000)]
    for budget, inferred, fails in ((20_000, 1, False), (8_000, 2, False), (5_000, 2, True)):
        calls.clear()
        monkeypatch.setattr(bodies_module, "DEFAULT_MEMORY_BUDGET", budget)
        states, notes = collect_body_statistics(model, batches, get_backend("ort"), DEFAULT_BINS, 1e30)
        assert len(calls) == inferred, budget
        assert bool(notes) == fails and (states == {}) == fails, budget

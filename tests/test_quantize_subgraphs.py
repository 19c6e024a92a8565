"""FP16 inside control flow (quantlab.quantize.subgraphs): the bodies of an FP16 group's Loop / If compute in float16,
on ONNX Runtime and in a TensorRT-RTX engine, with the Loop's interface and the outputs unchanged."""

from __future__ import annotations

import models
import numpy as np
import onnx
import pytest
from onnx import TensorProto

from quantlab.graph import model_from_proto
from quantlab.plan import uniform_plan
from quantlab.quantize import WriteOptions, write_model


_run = models.run_ort


def _body(proto: onnx.ModelProto, op: str = "Loop", attr: str = "body") -> onnx.GraphProto:
    node = next(n for n in proto.graph.node if n.op_type == op)
    return next(a.g for a in node.attribute if a.name == attr)


def _float16_nodes(graph: onnx.GraphProto) -> list[str]:
    """Nodes whose outputs the graph types as float16 (written Casts to float16 apart)."""
    typed = {vi.name: vi.type.tensor_type.elem_type for vi in graph.value_info}
    return [n.op_type for n in graph.node if n.op_type != "Cast"
            and any(typed.get(o) == TensorProto.FLOAT16 for o in n.output)]


def test_an_fp16_while_loop_computes_its_body_in_float16():
    """until_converged's body (MatMul, Add, Tanh) stayed float32 in its FP16 model; now it computes in float16 (a
    float16 copy of its weight inside the body), the loop still reads and returns float32, ONNX Runtime runs it
    within float16's error of FP32 and TensorRT-RTX builds it."""
    model = model_from_proto(models.until_converged(), label="until_converged")
    written = write_model(model, uniform_plan("fp16"), None, WriteOptions())
    body = onnx.shape_inference.infer_shapes(written.proto).graph.node
    loop_body = next(a.g for n in body if n.op_type == "Loop" for a in n.attribute if a.name == "body")
    assert {"MatMul", "Tanh"} <= set(_float16_nodes(loop_body))
    assert any(i.data_type == TensorProto.FLOAT16 for i in loop_body.initializer)  # the weight's copy
    assert [i.type.tensor_type.elem_type for i in loop_body.input[2:]] == [TensorProto.FLOAT]
    assert any("compute their bodies in float16 too: 'refine'" in n for n in written.provenance.notes)
    assert not any("left in float" in n for n in written.provenance.notes)  # said of INT8 plans only
    x = {"input": np.random.default_rng(3).normal(0, 1, (4, 16)).astype(np.float32)}
    ref, fp16 = _run(model.proto, x), _run(written.proto, x)
    assert fp16["refined"].dtype == np.float32
    if fp16["steps"].shape == ref["steps"].shape:  # float16 may converge a step earlier or later
        np.testing.assert_allclose(fp16["refined"], ref["refined"], atol=2e-2)
    trt = pytest.importorskip("quantlab.backends.tensorrt")
    from quantlab.shapes import parse_shapes

    try:
        backend = trt.TensorRTBackend("tensorrt-rtx")
    except Exception as exc:  # noqa: BLE001 - any missing piece of TensorRT-RTX: skip, saying why
        pytest.skip(f"TensorRT-RTX is not usable here: {exc}")
    assert len(backend.build_engine(written.proto, shapes=parse_shapes("input:1x16,4x16,8x16"))) > 10_000


def test_weights_only_a_body_read_are_kept_once_as_float16():
    """loop_carrying_weights: b is read only inside the loop (hoisted there at load): the model keeps its float16
    copy in the body and no float32 b (SLANet's FP16 model had kept 2.1 MB of such weights twice). w is also read
    after the loop (head, w_final), so its float32 original stays."""
    model = model_from_proto(models.loop_carrying_weights(), label="loop_carrying_weights")
    written = write_model(model, uniform_plan("fp16"), None, WriteOptions())
    outer = {i.name: i.data_type for i in written.proto.graph.initializer}
    assert "b" not in outer and "w" in outer
    assert any(i.data_type == TensorProto.FLOAT16 for i in _body(written.proto).initializer)
    x = {"input": np.random.default_rng(1).normal(0, 1, (3, 16)).astype(np.float32)}
    ref, fp16 = _run(model.proto, x), _run(written.proto, x)
    np.testing.assert_array_equal(fp16["w_final"], ref["w_final"])  # w passes through float32


def test_fp16_simulation_rounds_inside_a_body_and_an_if_gets_both_branches():
    """The If of a Silero-style model whose sample rate is an input (not inlined): both branches are written in
    float16; with fp16_simulation (ONNX Runtime accuracy runs) they keep float32 kernels and round instead, and
    the outputs stay within float16's error of FP32."""
    proto = models.voice_activity()
    del proto.graph.initializer[[i.name for i in proto.graph.initializer].index("sr")]
    model = model_from_proto(proto, label="voice_activity")
    native = write_model(model, uniform_plan("fp16"), None, WriteOptions())
    for branch in ("then_branch", "else_branch"):
        graph = onnx.shape_inference.infer_shapes(native.proto).graph
        inferred = next(a.g for n in graph.node if n.op_type == "If" for a in n.attribute if a.name == branch)
        assert "MatMul" in _float16_nodes(inferred)
    simulated = write_model(model, uniform_plan("fp16"), None, WriteOptions(fp16_simulation=True))
    feeds = {**models.voice_activity_feeds(4, seed=2), "sr": np.array(8000, np.int64)}
    ref, sim = _run(model.proto, feeds), _run(simulated.proto, feeds)
    for name in ref:
        np.testing.assert_allclose(sim[name], ref[name], atol=3e-2)
        assert not np.array_equal(sim[name], ref[name])  # rounded somewhere: the branch is no longer float32


def test_an_outer_weight_a_float32_body_node_reads_stays_outside():
    """A body node kept float32 (Pow: fp32_ops) reading an outer constant reads it from outside as before; the
    body's float16 writing renamed it and left the read dangling (caught only by the checker)."""
    proto = models.loop_carrying_weights()
    body = _body(proto)
    step = next(n for n in body.node if n.name == "step_relu")
    step.CopyFrom(onnx.helper.make_node("Pow", ["h_out", "two"], ["step"], name="step_pow"))
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two"))
    model = model_from_proto(proto, label="loop_with_pow")
    written = write_model(model, uniform_plan("fp16"), None, WriteOptions())
    pow_node = next(n for n in _body(written.proto).node if n.op_type == "Pow")
    assert pow_node.input[1] == "two" and "two" in {i.name for i in written.proto.graph.initializer}
    x = {"input": np.random.default_rng(4).normal(0, 1, (3, 16)).astype(np.float32)}
    ref, fp16 = _run(model.proto, x), _run(written.proto, x)
    if fp16["steps"].shape == ref["steps"].shape:
        np.testing.assert_allclose(fp16["steps"], ref["steps"], atol=3e-2)


def test_a_loop_that_carries_a_sequence_gets_a_float16_body_that_runs():
    """A loop pushing each step's MatMul into a tensor sequence (SequenceInsert, trip count an input): its body is
    written in float16 (the MatMul) and the sequence still holds float32 tensors, so ConcatFromSequence after the
    loop runs as before."""
    from onnx import helper, numpy_helper

    seq = helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, ["N", 4]))
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="go_on"),
         helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
         helper.make_node("SequenceInsert", ["seq_in", "y"], ["seq_out"], name="push")],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), helper.make_value_info("seq_in", seq)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_value_info("seq_out", seq)])
    graph = helper.make_graph(
        [helper.make_node("SequenceEmpty", [], ["seq0"], name="empty", dtype=TensorProto.FLOAT),
         helper.make_node("Loop", ["trips", "", "seq0"], ["seq"], name="loop", body=body),
         helper.make_node("ConcatFromSequence", ["seq"], ["out"], name="cat", axis=0)],
        "pushes", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                   helper.make_tensor_value_info("trips", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 4])],
        [numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32), "w")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), label="pushes")
    written = write_model(model, uniform_plan("fp16"), None, WriteOptions())
    assert any("compute their bodies in float16 too: 'loop'" in n for n in written.provenance.notes)
    feeds = {"x": np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32), "trips": np.array(3, np.int64)}
    ref, fp16 = _run(model.proto, feeds), _run(written.proto, feeds)
    assert fp16["out"].shape == (6, 4) and fp16["out"].dtype == np.float32
    np.testing.assert_allclose(fp16["out"], ref["out"], atol=1e-2)


def test_a_float16_body_that_breaks_the_model_is_written_as_it_was(monkeypatch):
    """A safety net: should a body written in float16 not fit its graph (here: made to redefine the model's input,
    which the ONNX checker refuses), the model is written again with its bodies as they were, and says so,
    instead of failing the whole FP16 build."""
    from quantlab.quantize import subgraphs

    real = subgraphs.fp16_subgraph

    def clashing(*args, **kwargs):
        body, notes = real(*args, **kwargs)
        cast = next(n for n in body.node if n.op_type == "Cast")
        cast.output[0] = "input"  # an outer name defined again inside the body
        return body, notes

    monkeypatch.setattr(subgraphs, "fp16_subgraph", clashing)
    model = model_from_proto(models.until_converged(), label="until_converged")
    written = write_model(model, uniform_plan("fp16"), None, WriteOptions())
    assert any("control-flow bodies stay float32" in n for n in written.provenance.notes)
    assert not any(i.data_type == TensorProto.FLOAT16 for i in _body(written.proto).initializer)
    x = {"input": np.random.default_rng(3).normal(0, 1, (2, 16)).astype(np.float32)}
    assert _run(written.proto, x)["refined"].shape == (2, 16)


def test_a_body_whose_inputs_pass_float16s_range_stays_float32():
    """No calibration range reaches inside a body, but the ones of what enters it do: until_converged's body reads
    x0, which reaches ~1e5 here; in float16 (max 65504) it would overflow, so with a table the body stays float32
    and the note names x0. Without a table nothing is known, and the body goes float16 as before."""
    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays

    model = model_from_proto(models.until_converged(), label="until_converged")
    loud = np.random.default_rng(0).normal(0, 5e4, (8, 16)).astype(np.float32)
    table = calibrate(model, from_arrays({"input": loud}), "minmax", batch_size=4).tables["minmax"]
    assert max(abs(table.ranges["x0"].min), abs(table.ranges["x0"].max)) > 8192
    guarded = write_model(model, uniform_plan("fp16"), table, WriteOptions())
    assert any("the bodies of 'refine' stay float32: 'x0'" in n for n in guarded.provenance.notes)
    assert not any(i.data_type == TensorProto.FLOAT16 for i in _body(guarded.proto).initializer)
    unguarded = write_model(model, uniform_plan("fp16"), None, WriteOptions())
    assert any(i.data_type == TensorProto.FLOAT16 for i in _body(unguarded.proto).initializer)

"""quantlab.sequences: the list a scripted loop collects, once the loop is unrolled, is one Concat."""

from __future__ import annotations

import models
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantlab.controlflow import resolve_static_control_flow
from quantlab.graph import model_from_proto
from quantlab.sequences import concat_collected_sequences, scan_loop_sequences


def _collecting_loop(axis: int, new_axis: int, trips: int = 3, width: int = 4, data_decides: bool = False
                     ) -> onnx.ModelProto:
    """torch.jit.script's ``ys = []; for _ in range(3): h = tanh(h @ W); ys.append(h)`` then ``torch.stack(ys, 1)``:

    x[N, 4] -> Loop(M=3; carried h, ys: SequenceInsert(ys, h')) -> ConcatFromSequence(ys, axis, new_axis) -> out

    ``data_decides``: the body continues while ``max(h') > -100`` (always, but the data decides: a while loop).
    """
    w = np.random.default_rng(0).normal(0, 0.6, (width, width)).astype(np.float32)
    seq_type = helper.make_tensor_sequence_value_info
    keep = [helper.make_node("Identity", ["go_outer"], ["cond_out"], name="/keep")]  # the outer constant, as torch
    if data_decides:
        keep = [helper.make_node("ReduceMax", ["h_out"], ["/top"], name="/top", keepdims=0),
                helper.make_node("Greater", ["/top", "floor"], ["cond_out"], name="/keep")]
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "w"], ["/mixed"], name="/mix"),
         helper.make_node("Tanh", ["/mixed"], ["h_out"], name="/tanh"),
         *keep,
         helper.make_node("SequenceInsert", ["ys_in", "h_out"], ["ys_out"], name="/append")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["N", width]),
         seq_type("ys_in", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["N", width]),
         seq_type("ys_out", TensorProto.FLOAT, ["N", width])])
    nodes = [helper.make_node("Constant", [], ["go_outer"], name="/go", value=numpy_helper.from_array(np.array(True))),
             helper.make_node("SequenceEmpty", [], ["ys0"], name="/empty", dtype=TensorProto.FLOAT),
             helper.make_node("Loop", ["trips", "", "x", "ys0"], ["h_last", "ys"], name="/Loop", body=body),
             helper.make_node("ConcatFromSequence", ["ys"], ["out"], name="/stack", axis=axis, new_axis=new_axis)]
    graph = helper.make_graph(nodes, "collecting_loop", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                       ["N", width])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["A", "B", "C"][:3 - (new_axis == 0)]),
                               helper.make_tensor_value_info("h_last", TensorProto.FLOAT, ["N", width])],
                              [numpy_helper.from_array(np.array(trips, np.int64), "trips"),
                               numpy_helper.from_array(w, "w"),
                               numpy_helper.from_array(np.array(-100.0, np.float32), "floor")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _constructed(axis: int) -> onnx.ModelProto:
    """Opset 11 (Unsqueeze takes its axes as an attribute), no loop: ``SequenceConstruct(Tanh(x))``, then
    ``SequenceInsert(·, Relu(x))``, then ``ConcatFromSequence(new_axis=1)``."""
    nodes = [helper.make_node("Tanh", ["x"], ["y0"], name="/tanh"),
             helper.make_node("Relu", ["x"], ["y1"], name="/relu"),
             helper.make_node("SequenceConstruct", ["y0"], ["s0"], name="/construct"),
             helper.make_node("SequenceInsert", ["s0", "y1"], ["s1"], name="/append"),
             helper.make_node("ConcatFromSequence", ["s1"], ["out"], name="/stack", axis=axis, new_axis=1)]
    graph = helper.make_graph(nodes, "constructed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["A", "B", "C"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize(("form", "axis", "new_axis"), [("loop", 1, 1), ("loop", 0, 0), ("opset 11", -1, 1)])
def test_an_unrolled_loops_list_becomes_a_concat_with_the_same_values(form, axis, new_axis):
    """After unrolling, SequenceEmpty -> SequenceInsert x3 -> ConcatFromSequence is a chain of known tensors:
    Unsqueeze (an attribute before opset 13) and Concat compute the same output, and no sequence op is left
    (TensorRT parses none: a scripted greedy decoder failed to build after its loop was unrolled)."""
    proto = _collecting_loop(axis, new_axis) if form == "loop" else _constructed(axis)
    out, done = resolve_static_control_flow(proto)
    notes = [d.note() for d in done]
    items = 3 if form == "loop" else 2
    assert notes[-1] == (f"ConcatFromSequence '/stack': the {items} tensors its sequence collects one by one are "
                         "concatenated directly (Concat; TensorRT parses no sequence ops)")
    assert form != "loop" or notes[0].startswith("Loop '/Loop': trip count 3 (static), unrolled")
    assert not any("Sequence" in n.op_type for n in out.graph.node)
    onnx.checker.check_model(out, full_check=True)
    x = {"x": np.random.default_rng(1).normal(0, 1, (2, 4)).astype(np.float32)}
    before, after = models.run_ort(proto, x), models.run_ort(out, x)
    assert before["out"].shape == {(1, 1): (2, 3, 4), (0, 0): (6, 4), (-1, 1): (2, 4, 2)}[(axis, new_axis)]
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-6, atol=1e-6)
    if form == "loop" and new_axis:
        from quantlab.backends.tensorrt import TensorRTBackend
        from quantlab.shapes import parse_shapes

        model = model_from_proto(proto, label="collecting loop")  # loading resolves it the same way
        assert not any("Sequence" in n.op_type for n in model.proto.graph.node)
        engine = TensorRTBackend("tensorrt-rtx").build_engine(model.proto, shapes=parse_shapes("x:1x4,2x4,4x4"),
                                                             label="collecting loop")
        assert len(engine) > 1000


def test_sequences_it_cannot_read_are_left_alone():
    """An insert at a position, or a sequence a loop left a loop builds: the ConcatFromSequence stays."""
    long_loop = _collecting_loop(1, 1, trips=100)  # above the unrolling limit: a loop's sequence
    out, done = concat_collected_sequences(long_loop)
    assert out is long_loop and done == ()
    at = _collecting_loop(1, 1)
    body = next(a.g for a in next(n for n in at.graph.node if n.op_type == "Loop").attribute)
    at.graph.initializer.append(numpy_helper.from_array(np.array(0, np.int64), "front"))
    next(n for n in body.node if n.op_type == "SequenceInsert").input.append("front")  # reads the outer "front"
    out, done = resolve_static_control_flow(at)
    assert any(n.op_type == "ConcatFromSequence" for n in out.graph.node)
    x = {"x": np.random.default_rng(1).normal(0, 1, (2, 4)).astype(np.float32)}
    np.testing.assert_allclose(models.run_ort(out, x)["out"], models.run_ort(at, x)["out"], rtol=1e-6)


@pytest.mark.parametrize(("axis", "new_axis", "data_decides"), [(1, 1, False), (-1, 0, False), (1, 1, True),
                                                                 (0, 1, True)])
def test_a_loops_list_is_a_scan_output_when_the_loop_stays(axis, new_axis, data_decides):
    """A loop too long to unroll (100 steps) or one the data stops appends to a list: its body emits the item as
    a scan output, and Transpose (and Reshape, for a concatenation) give what ConcatFromSequence gave, with no
    sequence op left; TensorRT builds the 100-step loop (the while loop's scan output needs a trip limit TensorRT
    can see: torch's while loops have none)."""
    proto = _collecting_loop(axis, new_axis, trips=100 if not data_decides else 7, data_decides=data_decides)
    out, done = resolve_static_control_flow(proto)
    assert [d.note() for d in done][-1] == ("Loop '/Loop': the list its body appends 'h_out' to each step is a scan "
                                            "output, stacked after the loop, instead of a sequence (TensorRT parses "
                                            "no sequence ops)")
    assert not any("Sequence" in n.op_type for n in out.graph.node)
    onnx.checker.check_model(out, full_check=True)
    x = {"x": np.random.default_rng(2).normal(0, 1, (3, 4)).astype(np.float32)}
    before, after = models.run_ort(proto, x), models.run_ort(out, x)
    steps = 100 if not data_decides else 7
    assert before["out"].shape == {(1, 1): (3, steps, 4), (-1, 0): (3, 4 * steps), (0, 1): (steps, 3, 4)}[
        (axis, new_axis)]
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    if not data_decides and new_axis:
        from quantlab.backends.tensorrt import TensorRTBackend
        from quantlab.shapes import parse_shapes

        engine = TensorRTBackend("tensorrt-rtx").build_engine(out, shapes=parse_shapes("x:1x4,2x4,4x4"),
                                                             label="long collecting loop")
        assert len(engine) > 1000


def test_a_concatenation_of_steps_whose_size_may_differ_stays_a_sequence():
    """Concatenated on the batch axis (a symbolic size: shape inference cannot say every step has the same),
    the list stays a sequence rather than risk a scan output of steps of different sizes."""
    proto = _collecting_loop(0, 0, trips=100)
    out, done = scan_loop_sequences(proto)
    assert out is proto and done == ()


def test_the_local_mode_skips_a_group_fed_the_list_a_loop_carries():
    """A scripted while loop whose list stays a list (its first item has another shape than the steps') and an
    FP16 build: the local mode fed the list to ConcatFromSequence's island and the comparison failed ("cannot tell
    the type of tensor 'ref/ys'"), stopping `quantlab run`. That group is skipped with a note."""
    from quantlab.calibrate import calibrate
    from quantlab.compare import CompareOptions, compare
    from quantlab.data import from_arrays
    from quantlab.plan import uniform_plan
    from quantlab.quantize import WriteOptions, write_model

    proto = _collecting_loop(-1, 0, data_decides=True)
    for node in proto.graph.node:  # the list starts with an item of another shape: it stays a list
        if node.op_type == "SequenceEmpty":
            node.CopyFrom(helper.make_node("SequenceConstruct", ["x_mean"], ["ys0"], name="/start"))
    proto.graph.node.insert(0, helper.make_node("ReduceMean", ["x"], ["x_mean"], name="/mean", axes=[1]))
    model = model_from_proto(proto)
    assert {"Loop", "ConcatFromSequence"} <= {n.op_type for n in model.proto.graph.node}
    data = from_arrays({"x": np.random.default_rng(0).normal(0, 1, (6, 4)).astype(np.float32)}, role="validation")
    fp16 = write_model(model, uniform_plan("fp16"), calibrate(model, data, "minmax").tables["minmax"], WriteOptions())
    result = compare(model, {"fp16": fp16}, data, CompareOptions(batch_size=3, bootstrap=0))
    assert any("local mode skips group '/stack': the type of its input 'ys' is unknown" in w for w in result.warnings)
    assert set(result.end_to_end["output"]) == {"out", "h_last"}


@pytest.mark.parametrize("axis, new_axis", [(1, 1), (-1, 0), (0, 1)])
def test_a_list_started_with_an_item_is_a_scan_output_too(axis, new_axis):
    """torch's ``ys = [x]`` before the loop is SequenceConstruct(x): the rewrite took only an empty start, so the
    while loop kept its sequence ops and TensorRT-RTX refused it ("unsupported op SequenceConstruct"). The start's
    items go before the steps."""
    proto = _collecting_loop(axis, new_axis, trips=7, data_decides=True)
    for node in proto.graph.node:
        if node.op_type == "SequenceEmpty":
            node.CopyFrom(helper.make_node("SequenceConstruct", ["x"], ["ys0"], name="/start"))
    out, done = resolve_static_control_flow(proto)
    assert any("is a scan output" in d.note() for d in done)
    assert not any("Sequence" in n.op_type for n in out.graph.node)
    onnx.checker.check_model(out, full_check=True)
    x = {"x": np.random.default_rng(2).normal(0, 1, (3, 4)).astype(np.float32)}
    before, after = models.run_ort(proto, x), models.run_ort(out, x)
    assert before["out"].shape == {(1, 1): (3, 8, 4), (-1, 0): (3, 32), (0, 1): (8, 3, 4)}[(axis, new_axis)]
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])


def test_a_list_of_items_whose_rank_needs_an_outer_constant_is_a_scan_output():
    """torch's ``norms.append(h.pow(2).sum(-1))`` in a while loop reads the reduction's axes from a main-graph
    Constant: shape inference, which carries no value across scopes, gave the item no rank, the list stayed a
    sequence and TensorRT-RTX refused it. The body's outer constants are copied in for that inference."""
    proto = _collecting_loop(1, 1, trips=7, data_decides=True)
    loop = next(n for n in proto.graph.node if n.op_type == "Loop")
    body = next(a.g for a in loop.attribute if a.name == "body")
    append = next(n for n in body.node if n.op_type == "SequenceInsert")
    append.input[1] = "/norm"
    body.node.insert(list(body.node).index(append),
                     helper.make_node("ReduceSum", ["h_out", "/axes"], ["/norm"], name="/norm", keepdims=0))
    proto.graph.node.insert(0, helper.make_node("Constant", [], ["/axes"], name="/axes_const",
                                                value=numpy_helper.from_array(np.array([-1], np.int64))))
    out, done = resolve_static_control_flow(proto)
    assert any("the list its body appends '/norm' to each step is a scan output" in d.note() for d in done)
    assert not any("Sequence" in n.op_type for n in out.graph.node)
    x = {"x": np.random.default_rng(2).normal(0, 1, (3, 4)).astype(np.float32)}
    before, after = models.run_ort(proto, x), models.run_ort(out, x)
    assert before["out"].shape == (3, 7)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])


def test_a_list_tensorrt_cannot_take_gets_advice_that_can_help():
    """A list that stays a list (its first item has another shape than the steps'): TensorRT-RTX refuses its
    sequence ops, and the advice was "pin these nodes to a precision the backend supports", which cannot help."""
    pytest.importorskip("tensorrt_rtx_bindings")
    from quantlab.backends.tensorrt import TensorRTBackend
    from quantlab.errors import UnsupportedOpError
    from quantlab.shapes import parse_shapes

    proto = _collecting_loop(-1, 0, data_decides=True)
    for node in proto.graph.node:
        if node.op_type == "SequenceEmpty":
            node.CopyFrom(helper.make_node("SequenceConstruct", ["x_mean"], ["ys0"], name="/start"))
    proto.graph.node.insert(0, helper.make_node("ReduceMean", ["x"], ["x_mean"], name="/mean", axes=[1]))
    model = model_from_proto(proto)
    with pytest.raises(UnsupportedOpError) as err:
        TensorRTBackend("tensorrt-rtx").build_engine(model.proto, shapes=parse_shapes("x:1x4,2x4,4x4"), label="list")
    assert "TensorRT has no sequence ops (" in str(err.value) and "Pin these nodes" not in str(err.value)

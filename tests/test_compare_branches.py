"""compare.branches: an INT8 candidate that takes the other branch of a data-decided If is named."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantlab.calibrate import calibrate
from quantlab.compare import CompareOptions, compare
from quantlab.compare.branches import decided_conditions
from quantlab.data import from_arrays
from quantlab.graph import model_from_proto
from quantlab.plan import uniform_plan
from quantlab.quantize import WriteOptions, write_model

THRESHOLD = 1.0


def _branch(name: str, op: str, inputs: list[str]) -> onnx.GraphProto:
    return helper.make_graph([helper.make_node(op, inputs, [f"{name}_y"], name=f"{name}_op")], name, [],
                             [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)])


def gated_model(shape_gate: bool = False) -> onnx.ModelProto:
    """x[N, 8] -> MatMul(identity) -> h; If mean(h) > 1: y = 2 h, else y = -h (or, ``shape_gate``: If Size(h) > 16).

    A score over a threshold deciding what runs next, as a detector's "any box left?" does."""
    eye = numpy_helper.from_array(np.eye(8, dtype=np.float32), "w")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    limit = numpy_helper.from_array(np.array(THRESHOLD, np.float32), "limit")
    sixteen = numpy_helper.from_array(np.array(16, np.int64), "sixteen")
    gate = ([helper.make_node("Size", ["h"], ["size"], name="size"),
             helper.make_node("Greater", ["size", "sixteen"], ["cond"], name="gate")] if shape_gate else
            [helper.make_node("ReduceMean", ["h"], ["m"], name="mean", keepdims=0),
             helper.make_node("Greater", ["m", "limit"], ["cond"], name="gate")])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), *gate,
             helper.make_node("If", ["cond"], ["y"], name="branch",
                              then_branch=_branch("then", "Mul", ["h", "two"]),
                              else_branch=_branch("else", "Neg", ["h"]))]
    graph = helper.make_graph(nodes, "gated", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                              [eye, two, limit, sixteen])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_only_conditions_the_values_decide_are_followed():
    assert decided_conditions(model_from_proto(gated_model())) == {"branch": "cond"}
    assert decided_conditions(model_from_proto(gated_model(shape_gate=True))) == {}


def test_an_int8_candidate_whose_clipped_range_flips_the_gate_is_named_per_run(capsys):
    """Calibrated on values under 0.5, the INT8 model clips x at ~0.5: batches whose mean is 3 read a mean under the
    threshold and take the else branch. The low batches stay on the same side: exactly the high runs are counted."""
    model = model_from_proto(gated_model())
    rng = np.random.default_rng(0)
    calib = from_arrays({"x": rng.uniform(0.0, 0.5, (32, 8)).astype(np.float32)})
    table = calibrate(model, calib, "minmax", batch_size=8).tables["minmax"]
    int8 = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    high = rng.uniform(2.5, 3.5, (4, 8)).astype(np.float32)
    low = rng.uniform(0.0, 0.4, (4, 8)).astype(np.float32)
    x = np.concatenate([high, low, high, low, high])  # five runs of 4: high, low, high, low, high
    valid = from_arrays({"x": x}, role="validation")
    result = compare(model, {"int8": int8, "fp32": model}, valid,
                     CompareOptions(batch_size=4, per_layer=False, bootstrap=0), progress=True)
    rows = {r["candidate"]: r for r in result.settings["branch_flips"]}
    assert rows["int8"]["runs"] == 5 and rows["int8"]["flipped"] == 3 and rows["int8"]["if"] == "branch"
    assert rows["fp32"]["flipped"] == 0
    (note,) = [w for w in result.warnings if "another If branch" in w]
    assert "candidate 'int8': If 'branch' (condition 'cond') in 3 of 5 run(s)" in note and "'fp32'" not in note
    assert "If branches" in capsys.readouterr().err  # the second pass shows its progress too
    quiet = compare(model, {"int8": int8}, valid, CompareOptions(batch_size=4, per_layer=False, bootstrap=0,
                                                                 branches=False))  # the search's evaluations
    assert "branch_flips" not in quiet.settings and not any("another If branch" in w for w in quiet.warnings)


def test_models_without_a_decided_if_get_no_branch_pass():
    model = model_from_proto(gated_model(shape_gate=True))
    x = np.random.default_rng(1).uniform(0, 1, (8, 8)).astype(np.float32)
    result = compare(model, {"same": model}, from_arrays({"x": x}, role="validation"),
                     CompareOptions(batch_size=4, per_layer=False, bootstrap=0))
    assert "branch_flips" not in result.settings
    assert not any("another If branch" in w for w in result.warnings)

"""compare.selections: a candidate whose rounding makes a MoE-style router pick other experts is named, per row."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from quantlab.calibrate import calibrate
from quantlab.compare import CompareOptions, compare
from quantlab.compare.selections import Selection, changed_rows, decided_selections, selection_note
from quantlab.data import from_arrays
from quantlab.graph import model_from_proto
from quantlab.plan import uniform_plan
from quantlab.quantize import WriteOptions, write_model

EXPERTS, WIDTH, TOKENS = 6, 8, 5


def routed_model(return_indices: bool = False, argmax: bool = False) -> onnx.ModelProto:
    """x[N, T, 8] -> router MatMul -> logits[N, T, 6] -> TopK(2) -> indices -> Gather(expert table[6, 8]) -> summed
    over the 2 picks -> y[N, T, 8] (+ x): a MoE layer with one row of weights per expert. ``argmax``: the pick is
    an ArgMax (keepdims) instead."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(0, 1, (WIDTH, EXPERTS)).astype(np.float32), "router"),
             numpy_helper.from_array(rng.normal(0, 1, (EXPERTS, WIDTH)).astype(np.float32), "experts"),
             numpy_helper.from_array(np.array([2], np.int64), "k"),
             numpy_helper.from_array(np.array([2], np.int64), "pick_axis")]
    pick = ([helper.make_node("ArgMax", ["logits"], ["idx"], name="route", axis=-1, keepdims=1)] if argmax else
            [helper.make_node("TopK", ["logits", "k"], ["top", "idx"], name="route", axis=-1)])
    nodes = [helper.make_node("MatMul", ["x", "router"], ["logits"], name="router_mm"), *pick,
             helper.make_node("Gather", ["experts", "idx"], ["rows"], name="pick_experts", axis=0),
             helper.make_node("ReduceSum", ["rows", "pick_axis"], ["mixed"], name="mix", keepdims=0),
             helper.make_node("Add", ["x", "mixed"], ["y"], name="residual")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", TOKENS, WIDTH])]
    if return_indices:
        outputs.append(helper.make_tensor_value_info("idx", TensorProto.INT64, ["N", TOKENS, 2]))
    graph = helper.make_graph(nodes, "routed", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                              ["N", TOKENS, WIDTH])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _indices(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The router's indices as an ONNX Runtime session returns them (independent of compare's pass), with Q/DQ run
    as written, as compare runs a TensorRT-form candidate (``simulates_tensorrt``): ORT's fused integer kernels
    round the INT8 router's logits otherwise (on an AVX2 CPU they picked other experts for 2 of 60 rows)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(proto)
    exposed.graph.output.append(helper.make_tensor_value_info("idx", TensorProto.INT64, None))
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(exposed.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
    return session.run(["idx"], {"x": x})[0]


def test_changed_rows_count_selections_their_order_aside():
    top2 = Selection("TopK", "idx", -1)
    ref = np.array([[[3, 5], [1, 2]], [[0, 4], [2, 0]]])
    got = np.array([[[5, 3], [1, 4]], [[0, 4], [0, 2]]])  # a swap of ranks is no change; {1, 4} is
    assert changed_rows(ref, got, top2) == (4, 1)
    assert changed_rows(np.moveaxis(ref, -1, 0), np.moveaxis(got, -1, 0), Selection("TopK", "idx", 0)) == (4, 1)
    arg = Selection("ArgMax", "idx", -1)
    assert changed_rows(np.array([[1], [2], [0]]), np.array([[1], [0], [0]]), arg) == (3, 1)
    assert changed_rows(ref, got[:, :1], top2) == (4, 4)  # another shape: every row changed


def test_only_value_decided_picks_the_model_does_not_return_are_followed():
    assert decided_selections(model_from_proto(routed_model())) == {"route": Selection("TopK", "idx", -1)}
    assert decided_selections(model_from_proto(routed_model(argmax=True))) == {"route": Selection("ArgMax", "idx", -1)}
    assert decided_selections(model_from_proto(routed_model(return_indices=True))) == {}


def test_an_int8_candidate_that_reroutes_tokens_is_counted_per_row(capsys):
    """Calibrated on a narrow range, INT8 clips the router's input: some tokens get other experts. The count must be
    the rows whose expert set differs, as ONNX Runtime itself returns them; the FP32 model moves none."""
    model = model_from_proto(routed_model())
    rng = np.random.default_rng(0)
    calib = from_arrays({"x": rng.uniform(-0.5, 0.5, (16, TOKENS, WIDTH)).astype(np.float32)})
    table = calibrate(model, calib, "minmax", batch_size=8).tables["minmax"]
    int8 = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    x = rng.normal(0, 1.5, (12, TOKENS, WIDTH)).astype(np.float32)
    result = compare(model, {"int8": int8, "fp32": model}, from_arrays({"x": x}, role="validation"),
                     CompareOptions(batch_size=4, per_layer=False, bootstrap=0), progress=True)
    rows = {r["candidate"]: r for r in result.settings["selection_flips"]}
    ref_sets, int8_sets = np.sort(_indices(model.proto, x), -1), np.sort(_indices(int8.proto, x), -1)
    expected = int(np.count_nonzero((ref_sets != int8_sets).any(-1)))
    assert expected > 0
    assert rows["int8"]["rows"] == 12 * TOKENS and rows["int8"]["changed"] == expected
    assert rows["fp32"]["changed"] == 0 and rows["int8"]["op"] == "TopK" and rows["int8"]["node"] == "route"
    (note,) = [w for w in result.warnings if "selected other elements" in w]
    assert f"candidate 'int8': TopK 'route' (indices 'idx') in {expected} of {12 * TOKENS} row(s)" in note
    assert "'fp32'" not in note and note.startswith("WARNING" if expected > 0.01 * 12 * TOKENS else "a candidate")
    assert "selections" in capsys.readouterr().err


def test_a_quiet_candidate_gets_no_note():
    rows = [{"candidate": "c", "node": "route", "op": "TopK", "indices": "idx", "rows": 1000, "changed": 0}]
    assert selection_note(rows) is None
    rows[0]["changed"] = 5
    note = selection_note(rows)
    assert note is not None and not note.startswith("WARNING") and "5 of 1000 row(s) (0.5%)" in note

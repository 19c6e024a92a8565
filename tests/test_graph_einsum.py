"""Einsums that are matrix products load as Transpose/MatMul (quantlab.graph.einsum): same outputs on ONNX
Runtime, INT8 MatMuls in the written model, and TensorRT-RTX parses and builds it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import models
from quantlab.graph import model_from_proto

HIDDEN, HEADS = 16, 2


def einsum_attention(seed: int = 0) -> onnx.ModelProto:
    """A TF-style attention block: EinsumDense projections ("abc,cd->abd"; the query's weight first, "cd,abc->abd"),
    per-head scores ("bqhd,bkhd->bhqk"), the weighted values ("bhqk,bkhd->bqhd"), an output projection over heads
    and head size ("abcd,cde->abe": two contracted indices, left an Einsum) and a row sum ("ij->i", one operand)."""
    rng = np.random.default_rng(seed)
    head = HIDDEN // HEADS

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Einsum", ["wq", "x"], ["q"], name="query", equation="cd,abc->abd"),
        helper.make_node("Einsum", ["x", "wk"], ["k"], name="key", equation="abc,cd->abd"),
        helper.make_node("Einsum", ["x", "wv"], ["v"], name="value", equation="abc,cd->abd"),
        helper.make_node("Reshape", ["q", "heads"], ["qh"], name="q_heads"),
        helper.make_node("Reshape", ["k", "heads"], ["kh"], name="k_heads"),
        helper.make_node("Reshape", ["v", "heads"], ["vh"], name="v_heads"),
        helper.make_node("Einsum", ["qh", "kh"], ["scores"], name="scores", equation="bqhd,bkhd->bhqk"),
        helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=-1),
        helper.make_node("Einsum", ["probs", "vh"], ["context"], name="context", equation="bhqk,bkhd->bqhd"),
        helper.make_node("Einsum", ["context", "wo"], ["y"], name="out_proj", equation="abcd,cde->abe"),
        helper.make_node("Einsum", ["wo2"], ["wo2_sum"], name="row_sum", equation="ij->i"),
        helper.make_node("Einsum", ["y", "wo2"], ["z"], name="final", equation="...c,cd"),
    ]
    graph = helper.make_graph(
        nodes, "einsum_attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, HIDDEN])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 6, 4]),
         helper.make_tensor_value_info("wo2_sum", TensorProto.FLOAT, [HIDDEN])],
        [weight("wq", HIDDEN, HIDDEN), weight("wk", HIDDEN, HIDDEN), weight("wv", HIDDEN, HIDDEN),
         weight("wo", HEADS, head, HIDDEN), weight("wo2", HIDDEN, 4),
         numpy_helper.from_array(np.array([0, 0, HEADS, head], np.int64), "heads")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _run(proto: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return models.ort_session(proto).run(None, {"x": x})


def test_matrix_product_einsums_load_as_matmuls_computing_the_same():
    proto = einsum_attention()
    loaded = model_from_proto(proto, label="einsum")
    ops = {n.name: n.op_type for n in loaded.proto.graph.node}
    assert {k: ops[k] for k in ("query", "key", "value", "scores", "context", "final")} == dict.fromkeys(
        ("query", "key", "value", "scores", "context", "final"), "MatMul")
    assert ops["out_proj"] == "Einsum" and ops["row_sum"] == "Einsum"  # two contracted indices; one operand
    transposes = [n for n in loaded.proto.graph.node if n.op_type == "Transpose"]
    assert sorted(n.name for n in transposes) == ["context/transpose_b", "context/transpose_out",
                                                  "scores/transpose_a", "scores/transpose_b"]
    weights = {i.name: numpy_helper.to_array(i) for i in loaded.proto.graph.initializer}
    query = next(n for n in loaded.proto.graph.node if n.name == "query")
    assert list(query.input) == ["x", "wq"]  # the weight on the right, as written: per-channel over d
    x = np.random.default_rng(1).normal(0, 1, (3, 6, HIDDEN)).astype(np.float32)
    for got, want in zip(_run(loaded.proto, x), _run(proto, x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert "wq" in weights and weights["wq"].shape == (HIDDEN, HIDDEN)


def test_a_transposed_weight_is_stored_transposed_once():
    """``"abc,dc->abd"`` (a torch Linear written as einsum: the weight is [out, in]) becomes MatMul with the
    weight transposed once, as an initializer: no Transpose runs per batch, and the MatMul reads a plain weight."""
    rng = np.random.default_rng(2)
    w = rng.normal(0, 0.3, (5, HIDDEN)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Einsum", ["x", "w"], ["y"], name="linear", equation="abc,dc->abd")], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 5])], [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    loaded = model_from_proto(proto)
    assert [n.op_type for n in loaded.proto.graph.node] == ["MatMul"]
    (weight,) = loaded.proto.graph.initializer
    np.testing.assert_array_equal(numpy_helper.to_array(weight), w.T)
    x = rng.normal(0, 1, (2, 6, HIDDEN)).astype(np.float32)
    np.testing.assert_allclose(_run(loaded.proto, x)[0], _run(proto, x)[0], rtol=1e-5, atol=1e-5)


def test_einsum_layers_are_written_int8_and_tensorrt_rtx_builds_them():
    """Before, every Einsum stayed float: no Q/DQ, the model INT8 in name only."""
    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays
    from quantlab.plan import uniform_plan
    from quantlab.quantize import WriteOptions, write_model

    loaded = model_from_proto(einsum_attention(), label="einsum")
    data = from_arrays({"x": np.random.default_rng(3).normal(0, 1, (8, 6, HIDDEN)).astype(np.float32)})
    table = calibrate(loaded, data, "minmax").tables["minmax"]
    written = write_model(loaded, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    graph = written.proto.graph
    made = {o: n for n in graph.node for o in n.output}
    int8_matmuls = {n.name for n in graph.node if n.op_type == "MatMul"
                    and all(made.get(t) is not None and made[t].op_type == "DequantizeLinear" for t in n.input)}
    assert {"query", "key", "value", "scores", "context", "final"} <= int8_matmuls
    x = np.random.default_rng(4).normal(0, 1, (2, 6, HIDDEN)).astype(np.float32)
    got, want = _run(written.proto, x)[0], _run(loaded.proto, x)[0]
    cosine = float(np.sum(got * want) / np.linalg.norm(got) / np.linalg.norm(want))
    assert cosine > 0.99
    tensorrt = pytest.importorskip("tensorrt_rtx_bindings", reason="the tensorrt-rtx extra is not installed")
    assert tensorrt is not None
    from quantlab.backends.tensorrt import TensorRTBackend

    engine = TensorRTBackend("tensorrt-rtx").build_engine(written.proto, label="einsum int8")
    assert isinstance(engine, bytes) and len(engine) > 10_000

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
    """A TF BERT attention block as tf2onnx writes it: EinsumDense projections into heads ("abc,cde->abde"; the
    value's weight first), scores from key and query ("aecd,abcd->acbe"), the weighted values ("acbe,aecd->abcd"),
    the projection out of the heads ("abcd,cde->abe"), a dense layer with an ellipsis and an implicit output
    ("...c,cd"), a torch Linear's [out, in] weight ("abc,dc->abd"). Left Einsums: a row sum ("ij->i", one operand)
    and a per-position dot product of two activations over two indices ("abcd,abcd->ab")."""
    rng = np.random.default_rng(seed)
    head = HIDDEN // HEADS

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Einsum", ["x", "wq"], ["q"], name="query", equation="abc,cde->abde"),
        helper.make_node("Einsum", ["x", "wk"], ["k"], name="key", equation="abc,cde->abde"),
        helper.make_node("Einsum", ["wv", "x"], ["v"], name="value", equation="cde,abc->abde"),
        helper.make_node("Einsum", ["k", "q"], ["scores"], name="scores", equation="aecd,abcd->acbe"),
        helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=-1),
        helper.make_node("Einsum", ["probs", "v"], ["context"], name="context", equation="acbe,aecd->abcd"),
        helper.make_node("Einsum", ["context", "wo"], ["y"], name="out_proj", equation="abcd,cde->abe"),
        helper.make_node("Einsum", ["y", "wd"], ["d"], name="dense", equation="...c,cd"),
        helper.make_node("Einsum", ["d", "wl"], ["z"], name="linear", equation="abc,dc->abd"),
        helper.make_node("Einsum", ["wd"], ["wd_sum"], name="row_sum", equation="ij->i"),
        helper.make_node("Einsum", ["context", "q"], ["agreement"], name="agreement", equation="abcd,abcd->ab"),
    ]
    graph = helper.make_graph(
        nodes, "einsum_attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, HIDDEN])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 6, 3]),
         helper.make_tensor_value_info("wd_sum", TensorProto.FLOAT, [HIDDEN]),
         helper.make_tensor_value_info("agreement", TensorProto.FLOAT, ["N", 6])],
        [weight("wq", HIDDEN, HEADS, head), weight("wk", HIDDEN, HEADS, head), weight("wv", HIDDEN, HEADS, head),
         weight("wo", HEADS, head, HIDDEN), weight("wd", HIDDEN, 4), weight("wl", 3, 4)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


LOWERED = ("query", "key", "value", "scores", "context", "out_proj", "dense", "linear")


def _run(proto: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return models.ort_session(proto).run(None, {"x": x})


def test_matrix_product_einsums_load_as_matmuls_computing_the_same():
    proto = einsum_attention()
    loaded = model_from_proto(proto, label="einsum")
    ops = {n.name: n.op_type for n in loaded.proto.graph.node}
    assert {k: ops[k] for k in LOWERED} == dict.fromkeys(LOWERED, "MatMul")
    assert ops["row_sum"] == "Einsum" and ops["agreement"] == "Einsum"
    helpers = sorted((n.op_type, n.name) for n in loaded.proto.graph.node if n.op_type in ("Transpose", "Reshape"))
    assert helpers == [("Reshape", "key/split"), ("Reshape", "out_proj/merge"), ("Reshape", "query/split"),
                       ("Reshape", "value/split"), ("Transpose", "context/transpose_b"),
                       ("Transpose", "context/transpose_out"), ("Transpose", "scores/transpose_a"),
                       ("Transpose", "scores/transpose_b"), ("Transpose", "scores/transpose_out")]
    weights = {i.name: numpy_helper.to_array(i) for i in loaded.proto.graph.initializer}
    matmuls = {n.name: list(n.input) for n in loaded.proto.graph.node if n.op_type == "MatMul"}
    assert weights[matmuls["query"][1]].shape == (HIDDEN, HIDDEN)  # [c, h, d] -> [c, h*d]
    assert matmuls["value"][0] == "x"  # the weight-first einsum: the activation on the left
    assert weights[matmuls["out_proj"][1]].shape == (HIDDEN, HIDDEN)  # [h, d, e] -> [h*d, e]
    assert matmuls["dense"][1] == "wd"  # already [K, N]: the same initializer
    assert not {"wq", "wk", "wv", "wo", "wl"} & set(weights)  # replaced, not kept beside their matrices
    x = np.random.default_rng(1).normal(0, 1, (3, 6, HIDDEN)).astype(np.float32)
    for got, want in zip(_run(loaded.proto, x), _run(proto, x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


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
    assert set(LOWERED) <= int8_matmuls
    x = np.random.default_rng(4).normal(0, 1, (2, 6, HIDDEN)).astype(np.float32)
    got, want = _run(written.proto, x)[0], _run(loaded.proto, x)[0]
    cosine = float(np.sum(got * want) / np.linalg.norm(got) / np.linalg.norm(want))
    assert cosine > 0.99
    tensorrt = pytest.importorskip("tensorrt_rtx_bindings", reason="the tensorrt-rtx extra is not installed")
    assert tensorrt is not None
    from quantlab.backends.tensorrt import TensorRTBackend

    engine = TensorRTBackend("tensorrt-rtx").build_engine(written.proto, label="einsum int8")
    assert isinstance(engine, bytes) and len(engine) > 10_000

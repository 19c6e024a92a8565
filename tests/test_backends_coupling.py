"""Batch coupling measured by running samples alone (quantlab.backends.coupling) on real ONNX Runtime sessions."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

import models
from quantlab.backends import get_backend
from quantlab.backends.coupling import COUPLING_TOLERANCE, batch_coupling, measured_coupling
from quantlab.data import from_arrays
from quantlab.graph import model_from_proto
from quantlab.graph.samples import batch_named_outputs, sample_mixing_nodes


def _data(shape: tuple[int, ...], seed: int = 0) -> object:
    return from_arrays({"input": np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32)})


def test_a_while_loop_that_runs_until_the_whole_batch_converges_is_measured_coupled():
    """until_converged stops when no element of the *batch* moves: the graph analysis sees no reduction over the
    sample axis (it is in the body, where shape inference loses the batch symbol), but a sample's refined state and
    its number of steps change with its batch mates."""
    model = model_from_proto(models.until_converged())
    assert sample_mixing_nodes(model, {}) == []
    data = _data((8, 16))
    found = {c.output: c for c in measured_coupling(get_backend("ort"), model, data, 4)}
    assert set(found) == {"refined", "steps"}  # 'ids' is int64: not judged
    assert found["refined"].how == "" and found["refined"].change > 10 * COUPLING_TOLERANCE
    assert found["steps"].how == "shape" and "its shape" in found["steps"].describe()
    coupling = batch_coupling(model, data, 4)
    assert coupling and not coupling.nodes and "run alone" in coupling.note(model.label, 4)
    assert "use --batch-size 1" in coupling.note(model.label, 4)


def test_independent_samples_are_not_measured_coupled_by_kernel_rounding():
    """A static-trip loop and a conv net give each sample the same outputs alone (to float rounding: ONNX Runtime
    may pick other kernels for one row than for four)."""
    backend = get_backend("ort")
    assert measured_coupling(backend, model_from_proto(models.refinement_loop()), _data((8, 16)), 4) == []
    conv = model_from_proto(models.conv_net(size=8))
    assert measured_coupling(backend, conv, _data((6, 3, 8, 8)), 4) == []
    assert measured_coupling(backend, conv, _data((6, 3, 8, 8)), 1) == []
    assert not batch_coupling(conv, _data((6, 3, 8, 8)), 4)  # no bodies: the graph analysis is enough, no run


def test_only_outputs_that_name_the_batch_are_judged():
    """A flattened output ``[?]`` holds the whole batch's values in one axis: which belong to which sample is
    unknown, so it is not compared (it would look coupled: 8 values together, 4 alone)."""
    nodes = [helper.make_node("Relu", ["input"], ["y"], name="relu"),
             helper.make_node("Reshape", ["y", "flat_shape"], ["flat"], name="flatten")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
                               helper.make_tensor_value_info("flat", TensorProto.FLOAT, [None])],
                              [onnx.numpy_helper.from_array(np.array([-1], np.int64), "flat_shape")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert batch_named_outputs(model, {}) == ["y"]
    assert measured_coupling(get_backend("ort"), model, _data((4, 4)), 4) == []


def test_a_two_tower_similarity_matrix_is_said_to_pair_the_samples():
    """CLIP's logits_per_image [N, M] holds every image against every text of the batch: alone, a sample's row has
    one column. The note says the output pairs the samples rather than blaming a hidden reduction."""
    w = onnx.numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.3, (4, 4)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["image", "w"], ["image_embeds"], name="image_proj"),
         helper.make_node("Transpose", ["text"], ["text_t"], name="text_t", perm=[1, 0]),
         helper.make_node("MatMul", ["image_embeds", "text_t"], ["logits_per_image"], name="similarity")], "towers",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("text", TensorProto.FLOAT, ["M", 4])],
        [helper.make_tensor_value_info("logits_per_image", TensorProto.FLOAT, ["N", "M"]),
         helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["N", 4])], [w])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    rng = np.random.default_rng(1)
    data = from_arrays({"image": rng.normal(0, 1, (4, 4)).astype(np.float32),
                        "text": rng.normal(0, 1, (4, 4)).astype(np.float32)})
    (found,) = measured_coupling(get_backend("ort"), model, data, 4)
    assert found.output == "logits_per_image" and found.how == "pairs N, M"
    assert "its [N, M] pairs every sample with the others" in found.describe()
    # the graph shows it too, so calibrate and run (which measure only models with bodies) see it: batch 1
    assert sample_mixing_nodes(model, {}) == ["similarity"]
    coupling = batch_coupling(model, data, 4)
    assert coupling.nodes == ("similarity",) and "a product that pairs the samples" in coupling.note(model.label, 4)
    assert sample_mixing_nodes(model_from_proto(models.conv_net(size=8)), {}) == []
    slip = models.any_size_classifier()  # an exporter declared a map's H as the batch: one input holds samples
    slip.graph.output[0].CopyFrom(helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", 8, "N", "W"]))
    assert sample_mixing_nodes(model_from_proto(slip), {}) == []

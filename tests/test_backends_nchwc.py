"""Statistics runs in ONNX Runtime's NCHWc layout: the same values as the ordinary run, and the same statistics."""

from __future__ import annotations

import models
import numpy as np
import onnx
import onnxruntime
import pytest

from quantlab.backends import get_backend
from quantlab.backends.base import TensorValues
from quantlab.backends.nchwc import (
    BlockedRunner,
    block_size,
    blocked_graph,
    in_layout,
    values_of,
)
from quantlab.backends.ort import OrtBackend
from quantlab.graph import activation_names, model_from_proto, tensor_specs
from quantlab.stats import collect_statistics

BLOCK = block_size(onnxruntime)
needs_nchwc = pytest.mark.skipif(BLOCK is None, reason="this ONNX Runtime has no NCHWc kernels on this CPU")


class _Ordinary(OrtBackend):
    """The ordinary path: every exposed tensor converted to its ONNX layout by ORT."""

    def build_values(self, model: onnx.ModelProto, outputs):  # type: ignore[override]
        return self.build(model, outputs=outputs)


def _blocked(block: int, channels: int, n: int = 2, spatial: tuple[int, ...] = (3, 5), seed: int = 0):
    """An NCHW array and its blocked storage as ORT returns it ([N, C_padded, *spatial], padding lanes 7.0)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, channels) + spatial).astype(np.float32)
    padded = -(-channels // block) * block
    full = np.full((n, padded) + spatial, 7.0, np.float32)
    full[:, :channels] = x
    lanes = full.reshape(n, padded // block, block, -1)  # [N, C/B, B, HW]
    stored = np.ascontiguousarray(np.moveaxis(lanes, 2, 3)).reshape((n, padded) + spatial)
    return x, stored


@pytest.mark.parametrize("block,channels", [(8, 8), (8, 12), (16, 24), (16, 5), (8, 1)])
def test_values_of_holds_every_real_value_once_and_in_layout_undoes_the_blocking(block, channels):
    x, stored = _blocked(block, channels)
    pieces = values_of(stored, channels, block)
    values = np.concatenate([np.ravel(p) for p in pieces])
    assert values.size == x.size and 7.0 not in values  # the padding lanes are left out
    assert np.array_equal(np.sort(values), np.sort(x.ravel()))
    assert np.array_equal(in_layout(stored, channels, block), x)


def _exposed(model: onnx.ModelProto) -> list[str]:
    return [t for t in activation_names(model) if t not in {i.name for i in model.graph.input}]


def _inferred(proto: onnx.ModelProto) -> onnx.ModelProto:
    return model_from_proto(proto).proto


@needs_nchwc
def test_blocked_run_gives_the_values_of_the_ordinary_run():
    proto = _inferred(models.blocked_layout_net())
    names = _exposed(proto)
    assert len(names) == 13
    backend = get_backend("ort", spinning=False)
    runner = backend.build_values(proto, names)
    assert isinstance(runner, BlockedRunner)
    x = models.random_inputs(proto, 3, seed=1)
    got = runner.run(x, names)
    want = backend.build(proto, outputs=names).run(x, names)
    blocked = [t for t in names if isinstance(got[t], TensorValues)]
    # the convolutions' outputs and the elementwise ops between them stay blocked; the broadcast Mul does not
    assert {"stem", "stem6", "dw", "dwr", "proj", "res"} <= set(blocked)
    assert not isinstance(got["scaled"], TensorValues)
    for t in names:
        value = got[t]
        if isinstance(value, TensorValues):
            flat = np.concatenate([np.ravel(p) for p in value.pieces])
            assert np.array_equal(np.sort(flat), np.sort(want[t].ravel())), t
            assert np.array_equal(value.in_layout(), want[t]), t
        else:
            assert np.array_equal(value, want[t]), t


@needs_nchwc
@pytest.mark.parametrize("scope", ["all", "post-activation"])
def test_statistics_are_identical_to_the_ordinary_path(scope):
    model = model_from_proto(models.blocked_layout_net(seed=3))
    proto = model.proto
    names = activation_names(proto)
    if scope == "post-activation":  # the pre-activations unexposed: ORT fuses Conv+Clip, Conv+Relu
        names = [t for t in names if t not in ("stem", "dw")]
    feeds = models.random_inputs(proto, 16, seed=2)

    def batches():
        return ({"x": feeds["x"][i:i + 4]} for i in range(0, 16, 4))

    fast = collect_statistics(model, batches, tensors=names, backend=get_backend("ort", spinning=False))
    ordinary = collect_statistics(model, batches, tensors=names, backend=_Ordinary(spinning=False))
    assert set(fast.tensors) == set(names)
    assert fast.backend["exposed_layout"] == [f"nchwc{BLOCK}"] and ordinary.backend["exposed_layout"] == ["onnx"]
    for t in names:
        assert fast.tensors[t] == ordinary.tensors[t], t


def test_control_flow_graphs_are_left_to_the_ordinary_path():
    proto = models.voice_activity()  # an If with two branch subgraphs
    assert any(a.type == onnx.AttributeProto.GRAPH for n in proto.graph.node for a in n.attribute)
    graph, blocked = blocked_graph(proto, ["h"], [o.name for o in proto.graph.output], tensor_specs(proto))
    assert blocked == {} and graph is proto


@needs_nchwc
def test_a_model_without_convolutions_gets_the_ordinary_runner():
    proto = _inferred(models.mlp_attention())
    runner = get_backend("ort").build_values(proto, _exposed(proto))
    assert not isinstance(runner, BlockedRunner)


def _pooling_net(channels: int = 16) -> onnx.ModelProto:
    """x -> Conv (c) -> Clip 0..6 (r) -> GlobalAveragePool (gap), MaxPool 3x3/2 (mp), AveragePool 2x2 (ap):
    ``channels`` fill whole blocks of 8 and 16, so ORT pools in NCHWc when ``c`` is not exposed."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    w = numpy_helper.from_array(rng.normal(0, 0.3, size=(channels, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c", "lo", "hi"], ["r"], name="relu6"),
             helper.make_node("GlobalAveragePool", ["r"], ["gap"], name="gap"),
             helper.make_node("MaxPool", ["r"], ["mp"], name="mp", kernel_shape=[3, 3], strides=[2, 2]),
             helper.make_node("AveragePool", ["r"], ["ap"], name="ap", kernel_shape=[2, 2], strides=[2, 2])]
    bounds = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("lo", 0.0), ("hi", 6.0))]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", channels, h, h])
               for n, h in (("gap", 1), ("mp", 19), ("ap", 20))]
    graph = helper.make_graph(nodes, "pools", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 40, 40])],
                              outputs, initializer=[w, *bounds])
    return _inferred(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


@needs_nchwc
def test_pools_after_an_exposed_tensor_run_as_in_the_model_itself():
    """Exposing c and r makes ORT pool in NCHW, whose sums round otherwise than its NCHWc pooling of the plain model (a
    GlobalAveragePool 1 ulp off on an AVX2 CPU: a table of every tensor and one of the quantized ones differed).
    The statistics run pools the blocked twin, as the model's own session does."""
    proto = _pooling_net()
    x = {"x": np.random.default_rng(5).normal(size=(4, 3, 40, 40)).astype(np.float32) * 3}
    backend = get_backend("ort", spinning=False)
    plain = backend.build(proto).run(x, ["gap", "mp", "ap"])
    runner = backend.build_values(proto, ["c", "r", "gap", "mp", "ap"])  # c exposed: ORT runs the Clip apart, in NCHW
    assert isinstance(runner, BlockedRunner)
    got = runner.run(x, ["c", "r", "gap", "mp", "ap"])
    assert isinstance(got["r"], TensorValues)
    for t in ("gap", "mp", "ap"):
        assert np.array_equal(got[t], plain[t]), t

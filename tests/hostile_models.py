"""Broken or hostile ONNX models for tests/test_hostile.py, built with onnx.helper.

They are never checked: some are invalid on purpose.

Each builder returns an ``onnx.ModelProto`` shaped like ``models.conv_net`` (input ``input``
[N,3,8,8] float32) so the shared data sets of the hostile tests fit it, unless the point is a misfit.
"""

from __future__ import annotations

import models
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = models.OPSET
SIZE = 8


def _model(nodes: list, inputs: list, outputs: list, inits: list, name: str,
           extra_opsets: tuple[tuple[str, int], ...] = ()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="quantlab-hostile-tests")
    model.ir_version = 8
    return model


def small_conv_net() -> onnx.ModelProto:
    """``models.conv_net`` at 4 channels and 8x8 pixels: the valid model every hostile case starts from."""
    return models.conv_net(seed=0, channels=4, size=SIZE)


def cyclic_net() -> onnx.ModelProto:
    """input -> Add(input, loop) -> Relu -> loop: the Add reads the Relu's output, a cycle."""
    nodes = [
        helper.make_node("Add", ["input", "loop"], ["summed"], name="cycle_add"),
        helper.make_node("Relu", ["summed"], ["loop"], name="cycle_relu"),
    ]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])]
    outputs = [helper.make_tensor_value_info("loop", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])]
    return _model(nodes, inputs, outputs, [], "cyclic_net")


def duplicate_names_net() -> onnx.ModelProto:
    """``small_conv_net`` with both Relu nodes named ``relu1``."""
    model = small_conv_net()
    for node in model.graph.node:
        if node.name == "relu2":
            node.name = "relu1"
    return model


def huge_dim_net(dim: int = 10**12, axis: int = 2) -> onnx.ModelProto:
    """Relu -> GlobalAveragePool -> Flatten on an input whose ``axis`` is fixed at ``dim`` (``axis`` 0: the batch)."""
    shape: list[int | str] = ["N", 3, SIZE, SIZE]
    shape[axis] = dim
    nodes = [
        helper.make_node("Relu", ["input"], ["relu"], name="relu"),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["out"], name="flatten", axis=1),
    ]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [shape[0], 3])]
    return _model(nodes, inputs, outputs, [], "huge_dim_net")


CUSTOM_DOMAIN = "com.example.hostile"


def custom_op_net() -> onnx.ModelProto:
    """Conv -> ``Frobnicate`` (domain com.example.hostile, no implementation anywhere) -> Relu."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Frobnicate", ["conv"], ["frob"], name="frobnicate", domain=CUSTOM_DOMAIN),
        helper.make_node("Relu", ["frob"], ["out"], name="relu"),
    ]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, SIZE, SIZE])]
    return _model(nodes, inputs, outputs, [w], "custom_op_net", extra_opsets=((CUSTOM_DOMAIN, 1),))


def external_data_net(location: str) -> onnx.ModelProto:
    """``small_conv_net`` whose first conv weight ``w1`` claims to live in the external file ``location``."""
    model = small_conv_net()
    for init in model.graph.initializer:
        if init.name == "w1":
            init.ClearField("raw_data")
            init.ClearField("float_data")
            init.data_location = TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", "0"), ("length", "432")):
                entry = init.external_data.add()
                entry.key, entry.value = key, value
    return model


def integer_only_net() -> onnx.ModelProto:
    """int64 input -> Add(1) -> Mul(2): no float activation anywhere (nothing to calibrate)."""
    one = numpy_helper.from_array(np.array(1, np.int64), "one")
    two = numpy_helper.from_array(np.array(2, np.int64), "two")
    nodes = [
        helper.make_node("Add", ["input", "one"], ["plus"], name="plus_one"),
        helper.make_node("Mul", ["plus", "two"], ["out"], name="times_two"),
    ]
    inputs = [helper.make_tensor_value_info("input", TensorProto.INT64, ["N", 4])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.INT64, ["N", 4])]
    return _model(nodes, inputs, outputs, [one, two], "integer_only_net")


def other_input_net() -> onnx.ModelProto:
    """A float model whose input is ``pixels`` [N,3,8,8]: a candidate that does not match the reference."""
    nodes = [helper.make_node("Relu", ["pixels"], ["out"], name="relu")]
    inputs = [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])]
    return _model(nodes, inputs, outputs, [], "other_input_net")

"""A model below the opset quantlab writes, upgraded so that it computes what it computed before.

ONNX's version converter keeps each node's attributes but not always its meaning: an opset-10 ``Resize`` (or an
``Upsample``, which it turns into one) has no ``coordinate_transformation_mode``, and opset 11 gave that attribute
a default of its own. Upgraded as is, a bilinear upsample moved its sampling grid by half a pixel: the FP32
reference then differed from the file by 1.6 on unit-variance data, and every figure was measured against the
changed model (an opset-10 export of ``F.interpolate(mode="bilinear")`` read 17.9 dB against itself)::

    Resize-10 (mode=linear)           ──► Resize-13 (mode=linear, coordinate_transformation_mode=asymmetric)
    Upsample-7/9 (mode=linear)        ──► (the same: what ONNX Runtime and TensorRT compute for opset < 11)
    Hardmax-<13 (axis not the last)   ──► refused: the converter keeps the axis, whose meaning changed in 13
"""

from __future__ import annotations

import onnx
from onnx import helper

from ..errors import ModelError
from .topology import nested_graphs

__all__ = ["upgraded"]

_ASYMMETRIC_BEFORE = 11
"""Below this opset a Resize's (an Upsample's) sampling grid is ``x_in = x_out / scale`` (``asymmetric``); from 11
the attribute defaults to ``half_pixel``. Nearest neighbour reads the same pixels either way (checked against ONNX
Runtime at scales 3, 2 x 1.5, 0.5 and 1.5 x 0.5); linear does not."""

_FLATTENED_BEFORE = 13
"""Below this opset Hardmax works on the input flattened to 2-D at ``axis``; from 13 along ``axis`` alone."""


def upgraded(proto: onnx.ModelProto, opset: int, target: int, label: str) -> onnx.ModelProto:
    """``proto`` (default-domain opset ``opset``) converted to ``target``, computing what it computed."""
    if opset < _FLATTENED_BEFORE:
        _refuse_flattened_hardmax(proto, label)
    from onnx import version_converter

    try:
        out = version_converter.convert_version(proto, target)
        onnx.checker.check_model(out)
    except Exception as exc:
        raise ModelError(
            f"{label}: opset {opset} is below {target} (needed for per-channel "
            f"Q/DQ) and the automatic upgrade failed: {exc}. Re-export the model with "
            f"opset_version>={target}."
        ) from None
    if opset < _ASYMMETRIC_BEFORE:
        _keep_asymmetric_grids(out)
    return out


def _keep_asymmetric_grids(proto: onnx.ModelProto) -> None:
    """Every linear Resize (from a Resize-10 or an Upsample) without a grid attribute gets the grid it had."""
    for graph in nested_graphs(proto.graph):
        for node in graph.node:
            if node.op_type != "Resize" or any(a.name == "coordinate_transformation_mode" for a in node.attribute):
                continue
            mode = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "mode"), b"nearest")
            if mode != b"nearest":
                node.attribute.append(helper.make_attribute("coordinate_transformation_mode", "asymmetric"))


def _refuse_flattened_hardmax(proto: onnx.ModelProto, label: str) -> None:
    """A Hardmax whose axis is not the last: the upgrade would change what it returns."""
    ranks: dict[str, int] | None = None
    for graph in nested_graphs(proto.graph):
        for node in graph.node:
            if node.op_type != "Hardmax":
                continue
            if ranks is None:  # shape inference only for a model that holds a Hardmax
                inferred = onnx.shape_inference.infer_shapes(proto)
                ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in (*inferred.graph.input,
                         *inferred.graph.value_info, *inferred.graph.output) if v.type.tensor_type.HasField("shape")}
            axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1)
            if axis != -1 and axis != ranks.get(node.input[0], 0) - 1:
                raise ModelError(
                    f"{label}: Hardmax {node.name or node.output[0]!r} (axis {axis}) picks the largest value over the "
                    f"input flattened from axis {axis} in opsets below 13, along axis {axis} alone from 13; the "
                    f"upgrade to opset 13 that per-channel Q/DQ needs would change its result. Re-export the model "
                    "with opset_version>=13.")

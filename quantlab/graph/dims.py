"""Dynamic axes written as ``-1`` or ``0``: symbolic again, before shape inference.

Some converters (paddle2onnx, older tf2onnx and hand-edited graphs) write a dynamic
axis as ``dim_value: -1`` or ``0`` where ONNX wants a ``dim_param``. ONNX Runtime runs
a -1 model, but shape inference computes with the -1: a Conv over a width of -1 gets a
fixed width of 0, and a sub-model cut on that inferred type refuses every real width
("Got invalid dimensions ... Expected: 0"). ONNX Runtime refuses to feed a 0 input any
data at all. The data checks already read both as "any size"::

    image [-1, 3, 48, -1]          image [image_0, 3, 48, image_3]
    logits [-1, -1, 12]      ─►    logits [?, ?, 12]        (inference fills it)
    value_info dims -1             value_info dims unknown

Graph inputs get a symbol per axis (``<input>_<axis>``); every other declared -1 or 0
becomes unknown, for inference to fill (unknown is never wrong, a 0 that was meant would
be inferred again).
"""

from __future__ import annotations

import onnx

__all__ = ["symbolic_negative_dims"]


def symbolic_negative_dims(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with its dims of -1 or 0 made symbolic (inputs) or unknown (outputs, value_info), in place."""
    g = proto.graph
    for vi in g.input:
        for axis, dim in enumerate(_dims(vi)):
            if dim.HasField("dim_value") and dim.dim_value <= 0:
                dim.Clear()
                dim.dim_param = f"{vi.name}_{axis}"
    for vi in list(g.output) + list(g.value_info):
        for dim in _dims(vi):
            if dim.HasField("dim_value") and dim.dim_value <= 0:
                dim.Clear()
    return proto


def _dims(vi: onnx.ValueInfoProto) -> list[onnx.TensorShapeProto.Dimension]:
    t = vi.type
    if t.HasField("tensor_type") and t.tensor_type.HasField("shape"):
        return list(t.tensor_type.shape.dim)
    return []

"""Dynamic axes written as ``-1``, ``0`` or ``"?"``: symbolic again, before shape inference.

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

paddle2onnx also writes ``"?"`` as the symbol of *every* unknown axis (``x [-1, 3, ?, ?]``): taken as one
symbol, it made a text classifier's height and width one dim, and a 48x192 crop was refused ("dimension '?'
(axis 3) is 192 in the data but 48"). It means "unknown", so it gets the same treatment.
"""

from __future__ import annotations

import onnx

__all__ = ["symbolic_negative_dims"]

_UNKNOWN = frozenset({"?", "-1", "None"})
"""``dim_param`` spellings of "unknown" (not a symbol two axes could share)."""


def symbolic_negative_dims(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with its dims of -1, 0 or "?" made symbolic (inputs) or unknown (outputs, value_info), in place."""
    g = proto.graph
    for vi in g.input:
        for axis, dim in enumerate(_dims(vi)):
            if _unknown(dim):
                dim.Clear()
                dim.dim_param = f"{vi.name}_{axis}"
    for vi in list(g.output) + list(g.value_info):
        for dim in _dims(vi):
            if _unknown(dim):
                dim.Clear()
    return proto


def _unknown(dim: onnx.TensorShapeProto.Dimension) -> bool:
    if dim.HasField("dim_value"):
        return dim.dim_value <= 0
    return dim.HasField("dim_param") and dim.dim_param.strip() in _UNKNOWN


def _dims(vi: onnx.ValueInfoProto) -> list[onnx.TensorShapeProto.Dimension]:
    t = vi.type
    if t.HasField("tensor_type") and t.tensor_type.HasField("shape"):
        return list(t.tensor_type.shape.dim)
    return []

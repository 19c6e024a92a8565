"""Constant nodes of the main graph become initializers at load: one form for every fold that follows.

paddle2onnx writes parameters as ``Constant`` nodes, not initializers; so may any exporter for a value it
computed. The folds at load (BatchNorm into Conv, Pad into Conv, weights computed from constants) and the
writer's weight slots read initializers. A BatchNormalization whose running variance (1e7 to 4.8e7, PP-OCRv4's
text detector) sat in a Constant node was left unfolded, and its FP16 copy held 65504 there: the detector's
FP16 model read SQNR -0.7 dB, TensorRT built it all the same::

    Constant(value=t) ─► c ─► Op        ==>        c (initializer, the same values) ─► Op

Only tensor values and the numeric ``value_float(s)`` / ``value_int(s)`` forms are moved; a Constant the graph
outputs, or a sparse or string one, stays a node. Constants inside If / Loop bodies stay too (a branch that
is inlined at load brings its Constants to the main graph first).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["constants_to_initializers"]

_NUMERIC = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}


def constants_to_initializers(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` with its main graph's Constant nodes as initializers (``proto`` when it has none, or
    when its IR version (< 4) wants every initializer listed as a graph input too)."""
    if proto.ir_version < 4:
        return proto
    outputs = {o.name for o in proto.graph.output}
    moved = {i: tensor for i, n in enumerate(proto.graph.node)
             if (tensor := _value(n, outputs)) is not None}
    if not moved:
        return proto
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    kept = [n for i, n in enumerate(out.graph.node) if i not in moved]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    out.graph.initializer.extend(moved[i] for i in sorted(moved))
    return out


def _value(node: onnx.NodeProto, outputs: set[str]) -> onnx.TensorProto | None:
    """The initializer a Constant node stands for, or None to keep it as a node."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
        return None
    name = node.output[0]
    if not name or name in outputs or len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    if attr.name == "value":
        tensor = onnx.TensorProto()
        tensor.CopyFrom(attr.t)
        tensor.name = name
        return tensor
    if attr.name in _NUMERIC:
        return numpy_helper.from_array(np.asarray(helper.get_attribute_value(attr), _NUMERIC[attr.name]), name)
    return None

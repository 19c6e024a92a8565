"""Types for the outputs of ops outside the ONNX domain (ONNX Runtime's ``com.microsoft`` contrib ops).

ONNX shape inference has no schema for them, so their outputs get no type, and
every tensor downstream of them may lose its type too: the calibration would
not see them as float activations, while the writer still quantizes the
MatMul reading them ("no range for 'g'" on a ``com.microsoft::Gelu`` between
two MatMuls). Their outputs take the type of the node's first input when that
is a float type (``Gelu``, ``FastGelu``, ``SkipLayerNormalization``,
``FusedMatMul``, ``BiasAdd``, ``Attention``... map T to T), and inference runs
again to carry the types downstream::

    x:float ─► MatMul ─► h:float ─► com.microsoft::Gelu ─► g:?      ─► MatMul ─► y:?
                                                   ==>  g:float (h's)          y:float (inferred again)
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

__all__ = ["typed_custom_outputs"]

_FLOATS = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE})
_ONNX_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})


def _known_types(proto: onnx.ModelProto) -> dict[str, int]:
    g = proto.graph
    types = {i.name: i.data_type for i in g.initializer}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def typed_custom_outputs(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` (shape-inferred) with a type for each untyped output of a non-ONNX-domain node whose first
    input is a float, shape inference run again after; ``proto`` itself when there is none."""
    custom = [n for n in proto.graph.node if n.domain not in _ONNX_DOMAINS]
    for _ in range(len(custom)):  # each round types the nodes whose first input got a type in the last one
        types = _known_types(proto)
        added = []
        for node in custom:
            first = types.get(node.input[0]) if node.input and node.input[0] else None
            if first not in _FLOATS:
                continue
            added += [helper.make_tensor_value_info(o, first, None) for o in node.output if o and o not in types]
        if not added:
            break
        typed = onnx.ModelProto()
        typed.CopyFrom(proto)
        typed.graph.value_info.extend(added)
        try:
            proto = onnx.shape_inference.infer_shapes(typed, strict_mode=False, data_prop=True)
        except Exception:  # noqa: BLE001 - keep the added types without the downstream inference
            proto = typed
    return proto

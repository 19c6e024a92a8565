"""Types for the outputs of ops outside the ONNX domain (ONNX Runtime's ``com.microsoft`` contrib ops).

ONNX shape inference has no schema for them, so their outputs get no type, and
every tensor downstream of them may lose its type too: the calibration would
not see them as float activations, while the writer still quantizes the
MatMul reading them ("no range for 'g'" on a ``com.microsoft::Gelu`` between
two MatMuls). Their outputs get the type ONNX Runtime's schema gives them
(:data:`~quantlab.graph.contrib_types.CONTRIB_OUTPUT_TYPES`: the type of an
input sharing the output's type variable, or the one type it can have, e.g.
``EmbedLayerNormalization``'s int32 ``mask_index`` beside its float output); an
op the table does not know takes its first input's type when that is a float.
Inference then runs again to carry the types downstream::

    x:float ─► MatMul ─► h:float ─► com.microsoft::Gelu ─► g:?      ─► MatMul ─► y:?
                                                   ==>  g:float (h's)          y:float (inferred again)

Each round types the contrib ops whose inputs the last one typed (a transformer
ONNX Runtime optimized chains dozens through MatMuls), so the rounds run on the
weightless copy of :mod:`quantlab.graph.light`, and the types found are copied
back once.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from .contrib_types import CONTRIB_OUTPUT_TYPES
from .light import infer_light

__all__ = ["typed_custom_outputs", "contrib_output_types"]

_FLOATS = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE})
_ONNX_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})


def _known_types(proto: onnx.ModelProto) -> dict[str, int]:
    g = proto.graph
    types = {i.name: i.data_type for i in g.initializer}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def contrib_output_types(node: onnx.NodeProto, types: dict[str, int]) -> dict[str, int]:
    """Output name -> ONNX element type for the outputs of ``node`` (a non-ONNX-domain op) that its schema and
    the known ``types`` of its inputs decide; the others are left out."""
    rules = CONTRIB_OUTPUT_TYPES.get((node.domain or "", node.op_type))
    out: dict[str, int] = {}
    for k, name in enumerate(node.output):
        if not name:
            continue
        if rules is None:  # an op the table does not know: its first input's type, when a float
            first = types.get(node.input[0]) if node.input and node.input[0] else None
            if first in _FLOATS:
                out[name] = first
            continue
        rule = rules[k] if k < len(rules) else None
        if isinstance(rule, str):
            fixed = getattr(TensorProto, rule.upper(), None)  # "int32" -> TensorProto.INT32
            if isinstance(fixed, int):
                out[name] = fixed
        elif rule is not None:
            present = [node.input[i] for i in rule if i < len(node.input) and node.input[i]]
            if present and present[0] in types:
                out[name] = types[present[0]]
    return out


def typed_custom_outputs(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` (shape-inferred) with types for the untyped outputs of non-ONNX-domain nodes, shape inference
    run again after each round (on the weightless copy, module docstring); ``proto`` itself when there is
    nothing to type."""
    custom = [n for n in proto.graph.node if n.domain not in _ONNX_DOMAINS]
    if not custom or all(o in _known_types(proto) for n in custom for o in n.output if o):
        return proto
    typed = proto
    for _ in range(len(custom)):  # each round types the nodes whose inputs got a type in the last one
        types = _known_types(typed)
        added = [helper.make_tensor_value_info(o, t, None) for node in custom
                 for o, t in contrib_output_types(node, types).items() if o not in types]
        if not added:
            break
        if typed is proto:
            typed = onnx.ModelProto()
            typed.CopyFrom(proto)
        typed.graph.value_info.extend(added)
        try:
            infer_light(typed, strict_mode=False, data_prop=True)
        except Exception:  # noqa: BLE001 - keep the added types without the downstream inference
            pass
    return typed

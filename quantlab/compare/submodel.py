"""Cutting ONNX sub-models: a list of a model's nodes becomes a model of its own.

::

    model       x ──► [n1] ──► a ──► [n2] ──► b ──► [n3] ──► y
    submodel([n2], inputs=[a], outputs=[b]):      a ──► [n2] ──► b
                (initializers n2 reads, typed inputs/outputs/value_info, opsets, functions kept)

Every cut tensor needs a type: shapes come from the model's value_info and, when a produced
tensor has none, from ONNX shape inference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper

from ..backends import Backend, Runner
from ..errors import CompareError, QuantlabError
from ..graph import outer_names, tensor_specs

__all__ = ["node_reads", "has_subgraph", "typed_specs", "submodel", "build_runner"]


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Tensors a node reads: its inputs and the outer names its subgraphs use."""

    reads = [t for t in node.input if t]
    for attr in node.attribute:
        bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for body in bodies:
            reads.extend(sorted(outer_names(body)))
    return reads


def has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _value_info(name: str, specs: Mapping[str, Any], label: str) -> onnx.ValueInfoProto:
    spec = specs.get(name)
    if spec is None or spec.dtype == "undefined":
        raise CompareError(f"{label}: cannot tell the type of tensor {name!r} (shape inference gives none, or it "
                           "is a sequence); per-layer comparison needs typed tensors. Run without it (--no-per-layer "
                           "or --no-local; per_layer=False / local=False), or with another layer chunk "
                           "(--layer-group-size) that does not cut here.")
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype))
    shape = None if spec.shape is None else [d if isinstance(d, (int, str)) else None for d in spec.shape]
    return helper.make_tensor_value_info(name, elem, shape)


def typed_specs(proto: onnx.ModelProto) -> dict[str, Any]:
    """Tensor specs of the model, completed by shape inference when a produced tensor has no type."""
    specs = tensor_specs(proto)
    produced = {o for n in proto.graph.node for o in n.output if o}
    if any(t not in specs or specs[t].dtype == "undefined" for t in produced):
        try:
            inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
            specs = {**tensor_specs(inferred), **{k: v for k, v in specs.items() if v.dtype != "undefined"}}
        except Exception:  # noqa: BLE001 - inference raises several types; what is typed stays typed
            pass
    return specs


def submodel(proto: onnx.ModelProto, nodes: Sequence[onnx.NodeProto], inputs: Sequence[str],
             outputs: Sequence[str], specs: Mapping[str, Any], label: str,
             extra_inputs: Sequence[onnx.ValueInfoProto] = ()) -> onnx.ModelProto:
    """The model made of ``nodes`` (see the module docstring); ``label`` names it in errors."""
    reads = {t for n in nodes for t in node_reads(n)}
    inits = [i for i in proto.graph.initializer if i.name in reads]
    made = {o for n in nodes for o in n.output if o}
    value_info = []
    for t in sorted(made - set(outputs)):
        spec = specs.get(t)
        if spec is not None and spec.dtype != "undefined":
            value_info.append(_value_info(t, specs, label))
    graph = helper.make_graph(
        list(nodes), f"{proto.graph.name}_part",
        [_value_info(t, specs, label) for t in inputs] + list(extra_inputs),
        [_value_info(t, specs, label) for t in outputs],
        initializer=inits, value_info=value_info,
    )
    model = helper.make_model(graph, opset_imports=list(proto.opset_import))
    model.ir_version = proto.ir_version
    for f in proto.functions:
        model.functions.append(f)
    return model


def build_runner(backend: Backend, proto: onnx.ModelProto, outputs: Sequence[str], label: str) -> Runner:
    """The backend's runner of ``proto`` exposing ``outputs`` too; its errors name ``label``."""
    try:
        return backend.build(proto, outputs=list(outputs) or None)
    except QuantlabError as exc:
        raise type(exc)(f"{label}: {exc}") from None

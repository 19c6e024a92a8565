"""A Loop/Scan/If body as a model of its own: what the statistics of a body and the writing of a body both start from.

A body reads three kinds of tensors: its own inputs (a Loop's iteration number, condition and carried values; a
Scan's state and the slices of its scan inputs), tensors it defines, and tensors of the enclosing graph it reads by
name. As a model, the enclosing graph's weights it reads become its initializers and the other tensors it reads from
outside become inputs after its own::

    Loop(body: i, cond, h_in ─► MatMul(h_in, W) ─► Add(·, xp_t) ─► h_out)      W: a weight, xp: an activation
    ==>  model(inputs: i, cond, h_in, xp; initializers: W) ─► cond_out, h_out
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper

from .load import TensorSpec
from .topology import outer_names

__all__ = ["BRANCHES", "body_graphs", "body_key", "body_model", "body_outer_inputs", "value_info_of"]

BRANCHES = ("then_branch", "else_branch")
"""An If's bodies, by attribute name: taken when its condition is true, and when false."""


def body_key(owner: str, attr: str) -> str:
    """The name a body goes by in a calibration table's ``bodies`` and as the prefix of the names its writing makes:
    the node's name for a Loop/Scan body, ``node/then_branch`` for an If's branch (two branches may define the same
    tensor names, and TensorRT wants every layer name once)."""
    return owner if attr == "body" else f"{owner}/{attr}"


def body_graphs(node: onnx.NodeProto) -> dict[str, onnx.GraphProto]:
    """The body of a Loop/Scan (``body``) or the branches of an If, by attribute name."""
    graphs = {a.name: a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}
    return {name: graphs[name] for name in (BRANCHES if node.op_type == "If" else ("body",)) if name in graphs}


def body_outer_inputs(body: onnx.GraphProto, initializers: Mapping[str, onnx.TensorProto]) -> list[str]:
    """The enclosing graph's tensors ``body`` reads by name that are not weights (they become inputs), sorted."""
    return [r for r in sorted(outer_names(body)) if r not in initializers]


def body_model(body: onnx.GraphProto, owner: str, specs: Mapping[str, TensorSpec],
               initializers: Mapping[str, onnx.TensorProto], model: onnx.ModelProto) -> onnx.ModelProto:
    """``body`` of the node ``owner`` as a model: its inputs, then the outer tensors it reads (typed by ``specs``;
    one without a spec is left out, as before), the outer weights it reads as initializers, its own outputs.

    The inputs keep their types and ranks but not their fixed sizes: a loop-carried value may change shape from step
    to step, and exporters type it by the first (torch's token accumulator ``[N, 0]``, ``[N, 1]`` a step later: the
    body model refused the second step, and the decoder's body went uncalibrated)."""
    reads = sorted(outer_names(body))
    weights = [initializers[r] for r in reads if r in initializers]
    outer = [value_info_of(specs[r]) for r in reads if r not in initializers and r in specs]
    inputs = [_sizes_free(i) for i in body.input]
    graph = helper.make_graph(list(body.node), body.name or owner, [*inputs, *outer], list(body.output),
                              [*body.initializer, *weights], value_info=list(body.value_info))
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def _sizes_free(info: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    """``info`` with each fixed dim of a tensor type made unknown (type, rank and named dims kept)."""
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(info)
    if copy.type.HasField("tensor_type") and copy.type.tensor_type.HasField("shape"):
        for dim in copy.type.tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                dim.Clear()
    return copy


def value_info_of(spec: TensorSpec) -> onnx.ValueInfoProto:
    """A value info with ``spec``'s type and shape (unknown dims unnamed)."""
    dims = None if spec.shape is None else [d if isinstance(d, (int, str)) else None for d in spec.shape]
    return helper.make_tensor_value_info(spec.name, helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype)), dims)

"""Identity nodes over initializers, as torch's exporter writes them for shared or equal parameters.

``Identity(onnx::MatMul_510) -> onnx::MatMul_526`` (a second layer whose weight equals the first's) or
``Identity(enc.layers.0.norm1.weight) -> norm.weight`` (every LayerNorm weight of ones) makes a weight
look like an activation: it would be calibrated (a "tensor" saturating 100 % in the tables) and a MatMul
reading it would get activation Q/DQ (one calibrated scale) instead of its weight's per-channel one.
The consumers read the initializer directly instead::

    W (initializer) ─► Identity ─► W' ─► MatMul        ==>        W (initializer) ─► MatMul
"""

from __future__ import annotations

import onnx

from .topology import outer_names

__all__ = ["fold_initializer_identities"]


def fold_initializer_identities(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with the main graph's Identity nodes over initializers removed and their readers rewired; an
    Identity whose output is a graph output, or read from inside a subgraph, stays. ``proto`` itself when
    there is none."""
    g = proto.graph
    inits = {i.name for i in g.initializer} - {i.name for i in g.input}
    keep = {o.name for o in g.output}
    for node in g.node:
        for attr in node.attribute:
            for body in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                keep |= outer_names(body)
    source = {n.output[0]: n.input[0] for n in g.node
              if n.op_type == "Identity" and n.domain in ("", "ai.onnx") and len(n.input) == 1
              and n.input[0] in inits and n.output[0] not in keep}
    if not source:
        return proto
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    nodes = [n for n in out.graph.node if not (n.op_type == "Identity" and n.output and n.output[0] in source)]
    for node in nodes:
        for k, name in enumerate(node.input):
            if name in source:
                node.input[k] = source[name]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    kept_info = [vi for vi in out.graph.value_info if vi.name not in source]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept_info)
    return out

"""Copies of initializers: Identity nodes (torch, for shared or equal parameters) and Casts up to float32.

``Identity(onnx::MatMul_510) -> onnx::MatMul_526`` (a second layer whose weight equals the first's) or
``Identity(enc.layers.0.norm1.weight) -> norm.weight`` (every LayerNorm weight of ones) makes a weight
look like an activation: it would be calibrated (a "tensor" saturating 100 % in the tables) and a MatMul
reading it would get activation Q/DQ (one calibrated scale) instead of its weight's per-channel one.
The consumers read the initializer directly instead::

    W (initializer) ─► Identity ─► W' ─► MatMul        ==>        W (initializer) ─► MatMul

A float32 model stored with float16 (or bfloat16, float64) weights casts each one up,
``Cast(to=FLOAT)``: the same trap, and the weight's type made the writer refuse the model as
"computing in float16". The cast is done once here: its output becomes a float32 initializer
of the same values (what the Cast computes at every run), and the narrow one goes when
nothing else reads it::

    W16 (float16 initializer) ─► Cast(to float) ─► W ─► Conv    ==>    W (float32 initializer) ─► Conv
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .topology import outer_names

__all__ = ["fold_initializer_identities", "fold_initializer_casts"]

_WIDENED = frozenset({TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE})


def fold_initializer_identities(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with the main graph's Identity nodes over initializers removed and their readers rewired; an
    Identity whose output is a graph output, or read from inside a subgraph, stays. ``proto`` itself when
    there is none."""
    g = proto.graph
    inits = {i.name for i in g.initializer} - {i.name for i in g.input}
    keep = _kept_names(g)
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
    _replace_nodes(out.graph, nodes, gone=set(source))
    return out


def _kept_names(g: onnx.GraphProto) -> set[str]:
    """Graph outputs and the tensors subgraphs read by name: a copy under such a name stays a node."""
    keep = {o.name for o in g.output}
    for node in g.node:
        for attr in node.attribute:
            for body in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                keep |= outer_names(body)
    return keep


def fold_initializer_casts(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with each ``Cast(to=FLOAT)`` of a float16/bfloat16/float64 initializer replaced by a float32
    initializer under the Cast's output name; the narrow initializers nothing reads any more removed. A Cast
    whose output is a graph output or read inside a subgraph stays. ``proto`` itself when there is none."""
    g = proto.graph
    inits = {i.name: i for i in g.initializer if i.name not in {x.name for x in g.input}}
    keep = _kept_names(g)
    casts = {n.output[0]: n.input[0] for n in g.node
             if n.op_type == "Cast" and n.domain in ("", "ai.onnx") and len(n.input) == 1 and len(n.output) == 1
             and n.input[0] in inits and inits[n.input[0]].data_type in _WIDENED and n.output[0] not in keep
             and any(a.name == "to" and a.i == TensorProto.FLOAT for a in n.attribute)}
    if not casts:
        return proto
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    nodes = [n for n in out.graph.node if not (n.op_type == "Cast" and n.output and n.output[0] in casts)]
    read = {t for n in nodes for t in n.input} | keep
    widened = [numpy_helper.from_array(numpy_helper.to_array(inits[src]).astype(np.float32), name)
               for name, src in casts.items()]
    kept_inits = [i for i in out.graph.initializer if i.name not in set(casts.values()) or i.name in read]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept_inits + widened)
    _replace_nodes(out.graph, nodes, gone=set(casts))
    return out


def _replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], gone: set[str]) -> None:
    """``graph``'s nodes become ``nodes``; the value_info of the tensors no node makes any more (``gone``) goes."""
    del graph.node[:]
    graph.node.extend(nodes)
    kept_info = [vi for vi in graph.value_info if vi.name not in gone]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)

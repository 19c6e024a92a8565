"""Copies of initializers: Identity nodes (torch, for shared or equal parameters) and Casts up to float32.

``Identity(onnx::MatMul_510) -> onnx::MatMul_526`` (a second layer whose weight equals the first's) or
``Identity(enc.layers.0.norm1.weight) -> norm.weight`` (every LayerNorm weight of ones) makes a weight
look like an activation: it would be calibrated (a "tensor" saturating 100 % in the tables) and a MatMul
reading it would get activation Q/DQ (one calibrated scale) instead of its weight's per-channel one.
The consumers read the initializer directly instead::

    W (initializer) ─► Identity ─► W' ─► MatMul        ==>        W (initializer) ─► MatMul

A float32 model stored with float16 (or bfloat16, float64) weights casts each one up,
``Cast(to=FLOAT)``, and torch without constant folding writes ``MatMul(x, Transpose(W))``: the
same trap (and the float16 weight made the writer refuse the model as "computing in float16").
Such a node is computed once here: its output becomes the initializer it computes at every run,
and its source goes when nothing else reads it::

    W16 (float16 initializer) ─► Cast(to float) ─► W ─► Conv    ==>    W (float32 initializer) ─► Conv
    W (initializer) ─► Transpose ─► Wt ─► MatMul                ==>    Wt (initializer) ─► MatMul
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .topology import kept_names

__all__ = ["fold_initializer_identities", "fold_initializer_views"]

_WIDENED = frozenset({TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE})
_LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Unsqueeze", "Squeeze", "Flatten"})


def fold_initializer_identities(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with the main graph's Identity nodes over initializers removed and their readers rewired; an
    Identity whose output is a graph output, or read from inside a subgraph, stays. ``proto`` itself when
    there is none."""
    g = proto.graph
    inits = {i.name for i in g.initializer} - {i.name for i in g.input}
    keep = kept_names(g)
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


def _is_widening_cast(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    return (node.op_type == "Cast" and len(node.input) == 1 and inits[node.input[0]].data_type in _WIDENED
            and any(a.name == "to" and a.i == TensorProto.FLOAT for a in node.attribute))


def _constant_values(g: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Outputs of Constant nodes holding a tensor (``value``): torch writes a layout op's axes or shape so."""
    return {n.output[0]: a.t for n in g.node if n.op_type == "Constant" and n.domain in ("", "ai.onnx")
            and len(n.output) == 1 for a in n.attribute if a.name == "value"}


def _folded_value(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> np.ndarray:
    """What ``node`` computes from its initializers: a widening Cast in numpy, a layout op by ONNX's reference
    implementation (exact: it moves values, it computes none)."""
    arrays = [numpy_helper.to_array(inits[t]) for t in node.input if t]
    if node.op_type == "Cast":
        return arrays[0].astype(np.float32)
    from onnx.reference import ReferenceEvaluator

    named = {t: a for t, a in zip([t for t in node.input if t], arrays, strict=True)}
    return np.asarray(ReferenceEvaluator(node).run(None, named)[0])


def fold_initializer_views(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with each node that only widens or re-lays out initializers (``Cast(to=FLOAT)`` of a
    float16/bfloat16/float64 one; Transpose, Reshape, Unsqueeze, Squeeze, Flatten of float ones, as torch
    writes ``MatMul(x, Transpose(W))`` without constant folding) replaced by the initializer it computes,
    under its output's name, chains included; the initializers nothing reads any more removed. A node whose
    output is a graph output or read inside a subgraph stays. ``proto`` itself when there is none."""
    out = proto
    for _ in range(len(proto.graph.node)):
        g = out.graph
        inits = {i.name: i for i in g.initializer if i.name not in {x.name for x in g.input}}
        constants = {**_constant_values(g), **inits}  # a layout op's axes/shape may be a Constant node's
        keep = kept_names(g)
        folded = [n for n in g.node if n.domain in ("", "ai.onnx") and len(n.output) == 1 and n.output[0]
                  and n.output[0] not in keep and n.input and n.input[0] in inits
                  and all(t in constants for t in n.input[1:] if t)
                  and (_is_widening_cast(n, inits) if n.op_type == "Cast"
                       else n.op_type in _LAYOUT_OPS and inits[n.input[0]].data_type == TensorProto.FLOAT)]
        if not folded:
            break
        made = [numpy_helper.from_array(_folded_value(n, constants), n.output[0]) for n in folded]
        if out is proto:
            out = onnx.ModelProto()
            out.CopyFrom(proto)
        gone = {n.output[0] for n in folded}
        nodes = [n for n in out.graph.node if not (len(n.output) == 1 and n.output[0] in gone)]
        read = {t for n in nodes for t in n.input} | keep
        unread_constants = {t for n in folded for t in n.input[1:] if t and t not in inits and t not in read}
        gone |= unread_constants
        nodes = [n for n in nodes if not (n.op_type == "Constant" and n.output and n.output[0] in unread_constants)]
        sources = {t for n in folded for t in n.input if t}
        kept_inits = [i for i in out.graph.initializer if i.name not in sources or i.name in read]
        del out.graph.initializer[:]
        out.graph.initializer.extend(kept_inits + made)
        _replace_nodes(out.graph, nodes, gone=gone)
    return out


def _replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], gone: set[str]) -> None:
    """``graph``'s nodes become ``nodes``; the value_info of the tensors no node makes any more (``gone``) goes."""
    del graph.node[:]
    graph.node.extend(nodes)
    kept_info = [vi for vi in graph.value_info if vi.name not in gone]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)

"""Weights computed from constants at every run, computed once at load: they are weights again.

torch without constant folding (``do_constant_folding=False``) and its dynamo exporter keep a
weight-normalised conv (wav2vec2's positional conv, ``weight_norm``) as arithmetic on two
parameters; a weight may also be scaled, transposed or reshaped on the way::

    g ─┐                                                     (at load)
    v ─┴► ReduceL2(v) ─► Div(g, .) ─► Mul(v, .) ─► W ─► Conv      ==>      W (initializer) ─► Conv

Such a ``W`` looked like an activation: it was calibrated (one per-tensor scale for the whole
weight, recomputed at every run, where a weight gets one scale per output channel), and bias
correction and weight Q/DQ skipped the layer. Here every weight and bias slot of Conv,
ConvTranspose, Gemm and MatMul (and W, R, B of LSTM, GRU and RNN) whose producer reads only constants (initializers, Constant
nodes; no graph input, Shape, Size, random or Q/DQ op, no subgraph) is evaluated once with ONNX's
reference implementation and becomes an initializer under the same name; nodes and
initializers nothing reads any more go. The values can differ from ONNX Runtime's own
evaluation in the last bit (a ReduceL2's summation order): the loaded model is the FP32
reference every comparison uses, so the candidates and it agree.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .topology import RANDOM_OPS, kept_names, upstream

__all__ = ["fold_computed_weights"]

_WEIGHT_SLOTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,),
                 "LSTM": (1, 2, 3), "GRU": (1, 2, 3), "RNN": (1, 2, 3)}
"""Inputs that hold a layer's weight or bias when they are constants (quantlab.quantize.placement), and the
W, R, B of recurrent layers: torch writes an LSTM's as ``Concat(Slice(w_ih), ...)`` (gates reordered),
which otherwise stayed Concat nodes the plan took for INT8 groups of activations."""

_NEVER_EVALUATED = RANDOM_OPS | {"QuantizeLinear", "DequantizeLinear"}
"""Ops whose output depends on more than their constant inputs (random draws), and Q/DQ: a model that already
holds them is the writer's to refuse, not this fold's to turn back into float. ``Shape``/``Size`` are not here:
of a constant they are constant (tf2onnx reshapes a Gemm weight by ``Reshape(W, ReduceProd(Shape(W')))``,
which had been calibrated as an activation, one clipped per-tensor scale), of anything else they are not."""


def fold_computed_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with each weight or bias computed from constants (see the module docstring) stored as a float
    initializer; ``proto`` itself when there is none, or when evaluating them fails (then they stay computed)."""
    g = proto.graph
    inits = {i.name for i in g.initializer} - {i.name for i in g.input}
    producers = {o: n for n in g.node for o in n.output if o}
    kept = kept_names(g)
    constant: dict[str, bool] = {}
    targets = [t for n in g.node if n.domain in ("", "ai.onnx")
               for slot in _WEIGHT_SLOTS.get(n.op_type, ()) if slot < len(n.input)
               for t in (n.input[slot],)
               if t and t not in inits and t in producers and t not in kept
               and _is_constant(t, producers, inits, constant)]
    targets = list(dict.fromkeys(targets))
    if not targets:
        return proto
    cone, read = _cone(targets, producers, inits)
    values = _evaluated(proto, targets, cone, read)
    if values is None:
        return proto
    return _with_initializers(proto, values, kept, cone)


def _is_constant(tensor: str, producers: dict[str, onnx.NodeProto], inits: set[str],
                 memo: dict[str, bool]) -> bool:
    """Whether ``tensor`` is computed from initializers and Constant nodes only (iteratively: deep chains)."""
    stack = [tensor]
    while stack:
        t = stack[-1]
        if t in memo:
            stack.pop()
            continue
        if t in inits:
            memo[t] = True
            stack.pop()
            continue
        node = producers.get(t)
        if (node is None or node.domain not in ("", "ai.onnx") or node.op_type in _NEVER_EVALUATED
                or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)):
            memo[t] = False
            stack.pop()
            continue
        pending = [i for i in node.input if i and i not in memo]
        if pending:
            stack.extend(pending)
            continue
        result = all(memo[i] for i in node.input if i)
        for o in node.output:
            if o:
                memo[o] = result
        stack.pop()
    return memo[tensor]


def _cone(targets: list[str], producers: dict[str, onnx.NodeProto], inits: set[str]) -> tuple[set[int], set[str]]:
    """The ``id``s of the nodes computing ``targets``, and the initializers they read."""
    walked = upstream(targets, producers)
    return {id(producers[t]) for t in walked if t in producers}, {t for t in walked if t in inits}


def _evaluated(proto: onnx.ModelProto, targets: list[str], cone: set[int],
               read: set[str]) -> dict[str, np.ndarray] | None:
    """The targets' values from one run of ONNX's reference evaluator over the ``cone`` nodes (``id``s) and the
    initializers they ``read``; None when it cannot compute them or a value is not a float (a weight)."""
    from onnx.reference import ReferenceEvaluator

    nodes = [n for n in proto.graph.node if id(n) in cone]
    graph = helper.make_graph(nodes, "computed_weights", [], [helper.make_empty_tensor_value_info(t) for t in targets],
                              initializer=[i for i in proto.graph.initializer if i.name in read])
    model = helper.make_model(graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
    try:
        values = ReferenceEvaluator(model).run(None, {})
    except Exception:  # an op the reference implementation lacks: the weight stays computed at run time
        return None
    out = {t: np.asarray(v) for t, v in zip(targets, values, strict=True)}
    if any(v.dtype.kind != "f" for v in out.values()):
        return None
    return out


def _with_initializers(proto: onnx.ModelProto, values: dict[str, np.ndarray], kept: set[str],
                       cone: set[int]) -> onnx.ModelProto:
    """A copy of ``proto`` where ``values`` are initializers and the ``cone`` nodes (and the initializers) no
    longer read are gone; graph outputs and tensors subgraphs read stay."""
    removable = {k for k, n in enumerate(proto.graph.node) if id(n) in cone}
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    indexed = [(k, n) for k, n in enumerate(g.node) if not any(o in values for o in n.output if o)]
    while True:  # drop what only the folded nodes read, chains included
        read = {t for _, n in indexed for t in n.input if t} | kept
        alive = [(k, n) for k, n in indexed if k not in removable or any(o in read for o in n.output if o)]
        if len(alive) == len(indexed):
            break
        indexed = alive
    nodes = [n for _, n in indexed]
    read = {t for n in nodes for t in n.input if t} | kept | {i.name for i in g.input}
    inits = [i for i in g.initializer if i.name in read]
    del g.initializer[:]
    g.initializer.extend(inits + [numpy_helper.from_array(v, t) for t, v in values.items()])
    del g.node[:]
    g.node.extend(nodes)
    gone = {o for n in proto.graph.node for o in n.output if o} - {o for n in nodes for o in n.output if o}
    info = [vi for vi in g.value_info if vi.name not in gone and vi.name not in values]
    del g.value_info[:]
    g.value_info.extend(info)
    return out

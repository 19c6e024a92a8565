"""Graph queries every other module needs: who produces and reads a tensor, node order, subgraph reads.

The one home of graph algorithms (plan, quantize, compare, stats and the clean-up passes read them here).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence

from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

from ..errors import ModelError

__all__ = ["initializer_map", "producer_map", "consumer_map", "consumer_indices", "topological_order",
           "topological_nodes", "with_outputs", "outer_names", "subgraph_reads", "kept_names", "upstream",
           "decided_by_values",
           "drop_unread_initializers", "FoldSite", "replace_folded", "shape_determined_nodes", "nested_graphs", "all_nodes",
           "random_nodes", "holds_qdq", "CONTROL_FLOW_OPS", "RANDOM_OPS", "SAME_VALUE_OPS", "SHAPE_ONLY_OPS"]

CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})
"""The ops that hold subgraphs (their bodies read outer tensors by name)."""

RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                        "Bernoulli"})
"""The ops that draw random numbers: never evaluated at rewrite time, and a model holding them may not give the
same outputs twice."""

SAME_VALUE_OPS = frozenset({"Identity", "Cast", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"})
"""Ops that pass their first input's values on unchanged but for their layout or float type: what a Softmax or a
Gather of weights goes through before the layer that reads it (quantlab.stats.scope, quantlab.quantize)."""

SHAPE_ONLY_OPS = frozenset({"Shape", "Size", "EyeLike"})
"""Ops whose output depends on their input's shape, not its values: walks for what values decide stop there."""


def initializer_map(proto: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in proto.graph.initializer}


def producer_map(proto: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that produces it."""
    return {out: node for node in proto.graph.node for out in node.output if out}


def consumer_map(proto: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it, in graph order."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for inp in node.input:
            if inp:
                consumers.setdefault(inp, []).append(node)
    return consumers


def topological_order(proto: onnx.ModelProto) -> list[int]:
    """Indices into ``graph.node`` in a topological order (graph order when already sorted, as ONNX requires;
    we verify). A cycle or a read of an undefined tensor is a ModelError naming the nodes."""
    nodes = list(proto.graph.node)
    known = {i.name for i in proto.graph.input} | {i.name for i in proto.graph.initializer}
    pending = list(range(len(nodes)))
    order: list[int] = []
    while pending:
        rest = []
        for idx in pending:
            if all((not t) or t in known for t in nodes[idx].input):
                order.append(idx)
                known.update(o for o in nodes[idx].output if o)
            else:
                rest.append(idx)
        if len(rest) == len(pending):
            names = ", ".join(repr(nodes[i].name or nodes[i].op_type) for i in rest[:5])
            raise ModelError(f"the graph has a cycle or reads undefined tensors at nodes {names}")
        pending = rest
    return order


def topological_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes in a topological order (see :func:`topological_order`)."""
    nodes = list(proto.graph.node)
    return [nodes[i] for i in topological_order(proto)]


def consumer_indices(proto: onnx.ModelProto) -> dict[str, list[int]]:
    """Tensor -> indices of the nodes reading it, in graph order, each node once (``Mul(x, x)`` reads x once;
    :func:`consumer_map` lists such a node twice)."""
    consumers: dict[str, list[int]] = {}
    for idx, node in enumerate(proto.graph.node):
        for t in node.input:
            if t and idx not in consumers.get(t, []):
                consumers.setdefault(t, []).append(idx)
    return consumers


def with_outputs(proto: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``proto`` whose graph also outputs ``names`` (for intermediate reads)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    existing = {o.name for o in out.graph.output}
    value_info = {vi.name: vi for vi in list(out.graph.value_info) + list(out.graph.input)}
    for name in names:
        if name in existing:
            continue
        if name in value_info:
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(value_info[name])
        else:
            vi = helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
        out.graph.output.append(vi)
        existing.add(name)
    return out


def outer_names(graph: onnx.GraphProto) -> set[str]:
    """Tensors a subgraph reads from enclosing scopes (used but not defined inside it)."""
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(t for t in node.input if t)
        defined.update(o for o in node.output if o)
        for attr in node.attribute:
            for body in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                used |= outer_names(body)
    used.update(o.name for o in graph.output)
    return used - defined


def nested_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph``, then every body in it (If branches, Loop/Scan bodies), nested ones too, depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for body in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from nested_graphs(body)


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of the bodies in it (:func:`nested_graphs`)."""
    for body in nested_graphs(graph):
        yield from body.node


def random_nodes(proto: onnx.ModelProto) -> list[str]:
    """``op 'name'`` of every node that draws random numbers (:data:`RANDOM_OPS`), bodies included."""
    return [f"{n.op_type} {n.name or n.output[0]!r}" for n in all_nodes(proto.graph) if n.op_type in RANDOM_OPS]


def holds_qdq(proto: onnx.ModelProto) -> bool:
    """Whether the model holds a DequantizeLinear anywhere, If/Loop/Scan bodies included (a merged decoder written
    INT8 only inside its branches has none in the main graph)."""
    return any(n.op_type == "DequantizeLinear" for n in all_nodes(proto.graph))


def subgraph_reads(nodes: Iterable[onnx.NodeProto]) -> set[str]:
    """Outer tensors that the If/Loop/Scan bodies of ``nodes`` read by name."""
    reads: set[str] = set()
    for node in nodes:
        for attr in node.attribute:
            for body in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                reads |= outer_names(body)
    return reads


def upstream(names: Iterable[str], producers: Mapping[str, onnx.NodeProto], *,
             stop: Callable[[onnx.NodeProto], bool] | None = None, bodies: bool = False) -> list[str]:
    """``names`` and every tensor they are computed from, each once, in the order a depth-first walk meets them.

    A tensor without a producer (an input, an initializer, a body's outer read) ends its path, and so does one
    whose producer ``stop`` refuses (a Shape: only its input's shape counts). ``bodies``: the outer tensors an
    If/Loop/Scan body reads by name are walked too (sorted, so the order never depends on hashing).
    """
    seen: set[str] = set()
    found: list[str] = []
    pending = list(names)
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        found.append(name)
        node = producers.get(name)
        if node is None or (stop is not None and stop(node)):
            continue
        pending += [t for t in node.input if t]
        if bodies:
            pending += sorted(subgraph_reads([node]))
    return found



def decided_by_values(tensor: str, producers: Mapping[str, onnx.NodeProto], inputs: Iterable[str]) -> bool:
    """Whether the values (not only the shapes) of some of ``inputs`` reach ``tensor``: an If's condition or a
    TopK's scores the data decides, as opposed to one computed from shapes or constants (outer reads of bodies
    walked too)."""
    feeding = upstream([tensor], producers, stop=lambda n: n.op_type in SHAPE_ONLY_OPS, bodies=True)
    return not set(inputs).isdisjoint(feeding)

def drop_unread_initializers(graph: onnx.GraphProto, read_before: Iterable[str], keep: Iterable[str] = ()) -> None:
    """Remove, in place, the initializers a rewrite left unread: read by a node before it (``read_before``), and
    now by no node, graph output, subgraph or name in ``keep``. An initializer no node ever read stays."""
    read = {t for n in graph.node for t in n.input} | kept_names(graph) | set(keep)
    before = set(read_before)
    kept = [i for i in graph.initializer if i.name in read or i.name not in before]
    del graph.initializer[:]
    graph.initializer.extend(kept)


@dataclass(frozen=True)
class FoldSite:
    """What a load-time fold of a node into its neighbour reads of the main graph: ``inits`` (name -> initializer),
    ``readers`` (tensor -> how many node inputs read it), ``producers`` (tensor -> index of its node) and ``keep``
    (names that must stay as they are: outputs, subgraph reads, and graph inputs, which may override an
    initializer)."""

    inits: dict[str, onnx.TensorProto]
    readers: dict[str, int]
    producers: dict[str, int]
    keep: set[str]

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> FoldSite:
        readers: dict[str, int] = {}
        for node in graph.node:
            for t in node.input:
                readers[t] = readers.get(t, 0) + 1
        return cls(inits={i.name: i for i in graph.initializer}, readers=readers,
                   producers={o: k for k, n in enumerate(graph.node) for o in n.output if o},
                   keep=kept_names(graph) | {i.name for i in graph.input})


def replace_folded(graph: onnx.GraphProto, removed: Collection[int], made: Sequence[onnx.TensorProto],
                   read_before: Iterable[str], keep: Iterable[str], gone: Collection[str]) -> None:
    """Finish, in place, a fold of nodes into their neighbours: drop the ``removed`` nodes (indices), put the
    initializers ``made`` in place of any of the same name, drop those the fold left unread
    (:func:`drop_unread_initializers`) and the value infos of the ``gone`` tensors."""
    nodes = [n for k, n in enumerate(graph.node) if k not in removed]
    del graph.node[:]
    graph.node.extend(nodes)
    replaced = {i.name for i in made}
    kept = [i for i in graph.initializer if i.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    drop_unread_initializers(graph, read_before, keep)
    graph.initializer.extend(made)
    info = [vi for vi in graph.value_info if vi.name not in gone]
    del graph.value_info[:]
    graph.value_info.extend(info)


def kept_names(graph: onnx.GraphProto) -> set[str]:
    """Graph outputs and the tensors its subgraphs read by name: a load-time fold must keep them under their names."""
    return {o.name for o in graph.output} | subgraph_reads(graph.node)


def shape_determined_nodes(proto: onnx.ModelProto) -> frozenset[int]:
    """Indices of the main graph's nodes that read no input's values, only shapes and constants: they stay
    float32 in an FP16 group, and out of INT8 groups (plan.groups): a YOLO's anchor grid, ``Range(Shape) + 0.5``,
    rounded to an INT8 scale calibrated at 320 pixels was clipped at 416.

    T5's relative-position buckets are float arithmetic on ``Range(Shape(ids))`` cast back to int64
    (``log(distance / 8) / log(16) * 8``): in float16 a rounded ``Log`` moves distances into the next bucket.
    Such a computation is the same for every sample of a shape, costs nothing next to the layers, and float16
    gains nothing there::

        ids ─► Shape ─► Range ─► Cast(float) ─► Div ─► Log ─► Mul ─► Cast(int64) ─► Gather(bias table)
               └─────────────────── float32 in an FP16 candidate ───────────────────┘
    """
    inits = {i.name for i in proto.graph.initializer}
    live = {i.name for i in proto.graph.input if i.name not in inits}  # tensors whose values come from the data
    determined: set[int] = set()
    for idx in topological_order(proto):
        node = proto.graph.node[idx]
        reads_values = node.op_type not in SHAPE_ONLY_OPS and (
            any(t in live for t in node.input if t) or bool(subgraph_reads([node]) & live))
        if reads_values:
            live.update(o for o in node.output if o)
        else:
            determined.add(idx)
    return frozenset(determined)

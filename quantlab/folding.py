"""Graph-rewrite helpers shared by the control-flow passes: constant values, renaming, dead code.

:class:`ConstantFolder` evaluates a tensor from constants alone (initializers,
Constant nodes, seeded values), one node at a time with ONNX's reference
evaluator, remembering which constants each value came from; ``rename_node``
copies a node under new tensor names, following the names into the subgraphs
that read them from the enclosing scope (:func:`quantlab.graph.topology.outer_names`,
re-exported as ``outer_reads``). It imports only ONNX, :mod:`quantlab.simplify` and
:mod:`quantlab.graph.topology`, so :mod:`quantlab.graph.load` may run the passes built on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph.topology import CONTROL_FLOW_OPS, RANDOM_OPS
from .graph.topology import outer_names as outer_reads
from .simplify import single_node_model

__all__ = [
    "NEVER_FOLD",
    "ConstantFolder",
    "Evaluators",
    "clip_bounds",
    "constant_node_value",
    "drop_dead_producers",
    "graph_names",
    "outer_reads",
    "rename_node",
    "renamed_initializer",
    "replace_node",
    "rewrite_until_fixed",
    "scalar_constant",
    "subgraphs",
]

Record = TypeVar("Record")

NEVER_FOLD = frozenset({"Shape", "Size", *RANDOM_OPS, *CONTROL_FLOW_OPS})
"""Ops never evaluated at rewrite time: shape- or randomness-dependent, or holding subgraphs."""


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs held in ``node``'s attributes (If branches, Loop/Scan bodies)."""
    out: list[onnx.GraphProto] = []
    for attr in node.attribute:
        out += [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
    return out


def graph_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name the graph's own nodes, inputs, outputs and initializers use."""
    names = {i.name for i in graph.input} | {o.name for o in graph.output} | {i.name for i in graph.initializer}
    for node in graph.node:
        names.update(t for t in list(node.input) + list(node.output) if t)
    return names


Evaluators = dict[tuple[int, tuple[tuple[str, tuple[int, ...]], ...]], tuple[onnx.NodeProto, Any]]
"""Reference evaluators of single nodes, by ``(id(node), the feeds' dtypes and shapes)``, each beside its node (held,
so that no other node object takes its id while the entry lives): folders made one after another over the same
graph (a loop body followed step by step) share one and build each node's evaluator once."""


class ConstantFolder:
    """Values of a graph's tensors computable from constants alone (memoised), and the constants behind them.

    ``seeds`` adds known values (e.g. a loop body's iteration number); their names count as leaves.
    ``evaluators``: a cache shared with other folders over the same, unchanged graph (:data:`Evaluators`).
    """

    def __init__(self, graph: onnx.GraphProto, model: onnx.ModelProto,
                 seeds: Mapping[str, np.ndarray] | None = None, evaluators: Evaluators | None = None) -> None:
        self.model = model
        self.evaluators: Evaluators = {} if evaluators is None else evaluators
        self.values: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        self.values.update({k: np.asarray(v) for k, v in (seeds or {}).items()})
        self.leaves: dict[str, tuple[str, ...]] = {name: (name,) for name in self.values}
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self._graph = graph
        self._dims: dict[str, tuple[int | None, ...]] | None = None  # inferred shapes, made on first need

    def _shape_dims(self, shape_node: onnx.NodeProto) -> tuple[int | None, ...] | None:
        """The dims a main-graph ``Shape`` node gives (its start/end slice applied), as shape inference fixes them
        from the declared input shapes (None per symbolic dim); None when its input has no inferred shape."""
        if self._dims is None:
            self._dims = _inferred_dims(self.model)
        dims = self._dims.get(shape_node.input[0]) if shape_node.input else None
        if dims is None:
            return None
        attrs = {a.name: a.i for a in shape_node.attribute}
        return dims[slice(attrs.get("start", 0), attrs.get("end"))]

    def _static_shape(self, node: onnx.NodeProto) -> np.ndarray | None:
        """A main-graph ``Shape`` whose (sliced) dims shape inference fixes: a scripted
        ``for t in range(x.shape[1])`` over a fixed axis is a static trip count. None when any dim is symbolic
        (the data decides)."""
        picked = self._shape_dims(node)
        if picked is None or any(d is None for d in picked):
            return None
        return self._keep(node.output[0], np.array(picked, dtype=np.int64), node.input[0])

    def _static_dims(self, gather: onnx.NodeProto) -> np.ndarray | None:
        """``Gather(Shape(x), i)`` when the dims it picks are fixed (torch's ``x.shape[1]``; the batch dim may be
        symbolic)."""
        shape_node = self.producer[gather.input[0]]
        index = self.value(gather.input[1]) if len(gather.input) > 1 else None
        sliced = self._shape_dims(shape_node)
        if index is None or sliced is None or index.dtype.kind not in "iu":
            return None
        try:
            picked = np.array(sliced, dtype=object)[np.asarray(index)]
        except IndexError:
            return None
        if any(d is None for d in np.ravel(picked)):
            return None
        return self._keep(gather.output[0], np.asarray(picked, dtype=np.int64), shape_node.input[0])

    def _keep(self, name: str, value: np.ndarray, source: str) -> np.ndarray:
        self.values[name] = value
        self.leaves[name] = (f"the static shape of {source!r}",)
        return value

    def value(self, name: str, depth: int = 0) -> np.ndarray | None:
        if name in self.values:
            return self.values[name]
        node = self.producer.get(name)
        if node is not None and self._graph is self.model.graph:
            if node.op_type == "Shape":
                return self._static_shape(node)
            if node.op_type == "Gather" and self.producer.get(node.input[0], node).op_type == "Shape":
                return self._static_dims(node)
        if node is None or node.op_type in NEVER_FOLD or node.domain not in ("", "ai.onnx") or depth > 200:
            return None
        feeds: dict[str, np.ndarray] = {}
        for i in (i for i in node.input if i):
            v = self.value(i, depth + 1)
            if v is None:
                return None
            feeds[i] = v
        outputs = self._evaluator(node, feeds).run(None, feeds)
        leaves = tuple(sorted({leaf for i in feeds for leaf in self.leaves[i]}))
        for out, v in zip((o for o in node.output if o), outputs):
            self.values[out] = np.asarray(v)
            self.leaves[out] = leaves or (f"Constant {node.name or out!r}",)
        return self.values.get(name)

    def _evaluator(self, node: onnx.NodeProto, feeds: Mapping[str, np.ndarray]) -> Any:
        """ONNX's reference evaluator of ``node`` alone, built once per node and feed types (building it took 55 %
        of following SLANet's decoder loop 500 steps; running it again with new values gives the same outputs)."""
        from onnx.reference import ReferenceEvaluator

        key = (id(node), tuple((v.dtype.str, v.shape) for v in feeds.values()))
        held = self.evaluators.get(key)
        if held is None or held[0] is not node:
            held = self.evaluators[key] = (node, ReferenceEvaluator(single_node_model(node, dict(feeds), self.model)))
        return held[1]

    def scalar(self, name: str) -> np.ndarray | None:
        """The value of ``name`` when it is constant and holds one element (else None)."""
        value = self.value(name) if name else None
        return value.reshape(()) if value is not None and value.size == 1 else None


def rename_node(node: onnx.NodeProto, mapping: Mapping[str, str]) -> onnx.NodeProto:
    """A copy of ``node`` reading and writing renamed tensors, nested subgraphs' outer reads included."""
    out = onnx.NodeProto()
    out.CopyFrom(node)
    for field in (out.input, out.output):
        for i, t in enumerate(field):
            field[i] = mapping.get(t, t)
    for body in subgraphs(out):
        inner = {k: v for k, v in mapping.items() if k in outer_reads(body)}
        if inner:
            renamed = [rename_node(n, inner) for n in body.node]
            del body.node[:]
            body.node.extend(renamed)
            for vi in body.output:
                vi.name = inner.get(vi.name, vi.name)
    return out


def renamed_initializer(init: onnx.TensorProto, name: str) -> onnx.TensorProto:
    out = onnx.TensorProto()
    out.CopyFrom(init)
    out.name = name
    return out


def constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    """The value a Constant node holds (any of its value_* attributes)."""
    from onnx.reference import ReferenceEvaluator

    model = helper.make_model(helper.make_graph([node], "c", [], [helper.make_empty_tensor_value_info(node.output[0])]))
    return np.asarray(ReferenceEvaluator(model).run(None, {})[0])


def scalar_constant(name: str, inits: Mapping[str, onnx.TensorProto],
                    producers: Mapping[str, onnx.NodeProto]) -> np.ndarray | None:
    """A one-element constant as a 0-d array of its own dtype: an initializer, or a Constant node (any of
    its ``value*`` attributes); None for a value computed at run time or holding several elements."""
    if name in inits:
        value = numpy_helper.to_array(inits[name])
    elif name in producers and producers[name].op_type == "Constant":
        value = constant_node_value(producers[name])
    else:
        return None
    return value.reshape(()) if value.size == 1 else None


def clip_bounds(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto],
                producers: Mapping[str, onnx.NodeProto]) -> tuple[np.ndarray | None, np.ndarray | None] | None:
    """``(min, max)`` of a Clip as 0-d arrays, None for an absent bound; None when a bound is computed at run time.

    Opset < 11 holds the bounds in float attributes (float32 0-d arrays here), later opsets in
    optional inputs 1 and 2 (an empty name is an absent bound).
    """
    attrs = {a.name: a.f for a in node.attribute if a.name in ("min", "max")}
    if attrs:
        return tuple(np.array(attrs[k], np.float32) if k in attrs else None  # type: ignore[return-value]
                     for k in ("min", "max"))
    bounds: list[np.ndarray | None] = []
    for i in (1, 2):
        name = node.input[i] if len(node.input) > i else ""
        value = scalar_constant(name, inits, producers) if name else None
        if name and value is None:
            return None
        bounds.append(value)
    return bounds[0], bounds[1]


def replace_node(graph: onnx.GraphProto, index: int, nodes: Iterable[onnx.NodeProto],
                 initializers: Iterable[onnx.TensorProto]) -> None:
    """Put ``nodes`` where node ``index`` was (keeping the topological order) and add ``initializers``."""
    kept = list(graph.node)
    kept[index:index + 1] = list(nodes)
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(initializers)


def drop_dead_producers(graph: onnx.GraphProto, names: Iterable[str]) -> None:
    """Remove the nodes that computed ``names`` (e.g. a folded condition), and theirs, when nothing reads them."""
    pending = [n for n in names if n]
    while pending:
        tensor = pending.pop()
        readers = {t for n in graph.node for t in n.input} | {o.name for o in graph.output}
        for n in graph.node:
            for body in subgraphs(n):
                readers |= outer_reads(body)
        if tensor in readers:
            continue
        producer = next((n for n in graph.node if tensor in n.output), None)
        if producer is None or any(o in readers for o in producer.output if o):
            continue
        graph.node.remove(producer)
        pending.extend(i for i in producer.input if i)


def _inferred_dims(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Tensor -> its dims (None where symbolic or unknown) after ONNX shape inference; {} if inference fails."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - a model shape inference cannot read: no static shapes, nothing folded
        return {}
    graph = inferred.graph
    out: dict[str, tuple[int | None, ...]] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    return out


def rewrite_until_fixed(proto: onnx.ModelProto, op_type: str,
                        rewrite: Callable[[onnx.ModelProto, ConstantFolder, int, onnx.NodeProto], Record | None],
                        ) -> tuple[onnx.ModelProto, tuple[Record, ...]]:
    """Rewrite main-graph ``op_type`` nodes one at a time until ``rewrite`` declines every one left.

    ``rewrite(copy, folder, index, node)`` edits the copy in place and returns what it did, or None to
    leave the node; constants are re-folded after each rewrite (one may fix another's inputs). Returns
    ``proto`` itself when nothing was rewritten.
    """
    if not any(n.op_type == op_type for n in proto.graph.node):
        return proto, ()
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    done: list[Record] = []
    while True:
        folder = ConstantFolder(out.graph, out)
        record = next((r for idx, node in enumerate(out.graph.node) if node.op_type == op_type
                       for r in [rewrite(out, folder, idx, node)] if r is not None), None)
        if record is None:
            return (out, tuple(done)) if done else (proto, ())
        done.append(record)

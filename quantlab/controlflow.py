"""Control flow the data cannot change: ``If`` nodes with a constant condition are inlined.

A voice-activity model keeps one set of weights per sample rate, as Constant nodes
inside the two branches of an ``If`` on ``sr == 16000``. Statistics see only the
main graph, so nothing inside a branch is calibrated and the writer cannot place
Q/DQ there. When the condition folds to a constant (from initializers, Constant
nodes, or inputs bound to the value the data always has), the taken branch
replaces the node::

    sr(16000) ─► Equal ─► cond ─► If ─► y          x ─► MatMul(W16) ─► Add(b16) ─► y
               x ─────────────────┘        ==>        (W16, b16: initializers)
      then: x ─► MatMul(Constant W16) ─► Add(Constant b16) ─► out

Branch Constant nodes become initializers (weights, as the writer expects); a
branch tensor or node whose name is already taken in the graph is renamed
``<If name>/<name>``; the branch output takes the If output's name (an Identity
when the branch just passes an outer tensor through). Nested Ifs come up into the
main graph and are inlined in turn. What was inlined is recorded in the model's
``metadata_props`` (:data:`RECORD_KEY`) so provenance can say so
(:func:`control_flow_notes`). Loop and Scan bodies are not unrolled: their tensors
stay float and :func:`float_subgraph_tensors` lists them with the reason.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import ModelError
from .simplify import single_node_model

__all__ = [
    "RECORD_KEY",
    "InlinedIf",
    "bind_inputs",
    "control_flow_notes",
    "float_subgraph_tensors",
    "inline_constant_ifs",
]

RECORD_KEY = "quantlab.inlined_if"
"""``metadata_props`` key holding the JSON list of inlined Ifs (node, condition, branch)."""

_NEVER_FOLD = frozenset({"Shape", "Size", "RandomNormal", "RandomUniform", "RandomNormalLike",
                         "RandomUniformLike", "Multinomial", "Bernoulli", "If", "Loop", "Scan"})


@dataclass(frozen=True)
class InlinedIf:
    """One If replaced by its taken branch: ``sources`` are the constants its condition came from."""

    node: str
    condition: bool
    branch: str
    sources: tuple[str, ...]

    def note(self) -> str:
        return (f"If {self.node!r}: condition constant {self.condition} (from {', '.join(self.sources) or 'a constant'}), "
                f"{self.branch} inlined before statistics and writing")


def bind_inputs(proto: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy where the inputs ``values`` names are initializers: the value the data always feeds them."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    names = {i.name for i in out.graph.input}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ModelError(f"cannot bind {', '.join(map(repr, unknown))}: not inputs of the model "
                         f"(its inputs are {', '.join(sorted(names))})")
    kept = [i for i in out.graph.input if i.name not in values]
    del out.graph.input[:]
    out.graph.input.extend(kept)
    inits = [i for i in out.graph.initializer if i.name not in values]
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits)
    out.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), k) for k, v in values.items())
    return out


def outer_reads(graph: onnx.GraphProto) -> set[str]:
    """Tensors a subgraph reads from enclosing scopes (as :func:`quantlab.graph.outer_names`; this module
    stays importable by :mod:`quantlab.graph`, so it does not import it)."""
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(t for t in node.input if t)
        defined.update(o for o in node.output if o)
        for attr in node.attribute:
            for body in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                used |= outer_reads(body)
    used.update(o.name for o in graph.output)
    return used - defined


class _Constants:
    """Values of main-graph tensors computable from constants alone (memoised), and their leaves."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        self.proto = proto
        self.values: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
        self.leaves: dict[str, tuple[str, ...]] = {name: (name,) for name in self.values}
        self.producer = {o: n for n in proto.graph.node for o in n.output if o}

    def value(self, name: str, depth: int = 0) -> np.ndarray | None:
        if name in self.values:
            return self.values[name]
        node = self.producer.get(name)
        if node is None or node.op_type in _NEVER_FOLD or node.domain not in ("", "ai.onnx") or depth > 200:
            return None
        feeds: dict[str, np.ndarray] = {}
        for i in (i for i in node.input if i):
            v = self.value(i, depth + 1)
            if v is None:
                return None
            feeds[i] = v
        from onnx.reference import ReferenceEvaluator

        outputs = ReferenceEvaluator(single_node_model(node, feeds, self.proto)).run(None, feeds)
        leaves = tuple(sorted({leaf for i in feeds for leaf in self.leaves[i]}))
        for out, v in zip((o for o in node.output if o), outputs):
            self.values[out] = np.asarray(v)
            self.leaves[out] = leaves or (f"Constant {node.name or out!r}",)
        return self.values.get(name)


def _graph_names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {o.name for o in graph.output} | {i.name for i in graph.initializer}
    for node in graph.node:
        names.update(t for t in list(node.input) + list(node.output) if t)
    return names


def _rename(node: onnx.NodeProto, mapping: Mapping[str, str]) -> onnx.NodeProto:
    """A copy of ``node`` reading and writing renamed tensors, nested subgraphs' outer reads included."""
    out = onnx.NodeProto()
    out.CopyFrom(node)
    for field in (out.input, out.output):
        for i, t in enumerate(field):
            field[i] = mapping.get(t, t)
    for attr in out.attribute:
        for body in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            inner = {k: v for k, v in mapping.items() if k in outer_reads(body)}
            if inner:
                renamed = [_rename(n, inner) for n in body.node]
                del body.node[:]
                body.node.extend(renamed)
                for vi in body.output:
                    vi.name = inner.get(vi.name, vi.name)
    return out


def _spliced(node: onnx.NodeProto, branch: onnx.GraphProto, taken: set[str], node_names: set[str]
             ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The nodes and initializers replacing ``node`` by ``branch`` (see the module docstring)."""
    prefix = node.name or node.output[0]
    local = {t for n in branch.node for t in n.output if t} | {i.name for i in branch.initializer}
    mapping = {t: (f"{prefix}/{t}" if t in taken else t) for t in local}
    claimed: set[str] = set()
    for out_vi, if_out in zip(branch.output, node.output):
        if out_vi.name in local and out_vi.name not in claimed:  # computed under the If output's name
            mapping[out_vi.name] = if_out
            claimed.add(out_vi.name)
    inits = [_renamed_init(i, mapping[i.name]) for i in branch.initializer]
    nodes: list[onnx.NodeProto] = []
    for n in branch.node:
        if n.op_type == "Constant" and not n.input:
            inits.append(numpy_helper.from_array(_constant_node_value(n), mapping[n.output[0]]))
            continue
        renamed = _rename(n, mapping)
        if n.name in node_names:
            renamed.name = f"{prefix}/{n.name}"
        nodes.append(renamed)
    for out_vi, if_out in zip(branch.output, node.output):
        written = mapping.get(out_vi.name, out_vi.name)
        if written != if_out:  # an outer tensor passed through, or one result given twice
            nodes.append(helper.make_node("Identity", [written], [if_out], name=f"{prefix}/{if_out}/identity"))
    return nodes, inits


def _renamed_init(init: onnx.TensorProto, name: str) -> onnx.TensorProto:
    out = onnx.TensorProto()
    out.CopyFrom(init)
    out.name = name
    return out


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    from onnx.reference import ReferenceEvaluator

    model = helper.make_model(helper.make_graph([node], "c", [], [helper.make_empty_tensor_value_info(node.output[0])]))
    return np.asarray(ReferenceEvaluator(model).run(None, {})[0])


def inline_constant_ifs(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, tuple[InlinedIf, ...]]:
    """A copy of ``proto`` whose main-graph Ifs with a constant condition are replaced by the taken branch.

    The record is also appended to the copy's ``metadata_props`` under :data:`RECORD_KEY`.
    Returns ``proto`` itself (no copy) when there is nothing to inline.
    """
    if not any(n.op_type == "If" for n in proto.graph.node):
        return proto, ()
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    done: list[InlinedIf] = []
    while True:
        constants = _Constants(out)
        for idx, node in enumerate(out.graph.node):
            if node.op_type != "If":
                continue
            cond = constants.value(node.input[0])
            if cond is None or cond.size != 1:
                continue
            taken = bool(cond.reshape(()))
            branch = next(a.g for a in node.attribute if a.name == ("then_branch" if taken else "else_branch"))
            nodes, inits = _spliced(node, branch, _graph_names(out.graph) - set(node.output),
                                    {n.name for n in out.graph.node if n.name})
            kept = list(out.graph.node)
            kept[idx:idx + 1] = nodes
            del out.graph.node[:]
            out.graph.node.extend(kept)
            out.graph.initializer.extend(inits)
            _drop_dead_producers(out.graph, node.input[0])
            done.append(InlinedIf(node.name or node.output[0], taken, "then_branch" if taken else "else_branch",
                                  constants.leaves.get(node.input[0], ())))
            break
        else:
            break
    if not done:
        return proto, ()
    _record(out, done)
    return out, tuple(done)


def _drop_dead_producers(graph: onnx.GraphProto, name: str) -> None:
    """Remove the nodes that computed ``name`` (the condition) when nothing else reads them."""
    pending = [name]
    while pending:
        tensor = pending.pop()
        readers = {t for n in graph.node for t in n.input} | {o.name for o in graph.output}
        for n in graph.node:
            for attr in n.attribute:
                for body in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    readers |= outer_reads(body)
        if tensor in readers:
            continue
        producer = next((n for n in graph.node if tensor in n.output), None)
        if producer is None or any(o in readers for o in producer.output if o):
            continue
        graph.node.remove(producer)
        pending.extend(i for i in producer.input if i)


def _record(proto: onnx.ModelProto, done: list[InlinedIf]) -> None:
    previous = [p for p in proto.metadata_props if p.key == RECORD_KEY]
    entries = json.loads(previous[0].value) if previous else []
    entries += [{"node": d.node, "condition": d.condition, "branch": d.branch, "sources": list(d.sources)}
                for d in done]
    kept = [p for p in proto.metadata_props if p.key != RECORD_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    proto.metadata_props.append(onnx.StringStringEntryProto(key=RECORD_KEY, value=json.dumps(entries)))


def _static_trip_count(node: onnx.NodeProto, constants: _Constants) -> int | None:
    if node.op_type != "Loop" or not node.input or not node.input[0]:
        return None
    value = constants.value(node.input[0])
    return int(value.reshape(())) if value is not None and value.size == 1 else None


def float_subgraph_tensors(proto: onnx.ModelProto) -> dict[str, str]:
    """Tensors computed inside If / Loop / Scan bodies (which stay float), each with the reason."""
    constants = _Constants(proto)
    out: dict[str, str] = {}
    for node in proto.graph.node:
        bodies = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
        if not bodies:
            continue
        label = f"{node.op_type} {node.name or node.output[0]!r}"
        if node.op_type == "If":
            reason = f"inside {label}, whose condition depends on the data (not inlined)"
        elif node.op_type == "Loop":
            trips = _static_trip_count(node, constants)
            reason = (f"inside the body of {label} (trip count {trips}, static, but loop bodies are not "
                      "unrolled)" if trips is not None else f"inside the body of {label} (trip count set by the data)")
        else:
            reason = f"inside the body of {label} (scan bodies are not unrolled)"
        for body in bodies:
            constants = {i.name for i in body.initializer} | {o for n in body.node if n.op_type == "Constant"
                                                               for o in n.output}
            for t in sorted(_graph_names(body) - {i.name for i in body.input} - outer_reads(body) - constants):
                out.setdefault(t, reason)
    return out


def control_flow_notes(proto: onnx.ModelProto) -> tuple[str, ...]:
    """Provenance notes: the Ifs inlined (from :data:`RECORD_KEY`) and the subgraph tensors left float."""
    notes = []
    for p in proto.metadata_props:
        if p.key == RECORD_KEY:
            notes += [InlinedIf(e["node"], e["condition"], e["branch"], tuple(e["sources"])).note()
                      for e in json.loads(p.value)]
    left = float_subgraph_tensors(proto)
    by_reason: dict[str, list[str]] = {}
    for name, reason in left.items():
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        notes.append(f"{len(names)} tensor(s) left in float, {reason}: {shown}")
    return tuple(notes)

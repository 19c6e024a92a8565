"""``Loop`` nodes with a trip count the data cannot change are unrolled, so their body tensors get calibrated.

A Loop whose trip count ``M`` folds to a constant, whose ``cond`` input is absent or
constant true, and whose body's ``cond`` output folds to a constant at every
iteration runs the same number of times for any data: it is replaced by that many
copies of its body (at most :data:`MAX_UNROLLED_TRIPS`)::

    v0 ─► Loop(M=3, body: v ─► f ─► v', s) ─► v3, [s0; s1; s2]
    ==>  v0 ─► f ─► v1 ─► f ─► v2 ─► f ─► v3          (copy i names its tensors "<loop>/<i>/<tensor>")
                └► s0        └► s1        └► s2 ─► Unsqueeze(0) each ─► Concat(axis 0) ─► scan output

The iteration number and ``cond`` become per-copy initializers; body weights
(initializers, Constant nodes) become one initializer shared by every copy; the
loop outputs keep their names (Identity for the carried values). A Loop whose body
says stop at iteration ``i`` (constant false) is unrolled ``i + 1`` times.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .folding import (
    ConstantFolder,
    Evaluators,
    constant_node_value,
    drop_dead_producers,
    outer_reads,
    rename_node,
    renamed_initializer,
    replace_node,
    rewrite_until_fixed,
)
from .graph.topology import subgraph_reads, upstream

__all__ = ["MAX_BOUNDED_TRIPS", "MAX_UNROLLED_TRIPS", "BoundedLoop", "HoistedInvariants", "UnrolledLoop",
           "bound_loop_trips", "hoist_loop_invariants", "scoped_name", "static_trip_count", "trip_bound",
           "unroll_static_loops"]

MAX_UNROLLED_TRIPS = 64
"""Loops running more often stay loops (their body tensors stay float): the graph would grow too much."""


@dataclass(frozen=True)
class UnrolledLoop:
    """One Loop replaced by ``trips`` copies of its body."""

    node: str
    trips: int

    def note(self) -> str:
        return (f"Loop {self.node!r}: trip count {self.trips} (static), unrolled into {self.trips} copies of its "
                "body before statistics and writing")


def static_trip_count(node: onnx.NodeProto, folder: ConstantFolder, model: onnx.ModelProto,
                      limit: int = MAX_UNROLLED_TRIPS) -> tuple[int | None, str]:
    """(the number of times the Loop runs for any data, or None; the reason when None)."""
    m = folder.scalar(node.input[0]) if node.input and node.input[0] else None
    if node.input and node.input[0] and m is None:
        return None, "trip count set by the data"
    if len(node.input) > 1 and node.input[1]:
        cond = folder.scalar(node.input[1])
        if cond is None:
            return None, "loop condition set by the data"
        if not bool(cond):
            return None, "loop never runs (condition false)"
    body = next(a.g for a in node.attribute if a.name == "body")
    outer = _outer_constants(body, folder)
    bound = int(m) if m is not None else limit + 1
    evaluators: Evaluators = {}
    for i in range(min(bound, limit + 1)):
        seeds = {**outer, body.input[0].name: _iteration(body, i), body.input[1].name: np.array(True)}
        cond_out = ConstantFolder(body, model, seeds, evaluators).scalar(body.output[0].name)
        if cond_out is None:
            return None, "the body's continue condition depends on the data"
        if not bool(cond_out):
            bound = i + 1
            break
    if bound > limit:
        return None, f"trip count {'unbounded' if m is None else bound} is above the unrolling limit {limit}"
    if bound == 0:
        return None, "trip count 0"
    return bound, ""


def _outer_constants(body: onnx.GraphProto, folder: ConstantFolder) -> dict[str, np.ndarray]:
    """The values of the outer-scope tensors ``body``'s nodes read that fold to constants: torch's scripted loops
    continue on ``Identity(<a Constant true of the main graph>)``."""
    own = {i.name for i in body.input} | {i.name for i in body.initializer} | {o for n in body.node for o in n.output}
    read = {t for n in body.node for t in [*n.input, *subgraph_reads([n])] if t and t not in own}
    values = {t: folder.value(t) for t in sorted(read)}
    return {t: v for t, v in values.items() if v is not None}


def _iteration(body: onnx.GraphProto, i: int) -> np.ndarray:
    dims = body.input[0].type.tensor_type.shape.dim
    return np.array([i] if len(dims) == 1 else i, np.int64)


def scoped_name(scope: str, name: str) -> str:
    """``<scope>/<name>``; torch's names already start with a slash (``/Loop/0/wi/Gemm``, not ``/Loop/0//wi``)."""
    return f"{scope}{name}" if name.startswith("/") else f"{scope}/{name}"


def _unrolled(node: onnx.NodeProto, trips: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The copies of the body, the final Identities and the scan-output Concats replacing ``node``."""
    body = next(a.g for a in node.attribute if a.name == "body")
    prefix = node.name or node.output[0]
    carried = len(node.input) - 2
    local = {t for n in body.node for t in n.output if t}
    shared = {i.name: scoped_name(prefix, i.name) for i in body.initializer}
    shared.update({n.output[0]: scoped_name(prefix, n.output[0]) for n in body.node
                   if n.op_type == "Constant" and not n.input})
    inits = [renamed_initializer(i, shared[i.name]) for i in body.initializer]
    inits += [numpy_helper.from_array(constant_node_value(n), shared[n.output[0]])
              for n in body.node if n.op_type == "Constant" and not n.input]
    current = list(node.input[2:])
    scans: list[list[str]] = [[] for _ in body.output[1 + carried:]]
    nodes: list[onnx.NodeProto] = []
    for i in range(trips):
        mapping = {t: scoped_name(f"{prefix}/{i}", t) for t in local} | shared
        mapping[body.input[0].name] = f"{prefix}/{i}/iteration"
        mapping[body.input[1].name] = f"{prefix}/{i}/cond"
        inits += [numpy_helper.from_array(_iteration(body, i), mapping[body.input[0].name]),
                  numpy_helper.from_array(np.array(True), mapping[body.input[1].name])]
        mapping.update({vi.name: v for vi, v in zip(body.input[2:], current)})
        for n in body.node:
            if n.op_type == "Constant" and not n.input:
                continue
            copy = rename_node(n, mapping)
            copy.name = scoped_name(f"{prefix}/{i}", n.name or n.output[0])
            nodes.append(copy)
        current = [mapping.get(vi.name, vi.name) for vi in body.output[1:1 + carried]]
        for j, vi in enumerate(body.output[1 + carried:]):
            scans[j].append(mapping.get(vi.name, vi.name))
    nodes += [helper.make_node("Identity", [v], [out], name=f"{prefix}/{out}/final")
              for v, out in zip(current, node.output[:carried]) if out]
    if any(scans):
        inits.append(numpy_helper.from_array(np.array([0], np.int64), f"{prefix}/axis0"))
    for parts, out in zip(scans, node.output[carried:]):
        if not out:
            continue
        stacked = [f"{prefix}/{k}/{out}/unsqueezed" for k in range(len(parts))]
        nodes += [helper.make_node("Unsqueeze", [p, f"{prefix}/axis0"], [s], name=s) for p, s in zip(parts, stacked)]
        nodes.append(helper.make_node("Concat", stacked, [out], name=f"{prefix}/{out}/concat", axis=0))
    return nodes, inits


def _names_taken(graph: onnx.GraphProto, loop: onnx.NodeProto, nodes: list[onnx.NodeProto],
                 inits: list[onnx.TensorProto]) -> bool:
    """Whether a tensor the unrolled copies define is already one of ``graph``'s (other than the loop's outputs)."""
    taken = ({i.name for i in graph.input} | {i.name for i in graph.initializer}
             | {o for n in graph.node for o in n.output}) - set(loop.output)
    return any(o in taken for n in nodes for o in n.output) or any(i.name in taken for i in inits)


def unroll_static_loops(proto: onnx.ModelProto, limit: int = MAX_UNROLLED_TRIPS
                        ) -> tuple[onnx.ModelProto, tuple[UnrolledLoop, ...]]:
    """A copy of ``proto`` whose main-graph Loops with a static trip count are unrolled (``proto`` if none)."""
    def unroll(out: onnx.ModelProto, folder: ConstantFolder, idx: int, node: onnx.NodeProto) -> UnrolledLoop | None:
        trips, _ = static_trip_count(node, folder, out, limit)
        if trips is None:
            return None
        nodes, inits = _unrolled(node, trips)
        if _names_taken(out.graph, node, nodes, inits):
            return None  # a copy's name is the graph's already: left a loop rather than wired to the wrong tensor
        replace_node(out.graph, idx, nodes, inits)
        drop_dead_producers(out.graph, node.input[:2])
        return UnrolledLoop(node.name or node.output[0], trips)

    return rewrite_until_fixed(proto, "Loop", unroll)


@dataclass(frozen=True)
class HoistedInvariants:
    """Loop-carried values of one Loop that its body passes through unchanged, now read from outside it."""

    node: str
    names: tuple[str, ...]

    def note(self) -> str:
        shown = ", ".join(self.names[:5]) + (", ..." if len(self.names) > 5 else "")
        return (f"Loop {self.node!r}: {len(self.names)} carried value(s) its body passes through unchanged ({shown}: "
                "constants an exporter carries through the loop, as paddle2onnx does its weights) are read from "
                "outside the loop instead (the same values: no activations to calibrate)")


def hoist_loop_invariants(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, tuple[HoistedInvariants, ...]]:
    """A copy of ``proto`` whose main-graph Loops no longer carry values their body returns as it got them (the
    body output is the body input itself); ``proto`` if none does. Exact: such a value never changes, so the
    loop's final value is its initial one, whatever the trip count::

        W ─► Loop(carried: W, h; body: (w, h) ─► (w, f(w, h))) ─► W', h'   ─► MatMul(W', ...)
        ==>  W ─► Loop(carried: h; body: h ─► f(W, h)) ─► h'                ─► MatMul(W, ...)

    Left carried: a value the body also emits elsewhere (a scan output), or whose outer name the body uses.
    """
    def hoist(out: onnx.ModelProto, folder: ConstantFolder, idx: int, node: onnx.NodeProto
              ) -> HoistedInvariants | None:
        body = next(a.g for a in node.attribute if a.name == "body")
        invariant = _invariant_carried(node, body)
        if not invariant:
            return None
        outer = {body.input[k + 2].name: node.input[k + 2] for k in invariant}
        kept = [k for k in range(len(node.input) - 2) if k not in invariant]
        new_body = onnx.GraphProto()
        new_body.CopyFrom(body)
        del new_body.node[:]
        new_body.node.extend(rename_node(n, outer) for n in body.node)
        del new_body.input[2:], new_body.output[1:]
        new_body.input.extend(body.input[k + 2] for k in kept)
        new_body.output.extend([body.output[k + 1] for k in kept] + list(body.output[len(node.input) - 1:]))
        finals = {node.output[k]: node.input[k + 2] for k in invariant if k < len(node.output) and node.output[k]}
        loop = helper.make_node("Loop", [*node.input[:2], *(node.input[k + 2] for k in kept)],
                                [*(node.output[k] for k in kept), *node.output[len(node.input) - 2:]],
                                name=node.name, body=new_body)
        graph_outputs = {o.name for o in out.graph.output}
        nodes = [loop] + [helper.make_node("Identity", [v], [o], name=f"{node.name or o}/{o}/invariant")
                          for o, v in finals.items() if o in graph_outputs]
        replace_node(out.graph, idx, nodes, [])
        renamed = {o: v for o, v in finals.items() if o not in graph_outputs}
        for n in out.graph.node if renamed else ():
            n.CopyFrom(rename_node(n, renamed))
        kept_info = [vi for vi in out.graph.value_info if vi.name not in finals]
        del out.graph.value_info[:]
        out.graph.value_info.extend(kept_info)
        return HoistedInvariants(node.name or node.output[0], tuple(node.input[k + 2] for k in invariant))

    return rewrite_until_fixed(proto, "Loop", hoist)


def _invariant_carried(node: onnx.NodeProto, body: onnx.GraphProto) -> list[int]:
    """Indices of the carried values the body returns unchanged and that can be read from outside instead."""
    defined = {i.name for i in body.input} | {i.name for i in body.initializer} | {
        t for n in body.node for t in n.output if t}
    out = []
    for k in range(len(node.input) - 2):
        inner, outer = body.input[k + 2].name, node.input[k + 2]
        others = [o.name for i, o in enumerate(body.output) if i != k + 1]
        if (outer and body.output[k + 1].name == inner and inner not in others
                and (outer == inner or outer not in defined)):
            out.append(k)
    return out


MAX_BOUNDED_TRIPS = 512
"""A while loop's counter is followed this many steps at most looking for the step its condition stops at."""


@dataclass(frozen=True)
class BoundedLoop:
    """A Loop its own condition stops within ``trips`` steps, whatever the data, given that trip limit."""

    node: str
    trips: int

    def note(self) -> str:
        return (f"Loop {self.node!r}: its condition stops it within {self.trips} steps whatever the data (a counter "
                f"it carries), so its trip limit is set to {self.trips} (TensorRT sizes scan outputs from it; the "
                "same outputs)")


def _decided(name: str, folder: ConstantFolder, want: bool, depth: int = 0) -> bool:
    """Whether bool ``name`` is ``want`` whatever the data: constant, or an And (Or) one of whose inputs is False
    (True), through Not and Identity, and through an If whose condition is constant (torch writes
    ``i < 24 and not done`` as ``If(i < 24, then: not done, else: False)``) or whose branches both are."""
    value = folder.value(name)
    if value is not None:
        return value.size == 1 and bool(value.reshape(())) is want
    node = folder.producer.get(name)
    if node is None or depth > 50:
        return False
    if node.op_type in ("Identity", "Not"):
        return _decided(node.input[0], folder, want if node.op_type == "Identity" else not want, depth + 1)
    if node.op_type == ("And" if not want else "Or"):
        return any(_decided(i, folder, want, depth + 1) for i in node.input)
    if node.op_type == "If":
        cond = folder.scalar(node.input[0])
        taken = ("then_branch", "else_branch") if cond is None else ("then_branch" if bool(cond) else "else_branch",)
        # a condition the data decides: both branches must give ``want`` (torch's ``done and i < 5`` is
        # If(done, then: i < 5, else: False))
        return all(_branch_decided(node, which, name, folder, want, depth) for which in taken)
    return False


def _branch_decided(node: onnx.NodeProto, which: str, name: str, folder: ConstantFolder, want: bool,
                    depth: int) -> bool:
    """:func:`_decided` of the output ``name`` of If ``node`` in its branch ``which``."""
    branch = next(a.g for a in node.attribute if a.name == which)
    seeds = {t: v for t in sorted(outer_reads(branch)) for v in [folder.value(t)] if v is not None}
    inner = ConstantFolder(branch, folder.model, seeds, folder.evaluators)
    return _decided(branch.output[list(node.output).index(name)].name, inner, want, depth + 1)


def trip_bound(node: onnx.NodeProto, folder: ConstantFolder, model: onnx.ModelProto,
               limit: int = MAX_BOUNDED_TRIPS) -> int | None:
    """The step (1-based) by which the body's condition is false whatever the data, following the carried values
    that start constant and that the body updates from constants alone (torch's ``while i < 24 and not done``:
    ``i``); None when no such step comes within ``limit``."""
    body = next(a.g for a in node.attribute if a.name == "body")
    carried = len(node.input) - 2
    values = {k: folder.value(node.input[k + 2]) for k in range(carried) if node.input[k + 2]}
    values = {k: v for k, v in values.items() if v is not None and v.size <= 16}
    deciding = set(upstream([body.output[0].name], {o: n for n in body.node for o in n.output if o}, bodies=True))
    if body.input[0].name not in deciding and not any(body.input[k + 2].name in deciding for k in values):
        return None  # no counter decides the condition: nothing to follow
    outer = _outer_constants(body, folder)
    evaluators: Evaluators = {}
    for t in range(limit):
        if not values:
            return None
        seeds = {**outer, body.input[0].name: _iteration(body, t), body.input[1].name: np.array(True),
                 **{body.input[k + 2].name: v for k, v in values.items()}}
        step = ConstantFolder(body, model, seeds, evaluators)
        if _decided(body.output[0].name, step, False):
            return t + 1
        values = {k: v for k in values for v in [step.value(body.output[k + 1].name)] if v is not None}
    return None


def bound_loop_trips(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, tuple[BoundedLoop, ...]]:
    """A copy of ``proto`` whose main-graph Loops without a trip limit below :func:`trip_bound` get that limit
    (``proto`` if none): exact, the condition stops them there anyway."""
    bounded: set[str] = set()  # the Loops given their bound already: not followed again on the next round

    def bound(out: onnx.ModelProto, folder: ConstantFolder, idx: int, node: onnx.NodeProto) -> BoundedLoop | None:
        if (node.name or node.output[0]) in bounded:
            return None
        current = folder.scalar(node.input[0]) if node.input and node.input[0] else None
        if node.input and node.input[0] and current is None:
            return None  # a trip count the data sets: a bound would have to be taken with it
        trips = trip_bound(node, folder, out)
        if trips is None or (current is not None and int(current) <= trips):
            return None
        label = node.name or node.output[0]
        limit = f"{label}/trip_limit"
        out.graph.initializer.append(numpy_helper.from_array(np.array(trips, np.int64), limit))
        node_copy = onnx.NodeProto()
        node_copy.CopyFrom(node)
        node_copy.input[0] = limit
        replace_node(out.graph, idx, [node_copy], [])
        drop_dead_producers(out.graph, [node.input[0]])
        bounded.add(label)
        return BoundedLoop(label, trips)

    return rewrite_until_fixed(proto, "Loop", bound)

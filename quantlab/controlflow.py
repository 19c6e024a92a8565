"""Control flow the data cannot change: constant ``If`` nodes inlined, static ``Loop`` nodes unrolled.

A voice-activity model keeps one set of weights per sample rate, as Constant nodes
inside the two branches of an ``If`` on ``sr == 16000``. Statistics see only the
main graph, so nothing inside a branch is calibrated and the writer cannot place
Q/DQ there. When the condition folds to a constant (from initializers, Constant
nodes, or inputs bound to the value the data always has: :func:`bind_inputs`),
the taken branch replaces the node::

    sr(16000) ─► Equal ─► cond ─► If ─► enc        x ─► MatMul(W16) ─► Add(b16) ─► Relu ─► enc
               x ─────────────────┘        ==>        (W16, b16: initializers)
      then: x ─► MatMul(Constant W16) ─► Add(Constant b16) ─► Relu ─► out

Branch Constant nodes become initializers (weights, as the writer expects); a
branch tensor or node whose name is already taken in the graph is renamed
``<If name>/<name>``; the branch output is computed under the If output's name (an
Identity when the branch passes a tensor through); the condition's now dead nodes
go. Nested Ifs come up into the main graph and are inlined in turn; Loops with a
static trip count are unrolled (:mod:`quantlab.loops`). :func:`resolve_static_control_flow`
does both and records what it did in the model's ``metadata_props``
(:data:`RECORD_KEY`), which :func:`control_flow_notes` turns into provenance notes,
together with the subgraph tensors that stay float and why (:func:`float_subgraph_tensors`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import ModelError
from .folding import (
    ConstantFolder,
    constant_node_value,
    drop_dead_producers,
    graph_names,
    outer_reads,
    rename_node,
    renamed_initializer,
    replace_node,
    rewrite_until_fixed,
    subgraphs,
)
from .graph.topology import SHAPE_ONLY_OPS, producer_map, upstream
from .loops import (
    MAX_UNROLLED_TRIPS,
    BoundedLoop,
    bound_loop_trips,
    HoistedInvariants,
    UnrolledLoop,
    static_trip_count,
    hoist_loop_invariants,
    unroll_static_loops,
)
from .sequences import ConcatenatedSequence, ScannedSequence, concat_collected_sequences, scan_loop_sequences

__all__ = [
    "RECORD_KEY",
    "InlinedIf",
    "bind_hints",
    "bind_inputs",
    "compute_layers_in_bodies",
    "compute_layers_outside",
    "control_flow_notes",
    "deciding_inputs",
    "float_subgraph_tensors",
    "inline_constant_ifs",
    "resolve_static_control_flow",
]

_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                          onnx.TensorProto.DOUBLE})

RECORD_KEY = "quantlab.control_flow"
"""``metadata_props`` key holding the JSON list of what was inlined / unrolled (one sentence each)."""


@dataclass(frozen=True)
class InlinedIf:
    """One If replaced by its taken branch: ``sources`` are the constants its condition came from."""

    node: str
    condition: bool
    branch: str
    sources: tuple[str, ...]

    def note(self) -> str:
        sources = ", ".join(self.sources) or "a constant"
        return (f"If {self.node!r}: condition constant {self.condition} (from {sources}), "
                f"{self.branch} inlined before statistics and writing")


Resolved = InlinedIf | UnrolledLoop | HoistedInvariants | BoundedLoop | ConcatenatedSequence | ScannedSequence
"""What :func:`resolve_static_control_flow` did to one node."""


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
    if values:
        _record_notes(out, [f"input {k!r} bound to {np.asarray(v).tolist()!r} (the value the data always feeds "
                            "it): Ifs and Loops it decides resolved for that value; the written model has no input "
                            f"{k!r}, so callers stop feeding it" for k, v in values.items()])
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
    inits = [renamed_initializer(i, mapping[i.name]) for i in branch.initializer]
    nodes: list[onnx.NodeProto] = []
    for n in branch.node:
        if n.op_type == "Constant" and not n.input:
            inits.append(numpy_helper.from_array(constant_node_value(n), mapping[n.output[0]]))
            continue
        renamed = rename_node(n, mapping)
        if n.name in node_names:
            renamed.name = f"{prefix}/{n.name}"
        nodes.append(renamed)
    for out_vi, if_out in zip(branch.output, node.output):
        written = mapping.get(out_vi.name, out_vi.name)
        if written != if_out:  # an outer tensor passed through, or one result given twice
            nodes.append(helper.make_node("Identity", [written], [if_out], name=f"{prefix}/{if_out}/identity"))
    return nodes, inits


def inline_constant_ifs(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, tuple[InlinedIf, ...]]:
    """A copy of ``proto`` whose main-graph Ifs with a constant condition are replaced by the taken branch.

    ``proto`` itself when there is nothing to inline. (The load-time entry is
    :func:`resolve_static_control_flow`, which also unrolls loops and records what it did.)
    """
    return rewrite_until_fixed(proto, "If", _inline_if)


def _inline_if(out: onnx.ModelProto, folder: ConstantFolder, idx: int, node: onnx.NodeProto) -> InlinedIf | None:
    """Splice the branch a constant condition takes in place of the If (None: the data decides)."""
    cond = folder.scalar(node.input[0])
    if cond is None:
        return None
    taken = bool(cond)
    branch = next(a.g for a in node.attribute if a.name == ("then_branch" if taken else "else_branch"))
    nodes, inits = _spliced(node, branch, graph_names(out.graph) - set(node.output),
                            {n.name for n in out.graph.node if n.name})
    replace_node(out.graph, idx, nodes, inits)
    drop_dead_producers(out.graph, [node.input[0]])
    return InlinedIf(node.name or node.output[0], taken, "then_branch" if taken else "else_branch",
                     folder.leaves.get(node.input[0], ()))


def resolve_static_control_flow(proto: onnx.ModelProto, *, max_trips: int = MAX_UNROLLED_TRIPS
                                ) -> tuple[onnx.ModelProto, tuple[Resolved, ...]]:
    """Inline constant Ifs and unroll static Loops until none is left (one may expose the other), then read the
    values the Loops left carry unchanged from outside them (:func:`quantlab.loops.hoist_loop_invariants`).

    What was done is appended to the copy's ``metadata_props`` under :data:`RECORD_KEY`, which
    :func:`control_flow_notes` reads back for provenance. ``proto`` itself when nothing applies.
    """
    done: list[Resolved] = []
    out = proto
    while True:
        out, ifs = inline_constant_ifs(out)
        out, loops = unroll_static_loops(out, max_trips)
        done += [*ifs, *loops]
        if not ifs and not loops:
            break
    out, hoisted = hoist_loop_invariants(out)
    out, concatenated = concat_collected_sequences(out)
    out, scanned = scan_loop_sequences(out)
    out, bounded = bound_loop_trips(out)
    done += [*hoisted, *concatenated, *scanned, *bounded]
    if not done:
        return proto, ()
    _record(out, done)
    return out, tuple(done)


def _record(proto: onnx.ModelProto, done: list[Resolved]) -> None:
    _record_notes(proto, [d.note() for d in done])


def _record_notes(proto: onnx.ModelProto, notes: list[str]) -> None:
    previous = [p for p in proto.metadata_props if p.key == RECORD_KEY]
    entries = json.loads(previous[0].value) if previous else []
    entries += notes
    kept = [p for p in proto.metadata_props if p.key != RECORD_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    proto.metadata_props.append(onnx.StringStringEntryProto(key=RECORD_KEY, value=json.dumps(entries)))


def _reason(node: onnx.NodeProto, folder: ConstantFolder, proto: onnx.ModelProto, max_trips: int) -> str:
    label = f"{node.op_type} {node.name or node.output[0]!r}"
    if node.op_type == "If":
        shaped = _shapes_deciding(node.input[0], proto)
        if shaped:
            return (f"inside {label}, whose condition depends on the shape of {', '.join(map(repr, shaped))} (a dynamic "
                    "dim), not on values: not inlined. TensorRT builds such an If only with that dim fixed "
                    "(build --shapes with min = opt = max)")
        return f"inside {label}, whose condition depends on the data (not inlined)"
    if node.op_type == "Loop":
        return f"inside the body of {label}, not unrolled: {static_trip_count(node, folder, proto, max_trips)[1]}"
    return f"inside the body of {label} ({node.op_type} bodies are not unrolled)"


def _shape_op(node: onnx.NodeProto) -> bool:
    """Where a walk for the inputs whose values decide something stops: past it, only a shape counts."""
    return node.op_type in SHAPE_ONLY_OPS


def _shapes_deciding(condition: str, proto: onnx.ModelProto) -> list[str]:
    """The graph inputs whose shapes alone decide ``condition`` (torch's ``if x.size(0) == 1: squeeze``), or []
    when an input's values reach it too."""
    producers = producer_map(proto)
    inputs = {i.name for i in proto.graph.input} - {i.name for i in proto.graph.initializer}
    if _inputs_upstream([condition], producers, inputs, _shape_op):
        return []
    return _inputs_upstream([condition], producers, inputs)


def float_subgraph_tensors(proto: onnx.ModelProto, *, max_trips: int = MAX_UNROLLED_TRIPS,
                           skip: Collection[int] = ()) -> dict[str, str]:
    """Activations computed inside If / Loop / Scan bodies (which stay float), each with the reason; ``skip``: the
    indices (in ``proto.graph.node``) of nodes whose bodies were written in INT8 (quantlab.stats.bodies calibrated
    them) or in float16 (said apart)."""
    folder = ConstantFolder(proto.graph, proto)
    out: dict[str, str] = {}
    for i, node in enumerate(proto.graph.node):
        bodies = subgraphs(node) if i not in skip else []
        reason = _reason(node, folder, proto, max_trips) if bodies else ""
        for body in bodies:
            _add_body_tensors(body, reason, out)
    return out


def _add_body_tensors(body: onnx.GraphProto, reason: str, out: dict[str, str]) -> None:
    """``body``'s float activations into ``out`` with ``reason``, and those of the bodies nested in it (an RNN-T's
    symbol loop inside its frame loop: every Gemm is there) with theirs."""
    constants = {i.name for i in body.initializer} | {o for n in body.node if n.op_type == "Constant" for o in n.output}
    declared = {vi.name: vi.type.tensor_type.elem_type for vi in list(body.output) + list(body.value_info)}
    not_float = {t for t, dtype in declared.items() if dtype and dtype not in _FLOAT_TYPES}
    for t in sorted(graph_names(body) - {i.name for i in body.input} - outer_reads(body) - constants - not_float):
        out.setdefault(t, reason)
    for node in body.node:
        for nested in subgraphs(node):
            _add_body_tensors(nested, f"inside {node.op_type} {node.name or node.output[0]!r}, nested {reason}", out)


_COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
"""The layers that carry a model's compute, and an INT8 plan's speed-up."""


def compute_layers_in_bodies(proto: onnx.ModelProto, skip: Collection[str] = ()) -> dict[str, int]:
    """``"Loop 'name'"`` -> how many Conv/ConvTranspose/MatMul/Gemm nodes its bodies hold (nested ones included),
    for the If / Loop / Scan nodes of the main graph that hold any, but the nodes in ``skip`` (bodies written INT8)."""
    def count(graph: onnx.GraphProto) -> int:
        return sum((n.op_type in _COMPUTE_OPS) + sum(count(b) for b in subgraphs(n)) for n in graph.node)

    out: dict[str, int] = {}
    for node in proto.graph.node:
        inside = sum(count(body) for body in subgraphs(node)) if node.name not in skip else 0
        if inside:
            out[f"{node.op_type} {(node.name or node.output[0])!r}"] = inside
    return out


def compute_layers_outside(proto: onnx.ModelProto) -> int:
    """The Conv/ConvTranspose/MatMul/Gemm nodes of the main graph (those a plan can make INT8)."""
    return sum(n.op_type in _COMPUTE_OPS for n in proto.graph.node)


def control_flow_notes(proto: onnx.ModelProto, written_bodies: Collection[int] = (), *,
                       float_tensors: bool = True) -> tuple[str, ...]:
    """Provenance notes: what :func:`resolve_static_control_flow` did, and (``float_tensors``: for a plan with INT8
    groups) the subgraph tensors left float but in ``written_bodies``, the indices of the nodes whose bodies the
    writer wrote in INT8 or float16."""
    notes: list[str] = []
    for p in proto.metadata_props:
        if p.key == RECORD_KEY:
            notes += [str(n) for n in json.loads(p.value)]
    by_reason: dict[str, list[str]] = {}
    left = float_subgraph_tensors(proto, skip=written_bodies) if float_tensors else {}
    for name, reason in left.items():
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        notes.append(f"{len(names)} tensor(s) left in float, {reason}: {shown}")
    return tuple(notes)


def deciding_inputs(proto: onnx.ModelProto, *, by_value: bool = False) -> dict[str, tuple[str, ...]]:
    """The graph inputs an ``If``'s condition (or a ``Loop``'s trip count or condition) is computed from, each
    with the nodes it decides (``"If 'name'"``), for the If / Loop nodes of the main graph still there: those
    loading could not resolve, because what decides them comes from the data. ``by_value``: only inputs whose
    values decide (what ``--bind`` can resolve), not those whose shape alone does."""
    producers = producer_map(proto)
    inputs = {i.name for i in proto.graph.input} - {i.name for i in proto.graph.initializer}
    stop = _shape_op if by_value else None
    out: dict[str, list[str]] = {}
    for node in proto.graph.node:
        roots = node.input[:1] if node.op_type == "If" else node.input[:2] if node.op_type == "Loop" else []
        for name in _inputs_upstream([t for t in roots if t], producers, inputs, stop):
            out.setdefault(name, []).append(f"{node.op_type} {node.name or node.output[0]!r}")
    return {name: tuple(nodes) for name, nodes in out.items()}


def _inputs_upstream(names: list[str], producers: Mapping[str, onnx.NodeProto], inputs: set[str],
                     stop: Callable[[onnx.NodeProto], bool] | None = None) -> list[str]:
    """The graph inputs among ``names`` and the tensors they are computed from, in the order first met."""
    return [t for t in upstream(names, producers, stop=stop, bodies=True) if t in inputs]


def bind_hints(proto: onnx.ModelProto, constant_inputs: Mapping[str, Any], samples: int) -> tuple[str, ...]:
    """What to ``--bind`` so that the If / Loop nodes the data decides can be resolved.

    ``constant_inputs``: inputs that held one value in every sample of the data (a voice model's
    sample rate ``sr``). A hint is given for a node only when every input it depends on is among
    them: binding them makes its condition a constant, so loading inlines the If (or unrolls the
    Loop) and its branch is calibrated and written instead of left in float.
    """
    decided = deciding_inputs(proto)
    by_node: dict[str, list[str]] = {}
    for name, nodes in decided.items():
        for node in nodes:
            by_node.setdefault(node, []).append(name)
    hints = []
    for node, names in by_node.items():
        if not all(n in constant_inputs for n in names):
            continue
        names = sorted(names)
        binds = " ".join(f"--bind {n}={constant_inputs[n]!r}" for n in names)
        table = ", ".join(f"{n} = {constant_inputs[n]!r}" for n in names)
        held = ", ".join(f"{n!r} held {constant_inputs[n]!r}" for n in names)
        done = "inlined when the model loads, and its branch is" if node.startswith("If") else \
            f"unrolled when the model loads (up to {MAX_UNROLLED_TRIPS} trips), and its body is"
        hints.append(f"{node} is decided by the data: input {held} in all {samples} calibration samples. "
                     f"`{binds}` on every command (`bind = {{ {table} }}` in an experiment) makes it a constant: "
                     f"the {node.split()[0]} is then {done} calibrated and written instead of left in float; "
                     "leave the bound input out of the data sets' [inputs]")
    return tuple(hints)

"""FP16 inside control flow: the body of a Loop/Scan (or the branches of an If) of an FP16 group, written in float16.

The writer handles one graph; a Loop node of an FP16 group kept its body in float32 (SLANet's GRU decoder: 10
MatMuls, 28 % of the weights, in FP32 in its "FP16" model). Each body is written like a model of its own, with a
uniform FP16 plan and the same options: its inputs and the outer tensors it reads become the model's inputs (float
ones cast to float16 where a float16 node reads them), the outer weights it reads its initializers (float16 copies
kept in the body), and its outputs come back as float32, so the Loop node's interface and the main graph do not
change::

    h ─► Loop(body: h_in(f32) ─► MatMul(W) ─► Tanh ─► h_out(f32)) ─► h'
    ==>  h ─► Loop(body: h_in ─► Cast(f16) ─► MatMul(W/fp16) ─► Tanh ─► Cast(f32) ─► h_out) ─► h'

Names the body's writing makes are prefixed with the node's name (ONNX forbids a subgraph to define a name of an
enclosing scope), an If's also with the branch's (:func:`quantlab.graph.bodies.body_key`: TensorRT refused a
second ``by_sample_rate/input/QuantizeLinear``, both branches quantizing the input they read). A Loop/Scan body or
If branch the table calibrated (``CalibrationTable.bodies``, quantlab.stats.bodies) is written with those ranges,
so its nodes beyond ``WriteOptions.fp16_data_max`` stay float32 one by one; for other bodies the writer keeps the
whole body float32 when a value entering or leaving it went beyond that in calibration.
Nested bodies are written the same way, recursively. The same machinery writes a calibrated body in INT8
(:func:`write_int8_bodies`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import onnx
from onnx import TensorProto

from ..errors import QuantlabError
from ..folding import rename_node
from ..graph import TensorSpec, outer_names
from ..graph.bodies import body_graphs, body_key, body_model
from ..graph.topology import subgraph_reads
from ..precision import FP16, INT8
from .options import WriteOptions

__all__ = ["body_table", "fp16_subgraph", "write_bodies", "write_fp16_bodies", "write_int8_bodies", "written_subgraph"]


def write_bodies(node: onnx.NodeProto, written: onnx.NodeProto, owner: str, precision: str, int8_asked: bool,
                 specs: Mapping[str, TensorSpec], initializers: Mapping[str, onnx.TensorProto], model: onnx.ModelProto,
                 options: WriteOptions, table: Any, beyond_fp16: Mapping[str, float]) -> tuple[list[str], str | None]:
    """The bodies of a control-flow node, written into the writer's copy ``written`` as plan and options ask; returns
    (notes, ``"int8"`` / ``"fp16"`` for what they now compute in, None when left as they were).

    INT8 when ``options.int8_bodies`` asks, the plan asked INT8 of the node's group (``int8_asked``,
    :meth:`quantlab.plan.ResolvedPlan.int8_asked`: an int8 default or rule; a group pinned or overridden to fp16/fp32
    keeps float bodies) and the table calibrated this node's bodies (:func:`write_int8_bodies`); else float16 for a
    node of an FP16 group (:func:`write_fp16_bodies`), unless a value that enters or leaves the bodies went beyond
    ``options.fp16_data_max`` in calibration (``beyond_fp16``: tensor -> its largest |x|): then they stay float32."""
    notes: list[str] = []
    if options.int8_bodies and int8_asked and table is not None and any(
            table.bodies.get(body_key(owner, attr)) for attr in body_graphs(node)):
        notes, wrote = write_int8_bodies(written, owner, specs, initializers, model, options, table, precision)
        if wrote:
            return notes, INT8
    if precision != FP16:
        return notes, None
    crossing = [*node.input, *node.output, *sorted(subgraph_reads([node]))]
    seen = [(t, beyond_fp16[t]) for t in crossing if t in beyond_fp16]
    if seen:
        t, v = max(seen, key=lambda tv: tv[1])
        return [*notes, f"the bodies of {owner!r} stay float32: {t!r}, which "
                        f"{'enters' if t not in node.output else 'leaves'} them, reached |x| {v:.3g} in calibration "
                        f"(beyond {options.fp16_data_max:g})"], None
    told, wrote = write_fp16_bodies(written, owner, specs, initializers, model, options, table)
    return [*notes, *told], FP16 if wrote else None


def write_fp16_bodies(node: onnx.NodeProto, owner: str, specs: Mapping[str, TensorSpec],
                      initializers: Mapping[str, onnx.TensorProto], model: onnx.ModelProto,
                      options: WriteOptions, table: Any = None) -> tuple[list[str], bool]:
    """Writes every body of ``node`` in float16, in place (:func:`fp16_subgraph`); a body quantlab cannot write so
    (sequences, odd types) stays float32 with a note. ``table``: the calibration table; when it holds the ranges
    calibrated inside a body (quantlab.stats.bodies), a body node whose values went beyond
    ``options.fp16_data_max`` stays float32, as in the main graph. Returns (notes, whether a body now computes in
    float16)."""
    notes: list[str] = []
    wrote = False
    for attr in node.attribute:
        for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            try:
                key = body_key(owner, attr.name)
                written, told = fp16_subgraph(body, key, specs, initializers, model, options,
                                              body_table(body, key, table))
            except Exception as exc:  # noqa: BLE001 - any body that cannot be written: it stays float32
                why = str(exc) if isinstance(exc, QuantlabError) else f"{type(exc).__name__}: {exc}"
                notes.append(f"the body of {owner!r} ({attr.name}) stays float32: writing it in float16 failed: {why}")
                continue
            body.CopyFrom(written)
            notes.extend(told)
            wrote = wrote or _holds_float16(written)
    return notes, wrote


def write_int8_bodies(node: onnx.NodeProto, owner: str, specs: Mapping[str, TensorSpec],
                      initializers: Mapping[str, onnx.TensorProto], model: onnx.ModelProto, options: WriteOptions,
                      table: Any, fallback: str) -> tuple[list[str], bool]:
    """Writes the body of a Loop/Scan (the branches of an If) whose group INT8 was asked of, in place, with an INT8
    plan (``fallback`` for what has no INT8 form) and the ranges calibrated inside it (``table.bodies`` under its
    :func:`quantlab.graph.bodies.body_key`, quantlab.stats.bodies) beside the outer tensors' ranges. A body that
    cannot be written so, or that has no ranges (a branch the calibration data never took), stays as it was, with a
    note. Returns (notes, whether a body now
    holds Q/DQ)::

        Loop(body: h_in ─► MatMul(W) ─► Tanh ─► h_out)
        ==>  Loop(body: h_in ─► Q/DQ ─► MatMul(Q/DQ(W)) ─► Tanh ─► h_out)
    """
    from ..plan import PrecisionPlan

    notes: list[str] = []
    wrote = False
    for attr, body in body_graphs(node).items():
        key = body_key(owner, attr)
        where = f"the body of {owner!r}" if attr == "body" else f"the {attr.replace('_', ' ')} of {owner!r}"
        sub_table = body_table(body, key, table)
        if sub_table is None:
            notes.append(f"{where} stays float: calibration never ran it")
            continue
        try:
            written, told = written_subgraph(body, key, specs, initializers, model, options,
                                             PrecisionPlan(default=INT8, fallback=fallback), sub_table)
        except Exception as exc:  # noqa: BLE001 - any body that cannot be written so: it stays as it was
            why = str(exc) if isinstance(exc, QuantlabError) else f"{type(exc).__name__}: {exc}"
            notes.append(f"{where} stays float: writing it in INT8 failed: {why}")
            continue
        quantizers = sum(n.op_type == "QuantizeLinear" for n in written.node)
        if not quantizers:
            notes.append(f"{where} stays float: nothing in it has an INT8 form")
            continue
        body.CopyFrom(written)
        notes += [*told, f"{where} is written INT8 with its calibrated ranges ({quantizers} QuantizeLinear)"]
        wrote = True
    return notes, wrote


def body_table(body: onnx.GraphProto, key: str, table: Any) -> Any:
    """The table a body is written with as a model of its own: the ranges calibrated inside it (``table.bodies[key]``,
    :func:`quantlab.graph.bodies.body_key`) and those of the outer tensors it reads; None when the table has none."""
    from ..table import CalibrationTable

    if table is None or not table.bodies.get(key):
        return None
    reads = outer_names(body)
    ranges = {**{t: r for t, r in table.ranges.items() if t in reads}, **table.bodies[key]}
    return CalibrationTable(table.method, ranges, "", settings=table.settings)


def _holds_float16(graph: onnx.GraphProto) -> bool:
    """Whether a written body computes or rounds anything in float16 (a float16 copy, a Cast to float16)."""
    to_f16 = any(n.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.FLOAT16 for a in n.attribute)
                 for n in graph.node)
    return to_f16 or any(i.data_type == TensorProto.FLOAT16 for i in graph.initializer)


def fp16_subgraph(body: onnx.GraphProto, owner: str, specs: Mapping[str, TensorSpec],
                  initializers: Mapping[str, onnx.TensorProto], model: onnx.ModelProto,
                  options: WriteOptions, table: Any = None) -> tuple[onnx.GraphProto, tuple[str, ...]]:
    """(``body`` written in float16, the notes of that writing). ``specs`` types the outer tensors the body reads;
    ``initializers`` are the enclosing graph's (an outer weight the body reads stays a weight); ``table``: the
    body's own ranges (:func:`body_table`), for the float16 range guard node by node."""
    from ..plan import uniform_plan

    return written_subgraph(body, owner, specs, initializers, model, options, uniform_plan(FP16), table)


def written_subgraph(body: onnx.GraphProto, owner: str, specs: Mapping[str, TensorSpec],
                     initializers: Mapping[str, onnx.TensorProto], model: onnx.ModelProto, options: WriteOptions,
                     plan: Any, table: Any) -> tuple[onnx.GraphProto, tuple[str, ...]]:
    """(``body`` written by :func:`quantlab.quantize.write_model` with ``plan`` and ``table`` as a model of its own
    (:func:`quantlab.graph.bodies.body_model`), the notes of that writing), its interface unchanged."""
    from ..graph import model_from_proto
    from .write import write_model

    reads = sorted(outer_names(body))
    weights = [initializers[r] for r in reads if r in initializers]
    loaded = model_from_proto(body_model(body, owner, specs, initializers, model), label=f"the body of {owner!r}")
    written = write_model(loaded, plan, table, dataclasses.replace(options, check=False))
    out = written.proto.graph
    original = {w.name: w.SerializeToString() for w in weights}
    unchanged = {i.name for i in out.initializer if original.get(i.name) == i.SerializeToString()}
    taken = _defined(body) | {i.name for i in body.input} | unchanged  # an outer weight as it was: read from outside
    renamed = {n: f"{owner}/{n}" for n in _defined(out) if n not in taken}  # one the loader rewrote: a body copy
    own_nodes = {n.name for n in body.node}
    result = onnx.GraphProto()
    result.name = body.name
    result.input.extend(body.input)
    result.output.extend(body.output)
    for node in out.node:
        copy = rename_node(node, renamed)
        if copy.name not in own_nodes:
            copy.name = f"{owner}/{copy.name}"
        result.node.append(copy)
    for init in out.initializer:
        if init.name in unchanged:
            continue  # read from the enclosing graph, as before
        copy = onnx.TensorProto()
        copy.CopyFrom(init)
        copy.name = renamed.get(init.name, init.name)
        result.initializer.append(copy)
    said_above = ("no --table", "ONNX Runtime can crash", "compute their bodies in float16 too")  # the model's own
    notes = tuple(f"inside {owner!r}: {n}" for n in written.provenance.notes if not any(s in n for s in said_above))
    return result, notes


def _defined(graph: onnx.GraphProto) -> set[str]:
    return {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output if o}


"""A sequence built item by item and then concatenated (a scripted loop's list, unrolled) becomes one Concat.

torch.jit.script writes ``ys.append(y)`` in a loop and ``torch.stack(ys)`` after it as a sequence the Loop
carries; once the loop is unrolled (:mod:`quantlab.loops`) the sequence is a chain of inserts, which TensorRT
cannot parse (it has no sequence ops). The same values, concatenated directly::

    SequenceEmpty ─► SequenceInsert(·, y0) ─► SequenceInsert(·, y1) ─► [Identity] ─► ConcatFromSequence(axis=a)
    ==>  y0 ─► Unsqueeze(a) ─┐
         y1 ─► Unsqueeze(a) ─┴─► Concat(axis=a)          (no Unsqueeze when new_axis=0)

A ``SequenceConstruct(x0, x1)`` at the chain's start gives its inputs first. Inserts at a position (a third
input) stay as they are.

A loop left a loop (a while loop, or too long to unroll) that appends to such a list each step returns the
same values as a scan output, which TensorRT builds (a while loop's too), reshaped after the loop (a list started
with items, torch's ``ys = [x]``, gets them put before the steps)::

    SequenceEmpty ─► Loop(carried ys; body: ys ─► SequenceInsert(ys, y) ─► ys') ─► ConcatFromSequence(axis=a)
    ==>  Loop(body: ... y ─► scan output) ─► ys[T, *y] ─► Transpose(T to axis a) [─► Reshape(T merged with
         axis a), for new_axis=0]

Taken only where every step's ``y`` has one shape: a stack (new_axis=1) requires it anyway; a concatenation
needs ``y``'s size on axis ``a`` fixed (a token ``[N, 1]`` each step), by ONNX shape inference.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .folding import ConstantFolder, drop_dead_producers, replace_node, rewrite_until_fixed
from .graph.topology import subgraph_reads
from .loops import scoped_name

__all__ = ["ConcatenatedSequence", "ScannedSequence", "concat_collected_sequences", "scan_loop_sequences"]


@dataclass(frozen=True)
class ConcatenatedSequence:
    """One ConcatFromSequence of a sequence of ``items`` known tensors, replaced by a Concat of them."""

    node: str
    items: int

    def note(self) -> str:
        return (f"ConcatFromSequence {self.node!r}: the {self.items} tensors its sequence collects one by one are "
                "concatenated directly (Concat; TensorRT parses no sequence ops)")


def _collected(sequence: str, producers: Mapping[str, onnx.NodeProto]) -> list[str] | None:
    """The tensors ``sequence`` holds, in order, when a chain of appends from an empty or constructed sequence
    builds it; else None."""
    appended: list[str] = []
    while True:
        node = producers.get(sequence)
        if node is None:
            return None
        if node.op_type == "Identity":
            sequence = node.input[0]
        elif node.op_type == "SequenceInsert" and (len(node.input) < 3 or not node.input[2]):
            appended.append(node.input[1])
            sequence = node.input[0]
        elif node.op_type == "SequenceEmpty":
            return appended[::-1]
        elif node.op_type == "SequenceConstruct":
            return [*node.input, *appended[::-1]]
        else:
            return None


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)


def concat_collected_sequences(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, tuple[ConcatenatedSequence, ...]]:
    """A copy of ``proto`` whose main-graph ConcatFromSequence nodes of a known chain of tensors are Concats
    (``proto`` if none is)."""
    def rewrite(out: onnx.ModelProto, folder: ConstantFolder, idx: int, node: onnx.NodeProto
                ) -> ConcatenatedSequence | None:
        producers = {o: n for n in out.graph.node for o in n.output if o}
        items = _collected(node.input[0], producers)
        if not items:
            return None
        attrs = {a.name: a.i for a in node.attribute}
        axis, new_axis = attrs.get("axis", 0), attrs.get("new_axis", 0)
        label = node.name or node.output[0]
        nodes: list[onnx.NodeProto] = []
        inits: list[onnx.TensorProto] = []
        parts = items
        if new_axis:
            parts = [f"{label}/{k}/unsqueezed" for k in range(len(items))]
            if _opset(out) >= 13:
                inits.append(numpy_helper.from_array(np.array([axis], np.int64), f"{label}/axis"))
                nodes += [helper.make_node("Unsqueeze", [t, f"{label}/axis"], [p], name=p) for t, p in zip(items, parts)]
            else:
                nodes += [helper.make_node("Unsqueeze", [t], [p], name=p, axes=[axis]) for t, p in zip(items, parts)]
        nodes.append(helper.make_node("Concat", parts, list(node.output), name=label, axis=axis))
        replace_node(out.graph, idx, nodes, inits)
        drop_dead_producers(out.graph, [node.input[0]])
        return ConcatenatedSequence(label, len(items))

    return rewrite_until_fixed(proto, "ConcatFromSequence", rewrite)


@dataclass(frozen=True)
class ScannedSequence:
    """One Loop's appended list (``item``, each step) turned into a scan output."""

    node: str
    item: str

    def note(self) -> str:
        return (f"Loop {self.node!r}: the list its body appends {self.item!r} to each step is a scan output, "
                "stacked after the loop, instead of a sequence (TensorRT parses no sequence ops)")


def _readers(graph: onnx.GraphProto, name: str) -> list[onnx.NodeProto]:
    """The nodes of ``graph`` that read ``name``, directly or from a subgraph."""
    return [n for n in graph.node if name in n.input or name in subgraph_reads([n])]


def _inferred_type(proto: onnx.ModelProto, loop_name: str, item: str,
                   folder: ConstantFolder | None = None) -> onnx.TypeProto | None:
    """``item``'s tensor type inside the body of Loop ``loop_name`` by ONNX shape inference; None when inference
    does not give its rank. With ``folder``, the small constants the body reads from the outer scope are copied
    into it first: inference does not carry values across scopes (torch's ``h.pow(2).sum(-1)`` in a while loop
    reads its axes from a main-graph Constant, and the item's rank was unknown)."""
    if folder is not None:
        proto = _with_outer_constants(proto, loop_name, folder)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except Exception:  # noqa: BLE001 - a model shape inference cannot read: left a sequence
        return None
    loop = next((n for n in inferred.graph.node if n.op_type == "Loop" and (n.name or n.output[0]) == loop_name), None)
    body = next((a.g for a in loop.attribute if a.name == "body"), None) if loop is not None else None
    infos = list(body.value_info) + list(body.output) + list(body.input) if body is not None else []
    info = next((vi for vi in infos if vi.name == item), None)
    if info is None or not info.type.HasField("tensor_type") or not info.type.tensor_type.HasField("shape"):
        return None
    return info.type


def _with_outer_constants(proto: onnx.ModelProto, loop_name: str, folder: ConstantFolder) -> onnx.ModelProto:
    """A copy of ``proto`` whose Loop ``loop_name`` computes the small constants (64 values at most) its body's
    own nodes read from the outer scope as Constant nodes of its own, under new names (for shape inference only)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    loop = next((n for n in out.graph.node if n.op_type == "Loop" and (n.name or n.output[0]) == loop_name), None)
    body = next((a.g for a in loop.attribute if a.name == "body"), None) if loop is not None else None
    if body is None:
        return proto
    local = {i.name for i in body.input} | {o for n in body.node for o in n.output} | {
        i.name for i in body.initializer}
    values = {t: v for t in sorted({i for n in body.node for i in n.input if i and i not in local})
              for v in [folder.value(t)] if v is not None and v.size <= 64}
    if not values:
        return proto
    made = [helper.make_node("Constant", [], [f"{t}/in_body"], value=numpy_helper.from_array(v))
            for t, v in values.items()]
    for node in body.node:
        node.input[:] = [f"{i}/in_body" if i in values else i for i in node.input]
    nodes = [*made, *body.node]
    del body.node[:]
    body.node.extend(nodes)
    return out


def _appended(loop: onnx.NodeProto, k: int) -> tuple[onnx.NodeProto, str] | None:
    """The body's ``SequenceInsert(ys, y)`` of carried value ``k`` and ``y``, when that is all the body does with
    the list."""
    body = next(a.g for a in loop.attribute if a.name == "body")
    s_in, s_out = body.input[k + 2].name, body.output[k + 1].name
    insert = next((n for n in body.node if s_out in n.output), None)
    if (insert is None or insert.op_type != "SequenceInsert" or insert.input[0] != s_in
            or (len(insert.input) > 2 and insert.input[2])):
        return None
    if _readers(body, s_in) != [insert] or _readers(body, s_out) or \
            [o.name for o in body.output].count(s_out) != 1:
        return None
    return insert, insert.input[1]


def scan_loop_sequences(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, tuple[ScannedSequence, ...]]:
    """A copy of ``proto`` whose main-graph Loops return the lists they append to as scan outputs (see the module
    docstring; ``proto`` if none does)."""
    def rewrite(out: onnx.ModelProto, folder: ConstantFolder, idx: int, node: onnx.NodeProto
                ) -> ScannedSequence | None:
        producers = {o: n for n in out.graph.node for o in n.output if o}
        graph_outputs = {o.name for o in out.graph.output}
        for k in range(len(node.input) - 2):
            start = producers.get(node.input[k + 2])
            final = node.output[k] if k < len(node.output) else ""
            readers = _readers(out.graph, final) if final else []
            if (start is None or start.op_type not in ("SequenceEmpty", "SequenceConstruct") or final in graph_outputs
                    or len(readers) != 1 or readers[0].op_type != "ConcatFromSequence"):
                continue
            found = _appended(node, k)
            if found is None:
                continue
            insert, item = found
            concat = readers[0]
            attrs = {a.name: a.i for a in concat.attribute}
            axis, new_axis = attrs.get("axis", 0), attrs.get("new_axis", 0)
            label = node.name or node.output[0]
            kind = _inferred_type(out, label, item, folder)
            if kind is None:
                continue
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in kind.tensor_type.shape.dim]
            rank = len(dims)
            axis = axis + rank + 1 if new_axis and axis < 0 else axis + rank if axis < 0 else axis
            if not 0 <= axis <= rank - (0 if new_axis else 1) or (not new_axis and dims[axis] < 0):
                continue  # a concatenation of steps whose sizes may differ: left a sequence
            heads = list(start.input) if start.op_type == "SequenceConstruct" else []
            if any(not _same_shape(out, h, dims) for h in heads):
                continue  # torch's ``ys = [x]``: taken when x has the steps' shape
            scanned = scoped_name(f"{label}/scanned", item)
            replace_node(out.graph, idx, [_scanning_loop(node, k, insert, item, kind, scanned)], [])
            position = next(i for i, n in enumerate(out.graph.node) if concat.output[0] in n.output)
            stacked = _with_heads(scanned, heads, f"{label}/listed")
            replace_node(out.graph, position, [*stacked[1], *_stacked_like_concat(stacked[0], concat, axis,
                                                                                   new_axis, rank)], [])
            drop_dead_producers(out.graph, [start.output[0]])
            kept = [vi for vi in out.graph.value_info if vi.name != final]
            del out.graph.value_info[:]
            out.graph.value_info.extend(kept)
            return ScannedSequence(label, item)
        return None

    return rewrite_until_fixed(proto, "Loop", rewrite)


def _same_shape(proto: onnx.ModelProto, name: str, dims: list[int]) -> bool:
    """Whether main-graph tensor ``name`` has the rank of ``dims`` and their known sizes (shape inference)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except Exception:  # noqa: BLE001 - unreadable: not taken
        return False
    infos = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    info = next((vi for vi in infos if vi.name == name), None)
    if info is None or not info.type.tensor_type.HasField("shape"):
        return False
    own = [d.dim_value if d.HasField("dim_value") else -1 for d in info.type.tensor_type.shape.dim]
    return len(own) == len(dims) and all(a == b or a < 0 or b < 0 for a, b in zip(own, dims))


def _with_heads(scanned: str, heads: list[str], label: str) -> tuple[str, list[onnx.NodeProto]]:
    """The scan output ``[T, *y]`` with the list's first items (a SequenceConstruct's inputs) before the steps:
    ``[len(heads) + T, *y]``, and the nodes that make it (none without heads)."""
    if not heads:
        return scanned, []
    zero = f"{label}/axis0"
    nodes = [helper.make_node("Constant", [], [zero], name=zero, value=numpy_helper.from_array(np.array([0], np.int64)))]
    firsts = []
    for i, h in enumerate(heads):
        firsts.append(f"{label}/head{i}")
        nodes.append(helper.make_node("Unsqueeze", [h, zero], [firsts[-1]], name=firsts[-1]))
    nodes.append(helper.make_node("Concat", [*firsts, scanned], [label], name=label, axis=0))
    return label, nodes


def _scanning_loop(node: onnx.NodeProto, k: int, insert: onnx.NodeProto, item: str, kind: onnx.TypeProto,
                   scanned: str) -> onnx.NodeProto:
    """The Loop without carried value ``k``, its body emitting ``item`` (of type ``kind``) as a last scan output,
    ``scanned`` after the loop."""
    body = next(a.g for a in node.attribute if a.name == "body")
    new_body = onnx.GraphProto()
    new_body.CopyFrom(body)
    emitted = f"{scanned}/step"
    del new_body.node[:]
    new_body.node.extend(n for n in body.node if n != insert)
    new_body.node.append(helper.make_node("Identity", [item], [emitted], name=emitted))
    del new_body.input[k + 2]
    del new_body.output[k + 1]
    info = onnx.ValueInfoProto(name=emitted)
    info.type.CopyFrom(kind)
    new_body.output.append(info)
    outputs = [o for i, o in enumerate(node.output) if i != k] + [scanned]
    return helper.make_node("Loop", [i for j, i in enumerate(node.input) if j != k + 2], outputs, name=node.name,
                            body=new_body)


def _stacked_like_concat(scanned: str, concat: onnx.NodeProto, axis: int, new_axis: int, rank: int
                         ) -> list[onnx.NodeProto]:
    """Nodes turning the scan output ``[T, *y]`` into what ``concat`` computed from the list of the ``T`` steps."""
    out = concat.output[0]
    label = concat.name or out
    if axis == 0 and new_axis:
        return [helper.make_node("Identity", [scanned], [out], name=label)]
    perm = [*range(1, axis + 1), 0, *range(axis + 1, rank + 1)]
    if new_axis:
        return [helper.make_node("Transpose", [scanned], [out], name=label, perm=perm)]
    moved = f"{label}/steps_at_axis"
    shape, head, tail, merged = (f"{label}/{n}" for n in ("shape", "head", "tail", "merged_shape"))
    starts = {f"{label}/zero": 0, f"{label}/axis": axis, f"{label}/after": axis + 2, f"{label}/end": rank + 1,
              f"{label}/minus_one": -1}
    consts = [helper.make_node("Constant", [], [n], name=n, value=numpy_helper.from_array(np.array([v], np.int64)))
              for n, v in starts.items()]
    return [*consts,
            helper.make_node("Transpose", [scanned], [moved], name=moved, perm=perm),
            helper.make_node("Shape", [moved], [shape], name=shape),
            helper.make_node("Slice", [shape, f"{label}/zero", f"{label}/axis"], [head], name=head),
            helper.make_node("Slice", [shape, f"{label}/after", f"{label}/end"], [tail], name=tail),
            helper.make_node("Concat", [head, f"{label}/minus_one", tail], [merged], name=merged, axis=0),
            helper.make_node("Reshape", [moved, merged], [out], name=label)]

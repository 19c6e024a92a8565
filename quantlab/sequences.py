"""A sequence built item by item and then concatenated (a scripted loop's list, unrolled) becomes one Concat.

torch.jit.script writes ``ys.append(y)`` in a loop and ``torch.stack(ys)`` after it as a sequence the Loop
carries; once the loop is unrolled (:mod:`quantlab.loops`) the sequence is a chain of inserts, which TensorRT
cannot parse (it has no sequence ops). The same values, concatenated directly::

    SequenceEmpty ─► SequenceInsert(·, y0) ─► SequenceInsert(·, y1) ─► [Identity] ─► ConcatFromSequence(axis=a)
    ==>  y0 ─► Unsqueeze(a) ─┐
         y1 ─► Unsqueeze(a) ─┴─► Concat(axis=a)          (no Unsqueeze when new_axis=0)

A ``SequenceConstruct(x0, x1)`` at the chain's start gives its inputs first. Inserts at a position (a third
input) and sequences of unknown length (a loop left a loop) stay as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .folding import ConstantFolder, drop_dead_producers, replace_node, rewrite_until_fixed

__all__ = ["ConcatenatedSequence", "concat_collected_sequences"]


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

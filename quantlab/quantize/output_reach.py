"""Whether an INT8 group's output gets the ORT form's output Q/DQ: who reads the output, and what that reader does
with a value rounded to zero (the questions :class:`~quantlab.quantize.placement.Placement` asks of each output).

An output Q/DQ is left out where it can only hurt::

    y ──► Log / Reciprocal / Sqrt / Div(·, y)     a value under half the INT8 step -> log(0), 1/0
    y ──► Reshape / Resize ──► model output        no INT8 layer reads it: a Q/DQ only rounds and clips
    y ──► Mul(10) ──► Squeeze ──► model output     (the same, scaled by a constant)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx
from onnx import numpy_helper

from ..graph.topology import subgraph_reads

__all__ = ["NEAR_ZERO_SENSITIVE", "OutputReach"]

_PASS_TO_OUTPUT = frozenset({"Concat", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast",
                             "Split", "Slice", "Resize"})
"""Ops that pass values on to a model output unchanged but for their layout (a Resize: interpolated, as SegFormer's
class logits upsampled to the input's size)."""

_SCALE_TO_OUTPUT = frozenset({"Mul", "Div", "Add", "Sub"})
"""Ops that pass values on to a model output scaled or shifted when their other operand is a constant (GLPN's depth
head: ``Sigmoid -> Mul(10) -> Squeeze``; a divisor only as the constant)."""

NEAR_ZERO_SENSITIVE: dict[str, tuple[int, ...]] = {"Log": (0,), "Reciprocal": (0,), "Sqrt": (0,), "Pow": (0,),
                                                    "Div": (1,)}
"""Float ops (and the input slots) whose result a value rounded to zero changes without bound: a log-mel
front end's ``Clip(mel, 1e-10) -> Log`` gets ``log(0) = -inf`` for every energy under half the INT8 step. A Pow
only with a negative or unknown exponent: ``0 ** 3`` is 0 (GELU-tanh's ``Pow(x, 3)``, T5's ``Pow(x, 2)``)."""


class OutputReach:
    """What reads a main-graph tensor, downstream to the model's outputs."""

    def __init__(self, nodes: Sequence[onnx.NodeProto], names: Sequence[str], graph_outputs: set[str],
                 initializers: Mapping[str, onnx.TensorProto]) -> None:
        self.nodes = nodes
        self.names = names
        self.graph_outputs = graph_outputs
        self.initializers = initializers
        self._readers: dict[str, list[onnx.NodeProto]] | None = None  # tensor -> main-graph nodes reading it

    def readers(self) -> dict[str, list[onnx.NodeProto]]:
        """tensor -> the main-graph nodes reading it (a control-flow node reads what its bodies read)."""
        if self._readers is None:
            self._readers = {}
            for node in self.nodes:
                for t in set(node.input) | subgraph_reads([node]):
                    self._readers.setdefault(t, []).append(node)
        return self._readers

    def only_reaches_outputs(self, tensor: str) -> str | None:
        """The model output ``tensor`` reaches when it reaches outputs only, through layout ops (a detector's scores
        and boxes -> Concat -> its output) or a scale or shift by a constant (GLPN's ``Sigmoid -> Mul(10)``: an
        output Q/DQ left 14 levels for its depths, 16 dB against 32); None when any other node reads it on the
        way. No INT8 layer reads such a
        tensor, so an output Q/DQ would only round (and, with entropy or percentile, clip) what the model returns:
        ddddocr's detector's objectness read amax 0.115 of its 0.50 under entropy (its detection F1 on 8 pages did
        not move, 51.3 % either way: the boxes' error dominates there; the clip is gone all the same)."""
        readers = self.readers()
        frontier, seen, reached = [tensor], {tensor}, None
        while frontier:
            t = frontier.pop()
            if t in self.graph_outputs:
                reached = reached or t
            for node in readers.get(t, []):
                if not self._passes_on(node, t):
                    return None
                for o in node.output:
                    if o and o not in seen:
                        seen.add(o)
                        frontier.append(o)
        return reached

    def _passes_on(self, node: onnx.NodeProto, tensor: str) -> bool:
        """Whether ``node`` passes ``tensor`` on unchanged but for its layout, or scaled or shifted by constants."""
        if node.op_type in _PASS_TO_OUTPUT:
            return True
        others = [i for i in node.input if i != tensor]
        return (node.op_type in _SCALE_TO_OUTPUT and len(others) == len(node.input) - 1
                and all(i in self.initializers for i in others)
                and (node.op_type != "Div" or node.input[0] == tensor))

    def near_zero_reader(self, tensor: str) -> str | None:
        """``op 'name'`` of a float node reading ``tensor`` where a value rounded to 0 changes its result without
        bound (:data:`NEAR_ZERO_SENSITIVE`); None when no reader does."""
        for node, name in zip(self.nodes, self.names, strict=True):
            slots = NEAR_ZERO_SENSITIVE.get(node.op_type, ())
            if any(i < len(node.input) and node.input[i] == tensor for i in slots) \
                    and not (node.op_type == "Pow" and self._non_negative(node.input[1])):
                return f"{node.op_type} {name!r}"
        return None

    def _non_negative(self, tensor: str) -> bool:
        """Whether ``tensor`` is a constant with no negative value (a Pow's exponent)."""
        init = self.initializers.get(tensor)
        return init is not None and bool((numpy_helper.to_array(init) >= 0).all())

"""Copied positions: a cache output that returns its input with the new positions appended.

A decoder step with a KV cache returns ``present = Concat(past, new)``: the first positions copy the ``past`` input,
which every model is fed alike (teacher-forced, from the reference's previous step), so they hold no error of any
candidate. Counted, they diluted the error of the new positions: Whisper's INT8 decoder read 36.0 dB on
``present_k0`` teacher-forced where its own steps, free-running, gave 31.4. They are left out of the end-to-end
figures as padding is (:mod:`.padding`): set to 0 in the reference and the candidate alike; free-running too,
where the copy is each model's own earlier steps (counted when they were new) and the data's first past::

    past    [N, H, P, D] ──┐
                           ├──► Concat(axis=2) ──► present [N, H, P + 1, D]
    new     [N, H, 1, D] ──┘                       figures over present[:, :, P:] only
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from ..graph import LoadedModel

__all__ = ["CopiedPrefix", "copied_prefixes", "copied_note", "new_positions", "without_copied"]

_PASS = frozenset({"Identity", "Cast"})
"""Ops between a cache input, its Concat and the output that change nothing the comparison sees (and a Concat of
one input: :func:`_passes`)."""


@dataclass(frozen=True)
class CopiedPrefix:
    """An output whose first positions along ``axis`` (of the output and of ``source`` alike) copy the graph input
    ``source``; ``samples_axis``: that axis once the output's samples are on axis 0."""

    source: str
    axis: int
    samples_axis: int


def copied_prefixes(model: LoadedModel, sample_axes: Mapping[str, int]) -> dict[str, CopiedPrefix]:
    """Output -> its copied prefix, for the outputs made by a Concat of several inputs whose first is a graph input
    (through Identity / Cast / one-input Concat)."""
    proto = model.proto
    producer = {o: n for n in proto.graph.node for o in n.output if o}
    inputs = {i.name for i in proto.graph.input} - {i.name for i in proto.graph.initializer}
    ranks = {s.name: len(s.shape) for s in (*model.inputs, *model.outputs) if s.shape is not None}
    out: dict[str, CopiedPrefix] = {}
    for spec in model.outputs:
        node = _through(producer, spec.name)
        if node is None or node.op_type != "Concat" or len([t for t in node.input if t]) < 2:
            continue
        first = _source(producer, node.input[0])
        rank = ranks.get(spec.name, ranks.get(first))
        if first not in inputs or rank is None:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0) % rank
        samples = sample_axes.get(spec.name, 0)
        if axis != samples:
            out[spec.name] = CopiedPrefix(source=first, axis=axis, samples_axis=axis + 1 if axis < samples else axis)
    return out


def _passes(node: onnx.NodeProto) -> bool:
    """Identity, Cast, or a Concat of one input (torch writes ``Concat(past)`` before ``Concat(past, new)``)."""
    return node.op_type in _PASS or (node.op_type == "Concat" and len([t for t in node.input if t]) == 1)


def _through(producer: Mapping[str, onnx.NodeProto], tensor: str) -> onnx.NodeProto | None:
    """The node making ``tensor``, past the nodes that pass it on unchanged."""
    node = producer.get(tensor)
    while node is not None and _passes(node):
        node = producer.get(node.input[0])
    return node


def _source(producer: Mapping[str, onnx.NodeProto], tensor: str) -> str:
    """``tensor`` traced back through the nodes that pass it on unchanged."""
    node = producer.get(tensor)
    while node is not None and _passes(node):
        tensor = node.input[0]
        node = producer.get(tensor)
    return tensor


def without_copied(array: np.ndarray, prefix: CopiedPrefix, length: int, *, samples_first: bool = True) -> np.ndarray:
    """``array`` with its first ``length`` positions along the prefix's axis set to 0: the axis once its samples are
    on axis 0 (``samples_first``), else as the model returns it."""
    axis = prefix.samples_axis if samples_first else prefix.axis
    if length <= 0 or array.ndim <= axis or array.shape[axis] < length:
        return array
    out = np.array(array, copy=True)
    index = [slice(None)] * array.ndim
    index[axis] = slice(0, length)
    out[tuple(index)] = 0
    return out


def new_positions(outputs: Mapping[str, np.ndarray], fed: Mapping[str, np.ndarray],
                  copied: Mapping[str, CopiedPrefix] | None, *, samples_first: bool) -> dict[str, np.ndarray]:
    """``outputs`` with each cache output's copy of its input (as long as the input ``fed``) set to 0: the outputs
    with their samples on axis 0 (``samples_first``, the end-to-end pass) or as the model returns them
    (free-running)."""
    out = dict(outputs)
    for o, prefix in (copied or {}).items():
        if o in out and prefix.source in fed:
            out[o] = without_copied(out[o], prefix, int(np.shape(fed[prefix.source])[prefix.axis]),
                                    samples_first=samples_first)
    return out


def copied_note(copied: Mapping[str, CopiedPrefix]) -> str | None:
    """What the comparison says when it leaves copied positions out."""
    if not copied:
        return None
    shown = ", ".join(f"{o!r} (of {p.source!r}, axis {p.axis})" for o, p in list(copied.items())[:3]) + (
        f" and {len(copied) - 3} more" if len(copied) > 3 else "")
    return (f"the first positions of {shown} copy an input every model is fed alike (a cache: Concat(past, new)): "
            "left out of their end-to-end and per-sample figures, which measure the new positions; the per-layer "
            "figures and a --metric see every position")

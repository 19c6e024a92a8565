"""Which elements each data-decided ``TopK``/``ArgMax`` inside a model selects, the reference against a candidate.

A MoE's router picks each token's experts with a ``TopK`` over its logits; a
DETR-style detector keeps its best queries with one; a model routes or pools
with an ``ArgMax``. When a candidate's rounding reorders two near-equal scores,
it selects another element: what follows computes something else for that
token (another expert's output), not the same thing rounded, and the error
figures of the outputs alone do not say why. The pass over data-decided ``If``
branches (:mod:`.branches`) exposes these indices too and counts the rows whose
selection differs::

    scores[..., E] ──► TopK(k) ──► indices[..., k] ──► Gather / OneHot / ...
                                   ref:  {3, 5}   candidate: {3, 6}  -> one row changed

A row is one selection: the indices along the op's axis (their order aside, so
two experts swapping ranks is not a change). ``ArgMax``/``ArgMin`` rows are
single elements. Only the main graph's ops whose scores are float and depend
on the values of a graph input are followed, and only indices the model does
not return (returned ones are compared as outputs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from ..graph import LoadedModel, producer_map, tensor_specs
from ..graph.topology import decided_by_values

__all__ = ["SELECTING_OPS", "Selection", "changed_rows", "decided_selections", "selection_note"]

SELECTING_OPS = frozenset({"TopK", "ArgMax", "ArgMin"})

WARNING_SHARE = 0.01
"""A share of changed rows above which the note is a WARNING: below, near-ties a few tokens move are expected of
any INT8 model."""


@dataclass(frozen=True)
class Selection:
    """One selecting op of the reference: its type, the indices tensor it writes and the axis it selects along."""

    op: str
    indices: str
    axis: int


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    found = [a for a in node.attribute if a.name == name]
    return int(helper.get_attribute_value(found[0])) if found else default


def decided_selections(model: LoadedModel) -> dict[str, Selection]:
    """``node name -> Selection`` for the main graph's TopK/ArgMax/ArgMin whose float scores depend on the values
    of a graph input and whose indices the model does not return, in graph order."""
    proto = model.proto
    producers = producer_map(proto)
    specs = tensor_specs(proto)
    inputs = set(model.input_names)
    returned = {o.name for o in proto.graph.output}
    found: dict[str, Selection] = {}
    for index, node in enumerate(proto.graph.node):
        if node.op_type not in SELECTING_OPS or not node.input or not node.input[0]:
            continue
        indices = node.output[1] if node.op_type == "TopK" and len(node.output) > 1 else node.output[0]
        spec = specs.get(node.input[0])
        if not indices or indices in returned or (spec is not None and spec.dtype != "undefined"
                                                  and not spec.is_float):
            continue
        if decided_by_values(node.input[0], producers, inputs):
            axis = _attribute(node, "axis", -1 if node.op_type == "TopK" else 0)
            found[node.name or f"{node.op_type}_{index}"] = Selection(node.op_type, indices, axis)
    return found


def changed_rows(reference: np.ndarray, candidate: np.ndarray, selection: Selection) -> tuple[int, int]:
    """(rows compared, rows whose selected set differs) of one run; every row changed when the shapes differ."""
    ref, got = np.asarray(reference), np.asarray(candidate)
    axis = selection.axis % max(ref.ndim, 1) if ref.ndim else 0
    rows = ref.size // max(ref.shape[axis], 1) if ref.ndim and selection.op == "TopK" else ref.size
    if ref.shape != got.shape:
        return rows, rows
    if selection.op != "TopK" or ref.ndim == 0:
        return rows, int(np.count_nonzero(ref != got))
    ref_sets = np.sort(np.moveaxis(ref, axis, -1), axis=-1).reshape(rows, -1)
    got_sets = np.sort(np.moveaxis(got, axis, -1), axis=-1).reshape(rows, -1)
    return rows, int(np.count_nonzero((ref_sets != got_sets).any(axis=1)))


def selection_note(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """A note (a WARNING past :data:`WARNING_SHARE` of some op's rows) naming every candidate and op that selected
    other elements than the reference; None when none did."""
    moved = [r for r in rows if r["changed"]]
    if not moved:
        return None
    heavy = any(r["changed"] > WARNING_SHARE * r["rows"] for r in moved)
    parts = "; ".join(f"candidate {r['candidate']!r}: {r['op']} {r['node']!r} (indices {r['indices']!r}) in "
                      f"{r['changed']} of {r['rows']} row(s) ({r['changed'] / max(r['rows'], 1):.1%})" for r in moved)
    return (("WARNING " if heavy else "") + "a candidate selected other elements than the reference: " + parts +
            ". There what follows computes something else (a MoE token sent to another expert, a detector keeping "
            "another query), not the same thing rounded; if the outputs suffer, keep the layers that compute the "
            "scores in higher precision (a plan pin). A row is one selection, its order aside; compare.json keeps "
            "the counts (settings.selection_flips).")

"""Which branch each data-decided ``If`` took, the reference against each candidate.

An ``If`` whose condition the data decides (a detector's "any box left?", a
score over a threshold) runs one branch or the other on every model run. A
candidate whose rounding moves the condition across its threshold runs the
other branch: its outputs then differ in kind, not only by rounding, and the
error figures alone do not say why. After the comparison's pass, this one runs
the reference and every candidate over the data again, whole models exposing
the conditions, and counts the runs where they differ::

    batch ──► FP32 model ──► cond_ref ─┐
          └─► candidate  ──► cond_c   ──┴─► runs where cond_c != cond_ref, per If

Only the main graph's Ifs are followed (one inside a Loop body decides once per
iteration). A condition computed from shapes alone (Shape, Size) or from
constants is not decided by the data, so it is left out (constant ones were
inlined when the model was loaded: quantlab.controlflow). In sequence mode
every model is fed the reference's state (the set's own batches are teacher
forced, as the comparison's figures are). The same pass counts the rows where a
data-decided TopK/ArgMax selects other elements (:mod:`.selections`); it runs
only for models that have such an If or selection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from ..backends.base import Backend
from ..data import Batch
from ..graph import LoadedModel, producer_map
from ..graph.topology import decided_by_values
from ..quantize import WrittenModel
from .candidates import REFERENCE_KEY
from .selections import Selection, changed_rows

__all__ = ["branch_note", "decided_conditions", "decision_flips"]



def decided_conditions(model: LoadedModel) -> dict[str, str]:
    """``If node name -> its condition tensor`` for the main graph's Ifs whose condition depends on the values of
    a graph input (not only on shapes or constants), in graph order."""
    producers = producer_map(model.proto)
    inputs = set(model.input_names)
    found: dict[str, str] = {}
    for index, node in enumerate(model.proto.graph.node):
        if node.op_type != "If" or not node.input or not node.input[0]:
            continue
        if decided_by_values(node.input[0], producers, inputs):
            found[node.name or f"If_{index}"] = node.input[0]
    return found


def _tensor_in(candidate: Any, tensor: str) -> str | None:
    """The candidate's name for the reference's ``tensor`` (an If's condition, a TopK's indices), None when its graph
    has no such tensor (a bare model, or a condition folded away)."""
    name = tensor
    if isinstance(candidate, WrittenModel):
        name = candidate.provenance.tensor_map.get(tensor, tensor)
    graph = candidate.proto.graph
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    return name if name in produced else None


def decision_flips(reference: LoadedModel, candidates: Mapping[str, Any], batches: Iterable[Batch],
                   backend_of: Callable[[str], Backend], batch_size: int, conditions: Mapping[str, str],
                   selections: Mapping[str, Selection] | None = None
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(If rows, selection rows) of one pass over ``batches`` with the reference and every candidate exposing the
    ``conditions`` of :func:`decided_conditions` and the indices of ``selections``
    (:func:`.selections.decided_selections`).

    If rows, one per candidate and If: ``runs`` (model runs compared), ``flipped`` (runs whose condition differed
    from the reference's), the If and its condition. Selection rows, one per candidate and op: ``rows`` compared
    and ``changed`` (:func:`.selections.changed_rows`), the op, its node and indices tensor.
    ``batches``: the comparison's batches (of up to ``batch_size`` samples, for the note);
    ``backend_of(name)``: the backend each candidate runs on (the reference: ``backend_of("")``).
    A candidate without a watched tensor gets no row for it.
    """
    selections = selections or {}
    watched = {**conditions, **{node: s.indices for node, s in selections.items()}}
    if not watched:
        return [], []
    names = {name: {node: _tensor_in(c, tensor) for node, tensor in watched.items()}
             for name, c in candidates.items()}
    names = {name: {k: v for k, v in found.items() if v is not None} for name, found in names.items()}
    runners = {REFERENCE_KEY: backend_of("").build(reference.proto, outputs=list(dict.fromkeys(watched.values())))}
    runners.update({name: backend_of(name).build(candidates[name].proto, outputs=list(dict.fromkeys(found.values())))
                    for name, found in names.items() if found})
    flipped = {(name, node): 0 for name, found in names.items() for node in found if node in conditions}
    changed = {(name, node): [0, 0] for name, found in names.items() for node in found if node in selections}
    runs = 0
    try:
        for batch in batches:
            feeds = batch.feeds
            ref = runners[REFERENCE_KEY].run(feeds, None)
            for name, found in names.items():
                if not found:
                    continue
                got = runners[name].run(feeds, None)
                for node, tensor in found.items():
                    if node in selections:
                        rows, moved = changed_rows(ref[watched[node]], got[tensor], selections[node])
                        changed[(name, node)][0] += rows
                        changed[(name, node)][1] += moved
                    elif not np.array_equal(np.asarray(got[tensor]), np.asarray(ref[watched[node]])):
                        flipped[(name, node)] += 1
            runs += 1
    finally:
        for runner in runners.values():
            runner.close()
    branches = [{"candidate": name, "if": node, "condition": conditions[node], "runs": runs, "flipped": count,
                 "batch_size": batch_size} for (name, node), count in flipped.items()]
    selected = [{"candidate": name, "node": node, "op": selections[node].op, "indices": selections[node].indices,
                 "rows": rows, "changed": moved} for (name, node), (rows, moved) in changed.items()]
    return branches, selected


def branch_note(rows: list[dict[str, Any]]) -> str | None:
    """A WARNING naming every candidate and If that took the other branch in some run; None when none did."""
    moved = [r for r in rows if r["flipped"]]
    if not moved:
        return None
    parts = "; ".join(f"candidate {r['candidate']!r}: If {r['if']!r} (condition {r['condition']!r}) in "
                      f"{r['flipped']} of {r['runs']} run(s)" for r in moved)
    return ("WARNING a candidate took another If branch than the reference: " + parts + ". There its outputs differ "
            "in kind (the other branch's computation), not only by rounding; keep the layers that compute the "
            "condition in higher precision (a plan pin), or check the condition's margin to its threshold. A run "
            f"is a batch of up to {moved[0]['batch_size']} sample(s): an If decides once per run; compare.json "
            "keeps the counts (settings.branch_flips).")

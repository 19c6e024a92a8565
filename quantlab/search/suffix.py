"""Run many plans on a few samples cheaply: what a plan shares with the all-INT8 model is run once.

A plan that reverts one group differs from the all-INT8 model only from that group on: the
writer emits the nodes in the source order, so the written models share a prefix of identical
nodes (same initializers) and the plan needs only its suffix, fed the all-INT8 model's values
of the tensors that cross the cut (the comparator's :func:`~quantlab.compare.submodel.submodel`)::

    all-INT8  x ─► [n1 .. nk] ─► a, s ─► [n(k+1) .. ] ─► y        run once, a and s kept
    plan      x ─► [n1 .. nk] ─► a, s ─► [m(k+1) .. ] ─► y'       only  a, s ─► [m(k+1) .. ] ─► y'

Reverting a group near the output then costs a few layers instead of the whole model; a plan
that differs from the first node on (or whose prefix reads other initializer values) runs whole.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from ..backends import Backend
from ..compare.submodel import submodel
from ..graph import TensorSpec, tensor_specs


def shared_prefix(anchor: onnx.ModelProto, other: onnx.ModelProto) -> int:
    """How many leading nodes ``other`` shares with ``anchor`` (identical nodes reading identical
    initializers): the index of ``other``'s first node that must run."""
    a_nodes, b_nodes = anchor.graph.node, other.graph.node
    a_init = {i.name: i for i in anchor.graph.initializer}
    b_init = {i.name: i for i in other.graph.initializer}
    k = 0
    while k < min(len(a_nodes), len(b_nodes)):
        a, b = a_nodes[k], b_nodes[k]
        if a.SerializeToString() != b.SerializeToString():
            break
        if any((t in a_init) != (t in b_init) or (t in a_init and a_init[t].SerializeToString()
                                                  != b_init[t].SerializeToString()) for t in b.input):
            break
        k += 1
    return k


def cut_tensors(proto: onnx.ModelProto, start: int) -> list[str]:
    """Tensors the nodes from ``start`` on read that earlier nodes (or the graph inputs) produce."""
    inits = {i.name for i in proto.graph.initializer}
    made_after = {o for n in proto.graph.node[start:] for o in n.output}
    cut: list[str] = []
    for n in proto.graph.node[start:]:
        for t in n.input:
            if t and t not in inits and t not in made_after and t not in cut:
                cut.append(t)
    return cut


def suffix_model(proto: onnx.ModelProto, start: int, cut: Sequence[str], output: str,
                 values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """``proto``'s nodes from ``start`` on, fed ``cut`` (typed from their ``values``), giving ``output``."""
    specs = dict(tensor_specs(proto))
    for t in cut:
        v = values[t]
        specs[t] = TensorSpec(t, v.dtype.name, (None, *v.shape[1:]))
    return submodel(proto, list(proto.graph.node[start:]), list(cut), [output], specs, f"suffix of {output}")


def _parts(feeds: Mapping[str, np.ndarray], batch: int) -> list[dict[str, np.ndarray]]:
    """``feeds`` (samples on axis 0) as runs of at most ``batch`` samples; one sample whose axes are its own,
    or a set no larger than ``batch``, runs whole."""
    n = max((len(v) for v in feeds.values() if np.ndim(v)), default=1)
    if n <= batch:
        return [dict(feeds)]
    return [{k: v[a:a + batch] for k, v in feeds.items()} for a in range(0, n, batch)]


def run_batched(backend: Backend, proto: onnx.ModelProto, feeds: Mapping[str, np.ndarray],
                outputs: Sequence[str], batch: int) -> dict[str, np.ndarray]:
    """``outputs`` of ``proto`` on ``feeds`` (samples on axis 0), ``batch`` samples per run."""
    parts = _run_parts(backend, proto, _parts(feeds, batch), outputs)
    return {o: np.concatenate([p[o] for p in parts]) for o in outputs}


def _run_parts(backend: Backend, proto: onnx.ModelProto, parts: Sequence[Mapping[str, np.ndarray]],
               outputs: Sequence[str]) -> list[dict[str, np.ndarray]]:
    runner = backend.build(proto, outputs=list(outputs))
    try:
        return [dict(runner.run(dict(part), list(outputs))) for part in parts]
    finally:
        runner.close()


def plan_outputs(backend: Backend, anchor: onnx.ModelProto, protos: Sequence[onnx.ModelProto],
                 feeds: Mapping[str, np.ndarray], output: str, batch: int) -> list[np.ndarray]:
    """``output`` of every model in ``protos`` on ``feeds``: the anchor runs once (keeping every
    cut tensor), each model only from its first node that differs from the anchor.

    The cut tensors are kept per run and fed back to the same run: not every one holds the samples on axis 0
    (Magika's ``strided_slice:0`` is the batch size, ``[8]``; stacked over two runs it was ``[8, 8]``, and the
    suffix's Reshape failed).
    """
    starts = [shared_prefix(anchor, p) for p in protos]
    cuts = [cut_tensors(p, s) if s > 0 else [] for p, s in zip(protos, starts, strict=True)]
    keep = list(dict.fromkeys([output, *(t for c in cuts for t in c if t not in feeds)]))
    parts = _parts(feeds, batch)
    kept = [{**part, **values} for part, values in zip(parts, _run_parts(backend, anchor, parts, keep),
                                                          strict=True)]
    out = []
    for p, start, cut in zip(protos, starts, cuts, strict=True):
        if start >= len(p.graph.node) and start == len(anchor.graph.node):
            runs = kept  # the anchor itself
        elif start == 0:
            runs = _run_parts(backend, p, parts, [output])
        else:
            model = suffix_model(p, start, cut, output, kept[0])
            runs = _run_parts(backend, model, [{t: k[t] for t in cut} for k in kept], [output])
        out.append(np.concatenate([r[output] for r in runs]))
    return out

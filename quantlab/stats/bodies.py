"""Statistics inside control flow: Loop/Scan bodies run step by step, the If branch taken once, as models of their own.

The statistics pass sees the main graph; a Loop's body runs inside ONNX Runtime, its tensors out of reach.
Exposing them as scan outputs would hold every step at once (SLANet's decoder: 501 steps x 72 tensors x a batch,
~0.6 GB), and a tensor whose shape changes from step to step cannot be one. So each batch runs the main graph once
more, exposing what the bodies read (the nodes' inputs and the outer tensors their bodies read), and then each body
as the node would, its float tensors reduced after each step::

    batch ──► main graph ──► M, cond, v0 (a Scan: state, scan inputs), outer reads
    Loop: i = 0; while i < M and cond: body(i, cond, v, outer) ──► cond', v', body tensors ──► reducers; v = v'
    Scan: for t over the scan axis (either direction): body(state, x[t], outer) ──► state', body tensors ──► reducers
    If:   cond ? then_branch(outer) : else_branch(outer) ──► branch tensors ──► reducers

Bodies of the main graph's Loop, Scan and If nodes that hold a MatMul, Gemm or Conv are calibrated (an If left
after loading is one the data decides: optimum's merged decoders keep every layer in its branches; an If with a
constant condition was inlined). Nested control flow runs inside the body model, uncalibrated. A body's own float
inputs (carried values, scan slices) and node outputs are reduced; ranges are keyed by the node's name
(:func:`quantlab.plan.groups.node_names`, the writer's names; an If's branch by ``node/then_branch``,
:func:`quantlab.graph.bodies.body_key`) and the tensor's name in the body. A branch the data never took has no
ranges. A body that cannot be run so (a failing session, a step limit) is left out with a note: its node
keeps float bodies, as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph import LoadedModel, tensor_specs
from ..graph.bodies import BRANCHES, body_graphs, body_key, body_model, body_outer_inputs
from ..graph.topology import initializer_map
from ..histogram import AbsHistogram, HistogramState
from ..plan.groups import COMPUTE_OPS, node_names
from .budget import DEFAULT_MEMORY_BUDGET, resolved_sizes
from .collect import batch_feeds

__all__ = ["BODY_OPS", "MAX_BODY_STEPS", "calibrated_bodies", "collect_body_statistics"]

BODY_OPS = frozenset({"Loop", "Scan", "If"})
"""Control-flow ops whose bodies are calibrated (an If with a constant condition was inlined at load)."""

MAX_BODY_STEPS = 100_000
"""Steps of one body run at most (a while loop whose condition never turns false would not end)."""


@dataclass(frozen=True)
class Body:
    """One body to calibrate: its node, the node's writer name, the graph attribute it is (``body``, or an If's
    ``then_branch`` / ``else_branch``), the body as a model, what it reads from outside and the float tensors to
    reduce (its float inputs, then its node outputs)."""

    node: onnx.NodeProto
    owner: str
    attr: str
    model: onnx.ModelProto
    outer: tuple[str, ...]
    tensors: tuple[str, ...]

    @property
    def key(self) -> str:
        """Its name in the table's ``bodies`` (:func:`quantlab.graph.bodies.body_key`)."""
        return body_key(self.owner, self.attr)


def _defined(graph: onnx.GraphProto) -> list[str]:
    return [o for n in graph.node if n.op_type != "Constant" for o in n.output if o]  # a Constant's: a weight


def calibrated_bodies(model: LoadedModel) -> list[Body]:
    """The bodies of the main graph's Loop/Scan/If nodes that hold a MatMul, Gemm or Conv, as :class:`Body` plans
    (an If: both branches)."""
    proto = model.proto
    found = []
    for node, name in zip(proto.graph.node, node_names(proto), strict=True):
        graphs = body_graphs(node) if node.op_type in BODY_OPS else {}
        if any(n.op_type in COMPUTE_OPS for g in graphs.values() for n in g.node):
            found.append((node, name, graphs))
    if not found:
        return []
    specs = tensor_specs(proto)
    weights = initializer_map(proto)
    bodies = []
    for node, name, graphs in found:
        for attr, graph in graphs.items():
            sub = body_model(graph, name, specs, weights, proto)
            inner = tensor_specs(sub)
            tensors = [t for t in (*[i.name for i in graph.input], *_defined(graph))
                       if t in inner and inner[t].dtype == "float32"]
            bodies.append(Body(node, name, attr, sub, tuple(body_outer_inputs(graph, weights)),
                               tuple(dict.fromkeys(tensors))))
    return bodies


def collect_body_statistics(model: LoadedModel, batches: Iterable[Any], backend: Any, bins: int,
                            huge_threshold: float, bodies: Sequence[Body] | None = None,
                            ) -> tuple[dict[str, dict[str, HistogramState]], tuple[str, ...]]:
    """(``node name -> body tensor -> histogram state``, notes) over ``batches`` (items as the statistics pass takes
    them) for ``bodies`` (default :func:`calibrated_bodies`, which a caller that checked may pass on); empty when
    there are none."""
    bodies = calibrated_bodies(model) if bodies is None else bodies
    if not bodies:
        return {}, ()
    initializers = initializer_map(model.proto)  # the loops' own inputs among them (a trip count, a first state)
    weights = {t: numpy_helper.to_array(initializers[t]) for b in bodies for t in b.node.input if t in initializers}
    needed = sorted({t for b in bodies for t in (*b.node.input, *b.outer)
                     if t and t not in initializers and t not in model.input_names})
    main = backend.build(model.proto, outputs=needed)
    runners: dict[str, Any] = {}
    reducers: dict[str, dict[str, AbsHistogram]] = {}
    for b in bodies:
        reducers[b.key] = {t: AbsHistogram(bins, huge_threshold) for t in b.tensors}
    failed: dict[str, str] = {}
    budget = _BranchBudget(DEFAULT_MEMORY_BUDGET)
    try:
        for b in bodies:
            try:
                own = {i.name for i in b.model.graph.input}
                runners[b.key] = backend.build(b.model, outputs=[t for t in b.tensors if t not in own])
            except Exception as exc:  # noqa: BLE001 - a body ORT cannot run alone stays uncalibrated, with a note
                failed[b.key] = f"it does not run as a model of its own ({exc})"
        for item in batches:
            feeds = dict(batch_feeds(item))
            values = {**weights, **feeds, **main.run(feeds, needed)} if needed else {**weights, **feeds}
            for b in bodies:
                if b.key in failed:
                    continue
                try:
                    if b.node.op_type == "If" and _taken(b, values):
                        budget.check(b, values)
                    _run_body(b, values, runners[b.key], reducers[b.key])
                except Exception as exc:  # noqa: BLE001 - as above
                    failed[b.key] = str(exc)
    finally:
        main.close()
        for runner in runners.values():
            runner.close()
    notes = tuple(f"the body {key!r} was not calibrated and stays float: {why}" for key, why in failed.items())
    states = {key: {t: r.state() for t, r in kept.items() if r.state().count}
              for key, kept in reducers.items() if key not in failed}
    return {k: v for k, v in states.items() if v}, notes


class _BranchBudget:
    """Raises when an If branch's tensors, all exposed for one run, would exceed the memory budget for a batch's outer
    shapes (a merged decoder's branch is the whole decoder: its exposure grows with the batch and the sequence).

    The first batch a branch takes is sized by shape inference; a later shape is estimated from it, grown by the
    square of how many more outer values it has (attention grows with the square of the sequence), and inferred
    only when that estimate passes the budget: a decoder's data changes shape every step."""

    def __init__(self, budget: int) -> None:
        self._budget = budget
        self._first: dict[str, tuple[float, int]] = {}  # body key -> (outer values, bytes) of its first batch

    def check(self, body: Body, values: Mapping[str, np.ndarray]) -> None:
        outer = {t: values[t] for t in body.outer}
        elements = sum(int(np.size(v)) for v in outer.values())
        first = self._first.get(body.key)
        if first is not None:
            growth = max(1.0, elements / max(first[0], 1.0)) ** 2
            if first[1] * growth <= self._budget:
                return
        total = _branch_bytes(body, outer)
        self._first.setdefault(body.key, (float(elements), total))
        if total > self._budget:
            raise RuntimeError(f"it would hold {total / 2**30:.1f} GiB of activations a batch (beyond "
                               f"{self._budget / 2**30:.0f} GiB); calibrate with a smaller --batch-size, or --bind "
                               "the input that decides it")


def _branch_bytes(body: Body, outer: Mapping[str, np.ndarray]) -> int:
    """Bytes of ``body``'s tensors for these outer values (shape inference; unknown sizes count 0)."""
    specs = tensor_specs(body.model)
    inits = {i.name for i in body.model.graph.initializer}
    shell = LoadedModel(proto=body.model, sha256="", path=None, inputs=tuple(
        specs[i.name] for i in body.model.graph.input if i.name not in inits and i.name in specs), outputs=(), opset=0)
    return sum(v for v in resolved_sizes(shell, list(body.tensors), outer).values() if v is not None)


BODY_VALUES_PER_UPDATE = 1 << 16
"""A body tensor's values are gathered over its steps up to this many before one histogram update: SLANet's decoder
gives 76 tensors of a few hundred values each 500 times a batch, and an update per step and tensor was half of its
calibration time. The counts, min and max are the same either way (AbsHistogram: integer counts, power-of-two
ranges that merge exactly)."""


def _run_body(body: Body, values: Mapping[str, np.ndarray], runner: Any, reducers: Mapping[str, AbsHistogram]) -> None:
    """One batch's run of ``body``'s node, step by step (an If: its branch once, when the batch takes it), its tensors
    into ``reducers``."""
    outer = {t: values[t] for t in body.outer}
    graph = body_graphs(body.node)[body.attr]
    if body.node.op_type == "If":
        steps = _branch_steps(body, values)
    elif body.node.op_type == "Loop":
        steps = _loop_steps(body.node, graph, values)
    else:
        steps = _scan_steps(body.node, graph, values)
    pending: dict[str, list[np.ndarray]] = {t: [] for t in reducers}
    held = dict.fromkeys(reducers, 0)

    def update(t: str) -> None:
        parts, pending[t], held[t] = pending[t], [], 0
        if parts:
            reducers[t].update(parts[0] if len(parts) == 1 else np.concatenate([p.reshape(-1) for p in parts]))

    feeds = next(steps)
    while feeds is not None:
        out = runner.run({**feeds, **outer}, None)
        for t in reducers:
            value = feeds.get(t) if t in feeds else out.get(t)
            if value is not None and np.issubdtype(np.asarray(value).dtype, np.floating):
                pending[t].append(np.asarray(value))
                held[t] += pending[t][-1].size
                if held[t] >= BODY_VALUES_PER_UPDATE:
                    update(t)
        feeds = steps.send(out)
    for t in reducers:
        update(t)


def _taken(body: Body, values: Mapping[str, np.ndarray]) -> bool:
    """Whether the batch's If condition takes this branch."""
    return body.attr == BRANCHES[0 if bool(np.asarray(values[body.node.input[0]]).reshape(-1)[0]) else 1]


def _branch_steps(body: Body, values: Mapping[str, np.ndarray]) -> Any:
    """An If branch's one run (no feeds of its own: it reads outer tensors), when the batch's condition takes it."""
    if _taken(body, values):
        yield {}
    yield None


def _loop_steps(node: onnx.NodeProto, graph: onnx.GraphProto, values: Mapping[str, np.ndarray]) -> Any:
    """A generator of a Loop's body feeds, one step at a time; each ``send`` gives it the step's outputs."""
    trip, cond_name, *carried_names = node.input
    limit = int(np.asarray(values[trip]).reshape(-1)[0]) if trip else None
    cond = bool(np.asarray(values[cond_name]).reshape(-1)[0]) if cond_name else True
    carried = [values[n] for n in carried_names]
    names = [i.name for i in graph.input]
    ranks = [len(i.type.tensor_type.shape.dim) if i.type.tensor_type.HasField("shape") else 0 for i in graph.input]
    outs = [o.name for o in graph.output]
    step = 0
    while (limit is None or step < limit) and cond:
        if step >= MAX_BODY_STEPS:
            raise RuntimeError(f"{MAX_BODY_STEPS} steps without stopping")
        feeds = {names[0]: np.array(step, np.int64).reshape([1] * ranks[0]),  # paddle2onnx declares them [1]
                 names[1]: np.array(cond, np.bool_).reshape([1] * ranks[1]),
                 **dict(zip(names[2:], carried, strict=False))}
        out = yield feeds
        cond = bool(np.asarray(out[outs[0]]).reshape(-1)[0])
        carried = [out[o] for o in outs[1:1 + len(carried_names)]]
        step += 1
    yield None


def _scan_steps(node: onnx.NodeProto, graph: onnx.GraphProto, values: Mapping[str, np.ndarray]) -> Any:
    """A generator of a Scan's body feeds (opset 9 on: no batch axis), one step at a time."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    scans = int(attrs["num_scan_inputs"])
    states = len(node.input) - scans
    axes = list(attrs.get("scan_input_axes") or [0] * scans)
    directions = list(attrs.get("scan_input_directions") or [0] * scans)
    inputs = [np.asarray(values[n]) for n in node.input[states:]]
    axes = [a % x.ndim for a, x in zip(axes, inputs, strict=True)]
    length = inputs[0].shape[axes[0]] if inputs else 0
    state = [values[n] for n in node.input[:states]]
    names = [i.name for i in graph.input]
    outs = [o.name for o in graph.output]
    for t in range(length):
        slices = [np.take(x, t if d == 0 else length - 1 - t, axis=a) for x, a, d in zip(inputs, axes, directions,
                                                                                          strict=True)]
        out = yield {**dict(zip(names[:states], state, strict=True)),
                     **dict(zip(names[states:], slices, strict=True))}
        state = [out[o] for o in outs[:states]]
    yield None

"""Which reference tensors are compared per layer, and how they are chunked for bounded memory.

``CompareOptions.layers``: ``"groups"`` (default) compares the tensor each fusion group hands
on (what exists in a TensorRT engine; ``layer`` and ``op_type`` are the group's anchor node,
e.g. the Conv of Conv+BN+Relu, ``node`` the node producing the tensor); ``"nodes"`` compares
every float node output (``layer`` = ``node``).

Large models do not expose every tensor at once: layers are split into chunks of
consecutive groups, at most ``layer_group_size`` tensors and ``memory_budget_mb`` of
reference activations per batch (see :mod:`.segments` for how a model runs chunk by chunk).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..graph import LoadedModel, tensor_specs, topological_order
from ..graph.topology import RANDOM_OPS
from ..plan import FusionGroup, constant_names, fusion_groups, node_names
from ..sequence import SequenceData
from .options import CompareOptions

__all__ = ["Layer", "ReferenceGraph", "analyse_reference", "elements_per_sample", "layers_per_group", "chunks"]


@dataclass(frozen=True)
class Layer:
    """One compared reference tensor."""

    tensor: str
    layer: str
    node: str
    order: int
    group: str
    op_type: str
    elements: int | None  # per sample, from the inferred shape


@dataclass
class ReferenceGraph:
    """The reference model's graph facts the comparison needs, computed once."""

    model: LoadedModel
    names: list[str]
    groups: list[FusionGroup]
    group_of: dict[str, str]
    producer: dict[str, int]
    position: dict[int, int]
    specs: dict[str, Any]
    constants: set[str]
    graph_inputs: list[str]
    outputs: list[str]
    """The tensor outputs: a sequence or map output (SequenceConstruct, ZipMap) is not compared."""


def analyse_reference(model: LoadedModel) -> ReferenceGraph:
    proto = model.proto
    names = node_names(proto)
    order = topological_order(proto)
    groups = fusion_groups(proto)
    group_of = {n: g.name for g in groups for n in g.nodes}
    producer = {o: i for i, node in enumerate(proto.graph.node) for o in node.output if o}
    inits = {i.name for i in proto.graph.initializer}
    return ReferenceGraph(
        model=model, names=names, groups=groups, group_of=group_of, producer=producer,
        position={idx: i for i, idx in enumerate(order)}, specs=tensor_specs(proto),
        constants=constant_names(proto),
        graph_inputs=[i.name for i in proto.graph.input if i.name not in inits],
        outputs=[o.name for o in proto.graph.output if o.type.HasField("tensor_type")],
    )


def elements_per_sample(spec: Any) -> int | None:
    """Elements of one sample of the tensor (its shape without the batch axis); None when not static."""
    if spec is None or spec.shape is None or len(spec.shape) < 1:
        return None
    n = 1
    for d in spec.shape[1:]:
        if not isinstance(d, int) or d < 0:
            return None
        n *= d
    return n


def _is_float_spec(spec: Any) -> bool:
    return spec is not None and spec.dtype in ("float32", "float16", "float64", "bfloat16")


def layers_per_group(ref: ReferenceGraph, mode: str) -> list[list[Layer]]:
    """Compared tensors per fusion group, in topological order of groups."""
    proto = ref.model.proto
    nodes = list(proto.graph.node)
    index_of = {name: i for i, name in enumerate(ref.names)}
    per_group: list[list[Layer]] = []
    seen: set[str] = set()
    for g in ref.groups:
        out: list[Layer] = []
        if mode == "groups":
            tensors = list(g.output_tensors) or [g.output_tensor]
            candidates = [(t, g.name) for t in tensors if t]
        else:
            candidates = [(o, n) for n in g.nodes for o in nodes[index_of[n]].output if o]
        for t, layer in candidates:
            if t in seen or t not in ref.producer or not _is_float_spec(ref.specs.get(t)):
                continue
            idx = ref.producer[t]
            if nodes[idx].op_type == "Constant" or nodes[idx].op_type in RANDOM_OPS:  # a draw is no layer's error
                continue
            seen.add(t)
            op_type = g.anchor_op if mode == "groups" else nodes[idx].op_type
            out.append(Layer(tensor=t, layer=layer, node=ref.names[idx], order=ref.position[idx], group=g.name,
                             op_type=op_type, elements=elements_per_sample(ref.specs.get(t))))
        per_group.append(out)
    return per_group


def sized_by_first_batch(per_group: list[list[Layer]], model: LoadedModel, dataset: Any,
                         batch_size: int) -> list[list[Layer]]:
    """``per_group`` with the sizes shape inference left unknown (a detector's H and W, a recogniser's width)
    taken from the data's first batch, so :func:`chunks` keeps its memory budget: with those counted as 0, one
    chunk of a text detector held 48 tensors of 8 images at 640x480 (a comparison took 12 GB). An estimate: a
    later, larger batch needs more."""
    unknown = [x.tensor for g in per_group for x in g if x.elements is None]
    if not unknown:
        return per_group
    # a sequence set's shapes are its data's: reading them there builds no session for the carry
    source = dataset.dataset if isinstance(dataset, SequenceData) else dataset
    first = next(iter(source.batches(batch_size)), None)
    if first is None:
        return per_group
    from ..stats.budget import resolved_sizes  # the calibration pass's sizing, for the same reason

    rows = max(len(first), 1)
    sizes = resolved_sizes(model, unknown, first.feeds)
    out: list[list[Layer]] = []
    last = 0  # what inference cannot follow (a Reshape to computed dims) counts as the layer before it
    for g in per_group:
        sized = []
        for x in g:
            if x.elements is None:
                x = replace(x, elements=sizes[x.tensor] // 4 // rows if sizes.get(x.tensor) else last or None)
            last = x.elements or last
            sized.append(x)
        out.append(sized)
    return out


def chunks(per_group: list[list[Layer]], options: CompareOptions) -> list[list[Layer]]:
    """Consecutive groups' layers, at most ``layer_group_size`` tensors and the memory budget per chunk."""
    budget = options.memory_budget_mb * 2**20
    out: list[list[Layer]] = []
    current: list[Layer] = []
    size = 0.0
    for layers in per_group:
        if not layers:
            continue
        nbytes = sum(4.0 * (x.elements or 0) * options.batch_size for x in layers)
        if current and (len(current) + len(layers) > options.layer_group_size or size + nbytes > budget):
            out.append(current)
            current, size = [], 0.0
        current.extend(layers)
        size += nbytes
    if current:
        out.append(current)
    return out

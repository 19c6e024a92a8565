"""Fusion groups: the nodes TensorRT runs as one kernel, so a precision applies to all of them.

Fusion groups (:func:`fusion_groups`), in topological order::

    x ─► Conv ─► [Add bias] ─► [BatchNorm] ─► [Add ◄─ skip] ─► [Relu|Clip|Sigmoid|x*sigmoid(x)|...] ─►
         └──────────────────────── one group, named after the Conv ───────────────────────┘

The anchor is Conv, ConvTranspose, Gemm or MatMul; a residual Add joins only
Conv/ConvTranspose groups (TensorRT's conv+add epilogue; an attention-mask
Add after a MatMul must not be quantized). When both inputs of the Add come
from convs (a ResNet downsample block), the first conv in topological order
takes it and the other conv's output is the skip input. Every other node is a group of its
own: pooling, Concat and Resize are quantizable (TensorRT runs them on INT8
inputs) where an INT8-capable node reads their output (:func:`_int8_reader_follows`);
data movement, normalisation, Softmax and stand-alone elementwise ops are not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import onnx

from ..graph import consumer_indices, tensor_specs, topological_order
from ..graph.topology import shape_determined_nodes

__all__ = [
    "COMPUTE_OPS",
    "RESIDUAL_ANCHORS",
    "ACTIVATION_OPS",
    "QUANTIZABLE_STANDALONE_OPS",
    "FusionGroup",
    "fusion_groups",
    "node_names",
    "constant_names",
]

COMPUTE_OPS: frozenset[str] = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
"""Anchors of fusion groups: the ops whose weights and inputs INT8 accelerates."""

RESIDUAL_ANCHORS: frozenset[str] = frozenset({"Conv", "ConvTranspose"})
"""Anchors a residual Add fuses into (TensorRT's conv + eltwise epilogue)."""

ACTIVATION_OPS: frozenset[str] = frozenset({
    "Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu", "HardSwish", "HardSigmoid", "Elu", "Selu",
    "Softplus", "Gelu", "PRelu", "ThresholdedRelu", "Mish", "Celu",
})
"""Pointwise activations TensorRT fuses into the epilogue of the preceding kernel."""

QUANTIZABLE_STANDALONE_OPS: frozenset[str] = frozenset({
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Concat", "Resize",
})
"""Non-compute ops that TensorRT runs on INT8 inputs (DQ -> op -> Q fuses).

Stand-alone Add/Mul are deliberately not here: in transformers they carry
attention masks at float32.min, which INT8 would clip away.
"""

_SWISH_GATES = frozenset({"Sigmoid", "HardSigmoid"})


@dataclass(frozen=True)
class FusionGroup:
    """Nodes TensorRT runs as one kernel, and the tensors at its edges.

    ``name`` is the anchor node's name (the first node for non-compute groups);
    ``input_tensors`` are the activation inputs (not initializers/constants)
    read from outside the group, in node order; ``output_tensor`` is the
    tensor the group hands on (the last node's first output) and
    ``output_tensors`` every output read outside the group or by the graph.
    ``residual_input`` is the skip tensor of a fused residual Add.
    """

    name: str
    nodes: tuple[str, ...]
    anchor_op: str
    quantizable: bool
    input_tensors: tuple[str, ...]
    output_tensor: str
    topo_index: int
    kind: str = "other"
    residual_input: str | None = None
    output_tensors: tuple[str, ...] = ()
    op_types: tuple[str, ...] = ()

    @property
    def is_compute(self) -> bool:
        return self.anchor_op in COMPUTE_OPS


def node_names(proto: onnx.ModelProto) -> list[str]:
    """A unique name for every node, in graph order.

    The node's own name when it has one and it is unique; otherwise
    ``<op_type>_<index>`` (index in ``graph.node``), made unique. The writer
    gives nodes these names, so plans and provenance can always refer to them.
    """
    raw = [n.name for n in proto.graph.node]
    counts: dict[str, int] = {}
    for name in raw:
        if name:
            counts[name] = counts.get(name, 0) + 1
    taken = {name for name, c in counts.items() if c == 1}
    out: list[str] = []
    for i, (node, name) in enumerate(zip(proto.graph.node, raw)):
        if name and counts[name] == 1:
            out.append(name)
            continue
        base = f"{name}#{i}" if name else f"{node.op_type}_{i}"
        candidate, k = base, 1
        while candidate in taken:
            candidate, k = f"{base}_{k}", k + 1
        taken.add(candidate)
        out.append(candidate)
    return out


def constant_names(proto: onnx.ModelProto) -> set[str]:
    """Initializers and outputs of Constant nodes: values fixed at export time."""
    names = {i.name for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            names.update(o for o in node.output if o)
    return names


class _Graph:
    """The queries grouping needs, computed once per model."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        self.names = node_names(proto)
        self.nodes = list(proto.graph.node)
        self.order = topological_order(proto)
        self.consumers = consumer_indices(proto)
        self.constants = constant_names(proto)
        # values fixed by the input's shape (anchor grids: Range(Shape) + 0.5) are not activations to quantize
        self.fixed = self.constants | {o for i in shape_determined_nodes(proto) for o in self.nodes[i].output if o}
        self.graph_outputs = {o.name for o in proto.graph.output}
        self.specs = tensor_specs(proto)
        self.fused_residuals: set[int] = set()  # residual Adds fused into a conv group: they read INT8 skips

    def sole_consumer(self, tensor: str) -> int | None:
        readers = self.consumers.get(tensor, [])
        if tensor in self.graph_outputs or len(readers) != 1:
            return None
        return readers[0]


def fusion_groups(proto: onnx.ModelProto) -> list[FusionGroup]:
    """The model's nodes grouped as TensorRT fuses them, in topological order.

    See the module docstring for the grouping. Absorbing a node into a group
    needs the group's current output to have that node as its only reader and
    not to be a graph output, so only the last node's output leaves a group.
    """
    g = _Graph(proto)
    assigned: set[int] = set()
    chains: list[list[int]] = []
    residual: dict[int, str] = {}
    for idx in g.order:
        if idx in assigned or g.nodes[idx].op_type not in COMPUTE_OPS:
            continue
        chain, skip = _compute_chain(g, idx, assigned)
        if skip is not None:
            residual[idx] = skip
        assigned.update(chain)
        chains.append(chain)
    for idx in g.order:
        if idx not in assigned:
            assigned.add(idx)
            chains.append([idx])
    # a valid topological order of groups: by the position of each group's last node
    position = {idx: i for i, idx in enumerate(g.order)}
    chains.sort(key=lambda c: max(position[i] for i in c))
    g.fused_residuals = {i for chain in chains if chain[0] in residual for i in chain
                         if g.nodes[i].op_type == "Add" and residual[chain[0]] in g.nodes[i].input}
    return [_group(g, chain, index, residual.get(chain[0])) for index, chain in enumerate(chains)]


def _compute_chain(g: _Graph, idx: int, assigned: set[int]) -> tuple[list[int], str | None]:
    """The nodes fused behind the compute node ``idx``, and the skip tensor of a fused residual Add."""
    node = g.nodes[idx]
    chain = [idx]
    skip: str | None = None
    current = node.output[0]
    stage = 0  # 0 after anchor, 1 after bias, 2 after BN, 3 after residual add, 4 done
    while stage < 4:
        nxt_idx = g.sole_consumer(current)
        if nxt_idx is None or nxt_idx in assigned:
            swish = _swish_tail(current, g.nodes, g.consumers, g.graph_outputs, assigned)
            if swish:
                chain.extend(swish)
                current = g.nodes[swish[-1]].output[0]
            break
        nxt = g.nodes[nxt_idx]
        op = nxt.op_type
        others = [i for i in nxt.input if i and i != current]
        if op == "Add" and stage < 1 and len(others) == 1 and others[0] in g.constants:
            stage = 1
        elif op == "BatchNormalization" and stage < 2 and nxt.input[0] == current:
            stage = 2
        elif (op == "Add" and stage < 3 and node.op_type in RESIDUAL_ANCHORS and len(others) == 1
              and others[0] not in g.constants and len(nxt.input) == 2):
            stage = 3
            skip = others[0]
        elif op in ACTIVATION_OPS and nxt.input[0] == current:
            stage = 4
        else:
            break
        chain.append(nxt_idx)
        current = nxt.output[0]
    return chain, skip


def _group(g: _Graph, chain: list[int], index: int, residual_input: str | None) -> FusionGroup:
    """The :class:`FusionGroup` of ``chain`` (node indices, anchor first), ``index`` in group order."""
    members = set(chain)
    anchor = g.nodes[chain[0]]
    produced = {o for i in chain for o in g.nodes[i].output if o}
    inputs: list[str] = []
    for i in chain:
        for t in g.nodes[i].input:
            if t and t not in produced and t not in g.constants and t not in inputs:
                inputs.append(t)
    outs: list[str] = []
    for i in chain:
        for t in g.nodes[i].output:
            if t and (t in g.graph_outputs or any(r not in members for r in g.consumers.get(t, []))):
                outs.append(t)
    last = g.nodes[chain[-1]]
    kind, quantizable = _classify(anchor, g.specs, g.fixed)
    if quantizable and anchor.op_type not in COMPUTE_OPS:
        quantizable = _int8_reader_follows(g, last.output[0] if last.output else "")
    return FusionGroup(
        name=g.names[chain[0]],
        nodes=tuple(g.names[i] for i in chain),
        anchor_op=anchor.op_type,
        quantizable=quantizable,
        input_tensors=tuple(inputs),
        output_tensor=last.output[0] if last.output else "",
        topo_index=index,
        kind=kind,
        residual_input=residual_input,
        output_tensors=tuple(outs),
        op_types=tuple(g.nodes[i].op_type for i in chain),
    )


def _swish_tail(
    current: str,
    nodes: Sequence[onnx.NodeProto],
    consumers: Mapping[str, list[int]],
    graph_outputs: set[str],
    assigned: set[int],
) -> list[int]:
    """``x * sigmoid(x)`` (SiLU / swish) or ``x * hardsigmoid(x)`` after ``current``, else []."""
    readers = consumers.get(current, [])
    if current in graph_outputs or len(readers) != 2 or any(r in assigned for r in readers):
        return []
    gates = [r for r in readers if nodes[r].op_type in _SWISH_GATES]
    muls = [r for r in readers if nodes[r].op_type == "Mul"]
    if len(gates) != 1 or len(muls) != 1:
        return []
    gate, mul = nodes[gates[0]], nodes[muls[0]]
    gate_out = gate.output[0]
    if sorted(mul.input) != sorted([current, gate_out]):
        return []
    if gate_out in graph_outputs or len(consumers.get(gate_out, [])) != 1:
        return []
    return [gates[0], muls[0]]


_PASS_THROUGH = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Split", "Slice",
                           "Gather", "Pad", "DepthToSpace", "SpaceToDepth", "Tile", "Expand"})
"""Data movement between a pool / Concat / Resize and the reader that decides whether it runs in INT8."""


def _int8_reader_follows(g: _Graph, tensor: str) -> bool:
    """Whether a pool's, Concat's or Resize's output reaches, through data movement only, a node that can read
    INT8 (a compute op, another of :data:`QUANTIZABLE_STANDALONE_OPS`, or a residual Add fused into a conv group,
    whose skip input is quantized: an FPN's upsampled map) and no graph output.

    Those ops run in INT8 only to spare a kernel between INT8 neighbours a requantization; where every reader
    is float (a recurrent state ``stateN = Concat(h, c)``, an LSTM, a Softmax, the graph's output) Q/DQ on
    their inputs would only round. A KV cache (``present = Concat(past, k)``, a graph output) would hand the next
    decoding step INT8-rounded keys, and TensorRT-RTX's Myelin failed on Q/DQ'd cache inputs with a dynamic past
    length::

        h ─┐                                         h ─┐
           ├─► Concat ─► stateN     no Q/DQ here        ├─► Q ─► DQ ─► Concat ─► Conv    INT8 pays off
        c ─┘                                         c ─┘
    """
    seen: set[str] = set()
    todo = [tensor] if tensor else []
    reader = False
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        if t in g.graph_outputs:
            return False
        seen.add(t)
        for idx in g.consumers.get(t, []):
            node = g.nodes[idx]
            if node.op_type in COMPUTE_OPS or idx in g.fused_residuals:
                reader = True
            elif ((node.op_type in _PASS_THROUGH or node.op_type in QUANTIZABLE_STANDALONE_OPS)
                  and node.input and (node.input[0] == t or node.op_type == "Concat")):
                # another Concat/pool/Resize reads INT8 only where it is INT8 itself: where its own output goes
                # (a YOLO head's per-level Concats feed one float Concat of scores and boxes)
                todo.extend(o for o in node.output if o)
    return reader


def _is_float(specs: Mapping[str, Any], tensor: str) -> bool:
    spec = specs.get(tensor)
    return spec is None or spec.dtype in ("float32", "float16", "undefined")


def _classify(
    anchor: onnx.NodeProto,
    specs: Mapping[str, Any],
    constants: set[str],
) -> tuple[str, bool]:
    """(kind, quantizable) of a group: float compute ops and INT8-capable data ops only."""
    op = anchor.op_type
    float_out = all(_is_float(specs, o) for o in anchor.output if o)
    if op in COMPUTE_OPS:
        data_inputs = [t for t in anchor.input[:2] if t]
        ok = float_out and all(_is_float(specs, t) for t in data_inputs)
        ok = ok and not all(t in constants for t in data_inputs)
        return "compute", ok
    if op in QUANTIZABLE_STANDALONE_OPS:
        data = [t for t in (anchor.input if op == "Concat" else anchor.input[:1]) if t]
        ok = float_out and any(t not in constants for t in data)
        ok = ok and all(_is_float(specs, t) for t in data if t not in constants)
        return ("concat" if op == "Concat" else "pool" if "Pool" in op else "resize"), ok
    return "other", False

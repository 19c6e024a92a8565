"""The local mode: each int8/fp16 group's written nodes (its island) run alone, fed reference values.

Tensors are aligned only through the writer's provenance (``Provenance.tensor_map``:
original tensor -> written tensor carrying its value), never by guessing from names::

    accumulated: the candidate runs end to end; each layer's written counterpart is compared
                 with the reference's tensor (error of the layer + everything upstream)

        reference   x ──► [G1] ──► a ──► [G2] ──► b           compare a : a',  b : b'
        candidate   x ──► [G1'] ──► a' ──► [G2'] ──► b'

    local:       each int8/fp16 group (and any group the writer changed) runs alone, fed the
                 reference's values of its inputs: its own error, not the one it inherits

        reference   x ──► [G1] ──► a ──► [G2] ──► b
                                   │ (reference value of a, cast to the written dtype)
        island      ref/a ──► Q/DQ ──► [G2' as written: DQ(W), Conv, Add, Relu ...] ──► b''
                                                                compare b : b''

An island is the group's written nodes (``Provenance.node_map``: the node plus the Q/DQ/Cast
nodes feeding it) closed over inserted nodes, cut at the written tensors that carry original
tensors; a Loop/If/Scan is cut out with its bodies, the outer tensors they read by name fed like its inputs (an
INT8 or FP16 body is an island of that precision, ``CandidatePlan.bodies``). The islands of a chunk of groups form
"local models" (renamed ``local/<i>/...``,
inputs ``ref/<tensor>``; a node shared by two islands on the same inputs is computed once),
one per worker thread, each run once per batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from ..backends import Backend
from ..errors import CompareError
from ..folding import rename_node
from ..graph import subgraph_reads, topological_order
from ..plan import FusionGroup
from ..precision import INT8
from ..quantize import Provenance, WrittenModel
from ..quantize.tensors import FP16_MAX
from .layers import Layer, ReferenceGraph
from .submodel import build_runner, node_reads, submodel, typed_specs

__all__ = ["Island", "QdqChain", "find_islands", "output_qdq_chains", "LocalModel"]


@dataclass(frozen=True)
class Island:
    """The written nodes of one group, cut at the tensors carrying its original inputs."""

    index: int
    group: str
    nodes: tuple[int, ...]                      # indices into the written graph's nodes
    boundary: tuple[str, ...]                   # written (= original) tensors fed from the reference
    outputs: tuple[tuple[str, str], ...]        # (reference tensor, written carrier)
    float16: bool = False                       # an FP16 group: fed reference values saturated at +-65504
    fed: tuple[tuple[str, str], ...] = ()       # (written tensor at the boundary, the reference tensor fed there)


def find_islands(name: str, written: WrittenModel, ref: ReferenceGraph, layers: Sequence[Layer],
                 carriers: Mapping[str, str], precision: Mapping[str, str],
                 produced: Mapping[str, int], chains: Sequence[QdqChain] = ()) -> tuple[dict[str, Island], list[str]]:
    """One island per group whose written form differs from the original (see the module docstring),
    and notes on the groups left out. ``chains``: the ORT form's output Q/DQ (:func:`output_qdq_chains`); an
    owned one is in its owner's island (``carriers`` then names its DQ's output), and a float reader is fed the
    reference value after it."""
    prov = written.provenance
    proto = written.proto
    w_nodes = list(proto.graph.node)
    inits = {i.name for i in proto.graph.initializer}
    ref_inits = {i.name for i in ref.model.proto.graph.initializer}
    stops = inits | {i.name for i in proto.graph.input if i.name not in inits} \
        | {v for k, v in prov.tensor_map.items() if k not in ref_inits and k not in ref.constants}
    position = {idx: k for k, idx in enumerate(topological_order(proto))}
    by_group: dict[str, list[Layer]] = {}
    for x in layers:
        if x.tensor in carriers:
            by_group.setdefault(x.group, []).append(x)
    known = set(ref.producer) | set(ref.graph_inputs) | ref_inits | ref.constants
    out: dict[str, Island] = {}
    notes: list[str] = []
    borrowed: list[tuple[str, str]] = []  # (float group, the INT8 group whose output Q/DQ its island holds)
    original = {v: k for k, v in prov.tensor_map.items()}  # written tensor -> the original it carries
    specs: dict[str, Any] = {}

    def typed() -> Mapping[str, Any]:  # computed on first use: shape inference of a large model costs seconds
        if not specs:
            specs.update(typed_specs(proto))
        return specs

    int8_first = sorted(range(len(ref.groups)), key=lambda i: precision.get(ref.groups[i].name) != INT8)
    for gi in int8_first:  # an INT8 group's island holds its output Q/DQ before its float readers stop there
        g = ref.groups[gi]
        if g.name not in by_group:
            continue
        float_group = precision.get(g.name, "fp32") != INT8
        owned = [c for c in chains if c.owner == g.name and c.owned]
        # a float group reading an INT8 group's output through its Q/DQ is fed the reference value after it, when
        # that Q/DQ's error is counted elsewhere: in the INT8 group's island, or in an INT8 reader's
        fed = {c.quantized: c.tensor for c in chains
               if float_group and c.owner != g.name and (not c.owned or c.owner in out)}
        members = _members(g, prov, w_nodes, stops | set(fed), produced)
        members -= {i for c in chains if c.quantized in fed for i in c.nodes}  # the reader's node_map holds them
        members |= {i for c in owned for i in c.nodes} if members else set()
        if not members:
            continue
        inserted = any(w_nodes[i].name in prov.inserted_nodes for i in members)
        if precision.get(g.name, "fp32") == "fp32" and not inserted:
            continue
        made = {o for i in members for o in w_nodes[i].output if o}
        # a Loop/If's bodies read outer tensors by name: they are fed from the reference too (LocalModel renames them)
        boundary = sorted({t for i in members for t in node_reads(w_nodes[i])
                           if t and t not in inits and t not in made})
        raw = {c.quantized: c.carrier for c in chains if c.owner == g.name and not c.owned}  # an INT8 reader's
        outputs = tuple((x.tensor, raw.get(carriers[x.tensor], carriers[x.tensor])) for x in by_group[g.name]
                        if raw.get(carriers[x.tensor], carriers[x.tensor]) in made)
        if not outputs:
            continue
        untyped = [t for t in boundary if t not in typed() or typed()[t].dtype == "undefined"]
        if untyped:  # e.g. a contrib op's int32 mask index in an FP16-simulation write: nothing to feed it as;
            # a list a while loop carries (a sequence, no tensor type) crashed the comparison
            notes.append(f"candidate {name!r}: local mode skips group {g.name!r}: the type of its input "
                         f"{untyped[0]!r} is unknown (shape inference cannot type it, or it is a sequence)")
            continue
        foreign = [t for t in boundary if fed.get(t, t) not in known]
        if foreign:  # e.g. a tensor --equalize rescaled: the reference cannot feed it
            notes.append(f"candidate {name!r}: local mode skips group {g.name!r}: its input {foreign[0]!r} exists "
                         "only in the candidate (a float rewrite such as --equalize rescaled it); compare against "
                         "the rewritten FP32 model for its local error")
            continue
        if precision.get(g.name, "fp32") == "fp32":  # ConvNeXt's Transpose after an INT8 depthwise conv
            borrowed.extend((g.name, o) for o in _output_qdq_owners(members, w_nodes, original, ref, g.name))
        order = sorted(members, key=position.__getitem__)
        out[g.name] = Island(index=gi, group=g.name, nodes=tuple(order), boundary=tuple(boundary), outputs=outputs,
                             float16=precision.get(g.name) == "fp16",
                             fed=tuple((t, fed[t]) for t in boundary if t in fed))
    if borrowed:  # one note for them all: a ConvNeXt has one such Transpose per block
        shown = ", ".join(f"{g!r} (of {o!r})" for g, o in borrowed[:3]) + (
            f" and {len(borrowed) - 3} more" if len(borrowed) > 3 else "")
        notes.append(f"candidate {name!r}: float group(s) {shown} read an INT8 group's output through its Q/DQ (the "
                     "ORT form quantizes an output where its readers read it), so their local figures hold that "
                     "group's output quantization: the error is the INT8 group's; pinning the float group would not "
                     "remove it")
    return dict(sorted(out.items(), key=lambda kv: kv[1].index)), notes


@dataclass(frozen=True)
class QdqChain:
    """A Q -> DQ pair the ORT form wrote on an INT8 group's output (``carrier``, written, carrying the reference's
    ``tensor``), read as ``quantized`` by other groups' nodes::

        [owner: Conv ─► Relu] ─► carrier ─► Q ─► DQ ─► quantized ─► [float reader: Transpose]

    In ONNX Runtime's fused kernels the owner's output *is* the quantized one (QLinearConv), so when only float
    groups read it (``owned``) the error of this Q/DQ is the owner's: the per-layer table measures the owner at
    ``quantized`` in both modes, and a float reader's island is fed the reference value after the DQ (its own
    error, none, not the owner's). With an INT8 reader the pair is that reader's input quantization, as in the
    TensorRT form (its local figures hold it); where a float group reads it too, the accumulated mode still
    measures the owner at ``quantized``."""

    owner: str
    tensor: str
    carrier: str
    quantized: str
    nodes: tuple[int, int]
    owned: bool
    """No INT8 group reads ``quantized``: its error is the owner's (in the owner's island); else it is the input
    quantization of the INT8 readers, as in the TensorRT form."""
    float_read: bool
    """A float group reads ``quantized``: the accumulated mode measures the owner there, so that the error does not
    first show at the float reader."""


def output_qdq_chains(written: WrittenModel, ref: ReferenceGraph, precision: Mapping[str, str]) -> list[QdqChain]:
    """The Q -> DQ pairs on INT8 groups' outputs that other groups read (the ORT form's output Q/DQ)."""
    prov = written.provenance
    w_nodes = list(written.proto.graph.node)
    original = {v: k for k, v in prov.tensor_map.items()}  # written tensor -> the original it carries
    origin = {w: o for o, ws in prov.node_map.items() for w in ws}  # written node -> the original node it writes
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(w_nodes):
        for t in node_reads(node):
            readers.setdefault(t, []).append(i)
    chains = []
    for qi, q in enumerate(w_nodes):
        if q.op_type != "QuantizeLinear" or not q.output[0] or len(readers.get(q.output[0], [])) != 1:
            continue
        di = readers[q.output[0]][0]
        if w_nodes[di].op_type != "DequantizeLinear":
            continue
        owner = _producing_group(q.input[0], original, ref)
        if owner is None or precision.get(owner) != INT8:
            continue
        groups = {ref.group_of.get(origin.get(w_nodes[r].name, "")) for r in readers.get(w_nodes[di].output[0], [])}
        others = groups - {owner}
        if not others or None in others:
            continue
        chains.append(QdqChain(owner=owner, tensor=original.get(q.input[0], q.input[0]), carrier=q.input[0], quantized=w_nodes[di].output[0],
                                nodes=(qi, di), owned=all(precision.get(str(h)) != INT8 for h in others),
                                float_read=any(precision.get(str(h)) != INT8 for h in others)))
    return chains


def _producing_group(written: str, original: Mapping[str, str], ref: ReferenceGraph) -> str | None:
    """The group whose node makes the reference tensor a written tensor carries (``original``: written tensor ->
    the original it carries); None for a graph input or a constant."""
    idx = ref.producer.get(original.get(written, written))
    return ref.group_of.get(ref.names[idx]) if idx is not None else None


def _output_qdq_owners(members: set[int], w_nodes: Sequence[onnx.NodeProto], original: Mapping[str, str],
                       ref: ReferenceGraph, group: str) -> list[str]:
    """The other groups whose outputs the QuantizeLinear nodes among ``members`` quantize (``original``: written
    tensor -> the original tensor it carries)."""
    owners: list[str] = []
    for i in sorted(members):
        node = w_nodes[i]
        if node.op_type != "QuantizeLinear":
            continue
        owner = _producing_group(node.input[0], original, ref)
        if owner is not None and owner != group and owner not in owners:
            owners.append(owner)
    return owners


def _members(group: FusionGroup, prov: Provenance, w_nodes: Sequence[onnx.NodeProto], stops: set[str],
             produced: Mapping[str, int]) -> set[int]:
    """The group's written nodes, closed over the nodes computing what they read, up to ``stops``
    (initializers, graph inputs and the written tensors carrying original tensors)."""
    w_index = {n.name: i for i, n in enumerate(w_nodes)}
    members: set[int] = set()
    for n in group.nodes:
        for w in prov.node_map.get(n, (n,)):
            if w in w_index:
                members.add(w_index[w])
    pending = list(members)
    while pending:
        idx = pending.pop()
        for t in node_reads(w_nodes[idx]):
            if t in stops:
                continue
            p = produced.get(t)
            if p is not None and p not in members:
                members.add(p)
                pending.append(p)
    return members


class LocalModel:
    """The islands of one candidate and one chunk, as one model fed reference values (``ref/<tensor>``)."""

    def __init__(self, name: str, proto: onnx.ModelProto, islands: Sequence[Island], backend: Backend) -> None:
        self._proto = proto
        self._specs = typed_specs(proto)
        self._inits = {i.name for i in proto.graph.initializer}
        self._nodes: list[onnx.NodeProto] = []
        self._inputs: dict[str, str] = {}           # graph input -> the reference tensor it is fed
        self._written: dict[str, str] = {}          # graph input -> the written tensor it stands for
        self._local_specs: dict[str, Any] = {}
        self._emitted: dict[tuple[int, tuple[str, ...]], list[str]] = {}
        self.outputs: list[tuple[str, str]] = []    # (output name, reference tensor)
        for island in islands:
            self._add(island)
        for graph_input, t in self._written.items():
            if t not in self._specs:
                raise CompareError(f"candidate {name!r}: cannot tell the type of written tensor {t!r} "
                                   "to feed it the reference's value (local mode)")
            self._local_specs[graph_input] = dataclasses.replace(self._specs[t], name=graph_input)
        self.inputs = [(n, t, self._local_specs[n].dtype) for n, t in self._inputs.items()]
        self.label = f"candidate {name!r} (local mode)"
        sub = submodel(proto, self._nodes, [n for n, _, _ in self.inputs], [o for o, _ in self.outputs],
                       self._local_specs, self.label)
        self.runner = build_runner(backend, sub, [], self.label)

    def _add(self, island: Island) -> None:
        """The island's nodes, renamed ``local/<index>/...``, reading ``ref/<tensor>`` at its boundary (an FP16
        group ``ref16/<tensor>``: the reference value saturated at +-65504, see :func:`_as_island_input`)."""
        w_nodes = self._proto.graph.node
        prefix = f"local/{island.index}/"
        names: dict[str, str] = {}   # written tensor made in this island -> its name here
        fed = dict(island.fed)       # written tensor -> the reference tensor fed there (else the same name)
        # what the island casts to float16 (a node the writer kept FP32, its input beyond float16's range as a
        # LayerNorm's sum of squares at 6e5, reads the float32 value: saturating it made the layer look broken)
        into16 = {w_nodes[i].input[0] for i in island.nodes if w_nodes[i].op_type == "Cast"
                  and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in w_nodes[i].attribute)}

        def rename(t: str) -> str:
            if not t or t in self._inits:
                return t
            if t in names:
                return names[t]
            feed = ("ref16/" if island.float16 and t in into16 else "ref/") + t
            self._inputs[feed] = fed.get(t, t)
            self._written[feed] = t
            return feed

        for i in island.nodes:
            src = w_nodes[i]
            ins = tuple(rename(t) for t in src.input)
            outer = {t: rename(t) for t in sorted(subgraph_reads([src]))}  # what its bodies read by name
            key = (i, ins + tuple(outer.items()))
            if key in self._emitted:  # the same node on the same inputs in an earlier island: computed once
                for t, done in zip(src.output, self._emitted[key]):
                    if t:
                        names[t] = done
                continue
            node = rename_node(src, outer)  # a copy, its bodies reading the fed names
            node.name = prefix + (src.name or f"{src.op_type}_{i}")
            del node.input[:]
            node.input.extend(ins)
            del node.output[:]
            node.output.extend(prefix + t if t else t for t in src.output)
            self._emitted[key] = list(node.output)
            self._nodes.append(node)
            for t in src.output:
                if t:
                    names[t] = prefix + t
                    if t in self._specs:
                        self._local_specs[prefix + t] = dataclasses.replace(self._specs[t], name=prefix + t)
        for tensor, carrier in island.outputs:
            self.outputs.append((names[carrier], tensor))

    @property
    def needs(self) -> list[str]:
        return [t for _, t, _ in self.inputs]

    def run(self, ref_live: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {}
        for name, t, dtype in self.inputs:
            feeds[name] = _as_island_input(ref_live[t], np.dtype(dtype), name.startswith("ref16/"))
        got = self.runner.run(feeds, [o for o, _ in self.outputs])
        return {t: got[o] for o, t in self.outputs}

    def close(self) -> None:
        self.runner.close()


def _as_island_input(value: np.ndarray, dtype: np.dtype, into_float16: bool = False) -> np.ndarray:
    """A reference value in the dtype an island reads; for an FP16 group (``into_float16``, float32 in FP16
    simulation) or into float16, saturated at +-65504 as the written model's float16 constants are
    (quantlab.quantize.casts): a torch mask ``(1 - m) * finfo(float32).min`` is -65504 in the FP16 candidate,
    where the reference's -3.4e38 made every island reading it overflow to -inf and look like the first layer
    to give NaN."""
    if value.dtype.kind == "f" and (dtype == np.float16 or into_float16):
        value = np.asarray(np.clip(value, -FP16_MAX, FP16_MAX))  # a 0-d array stays an array (np.clip: a scalar)
    return value if value.dtype == dtype else np.asarray(value.astype(dtype))

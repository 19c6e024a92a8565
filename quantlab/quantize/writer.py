"""The writing pass: every node of the original graph, in topological order, with what its inputs need.

For each node the writer asks the :class:`~quantlab.quantize.placement.Placement`
whether an input is quantized (then :class:`~quantlab.quantize.qdq.QdqInserter`
supplies the DQ output), else :class:`~quantlab.quantize.casts.Casts` supplies
the input in the dtype the node's precision needs. The node keeps its name
and its outputs' names (a float16 graph output is computed under a derived
name and cast back under its own)::

    reader of x ◄── x/dq ◄── Q/DQ (int8 group)        reader of x ◄── x/to_fp16 ◄── Cast (fp16 group)

:class:`~quantlab.quantize.tensors.TensorBook` keeps the names and dtypes;
the writer assembles the model and the :class:`Provenance` from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import onnx
from onnx import TensorProto, helper

from ..backends.ort import unsafe_optimizers
from ..controlflow import control_flow_notes
from ..errors import PlanError
from ..graph import LoadedModel, default_opset, outer_names, subgraph_reads, topological_order
from ..graph.topology import CONTROL_FLOW_OPS, initializer_map, shape_determined_nodes
from ..plan import FusionGroup, ResolvedPlan
from ..precision import FP16, INT8
from ..version import __version__
from .casts import Casts
from .fp32_nodes import Fp32Nodes, below_fp16, beyond_fp16, phase_nodes
from .options import WriteOptions
from .placement import Placement, Slot
from .provenance import Provenance
from .qdq import QdqInserter
from .qparams import QParams
from .tensors import F16, F32, TensorBook
from .write_notes import writing_notes

__all__ = ["Writer"]


class Writer:
    """Writes the new graph node by node; its collaborators track names, dtypes, casts and Q/DQ."""

    def __init__(self, model: LoadedModel, plan: ResolvedPlan, placement: Placement,
                 options: WriteOptions, rewrite_bodies: bool = True) -> None:
        self.src = model.proto
        self.plan = plan
        self.placement = placement
        self.options = options
        self.nodes = placement.nodes
        self.names = placement.names
        self.graph_outputs = placement.graph_outputs
        self.group_of: dict[str, FusionGroup] = {n: g for g in plan.groups for n in g.nodes}
        self.book = TensorBook(self.src, placement.specs, placement.names)
        self.casts = Casts(self.book, options, default_opset(self.src), placement.constants)
        self.qdq = QdqInserter(self.book, self.casts, options)
        self.node_map: dict[str, list[str]] = {}
        self.notes: list[str] = []
        self.fp16_bodies: list[str] = []  # control-flow nodes whose bodies were written in float16
        self.int8_bodies: list[str] = []  # Loop/Scan/If nodes whose bodies were written in INT8
        self.written_bodies: list[int] = []  # the indices of the nodes whose bodies were written in INT8 or float16
        self.rewrite_bodies = rewrite_bodies  # False: bodies stay as they are (the fallback of write_model)
        self.initializers = initializer_map(self.src)
        self.beyond_fp16 = beyond_fp16(placement.table, options.fp16_data_max)
        self.fp32 = Fp32Nodes(self.book, options, placement.constants, self.beyond_fp16, below_fp16(placement.table),
                              phase_nodes(self.nodes, self.names, placement.table, placement.constants))
        self._kept: set[str] = set()  # initializers the written model keeps
        self.subgraph_reads = frozenset(subgraph_reads(self.nodes))
        self.shape_determined = shape_determined_nodes(self.src)

    def run(self) -> onnx.ModelProto:
        for idx in topological_order(self.src):
            self.write_node(idx)
        self._check_subgraph_reads()
        self.notes.extend(control_flow_notes(  # Ifs inlined; body tensors left float, when the plan has INT8
            self.src, self.written_bodies, float_tensors=INT8 in self.plan.precision.values()))
        self.notes.extend(writing_notes(self.src, self.plan, self.placement, self.casts, self.qdq, self.fp16_bodies,
                                        self.fp32, self.options.fp16_data_max))
        written = self._assemble()
        crashing = unsafe_optimizers(written)
        if crashing:
            why = "; ".join(f"{name}: {reason}" for name, reason in crashing.items())
            self.notes.append(f"ONNX Runtime can crash the process on this model ({why}): create a session of it "
                              f"with disabled_optimizers={list(crashing)!r}, as quantlab does")
        return written

    def write_node(self, idx: int) -> None:
        node = self.nodes[idx]
        name = self.names[idx]
        precision = self.plan.precision[self.group_of[name].name]
        statistic = self.fp32.statistic(node)  # every node: a statistic is known from its inputs
        runs_fp16 = (precision == FP16 and not statistic and idx not in self.shape_determined
                     and not self.fp32.keeps_fp32(node, name))
        wants, fp16 = self.casts.input_wants(node, runs_fp16)
        new_inputs, chains = self._inputs(idx, node, name, wants)
        outputs, casts = self._outputs(node, fp16)
        written = onnx.NodeProto()
        written.CopyFrom(node)
        written.name = name
        del written.input[:]
        written.input.extend(_without_trailing_omitted(new_inputs))
        del written.output[:]
        written.output.extend(outputs)
        if node.op_type in CONTROL_FLOW_OPS and self.rewrite_bodies:
            from .subgraphs import write_bodies

            notes, kind = write_bodies(node, written, name, precision,
                                       self.plan.int8_asked(self.group_of[name].name), self.book.specs,
                                       self.initializers, self.src, self.options, self.placement.table,
                                       self.beyond_fp16)
            self.notes.extend(notes)
            if kind == INT8:
                self.int8_bodies.append(name)
            elif kind == FP16:
                self.fp16_bodies.append(name)
            if kind in (INT8, FP16):
                self.written_bodies.append(idx)
        self.book.out_nodes.append(written)
        self.book.flush_casts()
        self.node_map[name] = [name] + chains + casts

    def _inputs(self, idx: int, node: onnx.NodeProto, name: str,
                wants: list[str | None]) -> tuple[list[str], list[str]]:
        """The written names the node reads, and the inserted nodes that made them (in order, once each)."""
        chains: list[str] = []
        new_inputs: list[str] = []
        pending_bias: tuple[int, Slot] | None = None
        weight_qp: QParams | None = None
        for i, t in enumerate(node.input):
            slot = self.placement.slots.get((idx, i))
            if t and slot is not None and slot.kind == "bias":
                pending_bias = (i, slot)  # needs the weight's scale: written after the weight
            if not t or (slot is not None and slot.kind == "bias"):
                new_inputs.append(t)
                continue
            if slot is not None and slot.kind == "weight":
                out, chain, weight_qp = self.qdq.weight(t, slot.axis, name, slot.scale_floor)
            else:
                out, chain = self._input(t, slot, wants[i], name)
            new_inputs.append(out)
            chains.extend(c for c in chain if c not in chains)
        if pending_bias is not None:
            i, slot = pending_bias
            if weight_qp is not None and slot.input_qparams is not None:
                out, chain = self.qdq.bias(slot.tensor, slot.input_qparams, weight_qp, name)
            else:
                out, chain = self.casts.get(slot.tensor, F32)
            new_inputs[i] = out
            chains.extend(c for c in chain if c not in chains)
        return new_inputs, chains

    def _input(self, t: str, slot: Slot | None, want: str | None, consumer: str) -> tuple[str, tuple[str, ...]]:
        """What ``consumer`` reads for input ``t`` (neither a weight nor a bias), and the nodes that made it."""
        if slot is not None and slot.kind == "activation":
            assert slot.qparams is not None
            return self.qdq.activation(t, slot.qparams, consumer)
        if t in self.placement.output_qdq and want in (F32, None):
            # target ort: readers of an int8 group's output read it through its Q/DQ
            return self.qdq.activation(t, self.placement.output_qdq[t], consumer)
        if want is None:
            have = self.book.versions.get(t, {})
            out = t if t in self.book.written_dtype or not have else next(iter(have.values()))
            return out, self.book.origin.get(out, ())
        if want == F16 and self.options.fp16_simulation:
            rounded = self.casts.get_rounded(t)
            self.book.flush_casts()
            return rounded
        return self.casts.get(t, want)

    def _outputs(self, node: onnx.NodeProto, fp16: bool) -> tuple[list[str], list[str]]:
        """The names the node writes, and the casts after it (fp16 simulation, float16 graph outputs)."""
        outputs: list[str] = []
        casts: list[str] = []
        for s, t in enumerate(node.output):
            if not t:
                outputs.append(t)
                continue
            dtype = self.casts.output_dtype(node, s, fp16)
            if dtype == F16 and self.options.fp16_simulation:
                exact = self.book.fresh(f"{t}/fp32_exact")
                outputs.append(exact)
                self.book.written_dtype[exact] = F32
                _, round_casts = self.casts.round_trip(exact, t, out=t)
                casts.extend(round_casts)
                self.book.register(t, t, F32)
                self.casts.rounded[t] = t
            elif dtype == F16 and (t in self.graph_outputs or t in self.subgraph_reads):
                # graph outputs keep their dtype; so do tensors If/Loop/Scan bodies read by name (they stay fp32)
                inner = self.book.fresh(f"{t}/fp16")
                outputs.append(inner)
                self.book.register(t, inner, F16)
                cast = helper.make_node("Cast", [inner], [t], name=self.book.fresh(f"{t}/Cast_to_fp32"),
                                        to=TensorProto.FLOAT)
                casts.append(cast.name)
                self.book.pending_casts.append(cast)
                self.book.register(t, t, F32)
            else:
                outputs.append(t)
                self.book.register(t, t, dtype)
        return outputs, casts

    def _check_subgraph_reads(self) -> None:
        """If/Loop/Scan bodies read outer tensors by name: those must keep their original dtype (a safety net:
        :meth:`_outputs` computes such a tensor in float16 under another name and casts it back to its own)."""
        written_dtype = self.book.written_dtype
        for idx, node in enumerate(self.nodes):
            for attr in node.attribute:
                bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                for body in bodies:
                    for t in sorted(outer_names(body)):
                        if written_dtype.get(t, self.book.orig_dtype(t)) != self.book.orig_dtype(t):
                            producer = self.placement.producers[t]
                            group = self.group_of[self.names[self.nodes.index(producer)]].name
                            raise PlanError(
                                f"node {self.names[idx]!r} ({node.op_type}) reads tensor {t!r} inside its "
                                f"subgraph, and the plan makes that tensor {written_dtype[t]}; quantlab "
                                f"cannot retype subgraphs. Pin group {group!r}, which produces it, to fp32."
                            )

    def _assemble(self) -> onnx.ModelProto:
        g = self.src.graph
        out_nodes = self.book.out_nodes
        used = {t for n in out_nodes for t in n.input if t} | {o.name for o in g.output} | subgraph_reads(out_nodes)
        graph_input_names = {i.name for i in g.input}
        originally_used = ({t for n in g.node for t in n.input if t} | {o.name for o in g.output}
                           | subgraph_reads(g.node))  # a weight only a body read, now read as its float16 copy
        inits = [i for i in self.book.out_inits
                 if i.name in used or i.name in graph_input_names
                 or (i.name in self.book.inits and i.name not in originally_used)]
        graph = helper.make_graph(out_nodes, g.name, list(g.input), list(g.output), initializer=inits,
                                  doc_string=g.doc_string)
        out = helper.make_model(graph, opset_imports=list(self.src.opset_import),
                                producer_name="quantlab", producer_version=__version__)
        out.ir_version = self.src.ir_version
        out.model_version = self.src.model_version
        out.domain = self.src.domain
        for p in self.src.metadata_props:
            out.metadata_props.add(key=p.key, value=p.value)
        for f in self.src.functions:
            out.functions.append(f)
        self._kept = {i.name for i in inits}
        return out

    def provenance(self, meta: Mapping[str, Any]) -> Provenance:
        tensor_map: dict[str, str] = {}
        tensor_dtype: dict[str, str] = {}
        originals: list[str] = [i.name for i in self.src.graph.input]
        originals += [i.name for i in self.src.graph.initializer]
        originals += [t for n in self.src.graph.node for t in n.output if t]
        for t in dict.fromkeys(originals):
            written = self._carrier(t)
            tensor_map[t] = written
            tensor_dtype[t] = self.book.written_dtype.get(written, self.book.orig_dtype(t))
        node_group = {n: g.name for n, g in self.group_of.items()}
        return Provenance(
            tensor_map=tensor_map,
            tensor_dtype=tensor_dtype,
            node_map={k: tuple(v) for k, v in self.node_map.items()},
            quantized_inputs=self.qdq.quantized,
            group_precision=self.plan.precision,
            node_group=node_group,
            inserted_nodes=self.book.inserted,
            notes=tuple(self.notes),
            meta=dict(meta),
            body_precision={**{self.group_of[n].name: FP16 for n in self.fp16_bodies},
                            **{self.group_of[n].name: INT8 for n in self.int8_bodies}},
        )

    def _carrier(self, tensor: str) -> str:
        """The written tensor that carries ``tensor``'s value: itself unless a weight was replaced."""
        if tensor not in self.book.inits or tensor in self._kept:
            return tensor
        quantized = self.qdq.quantized
        for rec in [quantized.get(tensor)] + list((quantized.get(tensor) or {}).get("variants", [])):
            if rec:
                return str(rec["output"])
        for name in [*self.book.versions.get(tensor, {}).values(), self.casts.rounded.get(tensor, "")]:
            if name in self._kept:
                return name
        return tensor


def _without_trailing_omitted(inputs: list[str]) -> list[str]:
    """``inputs`` without the empty names at its end: an optional input given as "" is one not given, and
    TensorRT's parser refuses some nodes that spell it out (``Conv(x, W, "")``: "Invalid Node")."""
    end = len(inputs)
    while end and not inputs[end - 1]:
        end -= 1
    return inputs[:end]

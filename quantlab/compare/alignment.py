"""How each candidate lines up with the reference: its inputs/outputs, its written carrier of each
compared tensor (from the writer's provenance), its groups' precisions and its islands."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx

from ..errors import CompareError
from ..graph import LoadedModel, tensor_specs
from ..quantize import WrittenModel
from .candidates import Candidate
from .islands import Island, find_islands, output_qdq_chains
from .layers import Layer, ReferenceGraph
from .options import CompareOptions

__all__ = ["CandidatePlan", "check_io", "plan_candidate"]


@dataclass(eq=False)
class CandidatePlan:
    """What the comparison does with one candidate."""

    name: str
    proto: onnx.ModelProto
    written: WrittenModel | None
    carriers: dict[str, str] = field(default_factory=dict)       # reference tensor -> written tensor
    precision: dict[str, str] = field(default_factory=dict)      # group -> precision
    bodies: dict[str, str] = field(default_factory=dict)         # control-flow group -> its bodies' precision
    islands: dict[str, Island] = field(default_factory=dict)     # group -> island (local mode)
    mirrored: set[str] = field(default_factory=set)              # groups whose local figures are the accumulated
    skipped: list[str] = field(default_factory=list)             # notes


def check_io(ref: LoadedModel, name: str, proto: onnx.ModelProto) -> None:
    """The candidate must take the reference's inputs and give its outputs (names, dtypes, ranks)."""
    specs = tensor_specs(proto)
    inits = {i.name for i in proto.graph.initializer}
    inputs = [i.name for i in proto.graph.input if i.name not in inits]
    outputs = [o.name for o in proto.graph.output]
    want_in, want_out = ref.input_names, ref.output_names
    if sorted(inputs) != sorted(want_in):
        raise CompareError(
            f"candidate {name!r} has inputs {inputs} but the reference {ref.label} has {want_in}: "
            f"missing {sorted(set(want_in) - set(inputs))}, unexpected {sorted(set(inputs) - set(want_in))}. "
            "Compare models written from this reference."
        )
    if sorted(outputs) != sorted(want_out):
        raise CompareError(
            f"candidate {name!r} has outputs {outputs} but the reference {ref.label} has {want_out}: "
            f"missing {sorted(set(want_out) - set(outputs))}, unexpected {sorted(set(outputs) - set(want_out))}. "
            "Compare models written from this reference."
        )
    for spec in list(ref.inputs) + list(ref.outputs):
        got = specs.get(spec.name)
        if got is None:
            continue
        kind = "input" if spec.name in want_in else "output"
        if spec.name in want_in and spec.dtype != "undefined" and got.dtype not in ("undefined", spec.dtype):
            half = "float16" in (got.dtype, spec.dtype) or "bfloat16" in (got.dtype, spec.dtype)
            raise CompareError(f"candidate {name!r}: {kind} {spec.name!r} is {got.dtype}, the reference's is "
                               f"{spec.dtype}; the same data cannot feed both." + (
                                   " Compare a candidate with the reference's input types: `quantlab build "
                                   "--precision fp16` writes one from the reference (float32 I/O), as does "
                                   "onnxconverter-common's convert_float_to_float16(model, keep_io_types=True)"
                                   if half else ""))
        if spec.shape is not None and got.shape is not None:
            if len(spec.shape) != len(got.shape):
                raise CompareError(f"candidate {name!r}: {kind} {spec.name!r} has rank {len(got.shape)} "
                                   f"{list(got.shape)}, the reference's has rank {len(spec.shape)} {list(spec.shape)}.")
            for a, b in zip(spec.shape[1:], got.shape[1:]):
                if isinstance(a, int) and isinstance(b, int) and a != b:
                    raise CompareError(f"candidate {name!r}: {kind} {spec.name!r} has shape {list(got.shape)}, "
                                       f"the reference's is {list(spec.shape)}.")


def plan_candidate(name: str, cand: Candidate, ref: ReferenceGraph, layers: Sequence[Layer],
                   options: CompareOptions) -> CandidatePlan:
    """The candidate checked against the reference, with its carriers and islands when it has provenance."""
    if isinstance(cand, WrittenModel):
        proto, written = cand.proto, cand
    elif isinstance(cand, LoadedModel):
        proto, written = cand.proto, None
    else:
        raise CompareError(f"candidate {name!r} is a {type(cand).__name__}; give a WrittenModel (from "
                           "quantlab.write_model / load_candidate) or a LoadedModel (quantlab.load_model)")
    check_io(ref.model, name, proto)
    plan = CandidatePlan(name=name, proto=proto, written=written)
    if written is None or not options.per_layer:
        return plan
    prov = written.provenance
    unknown = [n for n in ref.names if n not in prov.node_group]
    if unknown:
        raise CompareError(
            f"candidate {name!r} was written from another model (source sha256 {written.source_sha256[:12]}, "
            f"reference {ref.model.sha256[:12]}): its provenance has no node {unknown[0]!r}"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + ". Compare it with the FP32 model it was written from."
        )
    plan.precision = {g.name: str(prov.group_precision.get(g.name, "fp32")) for g in ref.groups}
    plan.bodies = dict(prov.body_precision)
    produced = {o: i for i, n in enumerate(proto.graph.node) for o in n.output if o}
    missing = []
    for x in layers:
        carrier = prov.tensor_map.get(x.tensor)
        if carrier is None or carrier not in produced:
            missing.append(x.tensor)
            continue
        plan.carriers[x.tensor] = carrier
    if missing:
        plan.skipped.append(f"candidate {name!r}: {len(missing)} layer tensor(s) have no written counterpart in "
                            f"its provenance (e.g. {missing[0]!r}); they are left out of its per-layer table")
    chains = output_qdq_chains(written, ref, plan.precision)
    for chain in chains:  # measured after its Q/DQ, as ONNX Runtime's fused kernel returns it (QdqChain)
        if chain.float_read and plan.carriers.get(chain.tensor) == chain.carrier:
            plan.carriers[chain.tensor] = chain.quantized
    if options.local:
        # a Loop/If whose bodies compute in INT8/FP16 is an island of that precision (its node alone is fp32)
        plan.islands, notes = find_islands(name, written, ref, layers, plan.carriers,
                                           {**plan.precision, **plan.bodies}, produced, chains)
        plan.skipped.extend(notes)
    return plan

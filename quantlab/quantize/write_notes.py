"""What the writing pass tells the user about the model it wrote: values clipped, biases that do not fit, layers
that could not take the precision asked of them (the notes of :class:`~quantlab.quantize.provenance.Provenance`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto

from ..graph.topology import CONTROL_FLOW_OPS, RANDOM_OPS, SHAPE_ONLY_OPS
from ..plan import ResolvedPlan
from ..precision import FP16_TINY, FP32
from .casts import Casts
from .fp32_nodes import PHASE_LIMIT, Fp32Nodes
from .placement import Placement
from .qdq import QdqInserter

__all__ = ["float_fallback_note", "writing_notes"]


def writing_notes(src: onnx.ModelProto, plan: ResolvedPlan, placement: Placement, casts: Casts, qdq: QdqInserter,
                  fp16_bodies: Sequence[str], fp32: Fp32Nodes, fp16_data_max: float) -> list[str]:
    """The notes of a finished writing pass, warnings first where they change what a layer computes.

    ``fp16_bodies``: control-flow nodes whose bodies were written in float16; ``fp32``: the FP16-group nodes kept
    float32 and why (quantlab.quantize.fp32_nodes).
    """
    notes: list[str] = []
    if casts.fp16_clipped:
        notes.append(f"{casts.fp16_clipped} constant value(s) (initializers, Constant nodes) outside "
                     "float16 range were clipped to +-65504 in fp16 copies")
    if qdq.bias_trouble:
        worst = sorted(qdq.bias_trouble.items(), key=lambda kv: -kv[1][1])
        shown = ", ".join(f"{t!r} ({n} channel(s) clipped, |error| up to {e:.3g}"
                          + (f", {tiny} scale(s) below float32's normals" if tiny else "") + ")"
                          for t, (n, e, tiny) in worst[:5])
        notes.append(f"WARNING {len(worst)} int32 bias(es) do not fit their scale s_x * s_w (a large bias over "
                     f"a near-zero weight channel): {shown}. Those channels compute another bias; write "
                     "the TensorRT form (float bias), or keep those layers in FP16/FP32")
    if casts.fp16_clipped_values:
        worst_values = sorted(casts.fp16_clipped_values.items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"{t!r} (|x| up to {v:.3g})" for t, v in worst_values[:5])
        notes.append(f"WARNING {len(worst_values)} parameter(s) hold values beyond float16's 65504, clipped in "
                     f"their FP16 copies, so the layers reading them compute something else: {shown}. Keep "
                     "those layers in FP32 (plan overrides), or fold the op that holds them into its "
                     "neighbour before exporting")
    if placement.unquantized_outputs:
        shown = ", ".join(f"{t!r} (read by {r})" for t, r in list(placement.unquantized_outputs.items())[:5])
        notes.append(f"{len(placement.unquantized_outputs)} INT8 group output(s) stay float, without "
                     "the output Q/DQ of the ORT form (ONNX Runtime runs those layers unfused): their "
                     "readers would turn every value under half the INT8 step into log(0) or a division by "
                     f"zero: {shown}")
    if placement.output_bound:
        shown = ", ".join(f"{t!r} (-> {o!r})" for t, o in list(placement.output_bound.items())[:5])
        notes.append(f"{len(placement.output_bound)} INT8 group output(s) stay float, without the output Q/DQ of the "
                     "ORT form: only layout ops (or a scale or shift by a constant) lead from them to the model's "
                     "outputs, so no INT8 layer reads them "
                     f"and a Q/DQ would only round and clip what the model returns: {shown}")
    heavy = float_fallback_note(src, plan, placement)
    if heavy:
        notes.append(heavy)
    if fp16_bodies:
        notes.append(f"{len(fp16_bodies)} control-flow node(s) of FP16 groups compute their bodies in "
                     f"float16 too: {', '.join(map(repr, fp16_bodies[:5]))} (a Loop/Scan body or If branch the "
                     "table calibrated keeps its nodes beyond float16's range in float32 one by one; other "
                     "bodies only as a whole, when a value entering or leaving them passes float16's)")
    if fp32.kept:
        worst_kept = sorted(fp32.kept.items(), key=lambda kv: -kv[1][1])
        shown = ", ".join(f"{n!r} ({t!r} up to {v:.3g})" for n, (t, v) in worst_kept[:5])
        notes.append(f"{len(worst_kept)} node(s) of FP16 groups compute in FP32: calibration saw their "
                     f"activations beyond {fp16_data_max:g} (float16 ends at 65504): {shown}")
    if fp32.kept_small:
        shown = ", ".join(f"{n!r} ({t!r} up to {v:.3g})" for n, (t, v) in list(fp32.kept_small.items())[:5])
        notes.append(f"{len(fp32.kept_small)} node(s) of FP16 groups compute in FP32: calibration saw every value "
                     f"of an activation they read or write below float16's smallest ({FP16_TINY:.3g}), so small that "
                     f"float16 reads it as 0: {shown}")
    if fp32.guards:
        shown = ", ".join(f"{n!r} ({t!r} = {v:.3g})" for n, (t, v) in list(fp32.guards.items())[:5])
        notes.append(f"{len(fp32.guards)} node(s) of FP16 groups compute in FP32: they read a guard constant that "
                     f"float16 reads as 0 (its smallest value is {FP16_TINY:.3g}; an epsilon before a Log or under a division, "
                     f"where 0 gives -inf or inf): {shown}")
    if fp32.phases:
        shown = ", ".join(f"{n!r} ({t!r} up to {v:.3g})" for n, (t, v) in list(fp32.phases.items())[:5])
        notes.append(f"{len(fp32.phases)} node(s) of FP16 groups compute in FP32: a Sin/Cos argument beyond "
                     f"{PHASE_LIMIT:g} rad (a timestep or position embedding), which float16 would round by up to "
                     f"|x| * 2**-11 rad, and what computes it: {shown}")
    return notes


FP32_FALLBACK_PHRASE = "with no INT8 form that fell back to FP32"
"""What :func:`float_fallback_note` says, for readers of a written model's notes (``quantlab run``'s messages)."""


def float_fallback_note(src: onnx.ModelProto, plan: ResolvedPlan, placement: Placement) -> str | None:
    """A note when a tenth or more of the weights sit in groups INT8 was asked of but that have no INT8 form
    (an LSTM, a weight-only Gather) and fell back to FP32: ddddocr's LSTM held 31 % of them, so its "INT8"
    engine came out larger than the FP16 one while the build said "int8 on 100 % of quantizable groups"."""
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
    sizes = {i.name: int(np.prod(i.dims)) for i in src.graph.initializer if i.data_type in floats}
    total = sum(sizes.values())
    fallback = [g for g in plan.groups if plan.precision[g.name] == FP32
                and plan.reasons.get(g.name, "").startswith("fallback")]
    nodes = placement.nodes
    index = placement.index_of
    constant = _constant_tensors(src)
    # a group computing on weights alone (DeBERTa's query projection of its relative-position table) is folded by
    # TensorRT's builder into a constant: nothing of it runs in FP32
    fallback = [g for g in fallback if not all(t in constant for n in g.nodes for t in nodes[index[n]].input if t)]
    # weights a Gather picks for an INT8 layer (a MoE's experts) reach it through its activation Q/DQ: they run INT8
    quantized = {placement.source_of(slot.tensor) for slot in placement.slots.values() if slot.kind == "activation"}
    fallback = [g for g in fallback if g.output_tensor not in quantized or placement.gathered_table(g.output_tensor)
                is None]
    read = {g.name: {t for n in g.nodes for t in nodes[index[n]].input if t in sizes
                     and nodes[index[n]].op_type not in SHAPE_ONLY_OPS}  # Shape(W) reads no value
            for g in fallback}
    held = {g: sum(sizes[t] for t in names) for g, names in read.items()}
    kept = set().union(*read.values())  # a table six unrolled steps' Gathers read counts once
    share = sum(sizes[t] for t in kept) / total if total else 0.0
    if share < 0.1:
        return None
    alike: dict[frozenset[str], list[str]] = {}  # groups reading the same weights are named together
    for g, names in read.items():
        if held[g] >= 0.01 * total:
            alike.setdefault(frozenset(names), []).append(g)
    biggest = sorted(alike.items(), key=lambda kv: -held[kv[1][0]])[:3]
    return (f"{share:.0%} of the weights are in groups {FP32_FALLBACK_PHRASE} ("
            + ", ".join(_named(groups) + f" {held[groups[0]] / total:.0%}" for _, groups in biggest)
            + "): a plan fallback of fp16 "
            "(`quantlab build --fallback fp16`, or fallback = \"fp16\" in a plan file) runs them in FP16")


def _named(groups: Sequence[str]) -> str:
    """``'a'``, or ``'a' and 2 other group(s) reading the same weights``."""
    more = f" and {len(groups) - 1} other group(s) reading the same weights" if len(groups) > 1 else ""
    return f"{groups[0]!r}{more}"


_NOT_FOLDED = RANDOM_OPS | CONTROL_FLOW_OPS


def _constant_tensors(model: onnx.ModelProto) -> set[str]:
    """The main graph's tensors computed from initializers and Constant nodes alone (a builder folds them)."""
    known = {i.name for i in model.graph.initializer} - {i.name for i in model.graph.input}
    for node in model.graph.node:  # a loaded model's nodes are in topological order
        if node.op_type in _NOT_FOLDED:
            continue
        if node.op_type == "Constant" or all(t in known for t in node.input if t):
            known.update(o for o in node.output if o)
    return known

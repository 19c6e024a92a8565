"""Which activation tensors to calibrate: every float activation, or only those an INT8 plan can put a Q/DQ on.

    x ─► Conv ─► t ─► Clip ─► y ─► [Q/DQ] ─► next Conv       t: fused pre-activation (scope "quantizable" skips it)
    ids ─► ... ─► RMSNorm internals, mask, bucket maths ─►   only float ops read them: skipped too
"""

from __future__ import annotations

import onnx

from ..errors import CalibrationError
from ..graph import activation_names, consumer_map, producer_map
from ..graph.topology import SAME_VALUE_OPS
from ..methods import TENSOR_SCOPES
from ..plan.groups import fusion_groups, node_names

__all__ = ["TENSOR_SCOPES", "fused_preactivations", "probability_tensors", "quantizable_tensors", "scope_tensors",
           "unquantized_tensors"]


_FUSING_PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization")
_FUSED_ACTIVATIONS = ("Relu", "Clip")


def fused_preactivations(proto: onnx.ModelProto) -> list[str]:
    """Conv/Gemm/MatMul/BatchNorm outputs read only by a Relu or Clip (and not graph outputs).

    TensorRT (and ONNX Runtime's QLinearConv) fuse the activation into the
    producer, so no Q/DQ ever sits on these tensors: their ranges are never
    used. On CNNs they hold about half of all activation values, so leaving them
    out halves the statistics work::

        x ─► Conv ─► t ─► Clip ─► y ─► [Q/DQ] ─► next Conv       t: fused pre-activation
    """
    producers = producer_map(proto)
    consumers = consumer_map(proto)
    outputs = {o.name for o in proto.graph.output}
    return [
        name for name in activation_names(proto, include_inputs=False)
        if name in producers and producers[name].op_type in _FUSING_PRODUCERS and name not in outputs
        and consumers.get(name) and all(c.op_type in _FUSED_ACTIVATIONS for c in consumers[name])
    ]


def quantizable_tensors(proto: onnx.ModelProto) -> set[str]:
    """The float activations some INT8 plan may put a Q/DQ on: the activation inputs and outputs of every quantizable
    fusion group (quantlab.plan.groups), a conv anchor's output unless a Relu/Clip fuses it (the ORT target
    quantizes it for QLinearConv; a MatMul's before its bias Add and Sigmoid it does not: YOLOS's box head), and a
    residual Add's inputs; not a model output, unless such a group reads it.

    A superset of what the writer quantizes for either target (an ONNX Runtime target also quantizes a conv's
    output before a BatchNorm or a residual Add, inside its group). Everything else only float ops read: an
    RMSNorm's internals, a mask, T5's bucket arithmetic, the Sigmoid inside a SiLU; a small T5 encoder has 120
    tensors of which 36 can get a Q/DQ.
    """
    return _quantizable_among(proto, activation_names(proto))


def _quantizable_among(proto: onnx.ModelProto, names: list[str]) -> set[str]:
    """:func:`quantizable_tensors` among ``names`` (the model's activation names, computed once by the caller)."""
    fused = set(fused_preactivations(proto))
    nodes = dict(zip(node_names(proto), proto.graph.node, strict=True))
    inputs: set[str] = set()
    out: set[str] = set()
    for group in fusion_groups(proto):
        if not group.quantizable:
            continue
        inputs.update(group.input_tensors)
        out.update(group.output_tensors or (group.output_tensor,))
        anchor = nodes[group.nodes[0]]
        if anchor.op_type in ("Conv", "ConvTranspose") and len(group.nodes) > 1:  # its output (ORT target: fused)
            out.update(t for t in anchor.output if t and t not in fused)
        if group.residual_input:  # the residual Add's inputs: the skip, and the conv branch (ORT target)
            inputs.update(t for name in group.nodes for t in nodes[name].input
                          if group.residual_input in nodes[name].input and t)
    # the writer puts no output Q/DQ on what the model returns (YOLOS's pred_boxes topped `coverage`'s worst
    # tensors, quantized by no plan): a model output counts when a quantizable group reads it
    returned = {o.name for o in proto.graph.output}
    return (inputs | (out - returned)) & set(names)


def unquantized_tensors(proto: onnx.ModelProto) -> frozenset[str]:
    """The float activations no INT8 plan puts a Q/DQ on (the complement of :func:`quantizable_tensors`): their
    ranges are never used, so their calibration notes are milder."""
    names = activation_names(proto)
    quantizable = _quantizable_among(proto, names)
    return frozenset(n for n in names if n not in quantizable)


def probability_tensors(proto: onnx.ModelProto) -> frozenset[str]:
    """The main graph's Softmax outputs, and the tensors that hold them unchanged: attention probabilities, whose
    largest values (the keys a query attends to) matter most (quantlab.calibrate keeps their whole range)."""
    out: set[str] = set()
    for node in proto.graph.node:  # a loaded model's nodes are in topological order
        # a Llama's attention Softmax is Cast before its MatMul with V
        if node.op_type == "Softmax" or (node.op_type in SAME_VALUE_OPS and node.input and node.input[0] in out):
            out.update(o for o in node.output if o)
    return frozenset(out)


def scope_tensors(proto: onnx.ModelProto, scope: str = "all") -> list[str]:
    """The tensors calibrated for ``scope`` (one of :data:`TENSOR_SCOPES`), in topological order."""
    names = activation_names(proto)
    if scope == "all":
        return names
    if scope == "quantizable":
        wanted = _quantizable_among(proto, names)
        return [n for n in names if n in wanted]
    raise CalibrationError(f"unknown tensor scope {scope!r}; choose one of {', '.join(TENSOR_SCOPES)}")

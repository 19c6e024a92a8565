"""Whether a loaded model is one quantlab can calibrate and write: float activations to measure, computed in float32.

Both refusals name the model and say what to give instead (the float model an already quantized one was made
from, the FP32 export of a float16 one).
"""

from __future__ import annotations

import onnx

from ..errors import ModelError
from .load import LoadedModel, activation_names
from .topology import all_nodes

__all__ = ["QUANTIZED_OPS", "check_float32", "check_float_activations", "check_not_quantized"]

QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger", "QLinearConv",
    "QLinearMatMul", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm", "QAttention",
    "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearGlobalAveragePool", "QLinearAveragePool",
    "QLinearLeakyRelu", "QLinearSigmoid", "QLinearSoftmax", "QLinearWhere", "QuantizeBFP", "DequantizeBFP",
    "MatMulNBits", "MatMulBnb4", "GatherBlockQuantized", "QMoE", "QOrderedMatMul", "DynamicQuantizeLinearInteger",
})
"""Ops of a model that is already quantized (ONNX Q/DQ and integer ops, ONNX Runtime's static, dynamic and
weight-only forms): its float tensors are dequantized values or int32 accumulators, not activations to calibrate."""


def check_not_quantized(model: LoadedModel) -> None:
    """ModelError naming the model and its quantized ops: calibrating one measures accumulators and dequantized
    values (ORT's dynamic quantization leaves float tensors between ConvInteger and the next
    DynamicQuantizeLinear), and writing Q/DQ into it quantizes twice."""
    found: dict[str, str] = {}
    for node in model.proto.graph.node:
        if node.op_type in QUANTIZED_OPS:
            found.setdefault(node.op_type, node.name or node.output[0])
    if found:
        shown = ", ".join(f"{op} (e.g. {name!r})" for op, name in sorted(found.items())[:4])
        raise ModelError(f"{model.label} is already quantized: it holds {shown}. quantlab calibrates and writes "
                         "INT8/FP16 from the float model: give the FP32 model this one was made from (a quantized "
                         "model can still be a candidate of `quantlab compare`).")


def check_float_activations(model: LoadedModel) -> None:
    """ModelError naming the model when it has no float activation: nothing for INT8 calibration to measure.

    An integer-only graph (ids to ids) or an already quantized one (QLinearConv, integer Q/DQ outputs) has no
    float tensor whose range could be calibrated; an empty table would be useless.
    """
    if activation_names(model.proto):
        return
    shown = ", ".join(f"{t.name!r} {t.dtype}" for t in model.inputs[:4]) or "none"
    quantized = sorted({n.op_type for n in model.proto.graph.node if n.op_type.startswith(("QLinear", "Quantize"))})
    hint = (f" It holds {', '.join(quantized)}: it is already quantized; calibrate the float model it was made from."
            if quantized else " INT8 calibration measures float activations; this model needs no calibration table.")
    raise ModelError(f"{model.label}: has no float activation tensors to calibrate (inputs: {shown}; "
                     f"no node outputs float32/float16).{hint}")


_HALF_TYPES = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}


def check_float32(model: LoadedModel, *, weights: bool = True) -> None:
    """ModelError for a model that already computes in float16/bfloat16 (inputs, or ``weights`` too): the
    writer's Q/DQ and FP16 casts are written around float32 tensors (opset 13-18 QuantizeLinear reads float32
    only). Calibrate refuses such a model too, before a pass whose table no build could use (a keep_io_types
    float16 export, float32 inputs over float16 weights, calibrated in full before build refused it).

    A half-precision input or weight that only Casts to float32 read (the float32 network of an export whose I/O is
    float16; a weight stored in float16 for a graph output) is no such model, nor a weight no node reads."""
    g = model.proto.graph
    inits = {i.name for i in g.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in all_nodes(g):
        for t in node.input:
            readers.setdefault(t, []).append(node)
    half = [(f"input {i.name!r}", i.type.tensor_type.elem_type) for i in g.input
            if i.name not in inits and not _cast_up_only(readers.get(i.name, []))]
    half += [(f"weight {i.name!r}", i.data_type) for i in g.initializer
             if i.name in readers and not _cast_up_only(readers[i.name])] if weights else []
    found = next(((what, _HALF_TYPES[t]) for what, t in half if t in _HALF_TYPES), None)
    if found is not None:
        raise ModelError(
            f"{model.label} already computes in {found[1]} ({found[0]} is {found[1]}); quantlab writes INT8 and "
            "FP16 from the FP32 model (--precision fp16, or fp16 groups in a plan, make the FP16 parts). Give "
            "the FP32 export.")


def _cast_up_only(readers: list[onnx.NodeProto]) -> bool:
    """Whether ``readers`` are all Casts to float32 (and there is one)."""
    return bool(readers) and all(n.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT
                                                              for a in n.attribute) for n in readers)

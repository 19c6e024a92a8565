"""Which activation tensors to calibrate: every float activation, or only those that get a Q/DQ.

    x ─► Conv ─► t ─► Clip ─► y ─► [Q/DQ] ─► next Conv       t: fused pre-activation (scope "quantizable" skips it)
"""

from __future__ import annotations

import onnx

from ..errors import CalibrationError
from ..graph import activation_names, consumer_map, producer_map
from ..methods import TENSOR_SCOPES

__all__ = ["TENSOR_SCOPES", "fused_preactivations", "scope_tensors"]


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


def scope_tensors(proto: onnx.ModelProto, scope: str = "all") -> list[str]:
    """The tensors calibrated for ``scope`` (one of :data:`TENSOR_SCOPES`), in topological order."""
    names = activation_names(proto)
    if scope == "all":
        return names
    if scope == "quantizable":
        fused = set(fused_preactivations(proto))
        return [n for n in names if n not in fused]
    raise CalibrationError(f"unknown tensor scope {scope!r}; choose one of {', '.join(TENSOR_SCOPES)}")

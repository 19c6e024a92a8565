"""Where a model holds float16 values, and whether it computes on them.

Two questions with different answers for an FP16-simulated model (float32 ops with float16 round trips
``Cast(to fp16) -> Cast(to fp32)`` between them): it *holds* float16 values, but no op other than a Cast
*computes* on them. If/Loop/Scan bodies count (an FP16 group's bodies are written in float16 too, and an
optimum-style merged decoder has every layer in an If).
"""

from __future__ import annotations

import onnx

from .topology import nested_graphs

__all__ = ["computes_in_float16", "float16_values", "holds_float16"]

_F16 = onnx.TensorProto.FLOAT16


def float16_values(proto: onnx.ModelProto) -> set[str]:
    """Names of the model's float16 values, in its bodies too: inputs, initializers, Constant and Cast-to-float16
    outputs."""
    out: set[str] = set()
    for graph in nested_graphs(proto.graph):
        out |= {i.name for i in graph.input if i.type.tensor_type.elem_type == _F16}
        out |= {t.name for t in graph.initializer if t.data_type == _F16}
        for n in graph.node:
            if (n.op_type == "Cast" and any(a.name == "to" and a.i == _F16 for a in n.attribute)) or (
                    n.op_type == "Constant" and any(a.name == "value" and a.t.data_type == _F16 for a in n.attribute)):
                out.update(o for o in n.output if o)
    return out


def holds_float16(proto: onnx.ModelProto) -> bool:
    """Whether the model holds any float16 value (a native FP16 model does, an FP16-simulated one too)."""
    return bool(float16_values(proto))


def computes_in_float16(proto: onnx.ModelProto) -> bool:
    """Whether a node other than a Cast reads a float16 value: a native FP16 model, not an FP16-simulated one."""
    halves = float16_values(proto)
    return any(n.op_type != "Cast" and any(i in halves for i in n.input)
               for graph in nested_graphs(proto.graph) for n in graph.node)

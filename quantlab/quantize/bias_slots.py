"""Where the bias of a Conv/Gemm/MatMul is: its own input, or the constant of the Add that follows it.

Bias correction measures a shift per output channel of a layer and must then find the float
bias those channels get, both when it picks the layers to measure and when it writes the
corrected values. A Conv holds it as input 2 and a Gemm as C (at beta 1); a MatMul (torch's
``Linear`` on a sequence) or a Gemm at beta 0 gets it from a later ``Add`` of a constant::

    Conv(x, W, b)                      b: input 2
    Gemm(x, W, C) beta=1               C: input 2
    MatMul(x, W) -> [Reshape | Squeeze | Unsqueeze]* -> Add(., b)     b: the Add's constant

The views between a MatMul and its Add move rows, not channels (tf2onnx writes ``MatMul ->
Reshape -> Add``), so the Add's bias still lines up with the weight's N outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["bias_add", "bias_slot"]


def bias_add(readers: Mapping[str, list[onnx.NodeProto]], matmul: onnx.NodeProto,
             inits: Mapping[str, onnx.TensorProto]) -> tuple[onnx.NodeProto, int] | None:
    """The Add that alone reads ``matmul``'s output (a MatMul, or a Gemm without a bias of its own) and adds a
    constant bias of its N outputs (``[N]``, or ones then N); the Add and the index of the bias among its inputs.
    None when there is no such Add. ``readers``: the graph's consumer map (quantlab.graph.consumer_map).

    Reshapes to a constant shape that keeps the N outputs on the last axis, and Squeezes/Unsqueezes of other
    axes, may stand between them (tf2onnx: ``MatMul -> Reshape -> Add``, which had left every layer of its BERT
    uncorrected; ``Gemm(beta=0) -> Reshape -> Squeeze -> Add``): they move rows, not channels."""
    w = inits.get(matmul.input[1])
    if w is None or len(w.dims) != 2:
        return None
    n = int(w.dims[0] if _attr(matmul, "transB", 0) else w.dims[1])
    out, rank = matmul.output[0], 2 if matmul.op_type == "Gemm" else None
    for _ in range(4):
        found = readers.get(out, [])
        rank = _rank_keeping_last(found[0], inits, n, rank) if len(found) == 1 else None
        if rank is None:
            break
        out = found[0].output[0]
    readers = readers.get(out, [])
    if len(readers) != 1 or readers[0].op_type != "Add" or len(readers[0].input) != 2:
        return None
    add = readers[0]
    slot = 1 - list(add.input).index(out)
    bias = inits.get(add.input[slot])
    if bias is None:
        return None
    dims = list(bias.dims)
    if not dims or dims[-1] != n or any(d != 1 for d in dims[:-1]):
        return None
    return add, slot


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _rank_keeping_last(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto], size: int,
                       rank: int | None) -> int | None:
    """The output rank of ``node`` when it keeps the last axis (``size`` long) where it is, else None: a Reshape to
    a constant shape ending in ``size``, a Squeeze/Unsqueeze whose axes (constant; ``rank``: its input's rank, when
    known) leave the last one alone."""
    if node.op_type == "Reshape":
        shape = inits.get(node.input[1]) if len(node.input) > 1 else None
        dims = numpy_helper.to_array(shape).reshape(-1) if shape is not None else np.zeros(0)
        return int(dims.size) if dims.size and int(dims[-1]) == int(size) else None
    if node.op_type not in ("Squeeze", "Unsqueeze") or rank is None:
        return None
    given = inits.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    axes = [int(a) for a in numpy_helper.to_array(given).reshape(-1)] if given is not None else list(_attr(node, "axes", []))
    if not axes:
        return None  # a Squeeze of every 1: the last axis too when N is 1
    out_rank = rank - len(axes) if node.op_type == "Squeeze" else rank + len(axes)
    last = rank - 1 if node.op_type == "Squeeze" else out_rank - 1
    normal = {a + (rank if node.op_type == "Squeeze" else out_rank) if a < 0 else a for a in axes}
    return None if last in normal else out_rank


def bias_slot(node: onnx.NodeProto, readers: Mapping[str, list[onnx.NodeProto]],
              inits: Mapping[str, onnx.TensorProto]) -> tuple[onnx.NodeProto, int] | None:
    """Where the bias of a Conv/Gemm/MatMul anchor is (the node and input index): a Conv's input 2, a Gemm's C
    when it has one at beta 1, else the Add that follows (:func:`bias_add`; a Gemm's C at beta 0 adds nothing)."""
    if node.op_type == "Conv":
        return node, 2
    if node.op_type == "Gemm" and float(_attr(node, "beta", 1.0)) == 1.0:
        return node, 2
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] and float(_attr(node, "beta", 1.0)) != 0.0:
        return None  # a scaled C: the corrected bias would be scaled too
    return bias_add(readers, node, inits)

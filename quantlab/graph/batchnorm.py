"""BatchNormalization after a Conv or ConvTranspose, folded into its weight and bias at load (as TensorRT does at
build).

torch's dynamo exporter (and a legacy export without constant folding) keeps every BatchNorm as a node. The
TensorRT form is not hurt (TensorRT fuses Conv + BN + activation, and the Q/DQ sit around that group), but
ONNX Runtime's form quantizes the conv's output before the BN, inside the group: a Conv3d video model lost
10 dB to it (26.96 against 36.83 dB folded). Folded, the model is the one the legacy exporter writes::

    x ─► Conv(W, b) ─► c ─► BatchNormalization(γ, β, μ, σ², ε) ─► y
    ==>  x ─► Conv(W·s, (b − μ)·s + β) ─► y          s = γ / sqrt(σ² + ε), per output channel

A Conv's weight holds its output channels on axis 0 ``[C_out, C_in/G, k...]``; a ConvTranspose's on axis 1 within
each of its G groups ``[C_in, C_out/G, k...]`` (a DBNet text detector's upsampling head: ConvTranspose + BN + ReLU).

Only when the Conv's output has the BN as its only reader (and is no graph output nor read by a subgraph),
the BN is in inference form (one output, ``training_mode`` 0) and every parameter, the weight and the bias
are initializers. The folded weight is a new initializer (named after the Conv) when the old one has other
readers. The reference FP32 model is then the folded one: its outputs move by float32 rounding only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .topology import FoldSite, replace_folded

__all__ = ["fold_batchnorm_into_conv"]


def fold_batchnorm_into_conv(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with each foldable Conv (ConvTranspose) + BatchNormalization pair (module docstring) made one
    Conv (ConvTranspose); ``proto`` itself when there is none."""
    g = proto.graph
    if not any(n.op_type == "BatchNormalization" for n in g.node):
        return proto
    site = FoldSite.of(g)
    inits, readers, producers, keep = site.inits, site.readers, site.producers, site.keep
    pairs = [(producers[bn.input[0]], k) for k, bn in enumerate(g.node)
             if _foldable(bn, g.node, producers, inits, readers, keep)]
    if not pairs:
        return proto
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    made: list[onnx.TensorProto] = []
    for c, b in pairs:
        conv, bn = g.node[c], g.node[b]
        weight, bias = _folded(conv, bn, inits)
        w_name = conv.input[1] if readers[conv.input[1]] == 1 else f"{conv.name or conv.output[0]}/bn_folded_weight"
        b_name = f"{conv.name or conv.output[0]}/bn_folded_bias"
        made += [numpy_helper.from_array(weight, w_name), numpy_helper.from_array(bias, b_name)]
        source = conv.input[0]
        del conv.input[:]
        conv.input.extend([source, w_name, b_name])
        conv.output[0] = bn.output[0]
    replace_folded(g, {b for _, b in pairs}, made, readers, keep, {proto.graph.node[c].output[0] for c, _ in pairs})
    return out


def _foldable(bn: onnx.NodeProto, nodes: Sequence[onnx.NodeProto], producers: dict[str, int],
              inits: dict[str, onnx.TensorProto], readers: dict[str, int], keep: set[str]) -> bool:
    if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx") or len(bn.input) != 5:
        return False
    if len([o for o in bn.output if o]) != 1 or any(a.name == "training_mode" and a.i for a in bn.attribute):
        return False
    conv = nodes[producers[bn.input[0]]] if bn.input[0] in producers else None
    if conv is None or conv.op_type not in ("Conv", "ConvTranspose") or conv.domain not in ("", "ai.onnx"):
        return False
    if readers.get(bn.input[0], 0) != 1 or bn.input[0] in keep or len(conv.output) != 1:
        return False
    params = list(bn.input[1:]) + [t for t in conv.input[1:] if t]
    if len(conv.input) < 2 or any(t not in inits or t in keep for t in params):
        return False
    return all(inits[t].data_type == onnx.TensorProto.FLOAT for t in params)


def _folded(conv: onnx.NodeProto, bn: onnx.NodeProto, inits: dict[str, onnx.TensorProto]
            ) -> tuple[np.ndarray, np.ndarray]:
    """The Conv's new (weight, bias), computed in float64 and stored as float32."""
    gamma, beta, mean, var = (numpy_helper.to_array(inits[t]).astype(np.float64) for t in bn.input[1:5])
    eps = next((helper.get_attribute_value(a) for a in bn.attribute if a.name == "epsilon"), 1e-5)
    scale = gamma / np.sqrt(var + float(np.float32(eps)))
    weight = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
    bias = (numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 and conv.input[2]
            else np.zeros(scale.size))
    if conv.op_type == "ConvTranspose":  # [C_in, C_out/G, k...]: output channel g * C_out/G + j is group g's column j
        groups = next((int(helper.get_attribute_value(a)) for a in conv.attribute if a.name == "group"), 1)
        grouped = weight.reshape((groups, weight.shape[0] // groups, weight.shape[1]) + weight.shape[2:])
        shaped = scale.reshape((groups, 1, weight.shape[1]) + (1,) * (weight.ndim - 2))
        folded = (grouped * shaped).reshape(weight.shape)
    else:
        folded = weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    return folded.astype(np.float32), ((bias - mean) * scale + beta).astype(np.float32)

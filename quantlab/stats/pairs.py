"""Which calibrated tensors are a Relu or ``Clip(x, 0, h)`` of another calibrated tensor (quantlab.clipped).

Their statistics come from their input's pass (one binning of ``x`` gives both), so the model need not
expose them::

    x ──> Relu / Clip(min=0, max=h) ──> y        x exposed, y derived: {x: (y, h)}
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from ..clipped import derivable_limit
from ..folding import constant_node_value
from ..graph import LoadedModel, initializer_map, producer_map
from ..graph.load import tensor_specs

__all__ = ["clipped_pairs"]


def clipped_pairs(model: LoadedModel, tensors: Sequence[str], huge_threshold: float,
                  exposed: Collection[str]) -> dict[str, tuple[str, float]]:
    """``{x: (y, h)}`` for each ``y = Relu(x)`` (``h`` inf) or ``Clip(x, 0, h)`` with both ``x`` and ``y`` among
    ``tensors``, ``x`` among ``exposed`` (run out of the model), float32 where the graph says, and a
    constant ``0 < h < huge_threshold``. One ``y`` per ``x`` (the first in graph order); no ``x`` that is
    another pair's ``y``."""
    wanted = set(tensors)
    exposed = set(exposed)
    specs = tensor_specs(model.proto)
    inits = initializer_map(model.proto)
    producers = producer_map(model.proto)
    pairs: dict[str, tuple[str, float]] = {}
    taken: set[str] = set()
    for node in model.proto.graph.node:
        if node.op_type not in ("Relu", "Clip") or not node.input or len(node.output) != 1:
            continue
        x, y = node.input[0], node.output[0]
        if x not in exposed or y not in wanted or x == y or x in pairs or x in taken:
            continue  # one y per x; an x that is itself derived (Relu(Relu(x))) is not run out of the model
        if any(t not in specs or specs[t].dtype != "float32" for t in (x, y)):
            continue
        h = _upper_bound(node, inits, producers)
        if h is None or derivable_limit(h, huge_threshold) is None:
            continue
        pairs[x] = (y, h)
        taken.add(y)
    return pairs


def _upper_bound(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto],
                 producers: dict[str, onnx.NodeProto]) -> float | None:
    """``h`` of a Relu (inf) or of a Clip whose min is the constant +0.0 (-0.0 could give -0.0 outputs);
    None for any other Clip (a min below 0, a bound computed at run time)."""
    if node.op_type == "Relu":
        return math.inf
    attrs = {a.name: a for a in node.attribute}
    if "min" in attrs or "max" in attrs:  # opset < 11
        lo = attrs["min"].f if "min" in attrs else -math.inf
        hi = attrs["max"].f if "max" in attrs else math.inf
    else:
        bounds = [_scalar(node.input[i], inits, producers) if len(node.input) > i and node.input[i] else None
                  for i in (1, 2)]
        if len(node.input) < 2 or not node.input[1] or bounds[0] is None:
            return None
        if len(node.input) > 2 and node.input[2] and bounds[1] is None:
            return None
        lo, hi = bounds[0], (bounds[1] if bounds[1] is not None else math.inf)
    lo32 = np.float32(lo)
    if lo32 != 0.0 or np.signbit(lo32):
        return None
    return float(np.float32(hi)) if math.isfinite(hi) else math.inf


def _scalar(name: str, inits: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto]) -> float | None:
    if name in inits:
        value = numpy_helper.to_array(inits[name])
    elif name in producers and producers[name].op_type == "Constant":
        value = constant_node_value(producers[name])
    else:
        return None
    if value.size != 1 or value.dtype != np.float32:
        return None
    return float(value.reshape(()))

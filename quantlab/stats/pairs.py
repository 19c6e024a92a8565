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

from ..clipped import derivable_limit
from ..folding import clip_bounds
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
    """``h`` of a Relu (inf) or of a Clip whose min is the float32 constant +0.0 (-0.0 could give -0.0
    outputs) and whose max is a float32 constant or absent; None for any other Clip (a min below 0, a NaN
    max, a bound computed at run time)."""
    if node.op_type == "Relu":
        return math.inf
    bounds = clip_bounds(node, inits, producers)
    if bounds is None or bounds[0] is None or any(b is not None and b.dtype != np.float32 for b in bounds):
        return None
    lo, hi = bounds
    if lo != 0.0 or np.signbit(lo) or (hi is not None and np.isnan(hi)):
        return None
    return float(hi) if hi is not None and math.isfinite(hi) else math.inf

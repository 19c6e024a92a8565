"""Outputs a user reads as the masks their probabilities threshold to (:mod:`quantlab.metrics.masks`).

A Sigmoid writes them, through only ops that move, pick or resample its values::

    ConvTranspose ─► Sigmoid ─► output [N, 1, H, W]                 a text detector's map (DBNet): yes
    Gemm ─► Sigmoid ─► Reshape ─► output [N, 40]                    multi-label tags: yes
    Sigmoid ─► If(Squeeze | Identity) ─► ReduceMean ─► output [N]   voice activity (Silero): yes
    Sigmoid ─► Mul(anchors) ─► Add(grid) ─► output                  a YOLO head's boxes: no (numbers)
    MLP ─► Sigmoid ─► output [N, Q, 4]                              a DETR head's boxes: no (cx, cy, w, h in [0, 1])

Their masks (``p > CompareOptions.decision_threshold``, 0.5 by default: DBNet reads its map at 0.3) are
compared as the masks an integer or boolean output is (:data:`.choices.CHOICE_COLUMNS`: ``element_match``,
``exact_match``), plus ``mask_iou``, the overlap of the two foregrounds (%, mean over the samples where either
mask holds anything), which a sparse map's agreement hides. Cosine and SQNR stay: the values are numbers too.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import onnx

from ..graph import LoadedModel
from ..graph.topology import producer_map

__all__ = ["probability_outputs"]

_PROBABILITIES = frozenset({"Sigmoid", "HardSigmoid"})
_VALUES_KEPT = frozenset({"Identity", "Cast", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice",
                          "Gather", "Split", "Resize", "Upsample", "Dropout", "Concat", "ReduceMean", "ReduceMax",
                          "ReduceMin", "AveragePool", "GlobalAveragePool", "MaxPool", "GlobalMaxPool"})
"""Ops whose outputs are (resampled, pooled) values of their data input (the first; every input of a Concat): a
mean or a max of probabilities is one (Silero VAD's speech probability is a ReduceMean of a Sigmoid's frames)."""
_MAX_HOPS = 16


def probability_outputs(model: LoadedModel, taken: Collection[str] = ()) -> list[str]:
    """The float outputs a Sigmoid writes (see the module docstring), in output order, but not those in ``taken``
    (outputs already read otherwise: class scores, integer outputs)."""
    producers = producer_map(model.proto)
    return [spec.name for spec in model.outputs
            if spec.is_float and spec.name not in taken and not _boxes(spec.shape)
            and _from_probabilities(spec.name, producers, _MAX_HOPS)]


def _boxes(shape: tuple | None) -> bool:
    """``[N, Q, 4]`` (rank 3 or more, 4 last): boxes, as DETR, YOLOS and RT-DETR write them through a Sigmoid
    (normalised cx, cy, w, h): a box's corner is no decision (YOLOS's boxes "agreed" at 0.5 on 100 % of them)."""
    return shape is not None and len(shape) >= 3 and shape[-1] == 4


def _from_probabilities(tensor: str, producers: Mapping[str, onnx.NodeProto], hops: int) -> bool:
    node = producers.get(tensor)
    if node is None or hops == 0:
        return False
    if node.op_type in _PROBABILITIES:
        return True
    if node.op_type == "If":  # both branches hand on probabilities (Silero's If on a shape: Squeeze or not)
        index = list(node.output).index(tensor)
        branches = [a.g for a in node.attribute if a.name in ("then_branch", "else_branch")]
        return len(branches) == 2 and all(
            index < len(g.output) and _from_probabilities(
                g.output[index].name, {**producers, **{o: n for n in g.node for o in n.output if o}}, hops - 1)
            for g in branches)
    if node.op_type not in _VALUES_KEPT:
        return False
    data = [t for t in node.input if t] if node.op_type == "Concat" else node.input[:1]
    return bool(data) and all(_from_probabilities(t, producers, hops - 1) for t in data)

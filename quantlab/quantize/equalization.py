"""Cross-layer equalization (CLE) of consecutive convolutions: a float model rewritten into an equal float model.

Per-tensor INT8 weights fit a convolution whose output channels differ a lot in range (typical of
depthwise convolutions after BatchNorm folding) badly: the widest channel sets the scale and the
small ones keep a few levels. Scaling channel c of a conv's output by 1/s_c and the next conv's
input channel c by s_c leaves the function unchanged (through ReLU, which is positively
homogeneous); s_c = sqrt(r1_c * r2_c) / r2_c gives both ranges the value sqrt(r1_c * r2_c)
(Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction",
eq. 9; r = max |w| of the channel). Pairs sharing a conv (expand -> depthwise -> project) are
equalized in turn until the scales stop changing; the weights are then rounded to float32 once.

The rewrite of one pair (``a``, ``u``: the tensors between the convs; Clip(0, 6) is ReLU6)::

    x -> Conv1(W1, b1) -> a -> Clip(0, 6) -> u -> Conv2(W2) -> y
                          ==>
    x -> Conv1(W1/s, b1/s) -> a/equalized -> Relu [the Clip's name] -> u/equalized_relu
         -> Min(., 6/s [C,1,1]) [CLIP/equalized_max] -> u/equalized -> Conv2(W2 * s over input c) -> y

    relu6(v) / s = min(relu(v / s), 6 / s) for s > 0, so y is unchanged up to float32 rounding
    (the bound 6/s is the initializer CLIP/equalized_bound).
    With Relu (or Clip(0, no max), or no activation) nothing is inserted: only tensors are renamed.

``clip="skip"`` leaves pairs joined by a Clip with an upper bound alone instead of splitting it.
Tensors whose values change get derived names (``/equalized``...): every tensor that keeps its
original name keeps its value (the naming rule the comparator relies on,
:mod:`quantlab.quantize.provenance`), and every node keeps its name. Rewriting changes the
ranges calibration measures, so the equalized model is what gets calibrated and written: see
:func:`quantlab.quantize.prepare_model`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import QuantlabError
from ..fingerprint import sha256_bytes
from ..folding import clip_bounds
from ..graph import LoadedModel, serialize
from ..graph.topology import consumer_map, initializer_map, producer_map

__all__ = ["Equalization", "EqualizedModel", "equalize_model"]

ClipMode = Literal["split", "skip"]


@dataclass(frozen=True)
class Equalization:
    """How to equalize: ``clip`` what to do with a Clip(0, max) between two convs
    ("split" into Relu + per-channel Min, exact; "skip" the pair); ``max_iterations``
    sweeps over all pairs; ``tolerance``: stop when every scale of a sweep is within
    this relative distance of 1.

    ``max_activation_growth``: the most any channel of the tensor between two convs may be
    enlarged (accumulated s_c >= 1 / growth). Nagel's scales (``float("inf")``) look at the
    weights only; a channel they enlarge widens the per-tensor INT8 range of that activation
    for every other channel (a ReLU6 channel's bound 6 becomes 6 / s_c). bench/baseline.py,
    per-tensor weights + bias correction, logits cosine (top-1 agreement): EfficientNet-Lite0
    no CLE 0.967 (94.4 %), growth 1 0.988 (98.1 %), unbounded 0.960 (98.8 %); EfficientNet-Lite2
    0.946 (91.3 %), 0.978 (96.3 %), 0.783 (66.9 %). With per-channel weights CLE does not help
    (Lite0 0.9956 -> 0.9913), so it is off by default.
    """

    clip: ClipMode = "split"
    max_iterations: int = 100
    tolerance: float = 1e-6
    max_activation_growth: float = 1.0

    def __post_init__(self) -> None:
        if self.clip not in ("split", "skip"):
            raise QuantlabError(f"equalization clip mode must be 'split' or 'skip', got {self.clip!r}")
        if not self.max_activation_growth >= 1.0:
            raise QuantlabError(f"equalization max_activation_growth must be >= 1 (inf: no bound), got "
                                f"{self.max_activation_growth!r}")
        if not isinstance(self.max_iterations, int) or self.max_iterations < 1:
            raise QuantlabError(f"equalization max_iterations must be a whole number >= 1, got {self.max_iterations!r}")

    def describe(self) -> dict[str, Any]:
        return {"clip": self.clip, "max_iterations": self.max_iterations, "tolerance": self.tolerance,
                "max_activation_growth": self.max_activation_growth if np.isfinite(self.max_activation_growth) else None}


@dataclass(frozen=True)
class EqualizedModel:
    """The rewritten model and what was done: ``pairs`` (first conv, activation or None, second conv)."""

    model: LoadedModel
    source_sha256: str
    settings: Equalization
    pairs: tuple[tuple[str, str | None, str], ...]
    iterations: int
    converged: bool

    def record(self) -> dict[str, Any]:
        """What provenance and reports say about it (with the hash of the rewritten model)."""
        return {**self.settings.describe(), "pairs": [list(p) for p in self.pairs], "pair_count": len(self.pairs),
                "iterations": self.iterations, "converged": self.converged,
                "source_sha256": self.source_sha256, "equalized_sha256": self.model.sha256}


@dataclass
class _Pair:
    first: onnx.NodeProto
    act: onnx.NodeProto | None
    second: onnx.NodeProto
    clip_max: float | None          # the Clip's upper bound (to split), else None
    scale: np.ndarray                # accumulated s_c per channel of the tensor between the convs


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _conv_kind(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]) -> str | None:
    """'dense' (group 1) or 'depthwise' (one input channel per group) for a Conv with constant weights."""
    if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
        return None
    if len(node.input) > 2 and node.input[2] and node.input[2] not in inits:
        return None
    group = int(_attr(node, "group", 1))
    dims = list(inits[node.input[1]].dims)
    if group == 1:
        return "dense"
    return "depthwise" if len(dims) >= 2 and dims[1] == 1 and dims[0] % group == 0 else None


def _find_pairs(proto: onnx.ModelProto, settings: Equalization) -> list[_Pair]:
    """Conv -> [Relu | Clip(0, max) | nothing] -> Conv, every tensor between read once, weights not shared."""
    inits = initializer_map(proto)
    producers = producer_map(proto)
    readers = consumer_map(proto)
    outputs = {o.name for o in proto.graph.output}
    pairs = []
    for first in proto.graph.node:
        if _conv_kind(first, inits) is None or first.output[0] in outputs:
            continue
        nxt = readers.get(first.output[0], [])
        if len(nxt) != 1:
            continue
        act, clip_max, tensor = None, None, first.output[0]
        if nxt[0].op_type in ("Relu", "Clip"):
            act = nxt[0]
            if act.op_type == "Clip":
                bounds = clip_bounds(act, inits, producers)
                if bounds is None or bounds[0] is None or bounds[0] != 0.0:
                    continue
                clip_max = None if bounds[1] is None else float(bounds[1])
                if clip_max is not None and (settings.clip == "skip" or not clip_max > 0):
                    continue
            tensor = act.output[0]
            if tensor in outputs or len(readers.get(tensor, [])) != 1:
                continue
            nxt = readers[tensor]
        second = nxt[0]
        if _conv_kind(second, inits) is None or second.input[0] != tensor:
            continue
        shared = [n for n in (first.input[1:] + second.input[1:2]) if n and len(readers.get(n, [])) != 1]
        if shared:
            continue
        channels = inits[first.input[1]].dims[0]
        if _conv_kind(second, inits) == "depthwise" and int(_attr(second, "group", 1)) != channels:
            continue
        if _conv_kind(second, inits) == "dense" and inits[second.input[1]].dims[1] != channels:
            continue
        pairs.append(_Pair(first, act, second, clip_max, np.ones(channels)))
    return pairs


def _input_channel_absmax(w: np.ndarray, depthwise: bool, channels: int) -> np.ndarray:
    """max |w| over everything reading each input channel (a depthwise conv's output channels c*m..c*m+m-1)."""
    if depthwise:
        return np.abs(w).reshape(channels, -1).max(axis=1)
    return np.abs(np.moveaxis(w, 1, 0)).reshape(channels, -1).max(axis=1)


def _scale_input_channels(w: np.ndarray, s: np.ndarray, depthwise: bool) -> np.ndarray:
    if depthwise:
        m = w.shape[0] // s.shape[0]
        return w * np.repeat(s, m).reshape((-1,) + (1,) * (w.ndim - 1))
    return w * s.reshape((1, -1) + (1,) * (w.ndim - 2))


def _equalize_weights(pairs: list[_Pair], weights: dict[str, np.ndarray], settings: Equalization,
                      kinds: Mapping[str, str]) -> tuple[int, bool]:
    """Sweep the pairs (float64 masters in ``weights``) until every scale is ~1; (sweeps, converged)."""
    for sweep in range(1, settings.max_iterations + 1):
        worst = 0.0
        for p in pairs:
            w1, w2 = weights[p.first.input[1]], weights[p.second.input[1]]
            c = p.scale.shape[0]
            r1 = np.abs(w1).reshape(c, -1).max(axis=1)
            r2 = _input_channel_absmax(w2, kinds[p.second.name] == "depthwise", c)
            ok = (r1 > 0) & (r2 > 0) & np.isfinite(r1) & np.isfinite(r2)
            s = np.ones(c)
            s[ok] = np.sqrt(r1[ok] * r2[ok]) / r2[ok]
            if np.isfinite(settings.max_activation_growth):  # S_c >= 1 / growth: a[c] / S_c grows at most that much
                s = np.maximum(s, 1.0 / (settings.max_activation_growth * p.scale))
            weights[p.first.input[1]] = w1 / s.reshape((-1,) + (1,) * (w1.ndim - 1))
            if len(p.first.input) > 2 and p.first.input[2]:
                weights[p.first.input[2]] = weights[p.first.input[2]] / s
            weights[p.second.input[1]] = _scale_input_channels(w2, s, kinds[p.second.name] == "depthwise")
            p.scale = p.scale * s
            worst = max(worst, float(np.max(np.abs(s - 1.0))) if c else 0.0)
        if worst <= settings.tolerance:
            return sweep, True
    return settings.max_iterations, False


def _unique(name: str, taken: set[str]) -> str:
    while name in taken:
        name += "_"
    taken.add(name)
    return name


def _rename(proto: onnx.ModelProto, old: str, new: str) -> None:
    """Every reader and the producer of tensor ``old`` (and its value_info) use ``new``."""
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
    for vi in proto.graph.value_info:
        if vi.name == old:
            vi.name = new


def _rewrite_pair(proto: onnx.ModelProto, pair: tuple[str, str | None, float | None, np.ndarray],
                  taken: set[str]) -> None:
    """Rename the rescaled tensors; split a bounded Clip into Relu + per-channel Min (module docstring).

    ``pair``: (first conv's output, activation's output or None, the Clip's max or None, scales).
    """
    a, u, clip_max, scale = pair
    _rename(proto, a, _unique(f"{a}/equalized", taken))
    if u is None:
        return
    if clip_max is None:
        _rename(proto, u, _unique(f"{u}/equalized", taken))
        return
    index = next(i for i, n in enumerate(proto.graph.node) if u in n.output)
    act = onnx.NodeProto()
    act.CopyFrom(proto.graph.node[index])
    relu_out = _unique(f"{u}/equalized_relu", taken)
    min_out = _unique(f"{u}/equalized", taken)
    bound_name = _unique(f"{act.name or u}/equalized_bound", taken)
    _rename(proto, u, min_out)
    info = next((vi for vi in proto.graph.value_info if vi.name == min_out), None)
    rank = len(info.type.tensor_type.shape.dim) if info is not None and info.type.tensor_type.HasField("shape") else 4
    bound = (clip_max / scale).astype(np.float32).reshape((-1,) + (1,) * max(rank - 2, 0))
    proto.graph.initializer.append(numpy_helper.from_array(bound, bound_name))
    relu = helper.make_node("Relu", [act.input[0]], [relu_out], name=act.name)
    minimum = helper.make_node("Min", [relu_out, bound_name], [min_out],
                               name=_unique(f"{act.name or u}/equalized_max", taken))
    del proto.graph.node[index]
    proto.graph.node.insert(index, minimum)
    proto.graph.node.insert(index, relu)
    if info is not None:
        copy = proto.graph.value_info.add()
        copy.CopyFrom(info)
        copy.name = relu_out


def equalize_model(model: LoadedModel, settings: Equalization = Equalization()) -> EqualizedModel:
    """The model with every eligible conv pair equalized (module docstring); deterministic.

    A model with no eligible pair comes back unchanged (same proto, same hash).
    """
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    pairs = _find_pairs(proto, settings)
    if not pairs:
        return EqualizedModel(model, model.sha256, settings, (), 0, True)
    inits = initializer_map(proto)
    kinds = {n.name: _conv_kind(n, inits) or "" for p in pairs for n in (p.first, p.second)}
    names = {n for p in pairs for n in [*p.first.input[1:3], p.second.input[1]] if n}
    weights = {n: numpy_helper.to_array(inits[n]).astype(np.float64) for n in names}
    sweeps, converged = _equalize_weights(pairs, weights, settings, kinds)
    described = tuple((p.first.name, p.act.name if p.act is not None else None, p.second.name) for p in pairs)
    for name, value in weights.items():
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    taken = {i.name for i in proto.graph.initializer} | {o for n in proto.graph.node for o in n.output} \
        | {n.name for n in proto.graph.node} | {i.name for i in proto.graph.input}
    plain = [(p.first.output[0], p.act.output[0] if p.act is not None else None, p.clip_max, p.scale)
             for p in pairs]
    for pair in plain:
        _rewrite_pair(proto, pair, taken)
    onnx.checker.check_model(proto)
    rewritten = dataclasses.replace(model, proto=proto, sha256=sha256_bytes(serialize(proto)))
    return EqualizedModel(rewritten, model.sha256, settings, described, sweeps, converged)

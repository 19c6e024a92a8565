"""SmoothQuant: move the range of outlier activation channels into the weights of the MatMul/Gemm reading them.

Transformer activations (LayerNorm outputs above all) have a few channels 10-100x wider than the
rest; one per-tensor INT8 scale for that activation crushes every other channel, while the
weights are easy to quantize. For the linear layers reading such an activation X (input
channels j), SmoothQuant (Xiao et al. 2023) divides X_j by s_j and multiplies the weight's
row j by s_j: X W = (X diag(1/s)) (diag(s) W), exact in real arithmetic, with

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)     (max|X_j| over the calibration set;
                                                     max|W_j| over every layer reading X)

The division is folded into the LayerNormalization producing X when it can (its gamma and
beta), else a Mul is inserted; ``x`` is the activation, ``W`` a constant weight::

    LayerNorm(g, b) -> x -> MatMul(W)       ==>   LayerNorm(g/s, b/s) -> x/smoothed -> MatMul(diag(s) W)
    P -> x -> MatMul(W)   (P anything else) ==>   P -> x -> Mul(1/s) -> x/smoothed -> MatMul(diag(s) W)
         (other readers of x keep reading x)

Only activations whose channel maxima are spread out get smoothed: max_j / median_j of max|X_j|
at least ``outlier_ratio``. Like equalization, this changes the ranges calibration measures, so
the smoothed model is what gets calibrated and written (:func:`quantlab.quantize.prepare_model`);
:class:`SmoothQuant` records the scales, measured once, and the hash of the model they fit.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..atomic import write_json
from ..data import DataSet
from ..errors import QuantlabError
from ..fingerprint import sha256_bytes
from ..graph import LoadedModel, serialize
from ..graph.topology import consumer_map, initializer_map, producer_map
from .fp32_values import fp32_values

__all__ = ["SmoothQuant", "measure_smoothquant", "apply_smoothquant", "DEFAULT_OUTLIER_RATIO", "check_alpha",
           "save_smoothquant", "load_smoothquant", "SMOOTHQUANT_FORMAT"]

SMOOTHQUANT_FORMAT = "quantlab.smoothquant/1"

DEFAULT_OUTLIER_RATIO = 8.0
"""Smooth an activation when its widest channel is this many times its median channel (max|X_j|)."""


@dataclass(frozen=True)
class SmoothQuant:
    """Measured per-channel scales: ``activations`` maps each smoothed tensor to its s_j;
    ``model_sha256``: the model they were measured on (refused for any other)."""

    alpha: float
    activations: tuple[tuple[str, tuple[float, ...]], ...]
    samples: int
    model_sha256: str
    outlier_ratio: float = DEFAULT_OUTLIER_RATIO

    def describe(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "outlier_ratio": self.outlier_ratio, "samples": self.samples,
                "activations": [name for name, _ in self.activations], "model_sha256": self.model_sha256,
                "max_scale": max((max(v) for _, v in self.activations if v), default=1.0),
                "min_scale": min((min(v) for _, v in self.activations if v), default=1.0)}


def save_smoothquant(smooth: SmoothQuant, path: str | os.PathLike[str]) -> Path:
    """Write the scales as JSON (atomically), for ``quantlab build --smoothquant-scales``."""
    return write_json(path, {"format": SMOOTHQUANT_FORMAT, **dataclasses.asdict(smooth)})


def load_smoothquant(path: str | os.PathLike[str]) -> SmoothQuant:
    """Read :func:`save_smoothquant`'s file; a QuantlabError naming the file when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != SMOOTHQUANT_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {SMOOTHQUANT_FORMAT!r}")
        acts = tuple((str(name), tuple(float(v) for v in values)) for name, values in data["activations"])
        if any(not (v > 0) for _, values in acts for v in values):
            raise ValueError("a scale is not a positive number")
        return SmoothQuant(alpha=check_alpha(data["alpha"]), activations=acts, samples=int(data["samples"]),
                           model_sha256=str(data["model_sha256"]), outlier_ratio=float(data["outlier_ratio"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise QuantlabError(f"{path}: not a SmoothQuant scales file written by `quantlab calibrate --smoothquant` "
                            f"({exc}); calibrate again with --smoothquant ALPHA") from None


def check_alpha(alpha: float) -> float:
    """alpha in [0, 1] (0: nothing moves to the weights; 1: all of the activation's range does)."""
    if not (isinstance(alpha, (int, float)) and 0.0 <= float(alpha) <= 1.0):
        raise QuantlabError(f"SmoothQuant alpha must be a number in [0, 1] (0.5 is the paper's default), got {alpha!r}")
    return float(alpha)


def _weight_rows(node: onnx.NodeProto, w: np.ndarray) -> np.ndarray | None:
    """The weight as [input channel, output] (None when the layer's form is not handled)."""
    if node.op_type == "MatMul":
        return w if w.ndim == 2 else None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if int(attrs.get("transA", 0)) or w.ndim != 2:
        return None
    return w.T if int(attrs.get("transB", 0)) else w


def _candidates(proto: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Activation -> the MatMul/Gemm layers reading it as input 0 with a constant 2-D weight used only there."""
    inits = initializer_map(proto)
    readers = consumer_map(proto)
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[0] in inits:
            continue
        w = node.input[1]
        if w not in inits or len(readers.get(w, [])) != 1 or node.input[1] == node.input[0]:
            continue
        if _weight_rows(node, numpy_helper.to_array(inits[w])) is None:
            continue
        out.setdefault(node.input[0], []).append(node)
    return out


def _channel_absmax(model: LoadedModel, tensors: list[str], dataset: DataSet, batch_size: int,
                    max_samples: int | None) -> tuple[dict[str, np.ndarray], int]:
    """max |x| per last-axis channel of each tensor over the samples (ONNX Runtime, batch by batch)."""
    peaks: dict[str, np.ndarray] = {}
    seen = 0
    for take, values in fp32_values(model, tensors, dataset, batch_size, max_samples, purpose="SmoothQuant"):
        for name, x in values.items():
            peak = np.abs(x.reshape(-1, x.shape[-1])).max(axis=0).astype(np.float64)
            peaks[name] = np.maximum(peaks[name], peak) if name in peaks else peak
        seen += take
    return peaks, seen


def measure_smoothquant(model: LoadedModel, dataset: DataSet, alpha: float = 0.5, *,
                        outlier_ratio: float = DEFAULT_OUTLIER_RATIO, batch_size: int = 8,
                        max_samples: int | None = None) -> SmoothQuant:
    """Per-channel scales for every MatMul/Gemm input with outlier channels (module docstring)."""
    alpha = check_alpha(alpha)
    proto = model.proto
    inits = initializer_map(proto)
    groups = _candidates(proto)
    peaks, seen = _channel_absmax(model, sorted(groups), dataset, batch_size, max_samples) if groups else ({}, 0)
    chosen = []
    for name in sorted(groups):
        x_max = peaks[name]
        rows = [_weight_rows(n, numpy_helper.to_array(inits[n.input[1]])) for n in groups[name]]
        if any(r is None or r.shape[0] != x_max.shape[0] for r in rows):
            continue
        w_max = np.max([np.abs(r).max(axis=1) for r in rows], axis=0).astype(np.float64)
        median = float(np.median(x_max))
        if not (median > 0 and float(x_max.max()) >= outlier_ratio * median):
            continue
        ok = (x_max > 0) & (w_max > 0)
        s = np.ones_like(x_max)
        s[ok] = x_max[ok] ** alpha / w_max[ok] ** (1.0 - alpha)
        chosen.append((name, tuple(float(v) for v in s)))
    return SmoothQuant(alpha=alpha, activations=tuple(chosen), samples=seen, model_sha256=model.sha256,
                       outlier_ratio=outlier_ratio)


def _foldable_layernorm(proto: onnx.ModelProto, tensor: str, readers: Mapping[str, list[onnx.NodeProto]],
                        smoothed: list[onnx.NodeProto]) -> onnx.NodeProto | None:
    """The LayerNormalization (last axis, constant gamma/beta read only by it) whose output only ``smoothed`` read."""
    node = producer_map(proto).get(tensor)
    inits = initializer_map(proto)
    if node is None or node.op_type != "LayerNormalization" or node.output[0] != tensor:
        return None
    if tensor in {o.name for o in proto.graph.output} or len(readers.get(tensor, [])) != len(smoothed):
        return None
    axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), -1)
    params = [n for n in node.input[1:3] if n]
    if axis != -1 or any(p not in inits or len(readers.get(p, [])) != 1 for p in params):
        return None
    return node


def _smooth_one(proto: onnx.ModelProto, tensor: str, layer_outputs: list[str], s: np.ndarray, taken: set[str]) -> None:
    """Scale the rows of every weight reading ``tensor`` by ``s``; divide ``tensor`` (LayerNorm fold or Mul)."""
    inits = initializer_map(proto)
    readers = consumer_map(proto)
    by_output = {n.output[0]: n for n in proto.graph.node if n.output}
    layers = [by_output[o] for o in layer_outputs]
    for node in layers:
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        trans_b = node.op_type == "Gemm" and any(a.name == "transB" and helper.get_attribute_value(a)
                                                 for a in node.attribute)
        w = w * (s[None, :] if trans_b else s[:, None])
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(w.astype(np.float32), node.input[1]))
    new = f"{tensor}/smoothed"
    while new in taken:
        new += "_"
    taken.add(new)
    ln = _foldable_layernorm(proto, tensor, readers, layers)
    if ln is not None:
        for p in [n for n in ln.input[1:3] if n]:
            v = numpy_helper.to_array(inits[p]).astype(np.float64) / s
            inits[p].CopyFrom(numpy_helper.from_array(v.astype(np.float32), p))
        ln.output[0] = new
        for vi in proto.graph.value_info:
            if vi.name == tensor:
                vi.name = new
    else:
        inv = f"{new}/inverse_scale"
        proto.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
        for node in layers:
            node.input[0] = new
        index = min(i for i, n in enumerate(proto.graph.node) if n.output and n.output[0] in layer_outputs)
        proto.graph.node.insert(index, helper.make_node("Mul", [tensor, inv], [new], name=f"{new}/scale"))
        return
    for node in layers:
        node.input[0] = new


def apply_smoothquant(model: LoadedModel, smooth: SmoothQuant) -> LoadedModel:
    """``model`` with the measured scales applied (module docstring); a new hash, same node names."""
    if smooth.model_sha256 != model.sha256:
        raise QuantlabError(f"the SmoothQuant scales were measured on the model with sha256 {smooth.model_sha256[:12]}"
                            f"..., not on {model.label} ({model.sha256[:12]}...); measure them again on this model "
                            "(quantlab.quantize.measure_smoothquant, after any equalization)")
    if not smooth.activations:
        return model
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    groups = _candidates(proto)
    taken = {i.name for i in proto.graph.initializer} | {o for n in proto.graph.node for o in n.output}
    for tensor, values in smooth.activations:
        layers = [n.output[0] for n in groups.get(tensor, [])]
        if not layers:
            raise QuantlabError(f"SmoothQuant: tensor {tensor!r} is not read by a MatMul/Gemm with a constant weight "
                                f"in {model.label}; measure the scales on this model")
        _smooth_one(proto, tensor, layers, np.asarray(values, dtype=np.float64), taken)
    onnx.checker.check_model(proto)
    return dataclasses.replace(model, proto=proto, sha256=sha256_bytes(serialize(proto)))

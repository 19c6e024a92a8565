"""Bias correction: fold the mean shift INT8 causes in each quantized Conv/Gemm/MatMul output into its bias.

Rounding weights (per tensor above all: a depthwise channel with small weights loses most
of its precision) and activations shifts the *mean* of a layer's output channel by a
constant; the next layers amplify it. Measured on the calibration set and subtracted from
the bias, that shift is gone (Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction", section 4.2, empirical form; NNCF's bias correction)::

    calibration set --> FP32 model with every quantized Conv/Gemm data input exposed
        per input x: the mean over samples of x and of Q(x) (fake-quantized exactly as written)
    shift[c] = mean over output positions of conv(W_q, E[Q(x)]) - conv(W, E[x])   (linear: exact)

    x --> Q --> DQ --+                          x --> Q --> DQ --+
      W int8 --> DQ -+--> Conv       ==>          W int8 --> DQ -+--> Conv      the same graph:
       b float ------+                    (b - shift) float -----+              only bias values

Samples of several shapes (text lines of several widths) have no one-sample mean image:
a layer whose inputs came in several shapes is measured from per-channel means instead,
``shift[o] = sum over c, k of Wq[o,c,k] E[Q(x)_c] - W[o,c,k] E[x_c]`` (the zero padding at the
borders is not counted: a small bias on narrow maps).

A MatMul with a weight initializer ``[K, N]`` (torch's ``Linear`` on a sequence: MatMul, then an Add
of the bias) is corrected from the means of its input's last axis over samples and tokens,
``shift[n] = E[Q(x)] @ Wq[:, n] - E[x] @ W[:, n]`` (linear: exact), folded into the Add's
constant bias; a MatMul whose output no such Add alone reads is left as it is.

Each layer's shift is measured with FP32 inputs (the layer alone), so one correction
serves every plan: :func:`write_model` applies it to the INT8 groups of the plan only. In
the TensorRT form the corrected bias is the float bias TensorRT already parses; in the
ONNX Runtime form it is quantized to int32 (scale s_x * s_w) as any bias is. A Conv/Gemm
without bias gets one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..atomic import write_json
from ..backends import get_backend
from ..data import DataSet
from ..errors import QuantlabError
from ..graph import LoadedModel, consumer_map
from ..graph.topology import drop_unread_initializers
from ..plan import ResolvedPlan, resolve_plan, uniform_plan
from ..precision import INT8
from ..table import CalibrationTable
from .options import WriteOptions
from .placement import Placement, Slot
from .prepare import check_prepared_table, prepare_model
from .input_means import InputMeans, fake_quantize, input_means
from .qparams import QParams, weight_qparams

__all__ = ["BiasCorrection", "measure_bias_correction", "apply_bias_correction", "fake_quantize",
           "save_bias_correction", "load_bias_correction", "BIAS_CORRECTION_FILE"]


@dataclass(frozen=True)
class BiasCorrection:
    """Per-channel shifts to subtract from the bias of each corrected layer (by node name).

    ``settings``: the write settings the shifts were measured for (target,
    per_channel_weights, reduce_range); :func:`apply_bias_correction` refuses others.
    """

    layers: tuple[tuple[str, tuple[float, ...]], ...]
    samples: int
    settings: tuple[tuple[str, Any], ...]

    def shift(self, node: str) -> np.ndarray | None:
        for name, values in self.layers:
            if name == node:
                return np.asarray(values, dtype=np.float64)
        return None

    @functools.cached_property
    def _peak(self) -> float:
        """The largest |shift| (every written model's provenance says it: computed once)."""
        return float(max((max(abs(v) for v in vals) for _, vals in self.layers if vals), default=0.0))

    def describe(self) -> dict[str, Any]:
        return {"layers": len(self.layers), "samples": self.samples, "settings": dict(self.settings),
                "max_abs_shift": self._peak}

    def to_dict(self) -> dict[str, Any]:
        """The shifts as JSON data (:func:`save_bias_correction`), so a build can apply what a search measured."""
        return {"format": BIAS_CORRECTION_FORMAT, "samples": self.samples, "settings": dict(self.settings),
                "layers": {name: list(values) for name, values in self.layers}}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> BiasCorrection:
        """The correction :meth:`to_dict` wrote; a QuantlabError naming ``where`` for anything else."""
        layers = data.get("layers") if isinstance(data, dict) else None
        if (not isinstance(data, dict) or data.get("format") != BIAS_CORRECTION_FORMAT or not isinstance(layers, dict)
                or not isinstance(data.get("settings"), dict) or not isinstance(data.get("samples"), int)
                or not all(isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)
                           for v in layers.values())):
            raise QuantlabError(f"{where}: not a bias correction file (format {BIAS_CORRECTION_FORMAT}) as `quantlab "
                                "search` / `quantlab run` write it (search/bias_correction.json)")
        return cls(layers=tuple((str(k), tuple(float(x) for x in v)) for k, v in layers.items()),
                   samples=data["samples"], settings=tuple(data["settings"].items()))


BIAS_CORRECTION_FORMAT = 1
"""Version of the bias correction file."""

BIAS_CORRECTION_FILE = "bias_correction.json"
"""Its name beside a search's plan.json: the shifts the final model's INT8 layers got (``build --bias-correction``)."""


def save_bias_correction(correction: BiasCorrection, path: str | Path) -> Path:
    """Write ``correction`` as JSON (atomically)."""
    return write_json(Path(path), correction.to_dict())


def load_bias_correction(path: str | Path) -> BiasCorrection:
    """Read a file :func:`save_bias_correction` wrote."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise QuantlabError(f"{path}: cannot read the bias correction file ({exc})") from None
    return BiasCorrection.from_dict(data, str(path))


def correction_settings(options: WriteOptions) -> tuple[tuple[str, Any], ...]:
    """What the shifts depend on besides the model and table (the float rewrites change the weights)."""
    return (("target", options.target), ("per_channel_weights", options.per_channel_weights),
            ("reduce_range", options.reduce_range),
            ("equalization", None if options.equalization is None else options.equalization.describe()["clip"]),
            ("smoothquant", None if options.smoothquant is None else options.smoothquant.model_sha256))


@dataclass(frozen=True)
class _Layer:
    node: onnx.NodeProto
    x: str
    x_qp: QParams | None
    w: np.ndarray
    axis: int | None

    @property
    def channel_axis(self) -> int:
        """The input axis the weight reduces: 1 for Conv/Gemm ([N, C, ...], [N, K]), the last for MatMul."""
        return -1 if self.node.op_type == "MatMul" else 1


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


def _bias_slot(node: onnx.NodeProto, readers: Mapping[str, list[onnx.NodeProto]],
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


def _layers(model: LoadedModel, placement: Placement, plan: ResolvedPlan) -> list[_Layer]:
    """The Conv/Gemm/MatMul anchors of INT8 groups whose weight is an initializer and whose data input is float
    (a MatMul also needs its bias Add: :func:`bias_add`)."""
    inits = {i.name: i for i in model.proto.graph.initializer}
    readers = consumer_map(model.proto)
    out = []
    for group in plan.groups_at(INT8):
        idx = placement.index_of.get(group.name)
        if idx is None:
            continue
        node = placement.nodes[idx]
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        if _bias_slot(node, readers, inits) is None:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and (int(attrs.get("transA", 0)) or float(attrs.get("alpha", 1.0)) != 1.0):
            continue
        w_slot: Slot | None = placement.slots.get((idx, 1))
        x_slot: Slot | None = placement.slots.get((idx, 0))
        if w_slot is None or w_slot.kind != "weight" or node.input[0] in inits:
            continue
        qp = x_slot.qparams if x_slot is not None and x_slot.kind == "activation" else None
        out.append(_Layer(node, node.input[0], qp, numpy_helper.to_array(inits[node.input[1]]), w_slot.axis))
    return out


def _input_means(model: LoadedModel, layers: list[_Layer], dataset: DataSet, batch_size: int,
                 max_samples: int | None) -> tuple[dict[tuple[str, int], InputMeans], int]:
    return input_means(model, {(lay.x, lay.channel_axis): lay.x_qp for lay in layers}, dataset, batch_size,
                       max_samples)


def _dequantized_weight(w: np.ndarray, axis: int | None, options: WriteOptions) -> np.ndarray:
    """The weight as the writer stores it: int8 times scale (per channel along ``axis`` or per tensor)."""
    if axis is not None and (w.ndim <= axis or w.shape[axis] == 0):
        axis = None
    qp, q = weight_qparams(w, axis, options.weight_qmax)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    return (q.astype(np.float32) * qp.scale.reshape(shape)).astype(np.float32)


def _conv_shift(layer: _Layer, wq: np.ndarray, mean_x: np.ndarray, mean_xq: np.ndarray) -> np.ndarray:
    """mean over positions of conv(Wq, E[Q(x)]) - conv(W, E[x]), run by ONNX Runtime (pads, groups...).

    ONNX Runtime's CPU Conv is float32 only, so the difference is computed from its two small
    terms, conv(Wq - W, E[x]) + conv(Wq, E[Q(x)] - E[x]), without cancellation.
    """
    attrs = {a.name: helper.get_attribute_value(a) for a in layer.node.attribute}
    shape = [1, *mean_x.shape]
    f32 = onnx.TensorProto.FLOAT
    nodes = [helper.make_node("Conv", ["x", "dw"], ["a"], **attrs),
             helper.make_node("Conv", ["dx", "wq"], ["b"], **attrs),
             helper.make_node("Add", ["a", "b"], ["y"])]
    graph = helper.make_graph(
        nodes, "bias_shift",
        [helper.make_tensor_value_info("x", f32, shape), helper.make_tensor_value_info("dx", f32, shape)],
        [helper.make_tensor_value_info("y", f32, None)],
        [numpy_helper.from_array((wq.astype(np.float64) - layer.w).astype(np.float32), "dw"),
         numpy_helper.from_array(wq.astype(np.float32), "wq")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    runner = get_backend("ort").build(proto)
    try:
        out = runner.run({"x": mean_x[None].astype(np.float32), "dx": (mean_xq - mean_x)[None].astype(np.float32)})
    finally:
        runner.close()
    y = np.asarray(out["y"], dtype=np.float64)
    return y.reshape(y.shape[1], -1).mean(axis=1)


def _channel_shift(layer: _Layer, wq: np.ndarray, mean_c: np.ndarray, mean_qc: np.ndarray) -> np.ndarray:
    """The Conv shift from per-channel input means (samples of several shapes): each output channel's
    weights summed over the kernel, times the means of the input channels its group reads."""
    group = next((int(helper.get_attribute_value(a)) for a in layer.node.attribute if a.name == "group"), 1)
    out_ch, per_group = layer.w.shape[0], layer.w.shape[1]
    reads = (np.arange(out_ch) // (out_ch // group))[:, None] * per_group + np.arange(per_group)[None, :]
    w = layer.w.astype(np.float64).reshape(out_ch, per_group, -1).sum(axis=2)
    w_q = wq.astype(np.float64).reshape(out_ch, per_group, -1).sum(axis=2)
    return (w_q * mean_qc[reads]).sum(axis=1) - (w * mean_c[reads]).sum(axis=1)


def _gemm_shift(layer: _Layer, wq: np.ndarray, mean_x: np.ndarray, mean_xq: np.ndarray) -> np.ndarray:
    trans_b = any(a.name == "transB" and helper.get_attribute_value(a) for a in layer.node.attribute)
    w, wq = (layer.w.T, wq.T) if trans_b else (layer.w, wq)
    return mean_xq.reshape(-1) @ wq.astype(np.float64) - mean_x.reshape(-1) @ w.astype(np.float64)


def _matmul_shift(wq: np.ndarray, w: np.ndarray, mean_c: np.ndarray, mean_qc: np.ndarray) -> np.ndarray:
    """E[Q(x)] @ Wq - E[x] @ W from the means of the input's last axis (over samples and tokens)."""
    return mean_qc @ wq.astype(np.float64) - mean_c @ w.astype(np.float64)


def measure_bias_correction(model: LoadedModel, table: CalibrationTable, dataset: DataSet,
                            options: WriteOptions = WriteOptions(), *, batch_size: int = 8,
                            max_samples: int | None = None) -> BiasCorrection:
    """Measure every quantizable Conv/Gemm/MatMul's output mean shift on ``dataset`` (module docstring).

    With ``options.equalization`` / ``options.smoothquant`` the shifts are measured on the rewritten
    model (:func:`quantlab.quantize.prepare_model`), the one ``table`` was calibrated on.
    """
    prepared = prepare_model(model, options)
    check_prepared_table(table, model, prepared)
    model = prepared.model
    plan = resolve_plan(uniform_plan("int8"), model.proto)
    placement = Placement(model, plan, table, options)
    placement.run()
    layers = _layers(model, placement, plan)
    means, seen = _input_means(model, layers, dataset, batch_size, max_samples)
    out = []
    for lay in layers:
        wq = _dequantized_weight(lay.w, lay.axis, options)
        mean = means[lay.x, lay.channel_axis]
        image = mean.image()
        if lay.node.op_type == "MatMul":
            shift = _matmul_shift(wq, lay.w, *mean.channels())
        elif image is None:  # inputs of several shapes: Conv from the per-channel means (Gemm has one shape)
            shift = _channel_shift(lay, wq, *mean.channels())
        else:
            shift = (_conv_shift if lay.node.op_type == "Conv" else _gemm_shift)(lay, wq, *image)
        if all(math.isfinite(v) for v in shift):
            out.append((lay.node.name, tuple(float(v) for v in shift)))
    return BiasCorrection(layers=tuple(out), samples=seen, settings=correction_settings(options))


def apply_bias_correction(model: LoadedModel, plan: ResolvedPlan, correction: BiasCorrection,
                          options: WriteOptions) -> tuple[LoadedModel, list[str]]:
    """A copy of ``model`` whose INT8 Conv/Gemm/MatMul anchors have corrected biases; the corrected nodes.

    The source hash stays the original model's: the written model derives from it plus the
    correction, which the provenance records.
    """
    if dict(correction.settings) != dict(correction_settings(options)):
        raise QuantlabError(f"the bias correction was measured for {dict(correction.settings)} but the model is "
                            f"written with {dict(correction_settings(options))}; measure it again with these "
                            "write options (quantlab.quantize.measure_bias_correction)")
    nodes_of_model = {n.name for n in model.proto.graph.node}
    foreign = [name for name, _ in correction.layers if name not in nodes_of_model]
    if foreign:
        shown = ", ".join(map(repr, foreign[:3])) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise QuantlabError(f"the bias correction names layer(s) {model.label} does not have ({shown}): it was "
                            "measured on another model. Use the bias_correction.json that the search of this model "
                            "wrote beside its plan.json.")
    int8 = {g.name for g in plan.groups_at(INT8)}
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    inits = {i.name: i for i in proto.graph.initializer}
    names = {i.name for i in proto.graph.initializer} | {o for n in proto.graph.node for o in n.output}
    applied = []
    replaced: set[str] = set()
    nodes = list(proto.graph.node)
    readers = consumer_map(proto)
    for node in nodes:
        shift = correction.shift(node.name) if node.name in int8 else None
        if shift is None:
            continue
        anchor = node.name
        found = _bias_slot(node, readers, inits)
        if found is None:
            continue
        target, slot = found  # a MatMul's bias is its Add's constant
        old = inits.get(target.input[slot]) if len(target.input) > slot and target.input[slot] else None
        if len(target.input) > slot and target.input[slot] and old is None:
            continue  # a computed bias: leave it
        bias = numpy_helper.to_array(old).astype(np.float64) if old is not None else np.zeros(shift.shape)
        if bias.reshape(-1).shape != shift.shape:
            continue
        name = f"{anchor}/corrected_bias"
        while name in names:
            name += "_"
        names.add(name)
        proto.graph.initializer.append(numpy_helper.from_array(
            (bias.reshape(-1) - shift).astype(np.float32).reshape(bias.shape), name))
        if old is not None:
            replaced.add(old.name)
        if len(target.input) > slot:
            target.input[slot] = name
        else:
            target.input.append(name)
        applied.append(anchor)
    if not applied:
        return model, []
    drop_unread_initializers(proto.graph, replaced)  # left in, ONNX Runtime warns of each
    return dataclasses.replace(model, proto=proto), applied


def bias_correction_record(correction: BiasCorrection | None, applied: list[str]) -> Mapping[str, Any] | None:
    """What the provenance says about the correction (None when none was asked)."""
    if correction is None:
        return None
    return {**correction.describe(), "applied": list(applied)}

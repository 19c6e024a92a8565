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

Measuring and applying are here; beside them, :mod:`~quantlab.quantize.bias_correction_file`
holds the shifts' value (:class:`BiasCorrection`) and its JSON file, and
:mod:`~quantlab.quantize.bias_slots` finds the bias each layer's shift goes into.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..backends import get_backend
from ..data import DataSet
from ..errors import QuantlabError
from ..graph import LoadedModel, consumer_map
from ..graph.topology import drop_unread_initializers
from ..plan import ResolvedPlan, resolve_plan, uniform_plan
from ..precision import INT8
from ..table import CalibrationTable
from .bias_correction_file import BIAS_CORRECTION_FILE, BiasCorrection, load_bias_correction, save_bias_correction
from .bias_correction_file import BIAS_CORRECTION_FORMAT as BIAS_CORRECTION_FORMAT
from .bias_slots import bias_add as bias_add
from .bias_slots import bias_slot
from .options import WriteOptions
from .placement import Placement, Slot
from .prepare import check_prepared_table, prepare_model
from .input_means import InputMeans, fake_quantize, input_means
from .qparams import QParams, weight_qparams

__all__ = ["BiasCorrection", "measure_bias_correction", "apply_bias_correction", "fake_quantize",
           "save_bias_correction", "load_bias_correction", "BIAS_CORRECTION_FILE"]


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


def _layers(model: LoadedModel, placement: Placement, plan: ResolvedPlan) -> list[_Layer]:
    """The Conv/Gemm/MatMul anchors of INT8 groups whose weight is an initializer and whose data input is float
    (a MatMul also needs its bias Add: :func:`~quantlab.quantize.bias_slots.bias_add`)."""
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
        if bias_slot(node, readers, inits) is None:
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
        found = bias_slot(node, readers, inits)
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

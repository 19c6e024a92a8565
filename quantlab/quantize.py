"""One writer for INT8 (explicit Q/DQ), FP16, FP32 and mixed-precision ONNX models.

:func:`write_model` takes the FP32 model, a precision plan (per fusion group,
see :mod:`quantlab.plan`) and a calibration table, and writes a model whose
types decide every layer's precision: TensorRT 11 and TensorRT-RTX build
*strongly typed* networks, so Q/DQ nodes and float16 tensors in the ONNX are
the whole story. ONNX Runtime runs the same model (real INT8 kernels on the
CPU for ``target="ort"``, a float simulation of the TensorRT form otherwise).

INT8 group, ``target="tensorrt"`` (TensorRT's recommended placement: quantize
the inputs of the fused kernel, int8 symmetric, zero point 0, float bias)::

    x ──► Q(s_x) ──► DQ ──┐                                skip ──► Q(s_k) ──► DQ ──┐
          W int8 ──► DQ ──┼──► Conv ──► [BN] ──► Add ◄──────────────────────────────┘
                b float ──┘                       └──► Relu ──► y (float; the next group's Q
                                                                    fuses into this kernel)

INT8 group, ``target="ort"`` (ONNX Runtime's fusable form: uint8 activations
from the table's min/max clipped to [-amax, amax], int32 bias with scale
s_x * s_w, and a Q/DQ on the group's output so DQ -> Conv -> Q becomes
QLinearConv; ORT drops a Relu/Clip standing before a Q whose zero point is 0,
so only other activations (LeakyRelu, swish, BatchNorm...) get a Q/DQ on the
conv's own output too, and a residual Add gets one on both inputs)::

    x ──► Q ──► DQ ──┐
     W int8 ──► DQ ──┼──► Conv ──► Relu ──► y ──► Q(s_y) ──► DQ ──► (every reader of y)
  b int32 ──► DQ ────┘

(On x86 CPUs without VNNI those fused uint8 x int8 kernels saturate with
full-range weights; ``WriteOptions(reduce_range=True)`` writes 7-bit weights
that cannot, and quantlab's ORT backend runs other Q/DQ models there unfused.)

Concat inputs share one scale (the widest of its inputs), so TensorRT and
ORT can concatenate in INT8 without requantizing::

    a ──► Q(s) ──► DQ ──┐
                        ├──► Concat        s = max(amax_a, amax_b) / 127
    b ──► Q(s) ──► DQ ──┘

FP16 group: its nodes compute in float16; Casts stand at region boundaries;
initializers get float16 copies (clipped to ±65504); ops in
``WriteOptions.fp32_ops`` (Softmax, reductions, ...) stay float32 inside the
region; graph inputs and outputs stay float32::

    x(f32) ──► Cast(f16) ──► Conv(f16) ──► Relu ──► y(f16) ──► Cast(f32) ──► fp32/int8 reader

``WriteOptions(fp16_simulation=True)`` (ONNX Runtime CPU accuracy runs only)
keeps float32 kernels and rounds every would-be-float16 tensor instead::

    x ──► Cast(f16) ──► Cast(f32) ──► Conv(w rounded) ──► y/fp32_exact ──► Cast(f16) ──► Cast(f32) ──► y

Naming rule (what the comparator relies on): every tensor of the original
graph keeps its name in the written graph and carries that tensor's value
(float32, or float16 inside fp16 regions; a graph output computed in float16
is cast back under its own name). Inserted nodes and tensors get derived
names (``x/q``, ``x/dq``, ``w/int8``, ``x/to_fp16``...). :class:`Provenance`
records the maps explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .atomic import write_bytes, write_json
from .errors import CalibrationError, ModelError, PlanError, QuantlabError
from .fingerprint import sha256_bytes, tool_versions
from .graph import LoadedModel, default_opset, outer_names, serialize, tensor_specs
from .version import __version__
from .plan import (
    FusionGroup,
    Precision,
    PrecisionPlan,
    ResolvedPlan,
    constant_names,
    fusion_groups,
    node_names,
    resolve_plan,
    save_plan,
    topological_order,
)
from .table import CalibrationTable, TensorRange, check_table_fits

__all__ = [
    "Target",
    "DEFAULT_FP32_OPS",
    "PROVENANCE_FORMAT",
    "WriteOptions",
    "Provenance",
    "WrittenModel",
    "write_model",
    "save_written",
    "load_provenance",
    "activation_qparams",
    "weight_qparams",
]

Target = Literal["tensorrt", "ort"]
PROVENANCE_FORMAT = "quantlab.provenance/1"

DEFAULT_FP32_OPS: tuple[str, ...] = (
    "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceProd", "Exp", "Log", "Pow", "Sqrt", "Reciprocal",
)
"""Ops kept in float32 inside fp16 regions: their range or accumulation overflows float16.
LayerNormalization is not here by default (TensorRT runs it in fp16 with fp32
accumulation); add it with ``WriteOptions(fp32_ops=DEFAULT_FP32_OPS + ("LayerNormalization",))``."""

_F32, _F16 = "float32", "float16"
_FP16_MAX = float(np.finfo(np.float16).max)
_TINY32 = float(np.finfo(np.float32).tiny)
_ACCEPT_ANY_INPUT = frozenset({"Shape", "Size", "Cast"})
_ONNX_DTYPE = {_F32: TensorProto.FLOAT, _F16: TensorProto.FLOAT16}


# --------------------------------------------------------------------------- options and results


@dataclass(frozen=True)
class WriteOptions:
    """How to write the model.

    ``target``: ``tensorrt`` (int8 symmetric activations, zero point 0, float
    bias: what TensorRT parsers accept) or ``ort`` (uint8 activations, int32
    bias, Q/DQ on int8 groups' outputs: what ORT fuses into QLinear kernels).
    ``per_channel_weights``: symmetric int8 per output channel (absmax of
    each channel / 127), else per tensor. ``fp32_ops``: op types kept float32
    inside fp16 regions. ``quantize_outputs`` / ``int32_bias``: None follows
    the target. ``check``: run the ONNX checker and a dtype self-check.

    ``reduce_range``: 7-bit weights (symmetric int8 in [-64, 64], ``scale =
    absmax / 64``), as ONNX Runtime's ``quantize_static(reduce_range=True)``.
    For ``target="ort"`` on x86 CPUs without VNNI: there ORT's uint8 x int8
    kernels (VPMADDUBSW) add pairs of products in saturating int16, so
    full-range weights (2 * 255 * 127 > 32767) give wrong results, while
    2 * 255 * 64 = 32640 always fits. Costs one bit of weight precision;
    TensorRT accumulates in int32 and never needs it.

    ``fp16_simulation``: for measuring FP16 accuracy on ONNX Runtime's CPU
    provider only. It has no float16 kernels for most ops: it inserts casts,
    computes in float32 and then removes cast pairs, so a native fp16 model
    there rounds only its weights, not its activations. This mode keeps every
    node float32 and rounds each tensor that would be float16 (weights too)
    through ``Cast(fp16) -> Cast(fp32)``, which ORT keeps. Never for TensorRT.
    """

    target: Target = "tensorrt"
    per_channel_weights: bool = True
    fp32_ops: tuple[str, ...] = DEFAULT_FP32_OPS
    quantize_outputs: bool | None = None
    int32_bias: bool | None = None
    fp16_simulation: bool = False
    check: bool = True
    reduce_range: bool = False

    def __post_init__(self) -> None:
        if self.target not in ("tensorrt", "ort"):
            raise QuantlabError(f"write target must be 'tensorrt' or 'ort', got {self.target!r}")
        object.__setattr__(self, "fp32_ops", tuple(self.fp32_ops))
        if self.target == "tensorrt" and self.int32_bias:
            raise QuantlabError("target 'tensorrt' cannot use int32 bias: TensorRT parsers reject "
                                "an int32 DequantizeLinear; use target 'ort' or int32_bias=False")

    @property
    def output_qdq(self) -> bool:
        return self.target == "ort" if self.quantize_outputs is None else self.quantize_outputs

    @property
    def bias_int32(self) -> bool:
        return self.target == "ort" if self.int32_bias is None else self.int32_bias

    @property
    def activation_dtype(self) -> str:
        return "int8" if self.target == "tensorrt" else "uint8"

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "per_channel_weights": self.per_channel_weights,
            "fp32_ops": list(self.fp32_ops),
            "quantize_outputs": self.output_qdq,
            "int32_bias": self.bias_int32,
            "activation_dtype": self.activation_dtype,
            "fp16_simulation": self.fp16_simulation,
            "reduce_range": self.reduce_range,
            "weight_qmax": self.weight_qmax,
        }

    @property
    def weight_qmax(self) -> int:
        """Largest int8 weight magnitude: 127, or 64 with ``reduce_range``."""
        return 64 if self.reduce_range else 127


@dataclass(frozen=True)
class Provenance:
    """How the written graph relates to the original one.

    ``tensor_map``: original tensor -> written tensor carrying its value
    (identity for every activation and graph I/O; a weight replaced by an
    INT8 initializer maps to its DequantizeLinear output, a weight used only
    in float16 to its float16 copy). ``tensor_dtype``: original tensor -> dtype
    of that written tensor. ``node_map``: original node -> written nodes (the
    node itself first, then the Q/DQ/Cast nodes feeding it or casting its
    output). ``quantized_inputs``: original tensor -> the Q/DQ inserted on it
    (``scale``, ``zero_point``, ``dtype``, ``axis``, ``kind``
    activation/weight/bias, ``output`` the DQ output, ``consumers``; a
    tensor quantized twice with different scales, e.g. a concat input, lists
    the others under ``variants``). ``group_precision``: group -> precision;
    ``node_group``: original node -> its group. ``inserted_nodes``: written
    node -> kind. ``meta``: hashes, options, table and tool versions.
    """

    tensor_map: Mapping[str, str]
    tensor_dtype: Mapping[str, str]
    node_map: Mapping[str, tuple[str, ...]]
    quantized_inputs: Mapping[str, Mapping[str, Any]]
    group_precision: Mapping[str, Precision]
    node_group: Mapping[str, str] = field(default_factory=dict)
    inserted_nodes: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PROVENANCE_FORMAT,
            "tensor_map": dict(self.tensor_map),
            "tensor_dtype": dict(self.tensor_dtype),
            "node_map": {k: list(v) for k, v in self.node_map.items()},
            "quantized_inputs": {k: dict(v) for k, v in self.quantized_inputs.items()},
            "group_precision": dict(self.group_precision),
            "node_group": dict(self.node_group),
            "inserted_nodes": dict(self.inserted_nodes),
            "notes": list(self.notes),
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Provenance:
        if data.get("format") != PROVENANCE_FORMAT:
            raise ModelError(f"not a quantlab provenance record (format {data.get('format')!r}, "
                             f"expected {PROVENANCE_FORMAT!r})")
        return cls(
            tensor_map=dict(data["tensor_map"]),
            tensor_dtype=dict(data["tensor_dtype"]),
            node_map={k: tuple(v) for k, v in data["node_map"].items()},
            quantized_inputs={k: dict(v) for k, v in data["quantized_inputs"].items()},
            group_precision=dict(data["group_precision"]),
            node_group=dict(data.get("node_group", {})),
            inserted_nodes=dict(data.get("inserted_nodes", {})),
            notes=tuple(data.get("notes", ())),
            meta=dict(data.get("meta", {})),
        )


@dataclass(frozen=True)
class WrittenModel:
    """A written model with everything needed to reproduce and align it."""

    proto: onnx.ModelProto = field(repr=False)
    provenance: Provenance = field(repr=False)
    plan: ResolvedPlan = field(repr=False)
    options: WriteOptions
    table_method: str | None
    source_sha256: str

    @property
    def sha256(self) -> str:
        return sha256_bytes(serialize(self.proto))


def load_provenance(path: str | os.PathLike[str]) -> Provenance:
    import json

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read provenance: {exc}") from None
    return Provenance.from_dict(data)


def save_written(written: WrittenModel, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``model.onnx``, ``provenance.json`` and ``plan.json`` (the effective plan), each atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "model": write_bytes(out / "model.onnx", serialize(written.proto)),
        "provenance": write_json(out / "provenance.json", written.provenance.to_dict()),
    }
    paths["plan"] = save_plan(written.plan.to_plan(), out / "plan.json", groups=written.plan.groups)
    return paths


# --------------------------------------------------------------------------- quantization parameters


@dataclass(frozen=True)
class QParams:
    """Scale (float32) and zero point of one Q/DQ pair; ``axis`` set for per-channel."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None

    def key(self) -> tuple[bytes, bytes, str, int | None]:
        return (self.scale.tobytes(), self.zero_point.tobytes(), self.zero_point.dtype.str, self.axis)

    def describe(self) -> dict[str, Any]:
        scale = self.scale.tolist()
        zp = self.zero_point.tolist()
        return {"scale": scale, "zero_point": zp, "dtype": self.zero_point.dtype.name, "axis": self.axis}


def activation_qparams(r: TensorRange, target: Target) -> QParams:
    """Per-tensor activation Q/DQ parameters from a calibrated range.

    tensorrt: int8, zero point 0, ``scale = amax / 127``. ort: uint8 over
    ``[max(min, -amax), min(max, amax)]`` widened to hold 0, ``scale =
    (hi - lo) / 255`` and ``zero_point = round(-lo / scale)``, computed in
    float64 then stored float32 as ONNX Runtime's quantizer does.
    """
    if target == "tensorrt":
        return QParams(np.array(r.scale, dtype=np.float32), np.array(0, dtype=np.int8))
    lo = min(max(float(r.min), -float(r.amax)), 0.0)
    hi = max(min(float(r.max), float(r.amax)), 0.0)
    scale64 = (hi - lo) / 255.0
    if np.float32(scale64) < _TINY32:
        return QParams(np.array(1.0, dtype=np.float32), np.array(0, dtype=np.uint8))
    zp = np.round(0.0 - lo / scale64)
    return QParams(np.array(scale64, dtype=np.float32), np.array(np.clip(zp, 0, 255), dtype=np.uint8))


def _fit_below(qp: QParams, upper: float) -> QParams:
    """Shrink a uint8 scale by float32 ulps until ``scale * (255 - zp)`` (float32) <= ``upper``.

    ONNX Runtime drops a Clip before a QuantizeLinear (so DQ -> Conv -> Clip -> Q
    becomes one QLinearConv) only when the Q's top value does not exceed the
    Clip's max; a ReLU6 output saturating at exactly 6 gives 255 * f32(6/255) > 6
    by rounding. A change of a few ulps keeps the numerics and lets it fuse.
    """
    if qp.zero_point.dtype != np.uint8:
        return qp
    scale = np.float32(qp.scale)
    span = np.float32(255 - int(qp.zero_point))
    limit = np.float32(upper)
    for _ in range(16):
        if np.float32(scale * span) <= limit:
            break
        scale = np.nextafter(scale, np.float32(0))
    return QParams(np.array(scale, dtype=np.float32), qp.zero_point, qp.axis)


def weight_qparams(w: np.ndarray, axis: int | None, qmax: int = 127) -> tuple[QParams, np.ndarray]:
    """Symmetric int8 weights: ``scale = absmax / qmax`` per channel along ``axis`` (or per tensor).

    Returns the parameters and the int8 weights ``clip(round(w / scale), -qmax, qmax)``
    (float32 division, round half to even); an all-zero channel gets scale 1.
    ``qmax`` is 127, or 64 for reduced-range (7-bit) weights; the scale is
    computed as ``2 * absmax / (2 * qmax)`` in float64, then stored float32,
    as ONNX Runtime's quantizer does, so both give the same bytes.
    """
    if qmax not in (127, 64):
        raise QuantlabError(f"int8 weight range must be 127 or 64 (reduce_range), got {qmax}")
    w32 = np.asarray(w, dtype=np.float32)
    if axis is None:
        absmax = np.abs(w32).max(initial=0.0).astype(np.float32).reshape(())
    else:
        reduce = tuple(i for i in range(w32.ndim) if i != axis)
        absmax = np.abs(w32).max(axis=reduce, initial=0.0).astype(np.float32)
    scale64 = 2.0 * absmax.astype(np.float64) / (2.0 * qmax)
    scale = scale64.astype(np.float32)
    scale = np.where(scale < _TINY32, np.float32(1.0), scale).astype(np.float32)
    shape = [1] * w32.ndim
    if axis is not None:
        shape[axis] = -1
    q = np.clip(np.round(w32 / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    zp = np.zeros(scale.shape, dtype=np.int8)
    return QParams(scale, zp, axis), q


def _combine_ranges(ranges: Sequence[TensorRange]) -> TensorRange:
    """The union range of concat inputs: widest amax, lowest min, highest max."""
    return TensorRange(amax=max(r.amax for r in ranges), min=min(r.min for r in ranges),
                       max=max(r.max for r in ranges))


# --------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class _Slot:
    """What to do with one input of one node: quantize as activation / weight / bias."""

    kind: Literal["activation", "weight", "bias"]
    tensor: str
    qparams: QParams | None = None  # activations
    axis: int | None = None  # weights
    weight_tensor: str | None = None  # bias: the weight it pairs with
    input_qparams: QParams | None = None  # bias: the activation scale


class _Placement:
    """Decides every Q/DQ of the model before anything is written (so errors come first)."""

    def __init__(self, model: LoadedModel, plan: ResolvedPlan, table: CalibrationTable | None,
                 options: WriteOptions) -> None:
        self.proto = model.proto
        self.plan = plan
        self.table = table
        self.options = options
        self.nodes = list(self.proto.graph.node)
        self.names = node_names(self.proto)
        self.index_of = {n: i for i, n in enumerate(self.names)}
        self.constants = constant_names(self.proto)
        self.graph_outputs = {o.name for o in self.proto.graph.output}
        self.specs = tensor_specs(self.proto)
        self.producers = {o: n for n in self.nodes for o in n.output if o}
        self.initializers = {i.name: i for i in self.proto.graph.initializer}
        self.slots: dict[tuple[int, int], _Slot] = {}
        self.output_qdq: dict[str, QParams] = {}  # tensor -> qparams every reader goes through
        self.missing: list[tuple[str, str]] = []  # (group, tensor)
        self.huge: list[tuple[str, str, int]] = []

    def _range(self, tensor: str, group: FusionGroup) -> TensorRange | None:
        if self.table is None or tensor not in self.table.ranges:
            self.missing.append((group.name, tensor))
            return None
        r = self.table.ranges[tensor]
        huge = int(r.excluded.get("huge", 0)) if r.excluded else 0
        if huge:
            self.huge.append((group.name, tensor, huge))
        return r

    def _activation(self, tensor: str, group: FusionGroup) -> QParams | None:
        r = self._range(tensor, group)
        if r is None:
            return None
        qp = activation_qparams(r, self.options.target)
        clip_max = self._clip_max(tensor) if self.options.target == "ort" else None
        return qp if clip_max is None else _fit_below(qp, clip_max)

    def _clip_max(self, tensor: str) -> float | None:
        """The constant upper bound of the Clip producing ``tensor`` (None if not a Clip output)."""
        producer = self.producers.get(tensor)
        if producer is None or producer.op_type != "Clip":
            return None
        if len(producer.input) > 2 and producer.input[2]:
            init = self.initializers.get(producer.input[2])
            return None if init is None else float(numpy_helper.to_array(init).reshape(()))
        for a in producer.attribute:  # opset < 11
            if a.name == "max":
                return float(a.f)
        return None

    def _is_float_activation(self, tensor: str) -> bool:
        spec = self.specs.get(tensor)
        return bool(tensor) and tensor not in self.constants and (spec is None or spec.dtype == _F32)

    def run(self) -> None:
        for group in self.plan.groups:
            if self.plan.precision[group.name] != "int8":
                continue
            if group.is_compute:
                self._compute_group(group)
            elif group.anchor_op == "Concat":
                self._concat_group(group)
            else:
                idx = self.index_of[group.name]
                t = self.nodes[idx].input[0]
                if self._is_float_activation(t):
                    self._set_activation(idx, 0, t, group)
            if self.options.output_qdq:
                self._output(group)
        if self.missing:
            self._raise_missing()
        if self.huge:
            lines = "; ".join(f"{t!r} (group {g!r}, {n} huge values)" for g, t, n in self.huge[:8])
            raise CalibrationError(
                f"the plan quantizes tensor(s) that hold huge sentinel values at calibration: {lines}. "
                "INT8 would clip them to +-amax (e.g. an attention mask at float32.min would stop "
                "masking). Pin those groups to fp16 or fp32 in the plan."
            )

    def _raise_missing(self) -> None:
        seen: list[str] = []
        for g, t in self.missing:
            item = f"{t!r} (group {g!r})"
            if item not in seen:
                seen.append(item)
        if self.table is None:
            raise CalibrationError(
                f"the plan puts {len(self.plan.groups_at('int8'))} group(s) in int8 but no calibration "
                "table was given; run `quantlab calibrate` and pass --table, or use an fp16/fp32 plan."
            )
        more = f" and {len(seen) - 10} more" if len(seen) > 10 else ""
        raise CalibrationError(
            f"calibration table ({self.table.method}) has no range for {len(seen)} tensor(s) the plan "
            f"quantizes: {', '.join(seen[:10])}{more}. Recalibrate this model, or pin those groups "
            "to fp16/fp32."
        )

    def _set_activation(self, idx: int, slot: int, tensor: str, group: FusionGroup,
                        qparams: QParams | None = None) -> None:
        qp = qparams if qparams is not None else self._activation(tensor, group)
        if qp is not None:
            self.slots[(idx, slot)] = _Slot("activation", tensor, qparams=qp)

    def _weight_axis(self, node: onnx.NodeProto, slot: int, shape: tuple[int, ...]) -> int | None:
        if not self.options.per_channel_weights:
            return None
        op = node.op_type
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if op == "Conv" and slot == 1:
            return 0
        if op == "ConvTranspose" and slot == 1:
            return 1 if int(attrs.get("group", 1)) == 1 else None
        if op == "Gemm" and slot == 1:
            return 0 if int(attrs.get("transB", 0)) else 1
        if op == "MatMul" and slot == 1 and len(shape) == 2:
            return 1
        return None

    def _compute_group(self, group: FusionGroup) -> None:
        idx = self.index_of[group.name]
        node = self.nodes[idx]
        for slot in (0, 1):
            if slot >= len(node.input) or not node.input[slot]:
                continue
            t = node.input[slot]
            if t in self.constants:
                shape = tuple(self.specs[t].shape or ()) if t in self.specs else ()
                axis = self._weight_axis(node, slot, tuple(int(d) for d in shape if isinstance(d, int)))
                self.slots[(idx, slot)] = _Slot("weight", t, axis=axis)
            elif self._is_float_activation(t):
                self._set_activation(idx, slot, t, group)
        if self.options.bias_int32 and node.op_type in ("Conv", "Gemm") and len(node.input) > 2:
            self._bias(idx, node, group)
        if self.options.output_qdq and node.op_type in ("Conv", "ConvTranspose") and len(group.nodes) > 1:
            # ORT: DQ -> Conv -> Q is QLinearConv. It drops a Relu/Clip before a Q itself; anything
            # else after the conv (LeakyRelu, Sigmoid, BatchNorm...) needs the conv's output quantized.
            nxt_idx = self.index_of[group.nodes[1]]
            nxt = self.nodes[nxt_idx]
            if nxt.op_type not in ("Relu", "Clip") and group.residual_input not in nxt.input:
                for slot, t in enumerate(nxt.input):
                    if t == node.output[0]:
                        self._set_activation(nxt_idx, slot, t, group)
        if group.residual_input is not None:
            add_idx = next(self.index_of[n] for n in group.nodes if self.nodes[self.index_of[n]].op_type == "Add"
                           and group.residual_input in self.nodes[self.index_of[n]].input)
            add = self.nodes[add_idx]
            for slot, t in enumerate(add.input):
                if t == group.residual_input:
                    self._set_activation(add_idx, slot, t, group)
                elif self.options.output_qdq and self._is_float_activation(t):
                    # ORT: Conv -> Q lets it fuse to QLinearConv and the Add to QLinearAdd
                    self._set_activation(add_idx, slot, t, group)

    def _bias(self, idx: int, node: onnx.NodeProto, group: FusionGroup) -> None:
        b = node.input[2]
        w_slot, x_slot = self.slots.get((idx, 1)), self.slots.get((idx, 0))
        if not b or b not in self.constants or w_slot is None or x_slot is None:
            return
        if w_slot.kind != "weight" or x_slot.kind != "activation":
            return
        if node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if float(attrs.get("alpha", 1.0)) != 1.0 or float(attrs.get("beta", 1.0)) != 1.0:
                return
            spec = self.specs.get(b)
            if spec is None or spec.shape is None or len(spec.shape) != 1:
                return
        self.slots[(idx, 2)] = _Slot("bias", b, weight_tensor=w_slot.tensor, input_qparams=x_slot.qparams)

    def _concat_group(self, group: FusionGroup) -> None:
        idx = self.index_of[group.name]
        node = self.nodes[idx]
        inputs = [(s, t) for s, t in enumerate(node.input) if self._is_float_activation(t)]
        ranges = [self._range(t, group) for _, t in inputs]
        if any(r is None for r in ranges) or not ranges:
            return
        shared = activation_qparams(_combine_ranges([r for r in ranges if r is not None]), self.options.target)
        for s, t in inputs:
            self._set_activation(idx, s, t, group, shared)

    def _output(self, group: FusionGroup) -> None:
        t = group.output_tensor
        if not t or t in self.graph_outputs or not self._is_float_activation(t):
            return
        qp = self._activation(t, group)
        if qp is not None:
            self.output_qdq[t] = qp


# --------------------------------------------------------------------------- writing


class _Writer:
    """Writes the new graph node by node, tracking which dtype each tensor name carries."""

    def __init__(self, model: LoadedModel, plan: ResolvedPlan, placement: _Placement,
                 options: WriteOptions) -> None:
        self.model = model
        self.src = model.proto
        self.plan = plan
        self.placement = placement
        self.options = options
        self.opset = default_opset(self.src)
        self.nodes = placement.nodes
        self.names = placement.names
        self.specs = placement.specs
        self.constants = placement.constants
        self.graph_outputs = placement.graph_outputs
        self.group_of: dict[str, FusionGroup] = {n: g for g in plan.groups for n in g.nodes}
        self.inits = {i.name: i for i in self.src.graph.initializer}
        self.const_nodes = {o: n for n in self.src.graph.node if n.op_type == "Constant" for o in n.output}

        self.out_nodes: list[onnx.NodeProto] = []
        self.out_inits: list[onnx.TensorProto] = list(self.src.graph.initializer)
        self.taken: set[str] = set(self.specs) | set(self.names) | set(self.inits)
        for n in self.src.graph.node:
            self.taken.update(t for t in list(n.input) + list(n.output) if t)
        # tensor -> {dtype: written name}; the first entry is the original name itself
        self.versions: dict[str, dict[str, str]] = {}
        self.written_dtype: dict[str, str] = {}
        self.origin: dict[str, tuple[str, ...]] = {}  # written tensor -> inserted nodes that made it
        self.qdq_cache: dict[tuple[str, Any], str] = {}
        self.weight_cache: dict[tuple[str, Any], tuple[str, QParams]] = {}
        self.quantized: dict[str, dict[str, Any]] = {}
        self.inserted: dict[str, str] = {}
        self.node_map: dict[str, list[str]] = {}
        self.notes: list[str] = []
        self.fp16_clipped = 0
        self._pending_casts: list[onnx.NodeProto] = []
        self._kept: set[str] = set()
        self.rounded: dict[str, str] = {}  # fp16 simulation: tensor -> float32 name holding its fp16-rounded value

        for vi in self.src.graph.input:
            if vi.name not in self.inits:
                self._register(vi.name, vi.name, self._orig_dtype(vi.name))
        for name in self.inits:
            self._register(name, name, self._orig_dtype(name))

    # -- bookkeeping ----------------------------------------------------------------

    def _orig_dtype(self, tensor: str) -> str:
        spec = self.specs.get(tensor)
        return spec.dtype if spec is not None else "undefined"

    def _register(self, tensor: str, written: str, dtype: str) -> None:
        self.versions.setdefault(tensor, {})[dtype] = written
        self.written_dtype[written] = dtype

    def _fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name

    def _add_node(self, node: onnx.NodeProto, kind: str) -> str:
        self.out_nodes.append(node)
        self.inserted[node.name] = kind
        return node.name

    def _add_init(self, base: str, array: np.ndarray) -> str:
        name = self._fresh(base)
        array = np.asarray(array)  # not ascontiguousarray: it turns a scalar scale into shape [1]
        if not array.flags.c_contiguous:
            array = array.copy(order="C")
        self.out_inits.append(numpy_helper.from_array(array, name))
        return name

    def _constant_array(self, tensor: str) -> np.ndarray:
        if tensor in self.inits:
            return numpy_helper.to_array(self.inits[tensor])
        node = self.const_nodes[tensor]
        for a in node.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
            if a.name in ("value_float", "value_floats", "value_int", "value_ints"):
                return np.asarray(helper.get_attribute_value(a),
                                  dtype=np.float32 if "float" in a.name else np.int64)
        raise ModelError(f"Constant node {node.name!r} holds a value kind quantlab cannot read")

    # -- getting a tensor in the dtype / quantization a reader needs -------------------

    def _get(self, tensor: str, dtype: str) -> tuple[str, tuple[str, ...]]:
        """The written name of ``tensor`` carrying ``dtype`` (adding a Cast or fp16 copy once)."""
        have = self.versions.get(tensor, {})
        if dtype in have:
            name = have[dtype]
            return name, self.origin.get(name, ())
        if tensor in self.inits and dtype in _ONNX_DTYPE:
            array = self._constant_array(tensor)
            if dtype == _F16:
                clipped = np.clip(array.astype(np.float32), -_FP16_MAX, _FP16_MAX)
                self.fp16_clipped += int(np.count_nonzero(clipped != array.astype(np.float32)))
                converted = clipped.astype(np.float16)
            else:
                converted = array.astype(np.float32)
            name = self._add_init(f"{tensor}/{'fp16' if dtype == _F16 else 'fp32'}", converted)
            self._register(tensor, name, dtype)
            return name, ()
        if not have:
            raise ModelError(f"internal: tensor {tensor!r} is read before it is written")
        src_dtype, src = next(iter(have.items()))
        if src_dtype not in _ONNX_DTYPE or dtype not in _ONNX_DTYPE:
            raise ModelError(f"internal: cannot cast {tensor!r} from {src_dtype} to {dtype}")
        suffix = "fp16" if dtype == _F16 else "fp32"
        out = self._fresh(f"{tensor}/to_{suffix}")
        node = helper.make_node("Cast", [src], [out], name=self._fresh(f"{tensor}/Cast_to_{suffix}"),
                                to=_ONNX_DTYPE[dtype])
        self._add_node(node, "cast")
        self._register(tensor, out, dtype)
        self.origin[out] = self.origin.get(src, ()) + (node.name,)
        return out, self.origin[out]

    def _get_rounded(self, tensor: str) -> tuple[str, tuple[str, ...]]:
        """fp16 simulation: ``tensor`` as float32 holding float16-rounded values (made once)."""
        if tensor in self.rounded:
            name = self.rounded[tensor]
            return name, self.origin.get(name, ())
        if tensor in self.inits:
            array = self._constant_array(tensor).astype(np.float32)
            clipped = np.clip(array, -_FP16_MAX, _FP16_MAX)
            self.fp16_clipped += int(np.count_nonzero(clipped != array))
            name = self._add_init(f"{tensor}/fp16_rounded", clipped.astype(np.float16).astype(np.float32))
            self.written_dtype[name] = _F32
            self.rounded[tensor] = name
            return name, ()
        src, chain = self._get(tensor, _F32)
        name, casts = self._round_trip(src, tensor)
        self.rounded[tensor] = name
        self.origin[name] = chain + casts
        return name, self.origin[name]

    def _round_trip(self, src: str, tensor: str, out: str | None = None) -> tuple[str, tuple[str, ...]]:
        """Cast(fp16) -> Cast(fp32) of ``src``; ``out`` names the result (default a derived name)."""
        half = self._fresh(f"{tensor}/fp16")
        out = out or self._fresh(f"{tensor}/fp16_rounded")
        down = helper.make_node("Cast", [src], [half], name=self._fresh(f"{tensor}/Cast_to_fp16"),
                                to=TensorProto.FLOAT16)
        up = helper.make_node("Cast", [half], [out], name=self._fresh(f"{tensor}/Cast_to_fp32"),
                              to=TensorProto.FLOAT)
        self._pending_casts.extend([down, up])
        self.written_dtype[half] = _F16
        self.written_dtype[out] = _F32
        return out, (down.name, up.name)

    def _get_qdq(self, tensor: str, qp: QParams, consumer: str) -> tuple[str, tuple[str, ...]]:
        """DQ(Q(tensor)) with ``qp``; one pair per (tensor, parameters), shared by its readers."""
        key = (tensor, qp.key())
        if key in self.qdq_cache:
            out = self.qdq_cache[key]
            self._note_consumer(tensor, out, consumer)
            return out, self.origin[out]
        src, chain = self._get(tensor, _F32)
        scale = self._add_init(f"{tensor}/scale", qp.scale)
        zp = self._add_init(f"{tensor}/zero_point", qp.zero_point)
        q_out = self._fresh(f"{tensor}/q")
        dq_out = self._fresh(f"{tensor}/dq")
        q = helper.make_node("QuantizeLinear", [src, scale, zp], [q_out], name=self._fresh(f"{tensor}/QuantizeLinear"))
        dq = helper.make_node("DequantizeLinear", [q_out, scale, zp], [dq_out],
                              name=self._fresh(f"{tensor}/DequantizeLinear"))
        self._add_node(q, "quantize")
        self._add_node(dq, "dequantize")
        self.written_dtype[q_out] = qp.zero_point.dtype.name
        self.written_dtype[dq_out] = _F32
        self.origin[dq_out] = chain + (q.name, dq.name)
        self.qdq_cache[key] = dq_out
        record = {**qp.describe(), "kind": "activation", "output": dq_out, "q_node": q.name,
                  "dq_node": dq.name, "consumers": []}
        self._record_quant(tensor, record)
        self._note_consumer(tensor, dq_out, consumer)
        return dq_out, self.origin[dq_out]

    def _record_quant(self, tensor: str, record: dict[str, Any]) -> None:
        if tensor not in self.quantized:
            self.quantized[tensor] = record
        else:
            self.quantized[tensor].setdefault("variants", []).append(record)

    def _note_consumer(self, tensor: str, dq_out: str, consumer: str) -> None:
        rec = self.quantized[tensor]
        for r in [rec] + rec.get("variants", []):
            if r["output"] == dq_out and consumer not in r["consumers"]:
                r["consumers"].append(consumer)

    def _get_weight(self, tensor: str, axis: int | None, consumer: str) -> tuple[str, tuple[str, ...], QParams]:
        key = (tensor, axis)
        if key in self.weight_cache:
            out, qp = self.weight_cache[key]
            self._note_consumer(tensor, out, consumer)
            return out, self.origin[out], qp
        w = self._constant_array(tensor).astype(np.float32)
        if axis is not None and (w.ndim <= axis or w.shape[axis] == 0):
            axis = None
        qp, q = weight_qparams(w, axis, self.options.weight_qmax)
        q_name = self._add_init(f"{tensor}/int8", q)
        scale = self._add_init(f"{tensor}/scale", qp.scale)
        zp = self._add_init(f"{tensor}/zero_point", qp.zero_point)
        out = self._fresh(f"{tensor}/dq")
        attrs = {"axis": axis} if axis is not None else {}
        dq = helper.make_node("DequantizeLinear", [q_name, scale, zp], [out],
                              name=self._fresh(f"{tensor}/DequantizeLinear"), **attrs)
        self._add_node(dq, "weight_dequantize")
        self.written_dtype[out] = _F32
        self.origin[out] = (dq.name,)
        self.weight_cache[key] = (out, qp)
        self._record_quant(tensor, {**qp.describe(), "kind": "weight", "output": out, "q_node": None,
                                    "dq_node": dq.name, "consumers": []})
        self._note_consumer(tensor, out, consumer)
        return out, self.origin[out], qp

    def _get_bias(self, tensor: str, x_qp: QParams, w_qp: QParams, consumer: str) -> tuple[str, tuple[str, ...]]:
        b = self._constant_array(tensor).astype(np.float32)
        bias_scale = (x_qp.scale * w_qp.scale).astype(np.float32)
        if bias_scale.ndim == 1 and bias_scale.shape[0] != b.reshape(-1).shape[0]:
            bias_scale = np.full(b.reshape(-1).shape, bias_scale.max(), dtype=np.float32)
        bias_scale = np.where(bias_scale == 0, np.float32(1.0), bias_scale).astype(np.float32)
        q = np.round(b.astype(np.float64) / bias_scale.astype(np.float64).reshape(-1 if bias_scale.ndim else ()))
        q = np.clip(q, np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32).reshape(b.shape)
        qname = self._add_init(f"{tensor}/int32", q)
        scale = self._add_init(f"{tensor}/scale", bias_scale)
        zp = self._add_init(f"{tensor}/zero_point", np.zeros(bias_scale.shape, dtype=np.int32))
        out = self._fresh(f"{tensor}/dq")
        attrs = {"axis": 0} if bias_scale.ndim == 1 else {}
        dq = helper.make_node("DequantizeLinear", [qname, scale, zp], [out],
                              name=self._fresh(f"{tensor}/DequantizeLinear"), **attrs)
        self._add_node(dq, "bias_dequantize")
        self.written_dtype[out] = _F32
        self.origin[out] = (dq.name,)
        qp = QParams(bias_scale, np.zeros(bias_scale.shape, dtype=np.int32), 0 if bias_scale.ndim == 1 else None)
        self._record_quant(tensor, {**qp.describe(), "kind": "bias", "output": out, "q_node": None,
                                    "dq_node": dq.name, "consumers": [consumer]})
        return out, self.origin[out]

    # -- node types ----------------------------------------------------------------------

    def _schema(self, node: onnx.NodeProto) -> Any | None:
        if node.domain not in ("", "ai.onnx"):
            return None
        try:
            return onnx.defs.get_schema(node.op_type, self.opset, node.domain)
        except Exception:  # noqa: BLE001 - unknown op: keep it as it is
            return None

    def _input_wants(self, node: onnx.NodeProto, fp16: bool) -> tuple[list[str | None], bool]:
        """Dtype each input should arrive in (None: as it is) and whether the node computes in fp16."""
        wants: list[str | None] = []
        schema = self._schema(node) if fp16 else None
        has_subgraph = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
        if schema is None or not schema.outputs or has_subgraph:
            fp16 = False
        allowed: dict[str, set[str]] = {}
        out_var = ""
        if fp16:
            allowed = {tc.type_param_str: set(tc.allowed_type_strs) for tc in schema.type_constraints}
            out_var = schema.outputs[0].type_str
            if "tensor(float16)" not in allowed.get(out_var, set()):
                fp16 = False
        tied_float = False
        for i, t in enumerate(node.input):
            orig = self._orig_dtype(t) if t else ""
            if not t or orig not in _ONNX_DTYPE:
                wants.append(None)
                continue
            if node.op_type in _ACCEPT_ANY_INPUT and i == 0:
                wants.append(None)
                continue
            if fp16:
                formal = schema.inputs[min(i, len(schema.inputs) - 1)]
                var = formal.type_str
                if var == out_var and orig == _F32:
                    wants.append(_F16)
                    tied_float = True
                    continue
                if t in self.constants and "tensor(float16)" in allowed.get(var, set()) and orig == _F32:
                    wants.append(_F16)
                    continue
            wants.append(orig)
        if fp16 and not tied_float:
            # nothing float flows through the node's data type: leave it as it was
            return self._input_wants(node, False)
        return wants, fp16

    def _output_dtype(self, node: onnx.NodeProto, slot: int, fp16: bool) -> str:
        t = node.output[slot]
        orig = self._orig_dtype(t)
        if not fp16 or orig != _F32:
            return orig
        schema = self._schema(node)
        formal = schema.outputs[min(slot, len(schema.outputs) - 1)]
        return _F16 if formal.type_str == schema.outputs[0].type_str else orig

    # -- the pass ---------------------------------------------------------------------------

    def write_node(self, idx: int) -> None:
        node = self.nodes[idx]
        name = self.names[idx]
        group = self.group_of[name]
        precision = self.plan.precision[group.name]
        runs_fp16 = precision == "fp16" and node.op_type not in self.options.fp32_ops
        wants, fp16 = self._input_wants(node, runs_fp16)
        chains: list[str] = []
        new_inputs: list[str] = []
        pending_bias: tuple[int, _Slot] | None = None
        weight_qp: QParams | None = None
        for i, t in enumerate(node.input):
            slot = self.placement.slots.get((idx, i))
            if not t:
                new_inputs.append(t)
                continue
            if slot is not None and slot.kind == "activation":
                assert slot.qparams is not None
                out, chain = self._get_qdq(t, slot.qparams, name)
            elif slot is not None and slot.kind == "weight":
                out, chain, weight_qp = self._get_weight(t, slot.axis, name)
            elif slot is not None and slot.kind == "bias":
                pending_bias = (i, slot)
                new_inputs.append(t)
                continue
            elif t in self.placement.output_qdq and wants[i] in (_F32, None):
                # target ort: readers of an int8 group's output read it through its Q/DQ
                out, chain = self._get_qdq(t, self.placement.output_qdq[t], name)
            elif wants[i] is None:
                have = self.versions.get(t, {})
                out = t if t in self.written_dtype or not have else next(iter(have.values()))
                chain = self.origin.get(out, ())
            elif wants[i] == _F16 and self.options.fp16_simulation:
                out, chain = self._get_rounded(t)
                self._flush_casts()
            else:
                out, chain = self._get(t, wants[i])  # type: ignore[arg-type]
            new_inputs.append(out)
            chains.extend(c for c in chain if c not in chains)
        if pending_bias is not None:
            i, slot = pending_bias
            if weight_qp is not None and slot.input_qparams is not None:
                out, chain = self._get_bias(slot.tensor, slot.input_qparams, weight_qp, name)
            else:
                out, chain = self._get(slot.tensor, _F32)
            new_inputs[i] = out
            chains.extend(c for c in chain if c not in chains)

        outputs: list[str] = []
        casts: list[str] = []
        for s, t in enumerate(node.output):
            if not t:
                outputs.append(t)
                continue
            dtype = self._output_dtype(node, s, fp16)
            if dtype == _F16 and self.options.fp16_simulation:
                exact = self._fresh(f"{t}/fp32_exact")
                outputs.append(exact)
                self.written_dtype[exact] = _F32
                _, round_casts = self._round_trip(exact, t, out=t)
                casts.extend(round_casts)
                self._register(t, t, _F32)
                self.rounded[t] = t
            elif t in self.graph_outputs and dtype == _F16:
                inner = self._fresh(f"{t}/fp16")
                outputs.append(inner)
                self._register(t, inner, _F16)
                cast = helper.make_node("Cast", [inner], [t], name=self._fresh(f"{t}/Cast_to_fp32"),
                                        to=TensorProto.FLOAT)
                casts.append(cast.name)
                self._pending_casts.append(cast)
                self._register(t, t, _F32)
            else:
                outputs.append(t)
                self._register(t, t, dtype)
        written = onnx.NodeProto()
        written.CopyFrom(node)
        written.name = name
        del written.input[:]
        written.input.extend(new_inputs)
        del written.output[:]
        written.output.extend(outputs)
        self.out_nodes.append(written)
        self._flush_casts()
        self.node_map[name] = [name] + chains + casts

    def _flush_casts(self) -> None:
        for cast in self._pending_casts:
            self._add_node(cast, "cast")
        self._pending_casts = []

    def run(self) -> onnx.ModelProto:
        for idx in topological_order(self.src):
            self.write_node(idx)
        self._check_subgraph_reads()
        if self.fp16_clipped:
            self.notes.append(f"{self.fp16_clipped} initializer value(s) outside float16 range were "
                              "clipped to +-65504 in fp16 copies")
        return self._assemble()

    def _check_subgraph_reads(self) -> None:
        """If/Loop/Scan bodies read outer tensors by name: those must keep their original dtype."""
        for idx, node in enumerate(self.nodes):
            for attr in node.attribute:
                bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                for body in bodies:
                    for t in sorted(outer_names(body)):
                        if self.written_dtype.get(t, self._orig_dtype(t)) != self._orig_dtype(t):
                            producer = self.placement.producers[t]
                            group = self.group_of[self.names[self.nodes.index(producer)]].name
                            raise PlanError(
                                f"node {self.names[idx]!r} ({node.op_type}) reads tensor {t!r} inside its "
                                f"subgraph, and the plan makes that tensor {self.written_dtype[t]}; quantlab "
                                f"cannot retype subgraphs. Pin group {group!r}, which produces it, to fp32."
                            )

    def _assemble(self) -> onnx.ModelProto:
        g = self.src.graph
        used = {t for n in self.out_nodes for t in n.input if t} | {o.name for o in g.output}
        graph_input_names = {i.name for i in g.input}
        originally_used = {t for n in g.node for t in n.input if t} | {o.name for o in g.output}
        inits = [i for i in self.out_inits
                 if i.name in used or i.name in graph_input_names or (i.name in self.inits and i.name not in originally_used)]
        graph = helper.make_graph(self.out_nodes, g.name, list(g.input), list(g.output), initializer=inits,
                                  doc_string=g.doc_string)
        out = helper.make_model(graph, opset_imports=list(self.src.opset_import),
                                producer_name="quantlab", producer_version=__version__)
        out.ir_version = self.src.ir_version
        out.model_version = self.src.model_version
        out.domain = self.src.domain
        for p in self.src.metadata_props:
            out.metadata_props.add(key=p.key, value=p.value)
        for f in self.src.functions:
            out.functions.append(f)
        self._kept = {i.name for i in inits}
        return out

    def provenance(self, meta: Mapping[str, Any]) -> Provenance:
        tensor_map: dict[str, str] = {}
        tensor_dtype: dict[str, str] = {}
        originals: list[str] = [i.name for i in self.src.graph.input]
        originals += [i.name for i in self.src.graph.initializer]
        originals += [t for n in self.src.graph.node for t in n.output if t]
        for t in dict.fromkeys(originals):
            written = self._carrier(t)
            tensor_map[t] = written
            tensor_dtype[t] = self.written_dtype.get(written, self._orig_dtype(t))
        node_group = {n: g.name for n, g in self.group_of.items()}
        return Provenance(
            tensor_map=tensor_map,
            tensor_dtype=tensor_dtype,
            node_map={k: tuple(v) for k, v in self.node_map.items()},
            quantized_inputs=self.quantized,
            group_precision=dict(self.plan.precision),
            node_group=node_group,
            inserted_nodes=self.inserted,
            notes=tuple(self.notes),
            meta=dict(meta),
        )

    def _carrier(self, tensor: str) -> str:
        """The written tensor that carries ``tensor``'s value: itself unless a weight was replaced."""
        if tensor not in self.inits or tensor in self._kept:
            return tensor
        for rec in [self.quantized.get(tensor)] + list((self.quantized.get(tensor) or {}).get("variants", [])):
            if rec:
                return str(rec["output"])
        for name in [*self.versions.get(tensor, {}).values(), self.rounded.get(tensor, "")]:
            if name in self._kept:
                return name
        return tensor


# --------------------------------------------------------------------------- entry point


def _same_groups(plan: ResolvedPlan, model: LoadedModel) -> None:
    groups = fusion_groups(model.proto)
    mine = [(g.name, g.nodes) for g in groups]
    theirs = [(g.name, g.nodes) for g in plan.groups]
    if mine != theirs:
        missing = sorted({g for g, _ in theirs} - {g for g, _ in mine})
        raise PlanError(
            f"the resolved plan was made for another model: its fusion groups differ from "
            f"{model.label}'s" + (f" (groups not in this model: {', '.join(missing[:5])})" if missing else "")
            + ". Resolve the plan against this model (quantlab.plan.resolve_plan)."
        )


def write_model(
    model: LoadedModel,
    plan: PrecisionPlan | ResolvedPlan,
    table: CalibrationTable | None,
    options: WriteOptions = WriteOptions(),
) -> WrittenModel:
    """Write the INT8 / FP16 / FP32 / mixed model ``plan`` asks for (see the module docstring).

    Raises PlanError for a plan that does not fit the model, CalibrationError
    for a table of another model, a missing range, or a range holding huge
    sentinels, ModelError for a model that already holds Q/DQ nodes.
    """
    proto = model.proto
    existing = [n.name or n.op_type for n in proto.graph.node
                if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if existing:
        raise ModelError(
            f"{model.label} already holds {len(existing)} QuantizeLinear/DequantizeLinear node(s) "
            f"(e.g. {existing[0]!r}); quantlab writes Q/DQ itself from the FP32 model. Give the "
            "original FP32 model."
        )
    resolved = plan if isinstance(plan, ResolvedPlan) else resolve_plan(plan, proto)
    if isinstance(plan, ResolvedPlan):
        _same_groups(resolved, model)
    if table is not None:
        check_table_fits(table, model)
    placement = _Placement(model, resolved, table, options)
    placement.run()
    writer = _Writer(model, resolved, placement, options)
    out = _finish(writer.run(), writer, model.label, options.check)
    meta = {
        "source_sha256": model.sha256,
        "source": str(model.path) if model.path else None,
        "written_sha256": sha256_bytes(serialize(out)),
        "plan_hash": resolved.plan_hash(),
        "int8_fraction": resolved.int8_fraction(),
        "group_counts": resolved.counts(),
        "options": options.as_dict(),
        "table_method": table.method if table is not None else None,
        "table_model_sha256": table.model_sha256 if table is not None else None,
        "table_settings": dict(table.settings) if table is not None else None,
        "versions": tool_versions(),
    }
    return WrittenModel(
        proto=out,
        provenance=writer.provenance(meta),
        plan=resolved,
        options=options,
        table_method=table.method if table is not None else None,
        source_sha256=model.sha256,
    )


def _finish(proto: onnx.ModelProto, writer: _Writer, label: str, check: bool) -> onnx.ModelProto:
    """Checker, then shape inference; its dtypes must agree with the ones the writer tracked.

    The result carries ``value_info`` for every tensor (inferred shapes, the
    written dtypes), so exposing an intermediate tensor as an output (for
    statistics or per-layer comparison) gets the right type.
    """
    if check:
        try:
            onnx.checker.check_model(proto)
        except Exception as exc:  # noqa: BLE001 - the checker raises several types
            raise ModelError(f"internal error: the model written from {label} fails the ONNX checker: {exc}") from None
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except Exception as exc:  # noqa: BLE001 - inference raises several types
        if check:
            raise ModelError(f"internal error: shape inference fails on the model written from {label}: {exc}") from None
        inferred = proto
    specs = tensor_specs(inferred)
    for tensor, spec in specs.items():
        want = writer.written_dtype.get(tensor)
        if want in _ONNX_DTYPE and spec.dtype in _ONNX_DTYPE and spec.dtype != want:
            raise ModelError(f"internal error: written tensor {tensor!r} is {spec.dtype}, expected {want}")
    io = {i.name for i in inferred.graph.input} | {o.name for o in inferred.graph.output}
    for tensor, dtype in writer.written_dtype.items():
        if dtype in _ONNX_DTYPE and tensor not in io and (tensor not in specs or specs[tensor].dtype == "undefined"):
            inferred.graph.value_info.append(helper.make_tensor_value_info(tensor, _ONNX_DTYPE[dtype], None))
    return inferred

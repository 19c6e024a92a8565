"""Where the Q/DQ pairs go: every quantized input of every int8 group, decided before anything is written.

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
conv's own output too, and a residual Add gets one on both inputs; no output Q/DQ where a Log, Div,
Sqrt... reads the output, nor where only the model's outputs do: quantlab.quantize.output_reach)::

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

All errors (a missing range, a range holding huge sentinels) come from here,
so nothing is written for a plan that cannot be.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import CalibrationError
from ..graph import LoadedModel, tensor_specs
from ..graph.topology import SAME_VALUE_OPS
from ..plan import FusionGroup, ResolvedPlan, constant_names, node_names
from ..precision import INT8
from ..table import CalibrationTable, TensorRange
from .options import WriteOptions
from .output_reach import OutputReach
from .qparams import QParams, activation_qparams, bias_scale_floor, combine_ranges, fit_below
from .tensors import F32

__all__ = ["Slot", "Placement"]

@dataclass(frozen=True)
class Slot:
    """What to do with one input of one node: quantize as activation / weight / bias."""

    kind: Literal["activation", "weight", "bias"]
    tensor: str
    qparams: QParams | None = None  # activations
    axis: int | None = None  # weights
    weight_tensor: str | None = None  # bias: the weight it pairs with
    input_qparams: QParams | None = None  # bias: the activation scale
    scale_floor: np.ndarray | None = field(default=None, compare=False)  # weights under an int32 bias


class Placement:
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
        self.slots: dict[tuple[int, int], Slot] = {}
        self.output_qdq: dict[str, QParams] = {}  # tensor -> qparams every reader goes through
        self.unquantized_outputs: dict[str, str] = {}  # group output left float -> the reader that wants it so
        self.output_bound: dict[str, str] = {}  # group output left float -> the model output it only reaches
        self.reach = OutputReach(self.nodes, self.names, self.graph_outputs, self.initializers)
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
        table = self.gathered_table(tensor)
        if table is not None and table.size:  # weights whatever the data picks: their own values bound them
            r = replace(r, amax=float(np.abs(table).max()), min=float(table.min()), max=float(table.max()))
        return r

    def source_of(self, tensor: str) -> str:
        """``tensor`` traced back through the ops that pass values on unchanged (:data:`SAME_VALUE_OPS`)."""
        node = self.producers.get(tensor)
        while node is not None and node.op_type in SAME_VALUE_OPS and node.input:
            tensor = node.input[0]
            node = self.producers.get(tensor)
        return tensor

    def gathered_table(self, tensor: str) -> np.ndarray | None:
        """The float initializer ``tensor`` holds rows of, picked by a Gather (a MoE's expert weights, layout ops
        after it aside); None for any other tensor. Its calibrated range saw only the rows the calibration data
        picked, and mse clipped a Mixtral's experts at 0.0798 of their 0.0884."""
        node = self.producers.get(self.source_of(tensor))
        if node is None or node.op_type != "Gather" or node.input[0] not in self.initializers:
            return None
        table = numpy_helper.to_array(self.initializers[node.input[0]])
        return table if table.dtype.kind == "f" else None

    def _activation(self, tensor: str, group: FusionGroup) -> QParams | None:
        r = self._range(tensor, group)
        if r is None:
            return None
        qp = activation_qparams(r, self.options.target)
        clip_max = self._clip_max(tensor) if self.options.target == "ort" else None
        return qp if clip_max is None else fit_below(qp, clip_max)

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
        return bool(tensor) and tensor not in self.constants and (spec is None or spec.dtype == F32)

    def run(self) -> None:
        for group in self.plan.groups:
            if self.plan.precision[group.name] != INT8:
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
                f"the plan puts {len(self.plan.groups_at(INT8))} group(s) in int8 but no calibration "
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
            self.slots[(idx, slot)] = Slot("activation", tensor, qparams=qp)

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
        if op == "Gemm" and slot == 0:  # the weight as A: out rows run along A's rows (its columns if transA)
            return 1 if int(attrs.get("transA", 0)) else 0
        if op == "MatMul" and len(shape) == 2:
            return 1 if slot == 1 else 0  # x @ W: per output column; W @ x: per output row
        # a batched weight (MoE experts, per-head [H, D, Dh]) keeps one scale: onnxruntime 1.32 fuses a per-axis
        # DequantizeLinear of a rank-3 B (axis 0 or 2) into MatMulIntegerToFloat, which then fails at run time
        # ("b zero point is not valid"), though TensorRT-RTX builds both axes
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
                self.slots[(idx, slot)] = Slot("weight", t, axis=axis)
            elif self._is_float_activation(t):
                self._set_activation(idx, slot, t, group)
        if self.options.bias_int32 and node.op_type in ("Conv", "Gemm") and len(node.input) > 2:
            self._bias(idx, node, group)
        if self.options.output_qdq and node.op_type in ("Conv", "ConvTranspose") and len(group.nodes) > 1:
            # ORT: DQ -> Conv -> Q is QLinearConv. It drops a Relu/Clip before a Q itself; anything
            # else after the conv (LeakyRelu, Sigmoid, BatchNorm...) needs the conv's output quantized.
            # Every reader in the group gets it: a SiLU reads it twice (Sigmoid and Mul), and one float reader
            # left keeps ORT from fusing the conv.
            nxt = self.nodes[self.index_of[group.nodes[1]]]
            if nxt.op_type not in ("Relu", "Clip") and group.residual_input not in nxt.input:
                for name in group.nodes[1:]:
                    reader_idx = self.index_of[name]
                    for slot, t in enumerate(self.nodes[reader_idx].input):
                        if t == node.output[0]:
                            self._set_activation(reader_idx, slot, t, group)
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
        self.slots[(idx, 2)] = Slot("bias", b, weight_tensor=w_slot.tensor, input_qparams=x_slot.qparams)
        if b in self.initializers and x_slot.qparams is not None and np.ndim(x_slot.qparams.scale) == 0:
            floor = bias_scale_floor(numpy_helper.to_array(self.initializers[b]), float(x_slot.qparams.scale),
                                     per_tensor=w_slot.axis is None)
            self.slots[(idx, 1)] = replace(w_slot, scale_floor=floor)

    def _concat_group(self, group: FusionGroup) -> None:
        """One shared Q/DQ on a Concat's inputs. (A Concat the graph outputs, such as a KV cache
        ``present = Concat(past, k)``, is no INT8 group: quantlab.plan.groups._int8_reader_follows.)"""
        idx = self.index_of[group.name]
        node = self.nodes[idx]
        inputs = [(s, t) for s, t in enumerate(node.input) if self._is_float_activation(t)]
        ranges = [self._range(t, group) for _, t in inputs]
        if any(r is None for r in ranges) or not ranges:
            return
        shared = activation_qparams(combine_ranges([r for r in ranges if r is not None]), self.options.target)
        for s, t in inputs:
            self._set_activation(idx, s, t, group, shared)

    def _output(self, group: FusionGroup) -> None:
        t = group.output_tensor
        if not t or t in self.graph_outputs or not self._is_float_activation(t):
            return
        sensitive = self.reach.near_zero_reader(t)
        if sensitive is not None:
            self.unquantized_outputs[t] = sensitive
            return
        reached = self.reach.only_reaches_outputs(t)
        if reached is not None:
            self.output_bound[t] = reached
            return
        qp = self._activation(t, group)
        if qp is not None:
            self.output_qdq[t] = qp

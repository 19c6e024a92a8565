"""The Q/DQ nodes themselves: activation pairs, int8 weights and int32 biases, each made once and shared.

    x ──► x/QuantizeLinear ──► x/q ──► x/DequantizeLinear ──► x/dq    activation (x/scale, x/zero_point)
    w/int8  (initializer) ──► w/DequantizeLinear ──► w/dq             weight, per channel on ``axis``
    b/int32 (initializer) ──► b/DequantizeLinear ──► b/dq             bias: scale s_x * s_w, zero point 0

Every pair is recorded for :class:`quantlab.quantize.Provenance` under the
original tensor (``quantized_inputs``), with the nodes that read it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import helper

from .casts import Casts
from .options import WriteOptions
from .qparams import QParams, weight_qparams
from .tensors import F32, TensorBook

__all__ = ["QdqInserter"]


def _fitted_floor(floor: np.ndarray | None, axis: int | None, w: np.ndarray) -> np.ndarray | None:
    """``floor`` as ``weight_qparams`` takes it for ``w`` on ``axis``: the largest value for a per-tensor scale;
    None when it has one value per channel of another axis."""
    if floor is None:
        return None
    floor = np.asarray(floor, np.float32)
    if axis is None:
        return np.asarray([floor.max()], np.float32)
    return floor if floor.size == w.shape[axis] else None


class QdqInserter:
    """Inserts the Q/DQ a placement asked for; one pair per (tensor, parameters), shared by its readers."""

    def __init__(self, book: TensorBook, casts: Casts, options: WriteOptions) -> None:
        self.book = book
        self.casts = casts
        self.options = options
        self.qdq_cache: dict[tuple[str, Any], str] = {}
        self.weight_cache: dict[tuple[str, Any], tuple[str, QParams]] = {}
        self.quantized: dict[str, dict[str, Any]] = {}  # original tensor -> its Q/DQ record (provenance)
        self.bias_trouble: dict[str, tuple[int, float, int]] = {}  # bias -> (channels clipped to int32, largest
        # |error| that made, channels whose scale s_x * s_w is below float32's normals: zero where denormals flush)

    def activation(self, tensor: str, qp: QParams, consumer: str) -> tuple[str, tuple[str, ...]]:
        """DQ(Q(tensor)) with ``qp``; one pair per (tensor, parameters), shared by its readers."""
        key = (tensor, qp.key())
        if key in self.qdq_cache:
            out = self.qdq_cache[key]
            self._note_consumer(tensor, out, consumer)
            return out, self.book.origin[out]
        src, chain = self.casts.get(tensor, F32)
        scale = self.book.add_init(f"{tensor}/scale", qp.scale)
        zp = self.book.add_init(f"{tensor}/zero_point", qp.zero_point)
        q_out = self.book.fresh(f"{tensor}/q")
        dq_out = self.book.fresh(f"{tensor}/dq")
        q = helper.make_node("QuantizeLinear", [src, scale, zp], [q_out], name=self.book.fresh(f"{tensor}/QuantizeLinear"))
        dq = helper.make_node("DequantizeLinear", [q_out, scale, zp], [dq_out],
                              name=self.book.fresh(f"{tensor}/DequantizeLinear"))
        self.book.add_node(q, "quantize")
        self.book.add_node(dq, "dequantize")
        self.book.written_dtype[q_out] = qp.zero_point.dtype.name
        self.book.written_dtype[dq_out] = F32
        self.book.origin[dq_out] = chain + (q.name, dq.name)
        self.qdq_cache[key] = dq_out
        record = {**qp.describe(), "kind": "activation", "output": dq_out, "q_node": q.name,
                  "dq_node": dq.name, "consumers": []}
        self._record(tensor, record)
        self._note_consumer(tensor, dq_out, consumer)
        return dq_out, self.book.origin[dq_out]

    def _record(self, tensor: str, record: dict[str, Any]) -> None:
        if tensor not in self.quantized:
            self.quantized[tensor] = record
        else:
            self.quantized[tensor].setdefault("variants", []).append(record)

    def _note_consumer(self, tensor: str, dq_out: str, consumer: str) -> None:
        rec = self.quantized[tensor]
        for r in [rec] + rec.get("variants", []):
            if r["output"] == dq_out and consumer not in r["consumers"]:
                r["consumers"].append(consumer)

    def _check_bias(self, tensor: str, b: np.ndarray, saturated: np.ndarray, q: np.ndarray,
                    bias_scale: np.ndarray) -> None:
        """Keep what int32 cannot hold: a large bias over a near-zero weight channel (s_w tiny) saturates, and
        its scale can fall below float32's normal numbers, which CPUs that flush denormals read as 0."""
        tiny = int(np.count_nonzero(np.abs(bias_scale) < np.finfo(np.float32).tiny))
        if not saturated.any() and not tiny:
            return
        written = q.reshape(-1).astype(np.float64) * np.broadcast_to(bias_scale.astype(np.float64), q.shape).reshape(-1)
        error = float(np.max(np.abs(written - b.reshape(-1).astype(np.float64)))) if saturated.any() else 0.0
        self.bias_trouble[tensor] = (int(np.count_nonzero(saturated)), error, tiny)

    def weight(self, tensor: str, axis: int | None, consumer: str,
               scale_floor: np.ndarray | None = None) -> tuple[str, tuple[str, ...], QParams]:
        """``tensor`` as int8 + DequantizeLinear, per channel on ``axis``; ``scale_floor``: least scales an int32
        bias beside it needs (quantlab.quantize.qparams.bias_scale_floor). One pair per (tensor, axis), and
        another only where the floor raises a scale: a weight shared by two readers is not written twice."""
        w = self.book.constant_array(tensor).astype(np.float32)
        if axis is not None and (w.ndim <= axis or w.shape[axis] == 0):
            axis = None
        qp, q = weight_qparams(w, axis, self.options.weight_qmax)
        key: tuple[Any, ...] = (tensor, axis)
        floor = _fitted_floor(scale_floor, axis, w)
        if floor is not None and np.any(floor.reshape(qp.scale.shape) > qp.scale):
            qp, q = weight_qparams(w, axis, self.options.weight_qmax, floor)
            key = (tensor, axis, floor.tobytes())
        if key in self.weight_cache:
            out, qp = self.weight_cache[key]
            self._note_consumer(tensor, out, consumer)
            return out, self.book.origin[out], qp
        q_name = self.book.add_init(f"{tensor}/int8", q)
        scale = self.book.add_init(f"{tensor}/scale", qp.scale)
        zp = self.book.add_init(f"{tensor}/zero_point", qp.zero_point)
        out = self.book.fresh(f"{tensor}/dq")
        attrs = {"axis": axis} if axis is not None else {}
        dq = helper.make_node("DequantizeLinear", [q_name, scale, zp], [out],
                              name=self.book.fresh(f"{tensor}/DequantizeLinear"), **attrs)
        self.book.add_node(dq, "weight_dequantize")
        self.book.written_dtype[out] = F32
        self.book.origin[out] = (dq.name,)
        self.weight_cache[key] = (out, qp)
        self._record(tensor, {**qp.describe(), "kind": "weight", "output": out, "q_node": None,
                                    "dq_node": dq.name, "consumers": []})
        self._note_consumer(tensor, out, consumer)
        return out, self.book.origin[out], qp

    def bias(self, tensor: str, x_qp: QParams, w_qp: QParams, consumer: str) -> tuple[str, tuple[str, ...]]:
        b = self.book.constant_array(tensor).astype(np.float32)
        bias_scale = (x_qp.scale * w_qp.scale).astype(np.float32)
        if bias_scale.ndim == 1 and bias_scale.shape[0] != b.reshape(-1).shape[0]:
            bias_scale = np.full(b.reshape(-1).shape, bias_scale.max(), dtype=np.float32)
        bias_scale = np.where(bias_scale == 0, np.float32(1.0), bias_scale).astype(np.float32)
        q = np.round(b.astype(np.float64) / bias_scale.astype(np.float64).reshape(-1 if bias_scale.ndim else ()))
        clipped = np.clip(q, np.iinfo(np.int32).min, np.iinfo(np.int32).max)
        self._check_bias(tensor, b, clipped.reshape(-1) != q.reshape(-1), clipped, bias_scale)
        q = clipped.astype(np.int32).reshape(b.shape)
        qname = self.book.add_init(f"{tensor}/int32", q)
        scale = self.book.add_init(f"{tensor}/scale", bias_scale)
        zp = self.book.add_init(f"{tensor}/zero_point", np.zeros(bias_scale.shape, dtype=np.int32))
        out = self.book.fresh(f"{tensor}/dq")
        attrs = {"axis": 0} if bias_scale.ndim == 1 else {}
        dq = helper.make_node("DequantizeLinear", [qname, scale, zp], [out],
                              name=self.book.fresh(f"{tensor}/DequantizeLinear"), **attrs)
        self.book.add_node(dq, "bias_dequantize")
        self.book.written_dtype[out] = F32
        self.book.origin[out] = (dq.name,)
        qp = QParams(bias_scale, np.zeros(bias_scale.shape, dtype=np.int32), 0 if bias_scale.ndim == 1 else None)
        self._record(tensor, {**qp.describe(), "kind": "bias", "output": out, "q_node": None,
                                    "dq_node": dq.name, "consumers": [consumer]})
        return out, self.book.origin[out]

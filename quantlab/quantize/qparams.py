"""Quantization parameters: scale and zero point of activations and weights, as TensorRT / ORT expect."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import QuantlabError
from ..table import TensorRange
from .options import Target

__all__ = ["QParams", "activation_qparams", "weight_qparams", "bias_scale_floor", "fit_below", "combine_ranges"]

_TINY32 = float(np.finfo(np.float32).tiny)


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


def fit_below(qp: QParams, upper: float) -> QParams:
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


def weight_qparams(w: np.ndarray, axis: int | None, qmax: int = 127,
                   scale_floor: np.ndarray | None = None) -> tuple[QParams, np.ndarray]:
    """Symmetric int8 weights: ``scale = absmax / qmax`` per channel along ``axis`` (or per tensor).

    Returns the parameters and the int8 weights ``clip(round(w / scale), -qmax, qmax)``
    (float32 division, round half to even); an all-zero channel gets scale 1.
    ``qmax`` is 127, or 64 for reduced-range (7-bit) weights; the scale is
    computed as ``2 * absmax / (2 * qmax)`` in float64, then stored float32,
    as ONNX Runtime's quantizer does, so both give the same bytes.
    ``scale_floor`` (per channel, or one value): the least scale, so an int32 bias with scale s_x * s_w fits
    (:func:`bias_scale_floor`); only channels of near-zero weights reach it.
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
    if scale_floor is not None:
        scale = np.maximum(scale, np.asarray(scale_floor, np.float32).reshape(scale.shape)).astype(np.float32)
    shape = [1] * w32.ndim
    if axis is not None:
        shape[axis] = -1
    q = np.clip(np.round(w32 / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    zp = np.zeros(scale.shape, dtype=np.int8)
    return QParams(scale, zp, axis), q


_INT32_HEADROOM = 0.5 * 2.0**31
"""The largest |bias| / (s_x * s_w) a bias may need, with room to spare below int32's limit."""


def bias_scale_floor(bias: np.ndarray, input_scale: float, per_tensor: bool) -> np.ndarray | None:
    """The least weight scales (per output channel, or one) with which an int32 bias quantized at
    ``input_scale * s_w`` fits int32 and its scale stays a normal float32 (None without a bias or an input
    scale). Only a near-zero weight channel's own scale is below it (the writer keeps the others).

    A live bias over a near-zero weight channel (PP-OCRv4's recogniser: 0.139 over weights of ~1e-9) otherwise
    saturated at int32's limit (written as 0.0946), or had a denormal scale that CPUs flushing denormals read as 0.
    ONNX Runtime's quantizer raises that channel's weight scale the same way.
    """
    b = np.abs(np.asarray(bias, np.float64).reshape(-1))
    s_x = float(input_scale)
    if not b.size or not s_x > 0:
        return None
    floor = np.maximum(b / (s_x * _INT32_HEADROOM), float(np.finfo(np.float32).tiny) * 4.0 / s_x)
    return np.asarray([floor.max()] if per_tensor else floor, np.float64).astype(np.float32)


def combine_ranges(ranges: Sequence[TensorRange]) -> TensorRange:
    """The union range of concat inputs: widest amax, lowest min, highest max."""
    return TensorRange(amax=max(r.amax for r in ranges), min=min(r.min for r in ranges),
                       max=max(r.max for r in ranges))


"""E[x] and E[Q(x)] of layer inputs over a data set, in one FP32 pass: what bias correction measures from.

One sample's shape (a CNN at a fixed size): the mean *image* of each input, so a
conv's shift is exact with its padding. Samples of several shapes, or a MatMul's
input (channels last): means per channel over samples and positions::

    x [N, C, H, W] ─► sum over N ─► [C, H, W]   (while every sample has one shape)
                   └► sum over N, H, W ─► [C]   (from the first other shape on; channels last: moved to axis 1)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..data import DataSet
from ..graph import LoadedModel
from .fp32_values import fp32_values
from .qparams import QParams

__all__ = ["InputMeans", "fake_quantize", "input_means"]


def fake_quantize(x: np.ndarray, qp: QParams) -> np.ndarray:
    """Q then DQ as ONNX defines them (per tensor): round half to even, saturate, float32."""
    scale = np.float32(qp.scale)
    zp = np.float32(int(qp.zero_point))
    lo, hi = (-128, 127) if qp.zero_point.dtype == np.int8 else (0, 255)
    q = np.round(np.asarray(x, dtype=np.float32) / scale)
    q += zp
    np.clip(q, lo, hi, out=q)
    q -= zp
    q *= scale
    return q


class InputMeans:
    """E[x] and E[Q(x)] of one layer input: summed over the samples at one sample's shape while every
    sample has one shape; from the first other shape on, per channel (axis 1 of the batch) over samples
    and positions (the image sums so far reduced to channels once)."""

    def __init__(self, channel_axis: int = 1) -> None:
        self.sum: np.ndarray | None = None  # [C, ...] while one shape, [C] after
        self.qsum: np.ndarray | None = None
        self.samples = 0
        self.channel_axis = channel_axis
        self.one_shape = channel_axis == 1  # a MatMul's input (channels last) is reduced to channels at once
        self.positions = 0  # samples x positions per channel

    def add(self, x: np.ndarray, xq: np.ndarray) -> None:
        if self.channel_axis != 1:
            x, xq = np.moveaxis(x, self.channel_axis, 1), np.moveaxis(xq, self.channel_axis, 1)
        if self.one_shape and self.sum is not None and self.sum.shape != x.shape[1:]:
            spatial = tuple(range(1, self.sum.ndim))
            self.sum, self.qsum, self.one_shape = self.sum.sum(axis=spatial), self.qsum.sum(axis=spatial), False
        axes = (0,) if self.one_shape else (0, *range(2, x.ndim))
        s, sq = x.sum(axis=axes, dtype=np.float64), xq.sum(axis=axes, dtype=np.float64)
        self.sum, self.qsum = (s, sq) if self.sum is None else (self.sum + s, self.qsum + sq)
        self.samples += x.shape[0]
        self.positions += x.size // max(x.shape[1], 1) if x.ndim > 1 else x.size

    def image(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(E[x], E[Q(x)]) at one sample's shape; None when the samples came in several shapes."""
        if not self.one_shape or self.sum is None or self.qsum is None:
            return None
        return self.sum / self.samples, self.qsum / self.samples

    def channels(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (E[x], E[Q(x)]) over samples and positions (after samples of several shapes, or a MatMul's
        input)."""
        assert self.sum is not None and self.qsum is not None and not self.one_shape
        return self.sum / self.positions, self.qsum / self.positions


def input_means(model: LoadedModel, wanted: Mapping[tuple[str, int], QParams | None], dataset: DataSet,
                batch_size: int, max_samples: int | None) -> tuple[dict[tuple[str, int], InputMeans], int]:
    """Per (tensor, channel axis) in ``wanted``: its means over the samples, with Q(x) fake-quantized by the
    tensor's quantization parameters (None: x itself); the samples seen. One FP32 pass on ONNX Runtime."""
    means = {key: InputMeans(key[1]) for key in wanted}
    seen = 0
    for take, values in fp32_values(model, (name for name, _ in wanted), dataset, batch_size, max_samples,
                                    purpose="bias correction"):
        for (name, axis), qp in wanted.items():
            x = values[name]
            means[name, axis].add(x, x if qp is None else fake_quantize(x, qp))
        seen += take
    return means, seen

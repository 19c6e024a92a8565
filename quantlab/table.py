"""Calibration tables: per-tensor INT8 ranges, with everything that produced them.

The JSON file is what ``quantlab calibrate`` writes and ``quantlab build``
reads. Activations are symmetric per-tensor INT8: ``scale = amax / 127``.
``min``/``max`` are kept too, so a writer targeting ONNX Runtime's uint8 form
can derive an asymmetric range clipped to ``[-amax, amax]``.

Also reads and writes TensorRT's calibration-cache text format (TensorRT 10):

    TRT-<version>-EntropyCalibration2
    <tensor name>: <big-endian hex float32 scale>
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TensorRange", "CalibrationTable", "TABLE_FORMAT"]

TABLE_FORMAT = "quantlab.calibration/1"


@dataclass(frozen=True)
class TensorRange:
    """The calibrated range of one activation tensor.

    ``amax`` is the symmetric clipping threshold (|x| above it saturates);
    ``min``/``max`` are the observed extremes of the finite, non-huge values;
    ``clipped_fraction`` is the share of observed values with |x| > amax.
    ``excluded`` counts values left out of the statistics (``nonfinite``,
    ``huge``: e.g. attention masks at float32.min).
    """

    amax: float
    min: float
    max: float
    clipped_fraction: float = 0.0
    excluded: Mapping[str, int] = field(default_factory=dict)
    histogram: Mapping[str, Any] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        """INT8 symmetric scale (amax / 127); a zero range gets the smallest normal scale."""
        return self.amax / 127.0 if self.amax > 0 else 1.1754943508222875e-38


@dataclass(frozen=True)
class CalibrationTable:
    """Ranges for one method, plus the provenance every output records.

    ``model_sha256`` ties the table to the model it was calibrated on;
    ``calib_set`` holds the manifest, the content hash of the samples used and
    their count; ``settings`` the method's parameters; ``versions`` the tools.
    """

    method: str
    ranges: Mapping[str, TensorRange]
    model_sha256: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    calib_set: Mapping[str, Any] = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def amax(self, tensor: str) -> float:
        return self.ranges[tensor].amax

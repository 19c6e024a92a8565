"""BiasCorrection, the measured per-channel shifts, and its JSON file (``bias_correction.json``).

A search measures the shifts once and writes them beside its plan.json, so that ``quantlab
build --bias-correction`` applies to the final model exactly what the search's candidates got,
without the calibration data. The file keeps the write settings the shifts were measured for:
:func:`quantlab.quantize.apply_bias_correction` refuses a model written with others.

This module holds the value and its file form only (no ONNX, no data): how the shifts are
measured and applied is :mod:`quantlab.quantize.bias_correction`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_json
from ..errors import QuantlabError

__all__ = ["BiasCorrection", "save_bias_correction", "load_bias_correction", "BIAS_CORRECTION_FILE",
           "BIAS_CORRECTION_FORMAT"]


@dataclass(frozen=True)
class BiasCorrection:
    """Per-channel shifts to subtract from the bias of each corrected layer (by node name).

    ``settings``: the write settings the shifts were measured for (target,
    per_channel_weights, reduce_range); :func:`~quantlab.quantize.apply_bias_correction` refuses others.
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

"""The one small interface every backend implements (after Polygraphy's runners).

    backend = get_backend("ort")            # or "tensorrt", "tensorrt-rtx"
    runner = backend.build(model_proto)      # parse / optimise / compile once
    outputs = runner.run({"input": x}, ["logits"])   # named inputs -> named outputs
    backend.describe()                       # library, version, device

The rest of quantlab talks to ONNX Runtime and TensorRT only through this.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import InputMismatchError

__all__ = ["BackendInfo", "Runner", "Backend", "TensorValues", "check_feed_names"]


@dataclass(frozen=True)
class BackendInfo:
    """What ran a model: recorded in every result."""

    name: str
    library: str
    version: str
    device: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "library": self.library, "version": self.version,
                "device": self.device, "details": dict(self.details)}


def check_feed_names(feeds: Mapping[str, np.ndarray], input_names: Sequence[str], what: str) -> None:
    """InputMismatchError unless ``feeds`` names exactly ``input_names`` (``what``: "model", "engine")."""
    missing = [n for n in input_names if n not in feeds]
    extra = [n for n in feeds if n not in input_names]
    if missing or extra:
        raise InputMismatchError(f"feeds do not match the {what}'s inputs {list(input_names)}: "
                                 f"missing {missing}, unknown {extra}")


@dataclass(frozen=True)
class TensorValues:
    """Every value of one tensor once, in the order the backend stores them (not the tensor's layout).

    For reductions that do not depend on order (histograms, min/max, zero
    counts): a backend can hand these over without reordering its memory.
    ``pieces`` are arrays (views where possible) that together hold each value
    once; ``in_layout()`` makes the ordinary array (a copy), for the rare tie
    that depends on order (which of +0.0 and -0.0 comes first).
    """

    pieces: tuple[np.ndarray, ...]
    in_layout: Callable[[], np.ndarray]

    @property
    def size(self) -> int:
        return sum(int(p.size) for p in self.pieces)


class Runner(abc.ABC):
    """A built model: feeds named inputs, returns named outputs as numpy arrays."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    layout: str = "onnx"
    """How a run returns exposed tensors: ``"onnx"`` (arrays in their ONNX layout) or the backend's own
    storage order as :class:`TensorValues` (``"nchwc16"``: ONNX Runtime's blocks of 16 channels)."""

    @abc.abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run one batch. ``outputs`` defaults to every output the runner exposes.

        The arrays belong to the caller: a later run must not write into them
        (quantlab.stats reduces run k's outputs while run k+1 computes).
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release device memory; optional."""


class Backend(abc.ABC):
    """Builds runners from ONNX models."""

    name: str = "backend"

    @abc.abstractmethod
    def build(
        self,
        model: onnx.ModelProto,
        *,
        outputs: Sequence[str] | None = None,
        cache_dir: Path | None = None,
    ) -> Runner:
        """Build a runner for ``model``.

        ``outputs`` lists intermediate tensors to expose in addition to the
        graph outputs (for statistics and per-layer comparison).
        """

    def build_values(self, model: onnx.ModelProto, outputs: Sequence[str]) -> Runner:
        """A runner for statistics: ``outputs`` are exposed, and a run may return each of them as
        :class:`TensorValues` (its values in the backend's own order) instead of an array.

        The default is :meth:`build`; a backend overrides it where exposing a
        tensor in its ONNX layout costs a conversion (ONNX Runtime's NCHWc).
        """
        return self.build(model, outputs=outputs)

    @abc.abstractmethod
    def describe(self) -> BackendInfo:
        """Library, version and device, for provenance."""

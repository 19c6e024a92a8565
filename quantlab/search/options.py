"""What a search may do: its settings (:class:`SearchOptions`) and the bound on full validations."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from ..backends import is_onnxruntime
from ..compare.options import DECISION_THRESHOLD
from ..errors import QuantlabError, SearchError
from ..schema import is_probability
from ..shapes import parse_shapes


@dataclass(frozen=True)
class SearchOptions:
    """Settings of one search; every default is defined here once.

    ``budget``: the most full validations (None: ceil(log2 G) + 5, G = quantizable groups).
    ``time_budget_s``: no new evaluation starts after this many seconds (this run).
    ``probe_samples``: the ranking subset (first N samples, at most half the set): every
    group's impact is measured there on the output's continuous noise (SQNR), which a few
    samples of full logits resolve; discrete metrics are only read on full validations.
    For top-1 thresholds, the number of critical samples of the flip search (the all-INT8
    plan's flipped samples, up to twice this many, then the most fragile ones).
    ``probe_top``: no longer used (every quantizable group's impact is measured); kept so
    that settings written by earlier versions still load.
    ``fp16_simulation``: write evaluated candidates with fp16 tensors rounded in float32
    kernels (None: when the backend is ONNX Runtime, whose CPU kernels would not round a
    native fp16 model's activations); the final model is always written natively.
    ``latency``: measure each full validation's latency (None: with ``objective="latency"``).
    ``metric``: a ``module:function`` user metric for the comparator (thresholds may name it).
    ``ctc_blank``: the blank class of CTC outputs, as :class:`quantlab.compare.CompareOptions` (thresholds may name
    ``text_agreement`` and ``cer``).
    ``decision_threshold``: as :class:`quantlab.compare.CompareOptions`: the probability above which an output a
    Sigmoid writes marks its mask (thresholds may name ``element_match``, ``exact_match`` and ``mask_iou``).
    ``per_channel_weights``: the writer's weight granularity (False: per tensor).
    ``shapes``: TensorRT engine shape ranges (``--shapes`` text) for every engine the search
    builds (a TensorRT backend only: ONNX Runtime runs any shape).
    ``bias_correction``: correct every INT8 Conv/Gemm/MatMul(+bias Add)'s output mean shift, measured on the
    calibration set given to :func:`~quantlab.search.search` (``calib=``; without it no
    correction is applied and the result's settings say so).
    """

    threshold: str
    backend: str = "ort"
    target: str = "tensorrt"                 # the writer's Q/DQ form (quantlab.quantize.Target)
    fallback: Literal["fp16", "fp32"] = "fp16"  # the tier tried first for pinned groups
    budget: int | None = None                # max full validations; None = ceil(log2 G) + 5
    time_budget_s: float | None = None
    objective: Literal["int8", "latency"] = "int8"
    probe_samples: int = 16                  # the ranking subset (continuous measures only)
    probe_top: int = 8                       # unused (see the docstring)
    batch_size: int = 8
    seed: int = 0
    fp16_simulation: bool | None = None
    latency: bool | None = None
    latency_iterations: int = 20
    metric: str | None = None
    ctc_blank: int | None = None             # CompareOptions.ctc_blank: CTC text figures a threshold may name
    decision_threshold: float = DECISION_THRESHOLD  # CompareOptions.decision_threshold: Sigmoid outputs' masks
    class_maps: tuple[str, ...] = ()         # CompareOptions.class_maps: outputs read as class scores per pixel
    per_channel_weights: bool = True
    bias_correction: bool = True
    shards: int = 1                          # full validations split into shards on Ray (quantlab.compare)
    ray: str | None = None                   # None: local; "auto" or a cluster address
    shapes: str | None = None                # TensorRT profiles, quantlab.shapes.parse_shapes text
    int8_bodies: bool = False                # WriteOptions.int8_bodies: calibrated Loop/Scan/If bodies in INT8 (not pinned)

    @property
    def backend_options(self) -> dict[str, Any]:
        """``get_backend(backend, **these)`` for every runner the search builds: the engine shapes."""
        return {"shapes": parse_shapes(self.shapes)} if self.shapes else {}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def simulate_fp16(self) -> bool:
        return is_onnxruntime(self.backend) if self.fp16_simulation is None else self.fp16_simulation

    @property
    def measure_latency(self) -> bool:
        return self.objective == "latency" if self.latency is None else self.latency

    def check(self) -> None:
        """Raise SearchError on settings the search cannot use."""
        problems = []
        if self.fallback not in ("fp16", "fp32"):
            problems.append(f"fallback must be 'fp16' or 'fp32', got {self.fallback!r}")
        if self.objective not in ("int8", "latency"):
            problems.append(f"objective must be 'int8' or 'latency', got {self.objective!r}")
        if self.target not in ("tensorrt", "ort"):
            problems.append(f"target must be 'tensorrt' or 'ort', got {self.target!r}")
        if self.budget is not None and (not isinstance(self.budget, int) or self.budget < 1):
            problems.append(f"budget must be a whole number of full validations >= 1 (or None), got {self.budget!r}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            problems.append(f"time_budget_s must be > 0 seconds (or None), got {self.time_budget_s!r}")
        for key in ("probe_samples", "batch_size", "latency_iterations"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                problems.append(f"{key} must be a whole number >= 1, got {getattr(self, key)!r}")
        if not is_probability(self.decision_threshold):
            problems.append(f"decision_threshold must be a probability in (0, 1), got {self.decision_threshold!r}")
        if not isinstance(self.probe_top, int) or self.probe_top < 0:
            problems.append(f"probe_top must be a whole number >= 0, got {self.probe_top!r}")
        if self.shapes is not None:
            problems.extend(self._shape_problems())
        if problems:
            raise SearchError("search options: " + "; ".join(problems))

    def _shape_problems(self) -> list[str]:
        if is_onnxruntime(self.backend):
            return ["shapes set TensorRT optimisation profiles and ONNX Runtime runs any shape: drop them, or "
                    "search with backend 'tensorrt' / 'tensorrt-rtx'"]
        try:
            parse_shapes(self.shapes or "")
        except QuantlabError as exc:
            return [str(exc)]
        return []


def evaluation_bound(groups: int) -> int:
    """ceil(log2 G) + 5 full validations for G quantizable groups (5 when G <= 1)."""
    return (math.ceil(math.log2(groups)) if groups > 1 else 0) + 5


"""The coverage gate: its metrics and default, in the threshold language (standard library only).

Light on purpose: experiment files and the command line check a gate
expression before any heavy import or any work.
"""

from __future__ import annotations

from ..threshold import Threshold, parse_threshold

__all__ = ["TENSOR_METRICS", "DEFAULT_GATE", "known_metrics", "parse_gate"]

TENSOR_METRICS = (
    "saturated", "saturated_calib", "saturated_excess", "saturated_samples", "outside", "outside_samples",
    "psi", "psi_ci_low", "psi_ci_high", "psi_noise", "psi_excess", "wasserstein",
)
"""Per-tensor columns a threshold may name (each also as ``<name>_max``)."""

DEFAULT_GATE = "outside_samples_max>0.2"
"""Fails when more than a fifth of some set's samples drive a tensor beyond anything the calibration set showed.

Out of ``n`` calibration samples, a new sample from the same distribution exceeds
all of them in a given tensor with probability about ``1 / (n + 1)``; on
EfficientNet-Lite0 a validation set of other natural photos reaches 0.14, a
darkened calibration set 0.93 (bench/calibration_coverage.py)."""


def known_metrics() -> set[str]:
    """Every metric a gate may name: the per-tensor columns and their ``_max`` over tensors and sets."""
    return set(TENSOR_METRICS) | {f"{m}_max" for m in TENSOR_METRICS}


def parse_gate(text: str | None) -> Threshold:
    """The gate's threshold (default :data:`DEFAULT_GATE`), refused when it names no coverage metric."""
    return parse_threshold(text if text is not None else DEFAULT_GATE, known_metrics=known_metrics())

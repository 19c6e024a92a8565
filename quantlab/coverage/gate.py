"""The coverage gate: its metrics and default, in the threshold language (standard library only).

Light on purpose: experiment files and the command line check a gate
expression before any heavy import or any work. A gate may hold several
thresholds joined by :data:`GATE_SEPARATOR` (``coverage --fail-if`` repeated):
it fails when any one holds, as ``compare --fail-if`` does.
"""

from __future__ import annotations

import math

from ..threshold import Threshold, parse_threshold

__all__ = ["TENSOR_METRICS", "DEFAULT_GATE", "GATE_SEPARATOR", "join_gates", "known_metrics", "outside_surprise",
           "parse_gate"]

GATE_SEPARATOR = " | "
"""Between the thresholds of a gate that fails when any one holds."""

TENSOR_METRICS = (
    "saturated", "saturated_calib", "saturated_excess", "saturated_samples", "zeroed", "zeroed_calib",
    "zeroed_excess", "sqnr_drop", "outside", "outside_samples", "outside_surprise", "psi", "psi_ci_low",
    "psi_ci_high", "psi_noise", "psi_excess", "wasserstein",
)
"""Per-tensor columns a threshold may name (each also as ``<name>_max``). ``sqnr_drop``: the dB of SQNR the
calibrated range is predicted to keep on the calibration values minus on this set's (quantlab.noise): saturation
and zeroing together, weighed by energy; a row also carries the two predictions, ``sqnr_calib`` and ``sqnr``."""

DEFAULT_GATE = "outside_surprise_max>2 and outside_samples_max>0.2 | zeroed_excess_max>0.2"
"""Fails when more than a fifth of a set's samples drive some tensor beyond anything the calibration set showed,
and that many would happen less than once in a hundred times with data of the calibration set's own distribution
(:func:`outside_surprise`): a material shift, and not chance. Or at the other end, when a set sits so far below
the calibrated range that a fifth more of some tensor's non-zero values round to 0 in INT8 than on the calibration
set (night audio, a dark camera). Its false alarms, measured: the largest ``zeroed_excess`` of any tensor on
same-distribution or other representative sets was 0.004 (EfficientNet-Lite0: the demo's validation photos, other
views of its calibration photos), 0.013 (PP-OCRv4's detector) and 0.012 (its recogniser), fifteen times under 0.2.

The share alone (the previous default, ``outside_samples_max>0.2``) ignored the set sizes: with 16 calibration and
12 validation samples one tensor reaches 3 of 12 with chance 0.067 on same-distribution data, so a model of 57
tensors was flagged on 4 of 5 fresh draws (UNet probe). The surprise alone flags any other population, however
harmless: on EfficientNet-Lite0, validation photos from another collection exceed the calibration maximum in
14 % of samples (INT8 top-1 drop 0.6 pp) and are surprising for 6 tensors; a darkened calibration set gives 93 %
(bench/calibration_coverage.py)."""


def outside_surprise(outside: int, samples: int, calib_samples: int, tensors: int) -> float:
    """``-log10`` of the chance that data of the calibration set's own distribution drives at least ``outside`` of
    ``samples`` samples beyond the calibration maximum of |x| in one of ``tensors`` tensors (0: no surprise; 2: a
    one-in-a-hundred event).

    With exchangeable samples, at least ``k`` of ``m`` new samples all exceed the largest of ``n`` calibration
    samples' maxima when the ``k`` largest of the ``n + m`` maxima are new ones: chance ``C(m, k) / C(n + m, k)``,
    whatever the distribution (``1 / (n + 1)`` for one sample). Times ``tensors`` (Bonferroni: a bound on the chance
    that any tensor gets there, however they are correlated), at most 1.
    """
    if outside <= 0 or samples <= 0:
        return 0.0
    log_chance = sum(math.log10(samples - i) - math.log10(calib_samples + samples - i)
                     for i in range(min(outside, samples)))
    return max(0.0, -(log_chance + math.log10(max(tensors, 1))))


def known_metrics() -> set[str]:
    """Every metric a gate may name: the per-tensor columns and their ``_max`` over tensors and sets."""
    return set(TENSOR_METRICS) | {f"{m}_max" for m in TENSOR_METRICS}


def parse_gate(text: str | None) -> tuple[Threshold, ...]:
    """The gate's thresholds (default :data:`DEFAULT_GATE`; several joined by :data:`GATE_SEPARATOR`), each refused
    when it names no coverage metric."""
    parts = (text if text is not None else DEFAULT_GATE).split(GATE_SEPARATOR.strip())
    return tuple(parse_threshold(part.strip(), known_metrics=known_metrics()) for part in parts)


def join_gates(texts: list[str] | None) -> str | None:
    """One gate text for thresholds given apart (``--fail-if`` repeated); None (the default gate) for none."""
    return GATE_SEPARATOR.join(texts) if texts else None

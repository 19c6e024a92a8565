"""The calibration methods quantlab knows, their settings and defaults: the one registry everything reads.

The CLI (``--method`` choices, help texts, defaults), :mod:`quantlab.calibrate`,
the experiment files, the search, the reports and the benchmarks all take
method names, ``"all"``, the default method and every default setting from
here; validation of the settings lives here too. Standard library only, so the
CLI can read it at start-up without loading numpy or numba::

    name        what sets amax                                 settings (default)
    minmax      max |x|                                        -
    percentile  |x| below which `percentile` % of values lie   percentile (99.99)
    entropy     TensorRT's KL-divergence search, smoothed,     bins 2048, levels 128, skip_zeros (True),
                point masses out of the search                 smoothing 1e-4, point_mass 0.01
    mse         least squared INT8 error (clip + rounding)     bins 2048, candidates 512, levels 127

``"all"`` computes every method (they share one statistics pass).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import CalibrationError

__all__ = [
    "Method",
    "METHODS_BY_NAME",
    "METHOD_NAMES",
    "ALL",
    "ALL_METHODS",
    "DEFAULT_METHOD",
    "DEFAULT_PERCENTILE",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_BINS",
    "DEFAULT_HUGE_THRESHOLD",
    "ENTROPY_BINS",
    "ENTROPY_LEVELS",
    "ENTROPY_SKIP_ZEROS",
    "ENTROPY_SMOOTHING",
    "ENTROPY_POINT_MASS",
    "MSE_CANDIDATES",
    "MSE_LEVELS",
    "check_percentile",
    "percentile_error",
    "resolve_methods",
    "method_settings",
]

DEFAULT_PERCENTILE = 99.99
"""Share (in %) of |x| the percentile method keeps below amax."""

ENTROPY_BINS = 2048
"""Histogram resolution TensorRT's entropy calibrator uses over [0, absmax] (also the mse method's)."""

ENTROPY_LEVELS = 128
"""Quantized levels on one side of zero for symmetric INT8 (entropy's merge target and first candidate)."""

ENTROPY_SMOOTHING = 1e-4
"""Counts each empty bin of P and Q gets before the KL divergence (ONNX Runtime's / MXNet's / TVM's eps)."""

ENTROPY_POINT_MASS = 0.01
"""A histogram bin holding more than this share of the non-zero values is a point mass: it does not steer the
entropy search, and no candidate may saturate more than this share (see quantlab.calibrators)."""

ENTROPY_SKIP_ZEROS = True
"""Entropy leaves exact zeros out of its histogram (``--entropy-keep-zeros`` turns this off)."""

MSE_CANDIDATES = 512
"""Thresholds the mse method tries, evenly over (0, upper]."""

MSE_LEVELS = 127
"""Rounding step of the mse method: amax / 127."""

DEFAULT_BINS = 2**14
"""Fine bins of the streaming |x| histogram per tensor (128 KiB of int64 counts each)."""

DEFAULT_HUGE_THRESHOLD = 1e30
"""|x| at or above this is a sentinel (mask, padding), not a value to calibrate on."""

TENSOR_SCOPES = ("all", "quantizable")
"""Which tensors a statistics pass covers: ``all`` float activations, or ``quantizable`` (those an INT8 plan can
put a Q/DQ on; see :func:`quantlab.stats.quantizable_tensors`)."""

DEFAULT_BATCH_SIZE = 8
"""Samples per model run during calibration (does not change the ranges)."""


@dataclass(frozen=True)
class Method:
    """One calibration method: its name, a one-line description, and the fixed parameters a table records."""

    name: str
    summary: str
    parameters: tuple[tuple[str, Any], ...] = ()


METHODS_BY_NAME: dict[str, Method] = {
    m.name: m
    for m in (
        Method("minmax", "max |x|: no clipping"),
        Method("percentile", "|x| below which the given percentile of values lie"),
        Method("entropy", "TensorRT's KL-divergence threshold, smoothed, robust to point masses",
               (("bins", ENTROPY_BINS), ("levels", ENTROPY_LEVELS), ("start_bin", ENTROPY_LEVELS),
                ("smoothing", ENTROPY_SMOOTHING), ("point_mass", ENTROPY_POINT_MASS))),
        Method("mse", "least expected squared INT8 error (clipping + rounding)",
               (("bins", ENTROPY_BINS), ("candidates", MSE_CANDIDATES))),
    )
}

METHOD_NAMES: tuple[str, ...] = tuple(METHODS_BY_NAME)
"""Every method name, in table order."""

ALL = "all"
"""The name that asks for every method (one statistics pass)."""

ALL_METHODS: tuple[str, ...] = METHOD_NAMES
"""What ``"all"`` computes: every method, mse included."""

DEFAULT_METHOD = "entropy"
"""The method used when none is given."""


def percentile_error(value: float) -> str | None:
    """Why ``value`` is not a valid percentile, or None when it is (in (0, 100])."""
    try:
        ok = 0.0 < float(value) <= 100.0
    except (TypeError, ValueError):
        ok = False
    return None if ok else f"percentile must be in (0, 100], got {value}"


def check_percentile(value: float) -> float:
    """``value`` as a float; CalibrationError when it is outside (0, 100]."""
    problem = percentile_error(value)
    if problem:
        raise CalibrationError(problem)
    return float(value)


def resolve_methods(methods: Sequence[str] | str) -> tuple[str, ...]:
    """Expand 'all' and check names; order kept, duplicates dropped; CalibrationError on an unknown name."""
    if isinstance(methods, str):
        methods = [methods]
    choices = ", ".join(METHOD_NAMES) + f" or {ALL!r}"
    out: list[str] = []
    for m in methods:
        for name in ALL_METHODS if m == ALL else (m,):
            if name not in METHODS_BY_NAME:
                raise CalibrationError(f"unknown calibration method {name!r}; choose from {choices}")
            if name not in out:
                out.append(name)
    if not out:
        raise CalibrationError(f"no calibration method given; choose from {choices}")
    return tuple(out)


def method_settings(method: str, *, percentile: float = DEFAULT_PERCENTILE, bins: int = DEFAULT_BINS,
                    huge_threshold: float = DEFAULT_HUGE_THRESHOLD,
                    entropy_skip_zeros: bool = ENTROPY_SKIP_ZEROS) -> dict[str, Any]:
    """The parameters a table records for ``method`` (everything that changes its ranges)."""
    (method,) = resolve_methods([method])
    common = {"fine_bins": bins, "huge_threshold": huge_threshold, "symmetric": True, "num_bits": 8}
    fixed = dict(METHODS_BY_NAME[method].parameters)
    if method == "percentile":
        check_percentile(percentile)
        return {**common, "percentile": percentile}
    if method == "entropy":
        skip = bool(entropy_skip_zeros)
        return {**common, **fixed, "skip_zeros": skip, "robust": skip,
                "histogram": "2048 bins of whole fine bins over [0, U], absmax <= U < 1.25 absmax"
                             + (", exact zeros left out" if skip else ""),
                "reference": "Migacz, 8-bit Inference with TensorRT, GTC 2017"
                             + ("; zeros skipped as pytorch-quantization's skip_zeros; P and Q smoothed as ONNX"
                                " Runtime's smooth_distribution; a bin holding more than point_mass of the values is"
                                " cut to its neighbours' height and never saturated" if skip
                                else "; as published (no smoothing, no point-mass rule)")}
    return {**common, **fixed}

"""``check_coverage``: does the calibration set represent these data sets? One pass per set, then the figures.

    table + calibration statistics ──> per-tensor coarse bins (amax, calibration deciles)
    each data set ──> coverage_pass ──> rows (saturation, PSI with bootstrap interval, W1), worst samples,
                                        per-input summary, fine histograms (mergeable statistics)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backends.base import Backend
from ..errors import CalibrationError
from ..graph import LoadedModel, check_not_quantized
from ..stats import Statistics, batch_feeds, batch_size_of
from ..table import CalibrationTable
from .collect import PassResult, TensorTally, check_names, coverage_pass, pass_statistics, table_bins
from .distance import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, psi_estimate, wasserstein_relative
from .gate import outside_surprise
from .result import CoverageResult, DataSetCoverage, parse_gate

__all__ = ["CoverageOptions", "check_coverage", "coverage_of"]


@dataclass(frozen=True)
class CoverageOptions:
    """Settings of a coverage check (defaults defined here only)."""

    batch_size: int = 8
    resamples: int = DEFAULT_RESAMPLES
    confidence: float = DEFAULT_CONFIDENCE
    seed: int = 0
    worst_samples: int = 10
    gate: str | None = None
    """Threshold that fails the check (None: :data:`quantlab.coverage.result.DEFAULT_GATE`)."""
    tensors: tuple[str, ...] | None = None
    """The table's tensors to check (None: all of them): ``quantlab run`` gives those its INT8 candidates
    quantize, so the verdict and its advice name no tensor that stays float."""
    backend: str = "ort"


def _row(name: str, tally: TensorTally, calib: Any, samples: int, calib_samples: int,
         weights: np.ndarray | None, confidence: float, tensors: int) -> dict[str, Any]:
    total = tally.blocks.total()
    values = int(total.sum())
    b = tally.bins
    sat = int(total[b.first_saturated:].sum())
    out = int(total[b.first_outside])
    est = psi_estimate(tally.blocks.used(), b.reference, calib_samples, samples, confidence=confidence,
                       weights=weights)
    fine = tally.fine.state()
    saturated = sat / values if values else math.nan
    clipped = b.calib_saturated  # |x| > amax as this set's values are counted (the table's clipped_fraction counts
    # only values more than half a step above: a white page's 1.0 under amax 0.9985 is in one and not the other)
    zeroed = fine.zeroed_fraction(b.amax) if values else math.nan  # non-zero values INT8 reads as 0: under-range
    zeroed_calib = calib.zeroed_fraction(b.amax)
    sqnr = fine.predicted_sqnr_db(b.amax) if values else math.nan  # both ends weighed by energy, in dB
    sqnr_calib = calib.predicted_sqnr_db(b.amax)
    excess = est.ci_low - est.noise if not math.isnan(est.ci_low) else math.nan
    return {
        "tensor": name, "samples": samples, "values": values, "amax": b.amax, "calib_absmax": b.calib_absmax,
        "absmax": fine.absmax, "saturated": saturated, "saturated_calib": clipped,
        "saturated_excess": saturated - clipped, "saturated_samples": tally.saturated_samples / samples,
        "zeroed": zeroed, "zeroed_calib": zeroed_calib, "zeroed_excess": zeroed - zeroed_calib,
        "sqnr": sqnr, "sqnr_calib": sqnr_calib, "sqnr_drop": _drop(sqnr_calib, sqnr),
        "outside": out / values if values else math.nan, "outside_samples": tally.outside_samples / samples,
        "outside_surprise": outside_surprise(tally.outside_samples, samples, calib_samples, tensors),
        "psi": est.value, "psi_ci_low": est.ci_low, "psi_ci_high": est.ci_high, "psi_noise": est.noise,
        "psi_excess": excess, "wasserstein": wasserstein_relative(calib, fine, b.amax),
        "zeros": fine.zero_fraction, "calib_zeros": calib.zero_fraction,
    }


def _drop(calib: float, here: float) -> float:
    """dB of predicted SQNR this set loses against the calibration set (nan when either has no signal; 0 when both
    are noiseless, where inf - inf would be nan)."""
    return 0.0 if math.isinf(calib) and math.isinf(here) else calib - here


def _rows(result: PassResult, calibration: Statistics, options: CoverageOptions) -> tuple[dict[str, Any], ...]:
    weights = _bootstrap_weights({tally.blocks.used().shape[0] for tally in result.tallies.values()}, options)
    return tuple(_row(t, tally, calibration.tensors[t], result.samples, calibration.samples,
                      weights.get(tally.blocks.used().shape[0]), options.confidence, len(result.tallies))
                 for t, tally in result.tallies.items())


def _bootstrap_weights(block_counts: set[int], options: CoverageOptions) -> dict[int, np.ndarray]:
    """Block count -> multinomial resampling weights ``[resamples, blocks]``, one draw shared by every tensor with
    that many blocks (so they are resampled alike). Almost always one count; a tensor whose samples could not be
    told apart in some runs (a flattened ``[N*S, H]`` in a batch of several) has fewer blocks than the rest."""
    out = {}
    for n_blocks in sorted(block_counts):
        if n_blocks >= 2 and options.resamples > 0:
            rng = np.random.default_rng(options.seed)
            out[n_blocks] = rng.multinomial(n_blocks, np.full(n_blocks, 1.0 / n_blocks), size=options.resamples)
    return out


def _flattened_note(result: PassResult) -> tuple[str, ...]:
    if result.pooled:
        shown = ", ".join(repr(t) for t in result.pooled[:3])
        more = f" and {len(result.pooled) - 3} more" if len(result.pooled) > 3 else ""
        return (f"{shown}{more} hold several samples' rows in one axis (a flattened [N*S, H]), and the model fixes "
                "its batch above 1, so no run of one sample is possible: each run's rows are split in as many equal "
                "parts as it had samples, in order, as a flatten of [N, ...] lays them out",)
    if not result.one_at_a_time:
        return ()
    shown = ", ".join(repr(t) for t in result.one_at_a_time[:3])
    more = f" and {len(result.one_at_a_time) - 3} more" if len(result.one_at_a_time) > 3 else ""
    return (f"{shown}{more} hold several samples' rows in one axis (a flattened [N*S, H] before a MatMul): the "
            "pass ran one sample at a time so that every tensor is checked per sample (slower, same figures)",)


def _notes(name: str, summary: Any, calibration_summary: Any) -> tuple[str, ...]:
    if calibration_summary is None or summary is None:
        return ()
    from ..data import beyond_calibration, overlap

    shared = overlap(calibration_summary, summary)
    sizes = tuple(f"{name}: {w}" for w in beyond_calibration(summary, calibration_summary, values=False,
                                                               role="its"))
    if not shared:
        return sizes
    note = (f"{name}: {shared} of {summary.count} samples are also in the calibration set; their coverage is "
            "trivially good, so this set looks better covered than new data would be")
    return (note, *sizes)


def coverage_of(model: LoadedModel, dataset: Any, table: CalibrationTable, calibration: Statistics, *,
                options: CoverageOptions = CoverageOptions(), backend: Backend | None = None,
                calibration_summary: Any = None, name: str | None = None, progress: bool = False) -> DataSetCoverage:
    """Coverage of one data set (a ``quantlab.data.DataSet``) by ``table`` calibrated on ``calibration``;
    ``progress``: a bar over its samples."""
    from ..backends import get_backend
    from ..data import check_inputs
    from ..sequence import with_carry

    dataset = with_carry(dataset, model, streams=options.batch_size)  # states as in use, as calibration saw them
    check_inputs(dataset, model, batch_size=options.batch_size)
    bins = table_bins(table, calibration)
    if options.tensors is not None:
        chosen = set(options.tensors)
        bins = {t: b for t, b in bins.items() if t in chosen}
    check_names(list(bins), model)
    label = name or getattr(dataset, "name", "data")
    bar = _progress_bar(progress, dataset, label)
    try:
        result = coverage_pass(model, dataset.batches(options.batch_size), bins,
                               backend=backend if backend is not None else get_backend(options.backend),
                               fine_bins=calibration.bins, huge_threshold=calibration.huge_threshold,
                               worst_samples=options.worst_samples,
                               on_batch=(lambda item: bar.update(batch_size_of(item, batch_feeds(item))))
                               if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    stats = pass_statistics(result, model.sha256, calibration.bins, calibration.huge_threshold,
                            backend.describe().as_dict() if backend is not None and hasattr(backend, "describe")
                            else {})
    return DataSetCoverage(
        name=label, source=dataset.describe_source() if hasattr(dataset, "describe_source") else label,
        samples=result.samples, rows=_rows(result, calibration, options),
        worst_samples=tuple(s.as_dict() for s in result.worst), summary=result.summary, statistics=stats,
        notes=_notes(label, result.summary, calibration_summary) + _flattened_note(result))


def _progress_bar(progress: bool, dataset: Any, label: str) -> Any:
    if not progress:
        return None
    from tqdm import tqdm

    total = len(dataset) if hasattr(dataset, "__len__") else None
    return tqdm(total=total, desc=f"coverage {label}", unit="sample", dynamic_ncols=True, leave=True)


def check_coverage(model: LoadedModel, datasets: Sequence[Any], table: CalibrationTable, calibration: Statistics, *,
                   options: CoverageOptions = CoverageOptions(), backend: Backend | None = None,
                   calibration_summary: Any = None, calibration_source: Mapping[str, Any] | None = None,
                   progress: bool = False) -> CoverageResult:
    """Coverage of every data set in ``datasets``, with the gate's threshold checked before any work;
    ``progress``: a bar per data set."""
    check_not_quantized(model)
    parse_gate(options.gate)
    if table.model_sha256 and table.model_sha256 != model.sha256:
        raise CalibrationError(f"the calibration table was made for another model (sha256 {table.model_sha256[:12]}, "
                               f"{model.label} is {model.sha256[:12]}); give this model's table")
    if not datasets:
        raise CalibrationError("no data set to check; give at least one --data manifest")
    sets = []
    names: list[str] = []
    for dataset in datasets:
        base = getattr(dataset, "name", "data")
        label, k = base, 2
        while label in names:
            label, k = f"{base}#{k}", k + 1
        names.append(label)
        sets.append(coverage_of(model, dataset, table, calibration, options=options, backend=backend,
                                calibration_summary=calibration_summary, name=label, progress=progress))
    from .result import DEFAULT_GATE

    calib = {**dict(calibration_source or {}), "samples": calibration.samples}
    if calibration_summary is not None and hasattr(calibration_summary, "as_dict"):
        calib["summary"] = calibration_summary.as_dict()
    return CoverageResult(datasets=tuple(sets), gate=options.gate or DEFAULT_GATE,
                          table={"method": table.method, "model_sha256": table.model_sha256,
                                 "calib_set": dict(table.calib_set)},
                          calibration=calib)

"""Calibrate a model on a calibration set: one statistics pass, then one table per method.

    dataset ──batches──> collect_statistics (one FP32 pass, streaming) ──> Statistics
       │                      └─ on_batch: DataFingerprint (hash, NaN/Inf check)
       └─ check_inputs (names, shapes, dtypes) before any work
    Statistics ──> table_from_statistics(method) ──> CalibrationTable  (minmax, percentile, entropy, mse)

All methods read the same histograms, so ``methods=("all",)`` costs one pass.
The entropy method leaves exact zeros out of its histogram, smooths it and
keeps point masses inside the range by default (see quantlab.calibrators for
the rule and why); ``entropy_skip_zeros=False`` runs TensorRT's algorithm as
published instead. The other methods count zeros like any value.
Same data, same order and same settings give byte-identical tables: the
histogram does not depend on the batch size (see quantlab.histogram) and the
tables record no time stamps.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .backends.base import Backend
from .calibrators import amax_entropy, amax_minmax, amax_mse
from .controlflow import bind_hints
from .errors import CalibrationError, DataError, InputMismatchError
from .fingerprint import tool_versions
from .graph import LoadedModel, check_float32, check_float_activations, check_not_quantized
from .histogram import HistogramState
from .methods import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_METHOD,
    DEFAULT_PERCENTILE,
    ENTROPY_BINS,
    ENTROPY_LEVELS,
    ENTROPY_SKIP_ZEROS,
    METHOD_NAMES,
    MSE_LEVELS,
    check_percentile,
    method_settings,
    resolve_methods,
)
from .sequence import with_carry
from .shapes import ShapeLog
from .stats import (
    DEFAULT_MEMORY_BUDGET,
    Statistics,
    batch_feeds,
    batch_size_of,
    collect_statistics,
    probability_tensors,
    unquantized_tensors,
)
from .range_notes import clipping_notes, noise_notes, statistics_notes, underflow_notes, zeroing_notes
from .table import SMALLEST_AMAX, CalibrationTable, TensorRange

__all__ = [
    "CalibrationResult",
    "calibrate",
    "clipping_notes",
    "noise_notes",
    "statistics_notes",
    "table_from_statistics",
    "tensor_range",
    "zeroing_notes",
]

_SUMMARY_QUANTILES = (0.5, 0.99, 0.999, 0.9999)


@dataclass(frozen=True)
class CalibrationResult:
    """Tables by method, the statistics they came from, and the summary of the data used."""

    tables: dict[str, CalibrationTable]
    statistics: Statistics
    data: Any
    """A ``quantlab.data.DataSummary`` (``.sha256``, ``.count``, ``.as_dict()``, ``.to_frame()``)."""


def _amax(state: HistogramState, method: str, percentile: float, entropy_skip_zeros: bool) -> float:
    absmax = state.absmax
    if absmax == 0.0:
        return 0.0
    if method == "minmax":
        return amax_minmax(state.min, state.max)
    if method == "percentile":
        return state.percentile(percentile)
    hist, upper = state.coarsen(ENTROPY_BINS)
    if method == "entropy":
        if not entropy_skip_zeros:  # TensorRT's algorithm as published: zeros kept, no smoothing, no spike rule
            return min(amax_entropy(hist, upper, levels=ENTROPY_LEVELS, robust=False), absmax)
        return min(amax_entropy(hist, upper, levels=ENTROPY_LEVELS, zeros=float(state.zeros)), absmax)
    if method == "mse":
        return min(amax_mse(hist, upper), absmax)
    raise CalibrationError(f"unknown calibration method {method!r}; choose from {', '.join(METHOD_NAMES)}")


def _histogram_summary(state: HistogramState) -> dict[str, Any]:
    return {
        "count": state.count,
        "zeros": state.zeros,
        "absmax": state.absmax,
        "fine_bins": state.bins,
        "upper": state.upper,
        "quantiles": {f"{q * 100:g}": state.quantile(q) for q in _SUMMARY_QUANTILES},
    }


def tensor_range(state: HistogramState, method: str, *, percentile: float = DEFAULT_PERCENTILE,
                 entropy_skip_zeros: bool = ENTROPY_SKIP_ZEROS, probability: bool = False) -> TensorRange:
    """The :class:`TensorRange` of one tensor for ``method``.

    ``clipped_fraction`` is the share of all usable values (exact zeros included) that saturate at run time:
    above ``amax`` by more than half an INT8 step (amax / 127). Those within it round to the top level as
    ``amax`` does: a HardSigmoid's 1.0 against an mse amax of 0.9985 saturates nothing. ``zeroed_fraction``
    is the other end: the share of non-zero values below half a step, which INT8 reads as 0. ``predicted_sqnr_db``
    weighs both by the values' energy (quantlab.noise): a range that saturates 0.4 % of a tensor's values can
    still lose most of its signal when those values are its largest.

    ``probability``: a Softmax's output (:func:`quantlab.stats.probability_tensors`), whose whole range entropy and
    percentile keep: their largest values are the keys a query attends to, which they clipped (a Llama's attention
    at 0.52 of its 1.0, its INT8 at 19.4 dB where the whole range gave 30.1; Swin's corner windows at 0.13 of 0.26).
    Not for entropy as TensorRT published it (``entropy_skip_zeros=False``)."""
    amax = _amax(state, method, percentile, entropy_skip_zeros)
    if probability and (method == "percentile" or (method == "entropy" and entropy_skip_zeros)):
        amax = max(amax, state.absmax)
    if 0.0 < amax < SMALLEST_AMAX:
        amax = SMALLEST_AMAX  # its scale would be a denormal float32: raised, with a note (underflow_notes)
    return TensorRange(
        amax=amax,
        min=state.min,
        max=state.max,
        clipped_fraction=state.fraction_above(amax * (1.0 + 0.5 / MSE_LEVELS)),
        zeroed_fraction=state.zeroed_fraction(amax, MSE_LEVELS),
        predicted_sqnr_db=state.predicted_sqnr_db(amax, MSE_LEVELS),
        excluded=state.excluded,
        histogram=_histogram_summary(state),
    )


def _probability_note(method: str, entropy_skip_zeros: bool, probabilities: frozenset[str],
                      unquantized: frozenset[str]) -> tuple[str, ...]:
    """What :func:`tensor_range` did to the Softmax outputs a plan may quantize."""
    kept = sorted(probabilities - unquantized)
    if not kept or not (method == "percentile" or (method == "entropy" and entropy_skip_zeros)):
        return ()
    shown = ", ".join(map(repr, kept[:3])) + (f" and {len(kept) - 3} more" if len(kept) > 3 else "")
    return (f"{len(kept)} Softmax output(s) keep their whole range under {method} ({shown}): their largest values, "
            "the keys a query attends to, are the ones that matter, and clipping them cost a Llama 11 dB",)


def _ranges(stats: Statistics, method: str, percentile: float, entropy_skip_zeros: bool,
            probabilities: Collection[str] = ()) -> dict[str, TensorRange]:
    """Every tensor's range, in one thread: the searches take 0.1-3 ms a tensor (quantlab.entropy_search,
    quantlab.mse_search), and threads lost time to each other (each search's return waited for the GIL)."""
    return {name: tensor_range(state, method, percentile=percentile, entropy_skip_zeros=entropy_skip_zeros,
                               probability=name in probabilities)
            for name, state in stats.tensors.items()}


def table_from_statistics(
    stats: Statistics,
    method: str,
    *,
    percentile: float = DEFAULT_PERCENTILE,
    calib_set: Mapping[str, Any] | None = None,
    versions: Mapping[str, str] | None = None,
    entropy_skip_zeros: bool = ENTROPY_SKIP_ZEROS,
    unquantized: Collection[str] = (),
    bodies: Mapping[str, Mapping[str, HistogramState]] | None = None,
    probabilities: Collection[str] = (),
) -> CalibrationTable:
    """One method's table from collected statistics (no model run: methods share one pass); ``bodies``: the
    statistics of Loop/Scan bodies and If branches (:func:`quantlab.stats.bodies.collect_body_statistics`), ranged
    the same way.

    ``entropy_skip_zeros=False`` gives TensorRT's entropy algorithm exactly as
    published: exact zeros included, no smoothing, no point-mass rule
    (``quantlab.calibrators.amax_entropy(robust=False)``).
    ``unquantized`` names the tensors no INT8 plan puts a Q/DQ on (only the
    notes use it: see :func:`statistics_notes`, :func:`clipping_notes`); ``probabilities`` the Softmax outputs
    whose whole range entropy and percentile keep (:func:`tensor_range`).
    """
    (method,) = resolve_methods([method])
    settings = method_settings(method, percentile=percentile, bins=stats.bins, huge_threshold=stats.huge_threshold,
                               entropy_skip_zeros=entropy_skip_zeros)
    settings["samples"] = stats.samples
    probabilities = frozenset(probabilities) & set(stats.tensors)
    ranges = _ranges(stats, method, percentile, entropy_skip_zeros, probabilities)
    inside = {node: {t: tensor_range(state, method, percentile=percentile, entropy_skip_zeros=entropy_skip_zeros)
                     for t, state in states.items()} for node, states in (bodies or {}).items()}
    return CalibrationTable(
        method=method,
        ranges=ranges,
        model_sha256=stats.model_sha256,
        settings=settings,
        calib_set=dict(calib_set or {}),
        versions=dict(versions if versions is not None else tool_versions()),
        notes=statistics_notes(stats, frozenset(unquantized))
        + underflow_notes(method, ranges, unquantized=frozenset(unquantized))
        + clipping_notes(method, ranges, stats, entropy_skip_zeros=entropy_skip_zeros,
                         unquantized=frozenset(unquantized))
        + zeroing_notes(method, ranges, unquantized=frozenset(unquantized))
        + noise_notes(method, ranges, unquantized=frozenset(unquantized))
        + noise_notes(method, {f"{node}/{t}": r for node, body in inside.items() for t, r in body.items()})
        + _probability_note(method, entropy_skip_zeros, probabilities, frozenset(unquantized)),
        bodies=inside,
    )


def recorded_shapes(dataset: Any, model: LoadedModel, shapes: ShapeLog) -> dict[str, Any]:
    """What a table keeps of the sample shapes it was calibrated on, for ``quantlab build``'s default engine
    profiles (:func:`quantlab.shapes.shapes_for_table`): ``input_shapes`` ([*shape, samples] rows per input,
    the batch axis at 1: the same whatever the batch size) and ``batch_axes`` (per input: the axis samples
    were stacked on, None for none)."""
    axis = getattr(dataset, "batch_axis", lambda name: 0)
    return {"input_shapes": shapes.as_dict(), "batch_axes": {name: axis(name) for name in model.input_names}}


def _dataset_size(dataset: Any) -> int | None:
    for attr in ("count", "size"):
        value = getattr(dataset, attr, None)
        if isinstance(value, int):
            return value
    try:
        return len(dataset)
    except TypeError:
        return None


def _checked_request(model: LoadedModel, methods: Sequence[str] | str, percentile: float, batch_size: int,
                     tensors: Sequence[str] | None) -> tuple[str, ...]:
    """The methods asked for, once the settings and the model are known to be usable (CalibrationError if not)."""
    chosen = resolve_methods(methods)
    if batch_size < 1:
        raise CalibrationError(f"batch_size must be >= 1, got {batch_size}")
    if "percentile" in chosen:
        check_percentile(percentile)
    check_not_quantized(model)
    check_float_activations(model)
    check_float32(model)  # before the pass: a float16 model's table no build could use
    if tensors is not None and not tensors:
        raise CalibrationError(f"{model.label}: the list of tensors to calibrate is empty; give at least one")
    return chosen


def calibrate(
    model: LoadedModel,
    dataset: Any,
    methods: Sequence[str] | str = (DEFAULT_METHOD,),
    *,
    percentile: float = DEFAULT_PERCENTILE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    backend: Backend | None = None,
    progress: bool = False,
    tensors: Sequence[str] | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    entropy_skip_zeros: bool = ENTROPY_SKIP_ZEROS,
) -> CalibrationResult:
    """Calibrate ``model`` on ``dataset`` (a ``quantlab.data.DataSet``) with every method in ``methods``.

    Checks the data against the model's inputs first (InputMismatchError),
    fingerprints every batch as it streams (DataError on NaN/Inf, naming the
    sample and input), then computes all methods from one statistics pass.
    ``entropy_skip_zeros=False``: the entropy method runs TensorRT's algorithm
    as published (exact zeros kept, no smoothing, no point-mass rule; clips
    ReLU outputs hard, see quantlab.calibrators.amax_entropy).
    """
    from .data import DataFingerprint, check_inputs

    chosen = _checked_request(model, methods, percentile, batch_size, tensors)
    dataset = with_carry(dataset, model, streams=batch_size)
    check_inputs(dataset, model, batch_size=batch_size)
    fingerprint, shapes = DataFingerprint(), ShapeLog()

    def on_batch(item: Any) -> None:
        fingerprint.update(item)
        shapes.observe_samples(batch_feeds(item), getattr(item, "batch_axes", {}), getattr(item, "alone_shapes", None))

    stats = collect_statistics(
        model,
        lambda: dataset.batches(batch_size),
        tensors=tensors,
        backend=backend,
        memory_budget_bytes=memory_budget_bytes,
        on_batch=on_batch,
        progress=progress,
        total=_dataset_size(dataset),
    )
    bodies, body_notes = _body_statistics(model, dataset, batch_size, backend, stats, progress)
    summary = fingerprint.summary()
    unquantized = unquantized_tensors(model.proto)
    probabilities = probability_tensors(model.proto)
    calib_set = {"manifest": dataset.manifest_record(), "sha256": summary.sha256, "count": summary.count,
                 **recorded_shapes(dataset, model, shapes)}
    if model.bindings:
        calib_set["bind"] = dict(model.bindings)  # part of the model's hash: build needs the same --bind
    versions = tool_versions()

    def table(method: str) -> CalibrationTable:
        made = table_from_statistics(stats, method, percentile=percentile, calib_set=calib_set, versions=versions,
                                     entropy_skip_zeros=entropy_skip_zeros, unquantized=unquantized, bodies=bodies,
                                     probabilities=probabilities)
        return replace(made, notes=made.notes + body_notes) if body_notes else made

    tables = {method: table(method) for method in chosen}
    hints = bind_hints(model.proto, _constant_unbatched_inputs(dataset, summary), summary.count)
    if hints:
        tables = {m: replace(t, notes=t.notes + hints) for m, t in tables.items()}
    return CalibrationResult(tables=tables, statistics=stats, data=summary)


def _body_statistics(model: LoadedModel, dataset: Any, batch_size: int, backend: Backend | None, stats: Statistics,
                     progress: bool) -> tuple[dict[str, dict[str, HistogramState]], tuple[str, ...]]:
    """The statistics of Loop/Scan bodies and If branches (one more pass over the data, only for a model with such a body) and the
    notes on them: which bodies were calibrated, and any left float."""
    from .stats.bodies import calibrated_bodies, collect_body_statistics

    try:
        found = calibrated_bodies(model)
        if not found:
            return {}, ()
    except Exception as exc:  # noqa: BLE001 - an add-on pass: the main graph's ranges are complete without it
        return {}, (f"control-flow bodies were not calibrated (they stay float): {type(exc).__name__}: {exc}",)
    if backend is None:
        from .backends import get_backend

        backend = get_backend("ort")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=_dataset_size(dataset), desc="loop bodies", unit="sample", dynamic_ncols=True)

    def items() -> Any:
        for item in dataset.batches(batch_size):
            yield item
            if bar is not None:
                bar.update(batch_size_of(item, batch_feeds(item)))

    try:
        bodies, notes = collect_body_statistics(model, items(), backend, stats.bins, stats.huge_threshold, found)
    except (DataError, InputMismatchError):
        raise  # the data itself: the main pass would have said it first
    except Exception as exc:  # noqa: BLE001 - as above
        bodies, notes = {}, (f"control-flow bodies were not calibrated (they stay float): {type(exc).__name__}: {exc}",)
    finally:
        if bar is not None:
            bar.close()
    if bodies:
        shown = ", ".join(f"{node!r} ({len(states)} tensors)" for node, states in bodies.items())
        notes = (f"control-flow bodies calibrated (Loop/Scan step by step, If branches as the data takes them; "
                 f"quantlab.stats.bodies): {shown}",) + notes
    return bodies, notes


def _constant_unbatched_inputs(dataset: Any, summary: Any) -> dict[str, float | int | list[Any]]:
    """Inputs without a batch axis that held one single value in every sample (what ``--bind`` takes:
    a number, or a list for a one-element tensor of rank > 0)."""
    axis = getattr(dataset, "batch_axis", lambda name: 0)
    out: dict[str, float | int | list[Any]] = {}
    for s in getattr(summary, "inputs", ()):
        if axis(s.name) is not None or not s.values or s.min != s.max or None in s.shape or math.prod(s.shape) != 1:
            continue
        value = int(s.min) if np.dtype(s.dtype).kind in "biu" else float(s.min)
        out[s.name] = np.full(s.shape, value).tolist() if s.shape else value
    return out

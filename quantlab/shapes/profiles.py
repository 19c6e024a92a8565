"""Optimisation profiles derived from data: (smallest, most frequent, largest) per axis of the shapes seen.

Where an engine build's ranges come from, in order: ``--shapes`` when given, else the shapes a
calibration table recorded plus those of the validation batches (:class:`ShapeLog`), else None
(the builder's guess). The batch axis is set apart: its minimum is 1 (a last partial batch may
hold any count) and, for sample shapes, its OPT and MAX are the run's batch (:data:`PROFILE_BATCH`),
since the data's samples say nothing about the batch a deployment runs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..errors import InputMismatchError
from .ranges import Shape, ShapeRange, check_range_fits, check_ranges, format_shapes, parse_shapes
from .shape_log import BATCH_AXIS, ShapeLog

__all__ = [
    "PROFILE_BATCH",
    "data_profile_note",
    "batch_axes_from_dict",
    "engine_shapes",
    "fixed_batch_size",
    "outside_profiles",
    "profiles_from_data",
    "range_from_shapes",
    "shapes_for_build",
    "shapes_for_table",
]

PROFILE_BATCH = 8
"""The batch an engine built from data shapes is tuned for and tops out at, (1, 8, 8) on the batch axis:
quantlab's default batch size (calibration, compare, search). The data's sample shapes say nothing about the
batch a deployment runs; ``--shapes`` sets it."""


def fixed_batch_size(shapes: Mapping[str, Sequence[Any] | None], batch_axes: Mapping[str, int | None] | None = None,
                     *, all_inputs: bool = False) -> int | None:
    """The batch size the inputs fix on their sample axes: a static export's ``[1, 3, 640, 640]`` fixes 1, and so
    does AECMOS's GRU state ``h0 [4, 1, 64]`` with its samples on axis 1 beside a dynamic ``input [N, 3, F, 160]``:
    the model runs at that batch only. None when no input fixes it, when two fix different sizes, or (with
    ``all_inputs``) when any input leaves it dynamic.

    ``shapes``: input name -> dims (an int, or a symbol / None / a negative int for a dynamic dim);
    ``batch_axes``: the axis each input's samples are on (missing: 0; None: no sample axis).
    """
    axes = batch_axes or {}
    sizes, dynamic = set(), False
    for name, shape in shapes.items():
        axis = axes.get(name, BATCH_AXIS)
        if axis is None or shape is None or axis >= len(shape):
            continue
        dim = shape[axis]
        if isinstance(dim, int) and not isinstance(dim, bool) and dim > 0:
            sizes.add(dim)
        else:
            dynamic = True
    if len(sizes) != 1 or (all_inputs and dynamic):
        return None
    return sizes.pop()


def _most_frequent(values: Counter[int]) -> int:
    """The most frequent value; ties go to the larger one (an engine tuned for it also fits the smaller)."""
    return max(values.items(), key=lambda kv: (kv[1], kv[0]))[0]


def range_from_shapes(name: str, network_shape: Sequence[int], seen: Mapping[Shape, int],
                      batch_axis: int | None = BATCH_AXIS, batch: int | None = None) -> ShapeRange:
    """(min, opt, max) per axis over the shapes ``seen`` (shape -> count); the batch axis' min is 1.

    ``batch``: the batch axis gets (1, batch, batch) whatever ``seen`` holds there (sample shapes).
    """
    net = [int(d) for d in network_shape]
    if batch is not None and batch_axis is not None:  # sample shapes: their batch axis is the model's
        seen = _with_batch(seen, batch_axis, net[batch_axis] if batch_axis < len(net) and net[batch_axis] >= 0 else 1)
    for shape in seen:
        check_range_fits(ShapeRange(name, shape, shape, shape), net)
    lo, opt, hi = [], [], []
    for axis, n in enumerate(net):
        values: Counter[int] = Counter()
        for shape, count in seen.items():
            values[shape[axis]] += count
        if axis == batch_axis and n < 0 and batch is not None:
            values = Counter({batch: 1})
        low = 1 if axis == batch_axis and n < 0 else min(values)
        lo.append(low), opt.append(_most_frequent(values)), hi.append(max(values))
    return ShapeRange(name, tuple(lo), tuple(opt), tuple(hi))


def _with_batch(seen: Mapping[Shape, int], axis: int, size: int) -> Counter[Shape]:
    out: Counter[Shape] = Counter()
    for shape, count in seen.items():
        out[shape[:axis] + (size,) + shape[axis + 1:] if axis < len(shape) else shape] += count
    return out


def profiles_from_data(network_inputs: Mapping[str, Sequence[int]], log: ShapeLog,
                       batch_axis: int | None | Mapping[str, int | None] = BATCH_AXIS,
                       batch: int | None = None) -> dict[str, ShapeRange]:
    """Ranges for every input with a dynamic dim (-1) that ``log`` saw; inputs it never saw are left out.

    ``batch_axis``: the axis samples are stacked on (min 1 there), one for all inputs or per
    input name (an input missing from the mapping, or mapped to None, has no batch axis).
    ``batch``: the batch axis' range is (1, batch, batch) (for a log of sample shapes), not the data's.
    """
    def axis(name: str) -> int | None:
        return batch_axis.get(name) if isinstance(batch_axis, Mapping) else batch_axis

    return {name: range_from_shapes(name, shape, log.shapes(name), axis(name), batch)
            for name, shape in network_inputs.items()
            if any(int(d) < 0 for d in shape) and log.shapes(name)}


def data_profile_note(ranges: Mapping[str, ShapeRange], network_inputs: Mapping[str, Sequence[int]]) -> str | None:
    """What an engine whose profiles came from data refuses: the dynamic axes (other than the batch, whose
    minimum is 1) the data never fed below some size (a decoder step's past calibrated from length 4 up: its
    steps 1-3 are refused at run time, as is any text line narrower than the narrowest calibrated; a ``past``
    input's cache never fed empty refuses the first step), and a ``past`` cache's lengths always (one longer than
    the longest calibrated, a later decoding step, is refused). None when every other dynamic axis reaches 0 or 1
    and no input is a cache."""
    narrow = []
    for name, r in ranges.items():
        net = network_inputs.get(name) or ()
        cache = "past" in name.lower()  # a KV cache: 0 at a decoder's first step, growing every step
        for axis, n in enumerate(net):
            if int(n) >= 0 or axis >= len(r.min):
                continue
            low, high = r.min[axis], r.max[axis]
            sizes = f"{low}" if low == high else f"{low} to {high}"
            if cache and axis:  # Whisper's decoder calibrated on 7 steps: its engine refused the 8th, unsaid
                why = (["a first step's empty cache is 0"] if low > 0 else []) + [
                    f"a cache longer than {high}, a later step, is refused"]
                narrow.append(f"{name!r} axis {axis}: {sizes} ({'; '.join(why)})")
            elif low > 1:
                narrow.append(f"{name!r} axis {axis}: {sizes}")
    if not narrow:
        return None
    shown = "; ".join(narrow[:4]) + (f"; and {len(narrow) - 4} more" if len(narrow) > 4 else "")
    return (f"the engine takes only the sizes the calibration data had on the model's dynamic axes ({shown}): a "
            "deployment feeding others (a decoder's first or later steps, a narrower image or text line) is refused "
            "at run time; give --shapes NAME:MIN,OPT,MAX with the sizes it will feed")


def batch_axes_from_dict(doc: object, where: str = "calib_set.batch_axes") -> dict[str, int | None]:
    """The per-input batch axes a table recorded (``{"state": 1, "sr": null}``); InputMismatchError naming
    ``where`` for anything else. Tables older than the record give None here: axis 0 for every input."""
    if not isinstance(doc, Mapping) or not all(
            v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0) for v in doc.values()):
        raise InputMismatchError(f"{where}: is {doc!r}; it maps input names to a batch axis (an integer >= 0) "
                                 "or null (no batch axis). Recalibrate to write it again.")
    return {str(k): v for k, v in doc.items()}


def shapes_for_build(shapes_text: str | Sequence[str] | None, recorded: Mapping[str, Sequence[Sequence[int]]] | None,
                     network_inputs: Mapping[str, Sequence[int]],
                     batch_axis: int | None | Mapping[str, int | None] = BATCH_AXIS,
                     seen: ShapeLog | None = None, batch: int | None = None) -> dict[str, ShapeRange] | None:
    """The ranges an engine build uses: ``--shapes`` when given (checked against ``network_inputs``), else
    those derived from the shapes the data had: ``recorded`` (a :meth:`ShapeLog.as_dict`, e.g. a table's
    ``calib_set["input_shapes"]``) plus ``seen`` (e.g. the validation batches), else None (the builder's
    guess, which names itself when the build fails).

    ``batch_axis`` and ``batch`` as in :func:`profiles_from_data` (a table records the axes as
    ``calib_set["batch_axes"]``).
    """
    if shapes_text:
        return check_ranges(parse_shapes(shapes_text), network_inputs)
    log = ShapeLog.from_dict(recorded, "calib_set.input_shapes") if recorded else ShapeLog()
    if seen is not None:
        log.update(seen)
    return profiles_from_data(network_inputs, log, batch_axis, batch) or None


def shapes_for_table(shapes_text: str | Sequence[str] | None, calib_set: Mapping[str, Any] | None,
                     network_inputs: Mapping[str, Sequence[int]], seen: ShapeLog | None = None,
                     where: str = "the calibration table", batch: int = PROFILE_BATCH) -> dict[str, ShapeRange] | None:
    """:func:`shapes_for_build` with the sample shapes and batch axes a calibration table recorded (its
    ``calib_set``: ``input_shapes``, ``batch_axes``; tables written before these keys give only ``seen``,
    on axis 0); the batch axis gets (1, ``batch``, ``batch``), ``batch`` the stream count of a ``[sequence]``
    set that declares one."""
    calib_set = calib_set or {}
    streams = _declared_streams(calib_set)
    if streams is not None:  # every command runs such a set at exactly its stream count: so will the engine
        batch = streams
    axes: int | None | Mapping[str, int | None] = BATCH_AXIS
    if "batch_axes" in calib_set:
        axes = batch_axes_from_dict(calib_set["batch_axes"], f"{where}: calib_set.batch_axes")
    fixed = fixed_batch_size(network_inputs, axes if isinstance(axes, Mapping) else None)
    if fixed is not None:  # an input fixes the batch (a recurrent state [layers, 1, H]): the engine runs that one
        batch = min(batch, fixed)
    return shapes_for_build(shapes_text, calib_set.get("input_shapes") or None, network_inputs, axes, seen, batch)


def _declared_streams(calib_set: Mapping[str, Any]) -> int | None:
    """The ``[sequence] streams`` of the manifest a table was calibrated on, None when it declares none."""
    manifest = calib_set.get("manifest")
    settings = manifest.get("settings") if isinstance(manifest, Mapping) else None  # the manifest file as parsed
    sequence = settings.get("sequence") if isinstance(settings, Mapping) else None
    streams = sequence.get("streams") if isinstance(sequence, Mapping) else None
    return streams if isinstance(streams, int) and not isinstance(streams, bool) and streams > 0 else None


def engine_shapes(backend: str, shapes_text: str | Sequence[str] | None, calib_set: Mapping[str, Any] | None,
                  network_inputs: Mapping[str, Sequence[int]], batches: Iterable[Any] | None = None,
                  where: str = "the calibration table", batch: int = PROFILE_BATCH) -> str | None:
    """The ``--shapes`` text every engine of a comparison or search on ``backend`` is built with: the ranges
    given, else those of the sample shapes ``calib_set`` recorded and of ``batches`` (the validation data),
    with the batch axis at (1, ``batch``, ``batch``) (the run's batch size), else None. ONNX Runtime needs
    none: None (and the given text unchanged, for the caller's check to refuse)."""
    if backend in ("ort", "onnxruntime"):
        return " ".join([shapes_text] if isinstance(shapes_text, str) else shapes_text) if shapes_text else None
    seen = ShapeLog.of(batches) if batches is not None and not shapes_text else None
    ranges = shapes_for_table(shapes_text, calib_set, network_inputs, seen, where, batch)
    return format_shapes(ranges) if ranges else None


def outside_profiles(label: str, profiles: Mapping[str, Sequence[Sequence[int]]],
                     inputs: Iterable[Mapping[str, Any]]) -> list[str]:
    """A note per input whose samples' sizes (a data summary's ``inputs``: ``name``, per-sample ``shape_min`` and
    ``shape_max``) fall outside the engine profile ``profiles[name]`` (``[min, opt, max]``, the batch on axis 0):
    the engine ``label`` names cannot run them, though ONNX Runtime compared them (a BART decoder step validated at
    an encoder length of 40 against an engine built up to 32, without a word)."""
    out = []
    for stats in inputs:
        profile = profiles.get(str(stats.get("name")))
        low, high = stats.get("shape_min"), stats.get("shape_max")
        if profile is None or low is None or high is None or len(profile) != 3:
            continue
        lo, hi = list(profile[0]), list(profile[2])
        if len(lo) == len(low) + 1:  # the batch axis: the profile's, not the samples'
            lo, hi = lo[1:], hi[1:]
        if len(lo) != len(low):
            continue
        if any(a < b for a, b in zip(low, lo)) or any(a > b for a, b in zip(high, hi)):
            sizes = "[" + ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in zip(low, high)) + "]"
            built = "[" + ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in zip(lo, hi)) + "]"
            out.append(f"{label}: input {stats.get('name')!r} has validation samples of sizes {sizes} where its "
                       f"engine's profile covers {built} (batch aside): the engine cannot run them, though these "
                       "figures (ONNX Runtime) cover them; rebuild with --shapes covering them")
    return out

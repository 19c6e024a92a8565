"""Input shape ranges (TensorRT optimisation profiles): parsed from ``--shapes``, derived from data.

A dynamic input needs a (min, opt, max) shape to build a TensorRT engine. Two sources:

* the user, trtexec's way: ``--shapes NAME:MIN,OPT,MAX`` (see :func:`parse_shapes`);
* the data: every shape the calibration / validation batches had (:class:`ShapeLog`),
  reduced per dimension to (smallest, most frequent, largest) (:func:`profiles_from_data`).

A dynamic dimension is never given a value the data never had: a text recognizer with
``[N, 3, 48, W]`` whose widths are 64..320 gets ``W`` in 64..320, not the old 1..32
default, whose ``W = 1`` makes the sequence reshape impossible ("kOPT values for profile 0
violate shape constraints ... reshape would change volume 0 to ..."). The batch axis is
the one exception: its minimum is 1, because a last partial batch may hold any count.

This module sits beside :mod:`quantlab.graph` (it imports only the errors): the data
layer, the backends and the CLI all use it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import InputMismatchError

__all__ = [
    "BATCH_AXIS",
    "PROFILE_BATCH",
    "SHAPES_GRAMMAR",
    "ShapeLog",
    "ShapeRange",
    "batch_axes_from_dict",
    "check_range_fits",
    "check_ranges",
    "engine_shapes",
    "format_shapes",
    "fixed_batch_size",
    "network_shapes",
    "parse_shapes",
    "profiles_from_data",
    "range_from_shapes",
    "shapes_for_build",
    "shapes_for_table",
]

Shape = tuple[int, ...]

BATCH_AXIS = 0
"""The axis the data layer stacks samples on; its profile minimum is 1 (partial batches)."""

PROFILE_BATCH = 8
"""The batch an engine built from data shapes is tuned for and tops out at, (1, 8, 8) on the batch axis:
quantlab's default batch size (calibration, compare, search). The data's sample shapes say nothing about the
batch a deployment runs; ``--shapes`` sets it."""

SHAPES_GRAMMAR = (
    "NAME:MIN,OPT,MAX (or NAME:SHAPE for one fixed shape), each shape as dims joined by 'x' "
    "(e.g. image:1x3x48x64,8x3x48x320,32x3x48x1600); several inputs separated by spaces or commas"
)
"""One line for error messages and ``--help``: what to write after ``--shapes``."""

_DIMS = re.compile(r"^[0-9]+(x[0-9]+)*$")


@dataclass(frozen=True)
class ShapeRange:
    """(min, opt, max) shapes of one input: TensorRT's optimisation profile for it.

    Checked on creation: same rank, dims >= 0 (TensorRT builds empty tensors: an optimum decoder's first step
    has a past of length 0), ``min <= opt <= max`` per axis.
    """

    name: str
    min: Shape
    opt: Shape
    max: Shape

    def __post_init__(self) -> None:
        ranks = {len(self.min), len(self.opt), len(self.max)}
        if len(ranks) != 1:
            raise InputMismatchError(
                f"shapes of input {self.name!r}: MIN, OPT and MAX have ranks {len(self.min)}, "
                f"{len(self.opt)} and {len(self.max)}; give three shapes of the same rank ({SHAPES_GRAMMAR})")
        for axis, (lo, opt, hi) in enumerate(zip(self.min, self.opt, self.max)):
            if lo < 0 or not lo <= opt <= hi:  # 0: an empty tensor, a decoder's first step (past length 0)
                raise InputMismatchError(
                    f"shapes of input {self.name!r}, axis {axis}: MIN {lo}, OPT {opt}, MAX {hi} must satisfy "
                    f"0 <= MIN <= OPT <= MAX ({SHAPES_GRAMMAR})")

    def as_tuple(self) -> tuple[Shape, Shape, Shape]:
        return self.min, self.opt, self.max

    def as_lists(self) -> list[list[int]]:
        """``[min, opt, max]`` as JSON lists: the form engine.json and the cache sidecar record."""
        return [list(self.min), list(self.opt), list(self.max)]

    def __str__(self) -> str:
        return f"{self.name}:{_text(self.min)},{_text(self.opt)},{_text(self.max)}"


def _text(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


def _dims(token: str, name: str, which: str) -> Shape:
    if not _DIMS.match(token):
        raise InputMismatchError(
            f"--shapes: {which} shape {token!r} of input {name!r} is not dims joined by 'x'; write {SHAPES_GRAMMAR}")
    return tuple(int(d) for d in token.split("x"))


def _specs(text: str) -> list[tuple[str, list[str]]]:
    """``text`` split into (name, [shape tokens]): a token holding ':' starts a new input."""
    specs: list[tuple[str, list[str]]] = []
    for token in (t for t in re.split(r"[\s,]+", text.strip()) if t):
        if ":" in token:
            name, first = token.rsplit(":", 1)  # names such as 'input:0' keep their own colons
            if not name:
                raise InputMismatchError(f"--shapes: {token!r} has no input name before ':'; write {SHAPES_GRAMMAR}")
            specs.append((name, [first]))
        elif not specs:
            raise InputMismatchError(
                f"--shapes: {token!r} comes before any input name; write {SHAPES_GRAMMAR}")
        else:
            specs[-1][1].append(token)
    return specs


def parse_shapes(text: str | Iterable[str]) -> dict[str, ShapeRange]:
    """``--shapes`` text (one string, or several: the flag may repeat) -> ranges by input name.

    Grammar (trtexec's ``--minShapes/--optShapes/--maxShapes`` in one flag)::

        SHAPES := SPEC ((',' | ' ') SPEC)*
        SPEC   := NAME ':' DIMS ',' DIMS ',' DIMS      min, opt, max
                | NAME ':' DIMS                        one fixed shape (min = opt = max)
        DIMS   := INT ('x' INT)*

    NAME is everything before the token's last ':', so ``input:0:1x3,...`` names ``input:0``.
    """
    texts = [text] if isinstance(text, str) else list(text)
    out: dict[str, ShapeRange] = {}
    for name, tokens in (spec for t in texts for spec in _specs(t)):
        if name in out:
            raise InputMismatchError(f"--shapes: input {name!r} is given twice; give each input once ({SHAPES_GRAMMAR})")
        if len(tokens) not in (1, 3):
            raise InputMismatchError(
                f"--shapes: input {name!r} has {len(tokens)} shapes ({','.join(tokens)}); give 3 "
                f"(MIN,OPT,MAX) or 1 (fixed): {SHAPES_GRAMMAR}")
        shapes = [_dims(t, name, which) for t, which in zip(tokens, ("MIN", "OPT", "MAX") if len(tokens) == 3
                                                               else ("the",))]
        lo, opt, hi = shapes if len(shapes) == 3 else shapes * 3
        out[name] = ShapeRange(name, lo, opt, hi)
    if not out:
        raise InputMismatchError(f"--shapes is empty; write {SHAPES_GRAMMAR}")
    return out


def format_shapes(ranges: Mapping[str, ShapeRange]) -> str:
    """The ``--shapes`` text that parses back to ``ranges`` (for messages and reports)."""
    return " ".join(str(r) for r in ranges.values())


def check_range_fits(shape_range: ShapeRange, network_shape: Sequence[int]) -> None:
    """InputMismatchError unless ``shape_range`` has the input's rank and keeps its fixed dims."""
    net = [int(d) for d in network_shape]
    name = shape_range.name
    if len(shape_range.min) != len(net):
        raise InputMismatchError(
            f"input {name!r}: the shapes given have rank {len(shape_range.min)} ({_text(shape_range.min)}) but "
            f"the model expects rank {len(net)} ({'x'.join(str(d) if d >= 0 else '?' for d in net)}, ? = dynamic)")
    for axis, n in enumerate(net):
        if n >= 0 and {shape_range.min[axis], shape_range.opt[axis], shape_range.max[axis]} != {n}:
            raise InputMismatchError(
                f"input {name!r}: the shapes given have axis {axis} in {shape_range.min[axis]}.."
                f"{shape_range.max[axis]} but the model fixes it to {n}; write {n} there")


def network_shapes(specs: Iterable[Any]) -> dict[str, list[int]]:
    """Input name -> shape with -1 for every dynamic dim, from :class:`quantlab.graph.TensorSpec`-like specs
    (``.name``, ``.shape`` of ints, dim names and None; an unknown rank gives no dims)."""
    return {str(s.name): [d if isinstance(d, int) and d >= 0 else -1 for d in (s.shape or ())] for s in specs}


def check_ranges(ranges: Mapping[str, ShapeRange], network_inputs: Mapping[str, Sequence[int]],
                 where: str = "--shapes") -> dict[str, ShapeRange]:
    """``ranges`` when every one names an input of the model and fits it (InputMismatchError naming ``where``)."""
    unknown = sorted(set(ranges) - set(network_inputs))
    if unknown:
        raise InputMismatchError(f"{where} names {', '.join(map(repr, unknown))}, which are not inputs of the "
                                 f"model; its inputs are {', '.join(map(repr, network_inputs))}")
    for name, shape_range in ranges.items():
        try:
            check_range_fits(shape_range, network_inputs[name])
        except InputMismatchError as exc:
            raise InputMismatchError(f"{where}: {exc}") from None
    return dict(ranges)


@dataclass
class ShapeLog:
    """Counts of the shapes seen per input, as batches stream by (calibration, validation).

    ``observe`` counts a feed dict's batch shapes; ``observe_samples`` its sample shapes (the
    batch axis set to 1, counted once per sample: what a calibration table keeps, the same
    whatever the batch size). :func:`profiles_from_data` turns the counts into ranges.
    """

    counts: dict[str, Counter[Shape]] = field(default_factory=dict)

    def observe(self, feeds: Mapping[str, object]) -> None:
        for name, array in feeds.items():
            shape = tuple(int(d) for d in getattr(array, "shape", ()))
            self.counts.setdefault(name, Counter())[shape] += 1

    def observe_samples(self, feeds: Mapping[str, object], batch_axes: Mapping[str, int | None],
                        alone: Mapping[str, Sequence[Sequence[int]]] | None = None) -> None:
        """Count each sample's shape: the batch axis (``batch_axes``, default 0; None: none) set to 1. An input
        without a batch axis counts once per sample of the batch too (the same counts whatever the batch size).
        ``alone``: for inputs a ``[pad]`` padded, each sample's shape padded alone (no batch axis;
        ``Batch.alone_shapes``), counted instead of the batch's padded one."""
        shapes = {name: [int(d) for d in getattr(array, "shape", ())] for name, array in feeds.items()}
        axes = {name: batch_axes.get(name, BATCH_AXIS) for name in shapes}
        sizes = [shape[axes[n]] for n, shape in shapes.items() if axes[n] is not None and axes[n] < len(shape)]
        samples = sizes[0] if sizes else 1
        for name, shape in shapes.items():
            counts = self.counts.setdefault(name, Counter())
            axis = axes[name]
            if alone and name in alone and axis is not None and axis < len(shape):
                for own in alone[name]:
                    counts[tuple(int(d) for d in own[:axis]) + (1,) + tuple(int(d) for d in own[axis:])] += 1
                continue
            if axis is not None and axis < len(shape):
                shape[axis] = 1
            counts[tuple(shape)] += samples

    @classmethod
    def of(cls, batches: Iterable[Any]) -> ShapeLog:
        """The sample shapes of every batch in ``batches`` (:class:`quantlab.data.Batch` items, on their
        ``batch_axes``, or plain feed mappings, batched on axis 0)."""
        log = cls()
        for item in batches:
            log.observe_samples(getattr(item, "feeds", item), getattr(item, "batch_axes", {}),
                                getattr(item, "alone_shapes", None))
        return log

    def update(self, other: ShapeLog) -> ShapeLog:
        """Add ``other``'s counts (e.g. the validation data's to the calibration data's); returns self."""
        for name, counts in other.counts.items():
            self.counts.setdefault(name, Counter()).update(counts)
        return self

    def shapes(self, name: str) -> Counter[Shape]:
        return self.counts.get(name, Counter())

    def as_dict(self) -> dict[str, list[list[int]]]:
        """Shapes seen per input as JSON, ``[*shape, count]`` rows (count-ordered): enough to derive the ranges again.

        A calibration table can keep it (``calib_set["input_shapes"]``) so that ``quantlab build``,
        which has no data, still builds profiles from the shapes the data had.
        """
        return {name: [[*shape, n] for shape, n in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))]
                for name, c in sorted(self.counts.items())}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Sequence[Sequence[int]]], where: str = "input_shapes") -> ShapeLog:
        """The log :meth:`as_dict` wrote; InputMismatchError naming ``where`` for anything else."""
        log = cls()
        for name, rows in doc.items():
            for row in rows:
                if not row or not all(isinstance(d, int) and d >= 0 for d in row):
                    raise InputMismatchError(f"{where}: input {name!r} has row {row!r}; rows are "
                                             "[dim, ..., dim, count] of non-negative integers")
                log.counts.setdefault(str(name), Counter())[tuple(row[:-1])] += row[-1]
        return log


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
    on axis 0); the batch axis gets (1, ``batch``, ``batch``)."""
    calib_set = calib_set or {}
    axes: int | None | Mapping[str, int | None] = BATCH_AXIS
    if "batch_axes" in calib_set:
        axes = batch_axes_from_dict(calib_set["batch_axes"], f"{where}: calib_set.batch_axes")
    fixed = fixed_batch_size(network_inputs, axes if isinstance(axes, Mapping) else None)
    if fixed is not None:  # an input fixes the batch (a recurrent state [layers, 1, H]): the engine runs that one
        batch = min(batch, fixed)
    return shapes_for_build(shapes_text, calib_set.get("input_shapes") or None, network_inputs, axes, seen, batch)


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

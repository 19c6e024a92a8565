"""Samples, batches and the :class:`DataSet` base: the lazy, ordered, batch-by-batch contract.

Every data set (manifest-backed or in-memory) loads sample ``i`` on demand
and stacks consecutive samples on each input's batch axis: axis 0 unless the
data set's ``batch_axes`` says otherwise (a recurrent ``state`` [2, N, 128] on
axis 1; None for an input with no batch axis, e.g. a scalar sample rate, which
every sample of a batch must then hold equal). A batch is refused before
loading when it could not fit in free memory.

Batching lives here alone (:func:`stack_samples`, :meth:`DataSet._iter_batches`):
a per-input batch axis or a sequence mode changes this module, not the sources.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..environment import available_memory_bytes, format_bytes, shape_bytes
from ..errors import DataError, InputMismatchError
from ..graph import TensorSpec
from ..schema import is_int
from .padding import PadSpec, alone_shapes, pad_samples

__all__ = [
    "Batch",
    "DataSet",
    "FirstSamples",
    "Sample",
    "SelectedSamples",
    "batch_fits",
    "checked_count",
    "format_shape",
    "stack_input",
    "stack_samples",
    "take_samples",
]

SAME_SHAPE_ADVICE = "make every sample the same shape (or use batch size 1)"


@dataclass(frozen=True)
class Sample:
    """One sample: feeds by input name (no batch axis) and its label (None without [labels])."""

    index: int
    key: str
    feeds: dict[str, np.ndarray]
    label: object | None = None


@dataclass(frozen=True)
class Batch:
    """Consecutive samples stacked on axis 0 (or the input's ``batch_axes`` entry; None: not stacked);
    ``labels`` is None when the set has no labels."""

    indices: tuple[int, ...]
    keys: tuple[str, ...]
    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    batch_axes: Mapping[str, int | None] = field(default_factory=dict)
    alone_shapes: Mapping[str, tuple[tuple[int, ...], ...]] = field(default_factory=dict)
    """Inputs ``[pad]`` padded: each sample's shape padded alone, without the batch axis
    (:func:`quantlab.data.padding.alone_shapes`); the engine profiles take these, not the batch's."""
    own_shapes: Mapping[str, tuple[tuple[int, ...], ...]] = field(default_factory=dict)
    """... and each sample's shape before any padding: what its content hash and input statistics read (the
    batch's padded form made them depend on the batch size)."""

    def per_sample(self, name: str) -> np.ndarray:
        """Input ``name`` with the samples on axis 0 (a value without a batch axis repeated per sample)."""
        array, axis = np.asarray(self.feeds[name]), self.batch_axes.get(name, 0)
        if axis is None:
            return np.broadcast_to(array, (len(self.indices), *array.shape))
        return np.moveaxis(array, axis, 0) if axis else array

    def __len__(self) -> int:
        return len(self.indices)


def format_shape(shape: Sequence[Any] | None) -> str:
    """``[1, 3, ?, ?]``: unknown dimensions as ``?``, an unknown rank as ``[?]``."""
    if shape is None:
        return "[?]"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def take_samples(array: np.ndarray, axis: int | None, index: int | slice) -> np.ndarray:
    """Sample(s) ``index`` of an input batched on ``axis`` (contiguous); an input without one (None) whole."""
    if axis is None:
        return array
    where = [slice(None)] * np.ndim(array)
    where[axis] = index
    taken = np.asarray(np.asarray(array)[tuple(where)])
    # ascontiguousarray makes a 0-d sample (one timestep of a [N] input) 1-d: the model's rank check refused it
    return np.ascontiguousarray(taken) if taken.ndim else taken


def stack_input(name: str, samples: Sequence[Sample], axis: int | None) -> np.ndarray:
    """One input's samples stacked on a new ``axis``; with no batch axis (None), the value they all hold."""
    first = samples[0]
    if axis is not None:
        return np.stack([s.feeds[name] for s in samples], axis=axis)
    for s in samples[1:]:
        if not np.array_equal(s.feeds[name], first.feeds[name]):
            raise DataError(
                f"input {name!r} has no batch axis (batch_axis = \"none\"), so every sample of a batch must hold "
                f"the same value, but sample {s.key!r} differs from sample {first.key!r}; give it a batch axis "
                "or use batch size 1."
            )
    return np.asarray(first.feeds[name])


def stack_samples(samples: Sequence[Sample], names: Sequence[str], label_dtype: str | None,
                  advice: Callable[[str], str], batch_axes: Mapping[str, int | None] | None = None,
                  padding: PadSpec | None = None) -> Batch:
    """Samples stacked on each input's batch axis, 0 by default, after ``padding`` made the inputs it names
    one length (DataError naming both samples when shapes or dtypes still differ)."""
    alone = alone_shapes(samples, padding)
    own = {n: tuple(tuple(int(d) for d in s.feeds[n].shape) for s in samples) for n in alone}
    samples = pad_samples(samples, padding)
    first = samples[0]
    feeds: dict[str, np.ndarray] = {}
    for name in names:
        ref = first.feeds[name]
        for s in samples[1:]:
            arr = s.feeds[name]
            if arr.shape != ref.shape or arr.dtype != ref.dtype:
                raise DataError(
                    f"input {name!r}: sample {s.key!r} is {arr.dtype} {arr.shape} but sample {first.key!r} is "
                    f"{ref.dtype} {ref.shape}; samples of a batch must match: {advice(name)}."
                )
        feeds[name] = stack_input(name, samples, (batch_axes or {}).get(name, 0))
    labels = None
    if label_dtype is not None:
        values = [s.label for s in samples]
        labels = np.array(values, dtype=object if label_dtype == "str" else label_dtype)
        if label_dtype == "str":
            labels = labels.astype(str)
    return Batch(indices=tuple(s.index for s in samples), keys=tuple(s.key for s in samples), feeds=feeds,
                 labels=labels, batch_axes=dict(batch_axes or {}), alone_shapes=alone, own_shapes=own)


def batch_fits(specs: Mapping[str, tuple[str, tuple[int, ...]]], batch: int, where: str, advice: str) -> None:
    """InputMismatchError when one batch (held twice while stacked) cannot fit in free memory."""
    available = available_memory_bytes()
    if available is None:
        return
    sizes = {n: shape_bytes((batch, *shape), np.dtype(dtype).itemsize) for n, (dtype, shape) in specs.items()
             if dtype not in ("undefined", "bfloat16")}
    if 2 * sum(sizes.values()) > available:
        name = max(sizes, key=lambda n: sizes[n])
        dtype, shape = specs[name]
        raise InputMismatchError(
            f"{where}: input {name!r}: a batch of {batch} samples of {dtype} {format_shape(shape)} is "
            f"{format_bytes(sizes[name])} ({sizes[name]} bytes), and a batch is held twice while it is stacked; this "
            f"machine has {format_bytes(available)} available. Refusing before loading it: {advice}."
        )


def checked_count(n: Any, what: str) -> int:
    """``n`` when it is an integer >= 1 (DataError naming ``what`` otherwise)."""
    if not is_int(n) or n < 1:
        raise DataError(f"{what} must be an integer >= 1, got {n!r}")
    return int(n)


class DataSet:
    """Ordered samples that load lazily; subclasses implement ``_load(i)``.

    ``batches(n)`` returns a fresh iterator each call, in the same order every
    time, holding at most one batch in memory.
    """

    role: str = "calibration"
    name: str = "data"
    input_names: tuple[str, ...] = ()
    label_dtype: str | None = None
    batch_axes: Mapping[str, int | None] = {}
    group_by_shape: bool = False
    padding: PadSpec | None = None  # [pad]: inputs padded to one length per batch (quantlab.data.padding)
    fed_back: Mapping[str, str] = {}
    """Output -> input a sequence set feeds it back into (quantlab.sequence): samples taken out of such a set
    carry their state already, but the state outputs still hold their samples on that input's batch axis."""

    def __len__(self) -> int:
        raise NotImplementedError

    def batch_axis(self, name: str) -> int | None:
        """The axis ``name``'s samples are stacked on (None: no batch axis, one value per batch)."""
        return self.batch_axes.get(name, 0)

    @property
    def count(self) -> int:
        return len(self)

    @property
    def has_labels(self) -> bool:
        return self.label_dtype is not None

    def _load(self, i: int) -> Sample:
        raise NotImplementedError

    def sample(self, i: int) -> Sample:
        return self._load(self._checked_index(i))

    def batches(self, batch_size: int) -> Iterator[Batch]:
        checked_count(batch_size, "batch_size")
        return self._iter_batches(batch_size)

    def head(self, n: int) -> DataSet:
        """The first ``n`` samples (all of them when the set holds fewer): same order, keys and feeds."""
        n = checked_count(n, "head(n): n")
        return self if n >= len(self) else self._first(n)

    def _describe_like(self, parent: DataSet) -> None:
        """Take ``parent``'s role, name, inputs, labels, batch axes, batching and padding (a set built on it)."""
        self.role, self.name = parent.role, parent.name
        self.input_names, self.label_dtype = parent.input_names, parent.label_dtype
        self.batch_axes, self.group_by_shape = parent.batch_axes, parent.group_by_shape
        self.padding, self.fed_back = parent.padding, parent.fed_back

    def _first(self, n: int) -> DataSet:
        """Samples 0..n-1 (``n`` < len); subclasses may return their own kind instead of a view."""
        return FirstSamples(self, n)

    def select(self, indices: Sequence[int], *, name: str | None = None) -> DataSet:
        """The samples ``indices``, in that order, as a data set that loads them from this one: same
        feeds, keys, labels, batch axes and padding. Without padding it batches equal shapes together
        (``batching = "by_shape"``) whatever this set does: a set in file order may keep its sizes apart
        only by that order (images of 56² then 70²), and a search's ranking subset takes samples from
        both (it failed on a manifest compare accepts)."""
        return SelectedSamples(self, [self._checked_index(i) for i in indices], name=name)

    def _checked_index(self, i: int) -> int:
        n = len(self)
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
            raise TypeError(f"sample index must be an int, got {type(i).__name__}")
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range: {self.name} holds {n} samples")
        return int(i) % n

    def _stack_advice(self, name: str) -> str:
        return SAME_SHAPE_ADVICE

    def _iter_batches(self, batch_size: int) -> Iterator[Batch]:
        n = len(self)
        if n:
            specs = {k: (v.dtype, tuple(int(d) for d in v.shape or ())) for k, v in self.input_specs().items()}
            batch_fits(specs, min(batch_size, n), f"data set {self.describe_source()}",
                       "lower the batch size (--batch-size / batch_size=)")
        if self.group_by_shape:
            yield from self._batches_by_shape(batch_size)
            return
        for start in range(0, n, batch_size):
            samples = [self._load(i) for i in range(start, min(start + batch_size, n))]
            yield stack_samples(samples, self.input_names, self.label_dtype, self._stack_advice, self.batch_axes,
                                self.padding)

    def _batches_by_shape(self, batch_size: int) -> Iterator[Batch]:
        """Samples of equal shapes batched together (``batching = "by_shape"``: text lines of several widths).

        A batch is given as soon as ``batch_size`` samples of one shape are in; the
        unfinished ones follow at the end, in the order their shapes first appeared.
        Holds at most (distinct shapes x batch size) samples. Same data, same batches.
        """
        pending: dict[tuple[Any, ...], list[Sample]] = {}
        for i in range(len(self)):
            sample = self._load(i)
            shape = tuple((name, sample.feeds[name].shape, sample.feeds[name].dtype.str) for name in self.input_names)
            group = pending.setdefault(shape, [])
            group.append(sample)
            if len(group) == batch_size:
                yield stack_samples(group, self.input_names, self.label_dtype, self._stack_advice, self.batch_axes,
                                    self.padding)
                del pending[shape]
        for group in pending.values():
            yield stack_samples(group, self.input_names, self.label_dtype, self._stack_advice, self.batch_axes,
                                    self.padding)

    def input_specs(self) -> dict[str, TensorSpec]:
        """dtype and per-sample shape (no batch axis) of each input, from the first sample."""
        cached = getattr(self, "_specs", None)
        if cached is None:
            first = self.sample(0)
            cached = {n: TensorSpec(n, first.feeds[n].dtype.name, tuple(first.feeds[n].shape))
                      for n in self.input_names}
            self._specs = cached
        return dict(cached)

    def manifest_record(self) -> dict[str, Any]:
        raise NotImplementedError

    def describe_source(self) -> str:
        return self.name


class SelectedSamples(DataSet):
    """Chosen samples of another data set, in the order given, loaded from it (:meth:`DataSet.select`)."""

    def __init__(self, parent: DataSet, indices: Sequence[int], *, name: str | None = None) -> None:
        self.parent, self._indices = parent, list(indices)
        self._describe_like(parent)
        self.name = name or parent.name
        self.group_by_shape = self.padding is None  # see DataSet.select

    def __len__(self) -> int:
        return len(self._indices)

    def _load(self, i: int) -> Sample:
        return self.parent._load(self._indices[i])

    def _stack_advice(self, name: str) -> str:
        return self.parent._stack_advice(name)

    def manifest_record(self) -> dict[str, Any]:
        return dict(self.parent.manifest_record(), samples=list(self._indices))

    def describe_source(self) -> str:
        return f"{len(self)} samples of {self.parent.describe_source()}"


class FirstSamples(SelectedSamples):
    """The first ``n`` samples of another data set, loaded from it (what :meth:`DataSet.head` gives by default)."""

    def __init__(self, parent: DataSet, n: int) -> None:
        super().__init__(parent, range(n))
        self._n = n

    def manifest_record(self) -> dict[str, Any]:
        return dict(self.parent.manifest_record(), count=self._n)

    def describe_source(self) -> str:
        return self.parent.describe_source()

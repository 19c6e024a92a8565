"""``[pad]``: samples of different lengths padded to one length per batch, with an optional mask input.

Text lines of several widths, sentences of several lengths: a batch needs one shape.
``batching = "by_shape"`` batches equal shapes together; ``[pad]`` instead pads every
sample of a batch, on one axis, to the longest (or the next multiple of ``to``)::

    sample a: ids [5]   mask [1 1 1 1 1]        batch: ids [[5 . . . . . .]     mask [[1 1 1 1 1 0 0 0]
    sample b: ids [8]   mask [1 1 1 1 1 1 1 1]          [8 . . . . . . .]]          [1 1 1 1 1 1 1 1]]
                   (mask made per sample:                 padded with value       padded with mask_values[1]
                    mask_values[0], one per position)     (to = "max": 8)

The mask is an input quantlab makes (the data must not feed it): one value per position
of the padded axis of the first input in ``inputs``, ``mask_values[0]`` on the sample's
own positions and ``mask_values[1]`` on padding (``[0.0, -1e9]`` for an additive mask).
Its dtype is int64 when both values are integers, else float32. A sample read alone
(``DataSet.sample``) is not padded; its mask is all ``mask_values[0]``.

The schema keys, their parsing into :class:`PadSpec` and the padding sit together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..errors import DataError, ManifestError
from ..schema import Key, Where, check_table, is_int, is_num, str_list

__all__ = ["PAD_KEYS", "PadSpec", "alone_shapes", "pad_samples", "parse_pad", "with_mask"]

GUIDE = "calib_sets/README.md"

PAD_KEYS: dict[str, Key] = {
    "inputs": Key("a non-empty list of input names", str_list, 'inputs = ["input_ids"]'),
    "value": Key("a number", is_num, "value = 0.0   # what padded positions hold"),
    "axis": Key("an integer (an axis of one sample, no batch axis; < 0 counts from the end)", is_int,
                "axis = 0   # the axis whose length differs, e.g. 2 for a text line [3, 48, W]"),
    "to": Key('"max" or an integer >= 1', lambda v: v == "max" or (is_int(v) and v >= 1),
              'to = "max"   # the batch\'s longest; or to = 32: up to the next multiple of 32'),
    "mask": Key("a model input name", lambda v: isinstance(v, str) and bool(v),
                'mask = "attention_mask"   # an input quantlab makes: real positions vs padding'),
    "mask_values": Key("[real, padding]: two numbers", lambda v: isinstance(v, list) and len(v) == 2
                       and all(is_num(x) for x in v), "mask_values = [1, 0]   # or [0.0, -1e9] (additive)"),
}
"""Keys of ``[pad]``; ``inputs`` is required."""

EXAMPLE = '[pad]\ninputs = ["input_ids"]\nvalue = 0\naxis = 0\nto = "max"\nmask = "attention_mask"'


@dataclass(frozen=True)
class PadSpec:
    """How samples of one batch are padded to one length (see the module docstring)."""

    inputs: tuple[str, ...]
    value: float = 0.0
    axis: int = 0
    to: int | None = None          # None: the batch's longest; k: up to the next multiple of k
    mask: str | None = None
    mask_values: tuple[float, float] = (1, 0)

    @property
    def mask_dtype(self) -> np.dtype:
        return np.dtype(np.int64 if all(is_int(v) for v in self.mask_values) else np.float32)

    def record(self) -> dict[str, Any]:
        """What a run records about the padding (the manifest record's ``padding``)."""
        return {"inputs": list(self.inputs), "value": self.value, "axis": self.axis,
                "to": "max" if self.to is None else self.to, "mask": self.mask,
                "mask_values": list(self.mask_values), "mask_dtype": self.mask_dtype.name if self.mask else None}


def parse_pad(table: dict[str, Any] | None, where: Where) -> PadSpec | None:
    """The manifest's ``[pad]`` (None without one); ManifestError naming the file, line and key."""
    if table is None:
        return None
    check_table(table, PAD_KEYS, where, "pad", error=ManifestError, guide=GUIDE)
    if "inputs" not in table:
        raise ManifestError(f"{where.at('pad')}: no 'inputs'; say which inputs are padded, e.g.\n{EXAMPLE}")
    inputs = tuple(table["inputs"])
    mask = table.get("mask")
    if mask in inputs or len(set(inputs)) != len(inputs):
        raise ManifestError(f"{where.at('pad', None, 'mask' if mask in inputs else 'inputs')}: an input is "
                            f"named twice ({list(inputs)}, mask {mask!r}); list each padded input once, and "
                            "the mask (which quantlab makes) apart from them, e.g.\n" + EXAMPLE)
    if "mask_values" in table and mask is None:
        raise ManifestError(f"{where.at('pad', None, 'mask_values')}: set without 'mask'; name the mask input "
                            'too, e.g. mask = "attention_mask"')
    to = table.get("to", "max")
    return PadSpec(inputs=inputs, value=table.get("value", 0.0), axis=table.get("axis", 0),
                   to=None if to == "max" else int(to), mask=mask,
                   mask_values=tuple(table.get("mask_values", (1, 0))))  # type: ignore[arg-type]


def _axis(spec: PadSpec, name: str) -> int:
    """The padded axis of ``name``: ``spec.axis``, except the mask's (it has one axis)."""
    return 0 if name == spec.mask else spec.axis


def _length(array: np.ndarray, spec: PadSpec, name: str, key: str) -> int:
    axis = _axis(spec, name)
    if not -array.ndim <= axis < array.ndim:
        raise DataError(f"sample {key!r}: input {name!r} is {list(array.shape)} and has no axis {axis} to pad "
                        "([pad] axis counts the axes of one sample, without the batch axis); fix [pad] axis.")
    return int(array.shape[axis])


def with_mask(feeds: dict[str, np.ndarray], spec: PadSpec | None, key: str) -> dict[str, np.ndarray]:
    """``feeds`` plus the mask of an unpadded sample (``mask_values[0]`` along the first padded input's axis)."""
    if spec is None or spec.mask is None:
        return feeds
    first = spec.inputs[0]
    length = _length(feeds[first], spec, first, key)
    return {**feeds, spec.mask: np.full((length,), spec.mask_values[0], dtype=spec.mask_dtype)}


def _target(lengths: Sequence[int], to: int | None) -> int:
    longest = max(lengths)
    return longest if to is None else -(-longest // to) * to


def _padded(array: np.ndarray, axis: int, length: int, value: float) -> np.ndarray:
    """``array`` with ``value`` appended on ``axis`` up to ``length`` (cast to the array's dtype)."""
    if array.shape[axis] == length:
        return array
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, length - array.shape[axis])
    return np.pad(array, widths, constant_values=np.asarray(value).astype(array.dtype))


def alone_shapes(samples: Sequence[Any], spec: PadSpec | None) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Per padded input (and the mask), each sample's shape padded alone: its own length, or the next multiple
    of ``to``. What an engine serving one request at a time is fed, so what its profile must admit: a batch's
    padded length is that of its longest sample alone, the shortest sample's alone length may be far below it
    (a 4-token sentence batched with a 26-token one)."""
    if spec is None:
        return {}
    names = [*spec.inputs, *([spec.mask] if spec.mask else [])]
    out: dict[str, tuple[tuple[int, ...], ...]] = {}
    for n in names:
        shapes = []
        for s in samples:
            length = _length(s.feeds[n], spec, n, s.key)  # DataError naming the sample for an axis it lacks
            shape = list(s.feeds[n].shape)
            shape[_axis(spec, n) % len(shape)] = _target([length], spec.to)
            shapes.append(tuple(int(d) for d in shape))
        out[n] = tuple(shapes)
    return out


def pad_samples(samples: Sequence[Any], spec: PadSpec | None) -> list[Any]:
    """``samples`` (:class:`quantlab.data.Sample`) with ``spec``'s inputs padded to one length per input."""
    if spec is None:
        return list(samples)
    names = [*spec.inputs, *([spec.mask] if spec.mask else [])]
    fills = {name: spec.value for name in spec.inputs} | ({spec.mask: spec.mask_values[1]} if spec.mask else {})
    targets = {n: _target([_length(s.feeds[n], spec, n, s.key) for s in samples], spec.to) for n in names}
    return [replace(s, feeds={**s.feeds, **{n: _padded(s.feeds[n], _axis(spec, n), targets[n], fills[n])
                                            for n in names}})
            for s in samples]

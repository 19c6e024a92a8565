"""How many passes over the data: group the exposed tensors so one batch of each group fits a memory budget."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from ..graph import LoadedModel, tensor_specs
from ..graph.light import light_copy

__all__ = ["DEFAULT_MEMORY_BUDGET", "DEFAULT_RUN_BUDGET", "RunRows", "plan_groups", "resolved_sizes", "samples_per_run"]

DEFAULT_MEMORY_BUDGET = 2 << 30
"""Bytes of exposed activations per model run before statistics are collected in several passes."""

DEFAULT_RUN_BUDGET = 256 << 20
"""Bytes of exposed activations in memory before a batch is run in slices (EfficientNet-Lite0: 4 samples;
2 per run when the reducers overlap the next run, which holds two runs' outputs: see quantlab.stats.collect).

Measured on EfficientNet-Lite0, every activation exposed (CPU ms per sample):
runs of 2-4 samples 63-67, of 8 71, of 16 72-79, of 32 83-84; peak RSS 0.65 GB
at 4 samples per run, 0.9 GB at 8, 2.1 GB at 32.
"""


def resolved_sizes(model: LoadedModel, names: Sequence[str], feeds: Mapping[str, np.ndarray], *,
                   infer: bool = True) -> dict[str, int | None]:
    """Bytes per tensor for this batch's input shapes (None when shape inference cannot tell).

    The graph's symbolic shapes first; for what they leave unknown, ONNX shape inference on a copy
    with these shapes (``infer=False``: not, it can take a second on a large model).
    """
    symbols: dict[str, int] = {}
    for spec in model.inputs:
        if spec.name in feeds and spec.shape is not None:
            for dim, actual in zip(spec.shape, np.shape(feeds[spec.name])):
                if isinstance(dim, str):
                    symbols.setdefault(dim, int(actual))

    def size_of(specs: Mapping[str, Any]) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for name in names:
            spec = specs.get(name)
            if spec is None or spec.shape is None:
                out[name] = None
                continue
            numel = 1
            for dim in spec.shape:
                value = dim if isinstance(dim, int) else symbols.get(dim) if isinstance(dim, str) else None
                if value is None:
                    numel = -1
                    break
                numel *= value
            itemsize = np.dtype(spec.dtype).itemsize if spec.dtype not in ("undefined", "bfloat16") else 4
            out[name] = None if numel < 0 else numel * itemsize
        return out

    sizes = size_of(tensor_specs(model.proto))
    if not infer or all(v is not None for v in sizes.values()):
        return sizes
    concrete = light_copy(model.proto)  # the weights' data is not needed, only their shapes
    del concrete.graph.value_info[:]
    for inp in concrete.graph.input:
        if inp.name in feeds:
            shape = np.shape(feeds[inp.name])
            dims = inp.type.tensor_type.shape.dim
            if len(dims) == len(shape):
                for d, actual in zip(dims, shape):
                    d.Clear()
                    d.dim_value = int(actual)
    try:
        concrete = onnx.shape_inference.infer_shapes(concrete, strict_mode=False, data_prop=True)
    except Exception:  # estimation only: fall back to what the symbolic shapes gave
        return sizes
    again = size_of(tensor_specs(concrete))
    return {n: sizes[n] if sizes[n] is not None else again[n] for n in names}


def plan_groups(sizes: Mapping[str, int | None], budget: int) -> list[list[str]]:
    """Split tensors (in order) into groups whose summed bytes stay within ``budget``.

    A tensor of unknown size counts as the largest known one; a tensor larger
    than the budget gets a group of its own.
    """
    known = [v for v in sizes.values() if v is not None]
    fallback = max(known) if known else 0
    groups: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, size in sizes.items():
        nbytes = fallback if size is None else size
        if current and used + nbytes > budget:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    if current:
        groups.append(current)
    return groups


def samples_per_run(model: LoadedModel, sizes: Mapping[str, int | None], rows: int, budget: int,
                    batch_axes: Mapping[str, int | None] | None = None) -> int:
    """Samples per model run: the most whose exposed activations fit ``budget``, at least one.

    ``sizes`` are the bytes per tensor of a batch of ``rows`` samples (unknown
    ones count as the largest known). All ``rows`` when a model input has a
    fixed or unknown batch dimension on its sample axis (``batch_axes``: axis 0
    unless named; None for an input without one) — the batch cannot be sliced.
    """
    axes = batch_axes or {}

    def sliceable(spec: Any) -> bool:
        axis = axes.get(spec.name, 0)
        return axis is None or bool(spec.shape) and axis < len(spec.shape) and not isinstance(spec.shape[axis], int)

    if rows <= 1 or not all(sliceable(spec) for spec in model.inputs):
        return max(rows, 1)
    known = [v for v in sizes.values() if v is not None]
    if not known:
        return rows
    total = sum(known) + max(known) * (len(sizes) - len(known))
    return max(1, min(rows, int(budget * rows // max(total, 1))))


class RunRows:
    """Samples per model run for each batch's input shapes: the exposed activations of one run within ``budget``.

    Shapes can change from batch to batch (text lines of other widths, sentences of other lengths).
    The first batch is sized exactly (``first_sizes``, from :func:`resolved_sizes`); another shape from
    the graph's symbols when they tell, else from the first's sizes grown by the square of how much
    larger a sample's inputs are (attention grows with the square of the sequence; a CNN's
    activations with the area, for which the square errs on the safe side). Smaller inputs keep
    the first batch's sizes. One plan per distinct shape.
    """

    def __init__(self, model: LoadedModel, names: Sequence[str], budget: int, first_feeds: Mapping[str, Any],
                 first_rows: int, first_sizes: Mapping[str, int | None]) -> None:
        self._model, self._names, self._budget = model, list(names), budget
        rows = max(first_rows, 1)
        self._per_sample = {t: None if v is None else v / rows for t, v in first_sizes.items()}
        self._elements = _input_elements(first_feeds) / rows
        self._known = {_shape_key(first_feeds): dict(first_sizes)}
        self._plans: dict[tuple[Any, ...], int] = {}

    def __call__(self, feeds: Mapping[str, Any], rows: int, batch_axes: Mapping[str, int | None] | None = None) -> int:
        key = _shape_key(feeds)
        if (key, rows) not in self._plans:
            self._plans[key, rows] = samples_per_run(self._model, self.sizes(feeds, rows), rows, self._budget,
                                                     batch_axes)
        return self._plans[key, rows]

    def sizes(self, feeds: Mapping[str, Any], rows: int) -> dict[str, int | None]:
        """Bytes per exposed tensor for a batch of ``rows`` samples of these input shapes (an estimate)."""
        key = _shape_key(feeds)
        if key in self._known:
            return self._known[key]
        sizes = resolved_sizes(self._model, self._names, feeds, infer=False)
        if any(v is None for v in sizes.values()):
            ratio = _input_elements(feeds) / max(rows, 1) / self._elements if self._elements else 1.0
            growth = max(1.0, ratio) ** 2
            sizes = {t: None if v is None else math.ceil(v * rows * growth) for t, v in self._per_sample.items()}
        return sizes


def _shape_key(feeds: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(sorted((name, np.shape(value)) for name, value in feeds.items()))


def _input_elements(feeds: Mapping[str, Any]) -> float:
    return float(sum(np.size(value) for value in feeds.values()))

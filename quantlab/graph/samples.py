"""Which axis of a tensor holds the samples of a batch.

Inputs say it themselves (``batch_axes``: a recurrent ``state [2, N, 128]`` on axis 1, a
scalar on none; axis 0 otherwise). For any other tensor it is the first axis whose
symbolic dim (``"N"``) is the batch dim of an input on that input's sample axis, as
shape inference propagated it; a tensor with no such symbol is assumed to have its
samples on axis 0; :func:`samples_on_axis0` checks the size against the batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from .load import LoadedModel, tensor_specs

__all__ = ["batch_symbols", "carries_samples", "samples_on_axis0", "tensor_sample_axes"]


def batch_symbols(model: LoadedModel, batch_axes: Mapping[str, int | None]) -> set[str]:
    """The symbolic dims naming the batch: each input's dim on its sample axis, where it is a symbol."""
    symbols: set[str] = set()
    for spec in model.inputs:
        axis = batch_axes.get(spec.name, 0)
        if axis is not None and spec.shape is not None and axis < len(spec.shape) and isinstance(spec.shape[axis], str):
            symbols.add(str(spec.shape[axis]))
    return symbols


def tensor_sample_axes(model: LoadedModel, batch_axes: Mapping[str, int | None],
                       names: Iterable[str]) -> dict[str, int]:
    """Tensor name -> the axis its samples are on (0 unless a batch symbol says otherwise)."""
    symbols = batch_symbols(model, batch_axes)
    specs = tensor_specs(model.proto)
    inputs = set(model.input_names)
    out: dict[str, int] = {}
    for name in names:
        axis = batch_axes.get(name, 0) if name in inputs else None
        if axis is None:  # an activation, or an input without a sample axis: what shape inference says
            spec = specs.get(name)
            found = [k for k, d in enumerate(spec.shape or ()) if isinstance(d, str) and d in symbols] if spec else []
            axis = found[0] if found else 0
        out[name] = axis
    return out


def carries_samples(model: LoadedModel, batch_axes: Mapping[str, int | None],
                    names: Iterable[str]) -> dict[str, bool | None]:
    """Tensor name -> does it hold one slice per sample? None where the graph does not tell.

    An input says it itself (``batch_axes``). An activation does when shape
    inference gave it a batch symbol (True), or a fully static shape while an
    input's batch dim is a symbol (False: the same whatever the batch, like a
    slice of a position table or a constant mask, computed once per model run).
    """
    symbols = batch_symbols(model, batch_axes)
    specs = tensor_specs(model.proto)
    inputs = set(model.input_names)
    out: dict[str, bool | None] = {}
    for name in names:
        spec = specs.get(name)
        if name in inputs:
            out[name] = batch_axes.get(name, 0) is not None
        elif spec is None or spec.shape is None:
            out[name] = None
        elif any(isinstance(d, str) and d in symbols for d in spec.shape):
            out[name] = True
        elif symbols and all(isinstance(d, int) for d in spec.shape):
            out[name] = False
        else:
            out[name] = None
    return out


def samples_on_axis0(array: np.ndarray, axis: int, samples: int) -> np.ndarray | None:
    """``array`` with its ``samples`` on axis 0 (a view): moved from ``axis``, or one sample as a whole;
    None when no axis of that size is where the samples should be (the caller says what that means)."""
    array = np.asarray(array)
    if array.ndim > axis and array.shape[axis] == samples:
        return np.moveaxis(array, axis, 0) if axis else array
    return array[np.newaxis] if samples == 1 else None

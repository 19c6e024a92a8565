"""Where each model output keeps its samples, so per-sample figures are per sample.

Most outputs have their samples on axis 0, but not all: a recurrent model's
``stateN [2, N, 128]`` carries them on axis 1 (the axis its ``state`` input is
batched on, ``batch_axes = {"state": 1}``; a ``[sequence] carry`` says so even where the export left
its dims unnamed). Otherwise an output's sample axis is the first
axis whose symbolic dim (``"N"``) is the batch dim of an input on that input's
batch axis; an output with no such symbol is assumed to have them on axis 0,
and a batch of one sample whose output has no axis of size 1 there (a complete
feed, an output without batch axis) is that one sample's output as a whole.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import CompareError
from ..graph import LoadedModel
from ..graph.samples import samples_on_axis0, tensor_sample_axes

__all__ = ["output_sample_axes", "samples_first"]


def output_sample_axes(model: LoadedModel, batch_axes: Mapping[str, int | None],
                       carry: Mapping[str, str] | None = None) -> dict[str, int]:
    """Output name -> the axis its samples are on (0 unless a batch symbol of the inputs, or the input a
    sequence ``carry`` feeds it back into, says otherwise)."""
    return tensor_sample_axes(model, batch_axes, model.output_names, carry)


def samples_first(array: np.ndarray, axis: int, samples: int, output: str) -> np.ndarray:
    """``array`` with its ``samples`` on axis 0 (see :func:`quantlab.graph.samples.samples_on_axis0`)."""
    moved = samples_on_axis0(array, axis, samples)
    if moved is None:
        raise CompareError(
            f"output {output!r} is {list(np.shape(array))} for a batch of {samples} samples: quantlab expected the "
            f"samples on axis {axis} and cannot tell which part of it belongs to which sample. Give the model a symbolic "
            "batch dim on that output (the one its inputs use); a state output fed back as an input: name it in the "
            "data set's [sequence] carry; otherwise compare with --batch-size 1 (not in sequence mode, where the "
            "batch is the streams)."
        )
    return moved

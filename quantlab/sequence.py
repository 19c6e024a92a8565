"""Sequence mode: a recurrent model's state output carried into its state input, sample after sample.

A voice-activity model returns ``stateN`` and takes it back as ``state`` on the next
audio chunk. Calibrating it on stored states (or zeros) shows it states it never sees
in use. :class:`SequenceData` wraps a data set: it runs the FP32 model on each batch
with the state the previous batch produced and hands out the batch with that state::

    batch t ──► feeds (state from batch t-1) ──► FP32 model ──► stateN ─┐
       ▲                                                               │ carry {"stateN": "state"}
       └───────────────────────────────────────────────────────────────┘ (batch t+1)

With batch size B the set is B interleaved streams: position j of batch t continues
position j of batch t-1 (batch size 1: one stream in sample order; a last, shorter
batch takes the first rows of the carried state along its batch axis). The first
batch keeps the data's own value of each carried input. Every consumer sees the
reference model's state (teacher forcing): calibration sees realistic state, and a
comparison measures each candidate's error on one step, not its drift over a stream.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from .backends import get_backend
from .data import Batch, DataSet, take_samples
from .errors import InputMismatchError
from .graph import LoadedModel

__all__ = ["SequenceData", "with_carry"]


class SequenceData(DataSet):
    """``dataset`` with each ``carry`` input (output name -> input name) fed from the previous batch's output."""

    def __init__(self, dataset: DataSet, model: LoadedModel, carry: Mapping[str, str], *,
                 backend: str = "ort") -> None:
        outputs, inputs = set(model.output_names), set(model.input_names)
        for out, inp in carry.items():
            if out not in outputs or inp not in inputs:
                raise InputMismatchError(
                    f"sequence carry {out!r} -> {inp!r}: {model.label} has outputs {sorted(outputs)} and inputs "
                    f"{sorted(inputs)}; carry = {{ <output> = \"<input>\" }} must name one of each.")
        self.dataset, self.model, self.carry, self.backend = dataset, model, dict(carry), backend
        self._describe_like(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def _load(self, i: int) -> Any:
        return self.dataset._load(i)  # one sample alone has no predecessor: the data's own state

    def _iter_batches(self, batch_size: int) -> Iterator[Batch]:
        runner = get_backend(self.backend).build(self.model.proto, outputs=list(self.carry))
        state: dict[str, np.ndarray] = {}
        try:
            for batch in self.dataset.batches(batch_size):
                feeds = dict(batch.feeds)
                for inp, value in state.items():
                    feeds[inp] = take_samples(value, self.batch_axis(inp), slice(0, len(batch)))
                batch = replace(batch, feeds=feeds)
                outputs = runner.run(feeds, list(self.carry))
                state = {inp: outputs[out] for out, inp in self.carry.items()}
                yield batch
        finally:
            runner.close()

    def manifest_record(self) -> dict[str, Any]:
        return dict(self.dataset.manifest_record(), sequence={"carry": dict(self.carry)})

    def describe_source(self) -> str:
        return self.dataset.describe_source()


def with_carry(dataset: DataSet, model: LoadedModel, *, backend: str = "ort") -> DataSet:
    """``dataset`` in sequence mode when its manifest has a ``[sequence] carry`` (else as given).

    What calibrate, compare and search call first, so a manifest's carry reaches every
    command; a set already in sequence mode is returned as is.
    """
    carry = getattr(dataset, "sequence_carry", None)
    if not carry or isinstance(dataset, SequenceData):
        return dataset
    return SequenceData(dataset, model, carry, backend=backend)

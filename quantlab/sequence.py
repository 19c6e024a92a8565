"""Sequence mode: a recurrent model's state output carried into its state input, sample after sample.

A voice-activity model returns ``stateN`` and takes it back as ``state`` on the next
audio chunk. Calibrating it on stored states (or zeros) shows it states it never sees
in use. :class:`SequenceData` wraps a data set: it runs the FP32 model on each batch
with the state the previous batch produced and hands out the batch with that state::

    batch t ──► feeds (state from batch t-1) ──► FP32 model ──► stateN ─┐
       ▲                                                               │ carry {"stateN": "state"}
       └───────────────────────────────────────────────────────────────┘ (batch t+1)

With batch size B the set is B interleaved streams (``[sequence] streams = B`` in the manifest says so, and
a run at another batch size is refused): position j of batch t continues
position j of batch t-1 (batch size 1: one stream in sample order; a last, shorter
batch takes the first rows of the carried state along its batch axis). The first
batch keeps the data's own value of each carried input. Every consumer sees the
reference model's state (teacher forcing): calibration sees realistic state, and a
comparison measures each candidate's error on one step, not its drift over a stream
(:data:`TEACHER_FORCING_NOTE`, which reports print).

A sample taken alone (``sample(i)``, a search's ranking subset) gets the state its stream
carries into it at the set's batch size (``streams``): the first request runs the FP32 model
over the set once and keeps each sample's carried state. Batches must come in sample order,
so ``batching = "by_shape"`` is refused.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from .backends import get_backend
from .data import Batch, DataSet, take_samples
from .errors import DataError, InputMismatchError
from .graph import LoadedModel

__all__ = ["TEACHER_FORCING_NOTE", "SequenceData", "sequence_carry", "with_carry"]

TEACHER_FORCING_NOTE = (
    "sequence mode ([sequence] carry): every candidate is fed the FP32 model's state (teacher forcing), so its "
    "figures are the error of one step; over a stream, where a candidate reads back its own state, the error can "
    "grow. Check a deployed model closed-loop on whole streams before release.")
"""What every report of a sequence-mode comparison says about its figures."""


class SequenceData(DataSet):
    """``dataset`` with each ``carry`` input (output name -> input name) fed from the previous batch's output."""

    def __init__(self, dataset: DataSet, model: LoadedModel, carry: Mapping[str, str], *,
                 backend: str = "ort", streams: int | None = None) -> None:
        """``streams``: the batch size the set is run at (interleaved streams), which decides the state a
        sample taken alone gets; None: the batch size of the last ``batches()`` call, else the data's own."""
        outputs, inputs = set(model.output_names), set(model.input_names)
        for out, inp in carry.items():
            if out not in outputs or inp not in inputs:
                raise InputMismatchError(
                    f"sequence carry {out!r} -> {inp!r}: {model.label} has outputs {sorted(outputs)} and inputs "
                    f"{sorted(inputs)}; carry = {{ <output> = \"<input>\" }} must name one of each.")
        if dataset.group_by_shape:
            raise DataError(
                f"data set {dataset.describe_source()}: [sequence] carry feeds each batch the state the one before "
                "left, so batches must come in sample order, and batching = \"by_shape\" reorders them. Use the "
                "default batching with the batch size set to the number of interleaved streams, and give all the "
                "chunks of one step the same shape (a cache that starts empty: the first step's chunks all empty).")
        self.dataset, self.model, self.carry, self.backend = dataset, model, dict(carry), backend
        self.streams = streams
        self._carried: dict[int, dict[int, dict[str, np.ndarray]]] = {}  # streams -> sample -> carried inputs
        self._describe_like(dataset)
        self.fed_back = dict(carry)  # sets taken out of this one (a search's ranking subset) know it too

    def __len__(self) -> int:
        return len(self.dataset)

    def _load(self, i: int) -> Any:
        """Sample ``i`` with the state its stream carries into it (the data's own before any run, when
        the set's batch size is not known yet)."""
        sample = self.dataset._load(i)
        if self.streams is None or i < self.streams:  # the first step keeps the data's own state
            return sample
        if self.streams not in self._carried:
            for _ in self._iter_batches(self.streams):  # one pass keeps every sample's carried state
                pass
        carried = self._carried[self.streams].get(i)
        return sample if carried is None else replace(sample, feeds={**sample.feeds, **carried})

    def _iter_batches(self, batch_size: int) -> Iterator[Batch]:
        runner = get_backend(self.backend).build(self.model.proto, outputs=list(self.carry))
        state: dict[str, np.ndarray] = {}
        kept: dict[int, dict[str, np.ndarray]] = {}
        try:
            for batch in self.dataset.batches(batch_size):
                feeds = self.fed(batch, state)
                for row, index in enumerate(batch.indices):
                    kept[index] = {inp: self._row(feeds[inp], inp, row) for inp in state}
                batch = replace(batch, feeds=feeds)
                outputs = runner.run(feeds, list(self.carry))
                state = {inp: outputs[out] for out, inp in self.carry.items()}
                yield batch
        finally:
            runner.close()
        self._carried[batch_size] = kept  # a pass run to its end: every sample's carried state
        if self.streams is None:
            self.streams = batch_size

    def fed(self, batch: Batch, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``batch``'s feeds with each carried input taken from ``state`` (input -> the previous batch's output;
        empty on the first batch, which keeps the data's own), cut to the batch's streams."""
        feeds = dict(batch.feeds)
        for inp, value in state.items():
            feeds[inp] = take_samples(value, self.batch_axis(inp), slice(0, len(batch)))
        return feeds

    def _row(self, value: np.ndarray, name: str, row: int) -> np.ndarray:
        """Sample ``row`` of a batched input, without its batch axis (as a Sample holds it)."""
        axis = self.batch_axis(name)
        return np.asarray(value) if axis is None else np.take(value, row, axis=axis).copy()

    def manifest_record(self) -> dict[str, Any]:
        return dict(self.dataset.manifest_record(), sequence={"carry": dict(self.carry)})

    def describe_source(self) -> str:
        return self.dataset.describe_source()


def with_carry(dataset: DataSet, model: LoadedModel, *, backend: str = "ort", streams: int | None = None) -> DataSet:
    """``dataset`` in sequence mode when its manifest has a ``[sequence] carry`` (else as given).

    What calibrate, compare and search call first, so a manifest's carry reaches every
    command; a set already in sequence mode is returned as is.
    """
    carry = getattr(dataset, "sequence_carry", None)
    if not carry or isinstance(dataset, SequenceData):
        return dataset
    declared = getattr(dataset, "sequence_streams", None)
    if declared is not None and streams is not None and streams != declared:
        # at 8, a T5 decoder's step 1 got the empty cache and step 2 step 0's: 4 streams read as 8, without a word
        raise InputMismatchError(
            f"data set {getattr(dataset, 'name', '') or dataset.describe_source()}: its samples interleave "
            f"{declared} streams ([sequence] streams = {declared}), so each batch must hold one sample of each: run "
            f"at batch size {declared} (--batch-size {declared}, batch_size = {declared}), not {streams}")
    return SequenceData(dataset, model, carry, backend=backend, streams=streams)


def sequence_carry(dataset: Any) -> dict[str, str]:
    """The ``[sequence] carry`` (output -> input) of a data set in sequence mode, of a set taken out of one, or
    of its manifest; {} without."""
    return dict(getattr(dataset, "fed_back", None) or getattr(dataset, "sequence_carry", None) or {})

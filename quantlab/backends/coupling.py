"""Whether a batch changes what a model computes for each of its samples, measured by running it.

The graph analysis (:func:`quantlab.graph.samples.sample_mixing_nodes`) sees a reduction over the sample axis
in the main graph only where shape inference names that axis. Inside a ``Loop`` or ``If`` body the batch symbol
is lost (a while loop that runs until *every* sample has converged: ``ReduceMax`` over the whole batch decides
the trip count of all), and a ``Reshape`` that folds the batch into another axis hides it too. Running the first
samples of a batch alone and comparing their outputs with the batch's sees all of these::

    batch [s0, s1, ...] --model--> outputs[s0], outputs[s1], ...
    [s0]                --model--> outputs'[s0]     differ beyond float rounding -> coupled
    [s1]                --model--> outputs'[s1]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data.batches import Batch, take_samples
from ..data.checks import coupled_batch_note, samples_coupled
from ..graph import LoadedModel
from ..graph.samples import batch_named_outputs, batch_symbols, samples_on_axis0, tensor_sample_axes
from ..graph.topology import CONTROL_FLOW_OPS, random_nodes
from .base import Backend, Runner

__all__ = ["COUPLING_TOLERANCE", "BatchCoupling", "CoupledOutput", "batch_coupling", "measured_coupling"]

COUPLING_TOLERANCE = 1e-3
"""Largest change of a sample's float output, alone vs in a batch, as a fraction of the output's largest magnitude
in the batch, still taken for float rounding. Kernels chosen by batch size (a GEMV for one row, a GEMM for eight,
AVX-512 or not) differ by ~1e-6 of that; a reduction over the batch changes values by percents."""


@dataclass(frozen=True)
class CoupledOutput:
    """An output whose values for a sample change when that sample runs alone: ``change`` is the largest absolute
    change as a fraction of the output's largest magnitude in the batch; ``how`` says what else changed
    ("shape", "non-finite": a value turned inf or NaN; "" when only values did)."""

    output: str
    change: float
    how: str = ""

    def describe(self) -> str:
        if self.how.startswith("pairs "):  # "pairs N, M": the batch symbols its shape names
            return (f"{self.output!r} (its shape: its [{self.how.removeprefix('pairs ')}] pairs every sample with "
                    "the others of its batch, as a two-tower similarity matrix does)")
        if self.how == "shape":
            return f"{self.output!r} (its shape)"
        if self.how == "non-finite":
            return f"{self.output!r} (values turned inf or NaN)"
        return f"{self.output!r} (by up to {self.change:.2g} of its largest value)"


def measured_coupling(backend: Backend, model: LoadedModel, dataset: Any, batch_size: int,
                      sample_axes: Mapping[str, int] | None = None, samples: int = 2) -> list[CoupledOutput]:
    """The float outputs of ``model`` whose values for the first ``samples`` samples of ``dataset``'s first batch
    (of ``batch_size``) change when each runs alone, by more than :data:`COUPLING_TOLERANCE` or in shape; []
    when none does, when that batch holds one sample, when it is padded (alone, a sample is not, so it may
    differ by design), or when the model draws random numbers (every run differs: the comparator's determinism
    check, :mod:`quantlab.compare.determinism`, says so instead of blaming the batch).

    Only outputs whose shape names the batch symbol are judged (:func:`quantlab.graph.samples.batch_named_outputs`:
    NMS boxes of the whole batch are not per sample). ``sample_axes``: output -> the axis its samples are on
    (default: what shape inference says, :func:`quantlab.graph.samples.tensor_sample_axes`)."""
    if batch_size < 2 or random_nodes(model.proto):
        return []
    batch = next(iter(dataset.batches(batch_size)), None)
    if batch is None or len(batch) < 2 or batch.alone_shapes:
        return []
    batch_axes = getattr(dataset, "batch_axes", {})
    outputs = [o for o in batch_named_outputs(model, batch_axes) if _is_float(model, o)]
    if not outputs:
        return []
    axes = dict(sample_axes) if sample_axes is not None else tensor_sample_axes(model, batch_axes, outputs)
    runner = backend.build(model.proto)
    try:
        changed = _changed_outputs(runner, batch, outputs, axes, min(samples, len(batch)))
    finally:
        runner.close()
    pairing = _pairing_outputs(model, batch_axes)
    return [dataclasses.replace(c, how=f"pairs {pairing[c.output]}") if c.how == "shape" and c.output in pairing
            else c for c in changed]


def _pairing_outputs(model: LoadedModel, batch_axes: Mapping[str, Any]) -> dict[str, str]:
    """Output -> its batch symbols, for the outputs whose shape names two or more (CLIP's ``logits_per_image``
    ``[N, M]``: images by texts)."""
    symbols = batch_symbols(model, batch_axes)
    out = {}
    for spec in model.outputs:
        named = [d for d in spec.shape or () if isinstance(d, str) and d in symbols]
        if len(set(named)) >= 2:
            out[spec.name] = ", ".join(named)
    return out


def _is_float(model: LoadedModel, output: str) -> bool:
    spec = next((s for s in model.outputs if s.name == output), None)
    return spec is not None and spec.is_float


def _changed_outputs(runner: Runner, batch: Batch, outputs: Sequence[str], axes: Mapping[str, int],
                     count: int) -> list[CoupledOutput]:
    together = runner.run(batch.feeds, list(outputs))
    worst: dict[str, CoupledOutput] = {}
    for i in range(count):
        alone = runner.run({name: take_samples(array, batch.batch_axes.get(name, 0), slice(i, i + 1))
                            for name, array in batch.feeds.items()}, list(outputs))
        for name in outputs:
            found = _sample_change(name, together[name], alone[name], axes.get(name, 0), len(batch), i)
            if found is not None and (found.how or found.change > COUPLING_TOLERANCE):
                if name not in worst or found.how or found.change > worst[name].change:
                    worst[name] = found
    return [worst[name] for name in outputs if name in worst]


def _sample_change(name: str, together: np.ndarray, alone: np.ndarray, axis: int, size: int,
                   index: int) -> CoupledOutput | None:
    """How sample ``index`` of output ``name`` changed alone; None when its samples cannot be told apart."""
    batched, single = samples_on_axis0(np.asarray(together), axis, size), samples_on_axis0(np.asarray(alone), axis, 1)
    if batched is None or single is None:
        return None
    ours, own = batched[index].astype(np.float64), single[0].astype(np.float64)
    if ours.shape != own.shape:
        return CoupledOutput(name, float("inf"), "shape")
    finite = np.isfinite(ours)
    if not np.array_equal(finite, np.isfinite(own)):
        return CoupledOutput(name, float("inf"), "non-finite")
    scale = float(np.max(np.abs(batched[np.isfinite(batched)]), initial=0.0))
    diff = float(np.max(np.abs(ours[finite] - own[finite]), initial=0.0))
    return CoupledOutput(name, diff / scale if scale > 0 else (float("inf") if diff > 0 else 0.0))


@dataclass(frozen=True)
class BatchCoupling:
    """What couples the samples of a batch: main-graph ``nodes`` that combine them
    (:func:`quantlab.data.samples_coupled`), or outputs ``measured`` to change when samples ran alone."""

    nodes: tuple[str, ...] = ()
    measured: tuple[CoupledOutput, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.nodes or self.measured)

    def note(self, label: str, batch_size: int) -> str:
        """:func:`quantlab.data.coupled_batch_note` for a run at ``batch_size``."""
        return coupled_batch_note(label, self.nodes, batch_size, [m.describe() for m in self.measured])


def batch_coupling(model: LoadedModel, dataset: Any, batch_size: int, backend: Backend | None = None) -> BatchCoupling:
    """The graph's sample-mixing nodes; where it shows none and the model has ``If``/``Loop``/``Scan`` bodies
    (whose reductions shape inference cannot place on the sample axis), what :func:`measured_coupling` finds at
    ``batch_size`` on ``backend`` (ONNX Runtime by default)."""
    nodes = tuple(samples_coupled(model, dataset))
    if nodes or batch_size < 2 or not any(n.op_type in CONTROL_FLOW_OPS for n in model.proto.graph.node):
        return BatchCoupling(nodes)
    if backend is None:
        from . import get_backend

        backend = get_backend("ort")
    return BatchCoupling(measured=tuple(measured_coupling(backend, model, dataset, batch_size)))

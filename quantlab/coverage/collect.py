"""The coverage pass: one streaming FP32 run over a data set, reduced per sample against the table's ranges.

    batches ──> feeds ──> runner(exposed tensors) ──> per tensor:  fine |x| histogram (AbsHistogram, as calibrate)
       │                                                           coarse bins per sample (bins.bin_per_sample)
       └─> DataFingerprint (per-input ranges, hash)                   ├─> BlockCounts (bootstrap)
                                                                      ├─> samples with any saturation / outside
                                                                      └─> WorstSamples (named by sample key)

Memory is one batch of activations plus, per tensor, the fine histogram and
``MAX_BLOCKS`` coarse rows, whatever the sample count.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backends.base import Backend
from ..errors import CalibrationError, DataError
from ..graph import LoadedModel
from ..graph.samples import carries_samples, samples_on_axis0, tensor_sample_axes
from ..histogram import AbsHistogram
from ..stats import (
    DEFAULT_RUN_BUDGET,
    RunRows,
    Statistics,
    batch_axes_of,
    batch_feeds,
    batch_size_of,
    resolved_sizes,
    sample_rows,
    sample_weights,
)
from ..table import CalibrationTable
from .bins import TensorBins, bin_per_sample, tensor_bins
from .blocks import MAX_BLOCKS, BlockCounts, SampleScore, WorstSamples

__all__ = ["TensorTally", "PassResult", "coverage_pass", "table_bins", "pass_statistics", "check_names"]


@dataclass
class TensorTally:
    """What the pass keeps for one tensor."""

    bins: TensorBins
    fine: AbsHistogram
    blocks: BlockCounts
    saturated_samples: int = 0
    outside_samples: int = 0


@dataclass(frozen=True)
class PassResult:
    tallies: Mapping[str, TensorTally]
    samples: int
    batches: int
    worst: tuple[SampleScore, ...]
    summary: Any
    """The data's ``quantlab.data.DataSummary``."""
    one_at_a_time: tuple[str, ...] = ()
    """Tensors whose samples a run of several could not tell apart (a flattened ``[N*S, H]``): the pass then ran
    one sample at a time, so that they are checked per sample too."""
    pooled: tuple[str, ...] = ()
    """... or, for a model that fixes its batch above 1 (no smaller run is possible), those tensors' first axis
    split in as many equal parts as the run had samples, in order (how a flatten of ``[N, ...]`` lays them out)."""


def table_bins(table: CalibrationTable, calibration: Statistics) -> dict[str, TensorBins]:
    """Coarse bins of every tensor the table calibrates (in the statistics' order); names what is missing."""
    missing = [t for t in table.ranges if t not in calibration.tensors]
    if missing:
        shown = ", ".join(repr(t) for t in missing[:5])
        raise CalibrationError(
            f"the calibration statistics hold no histogram for {len(missing)} tensor(s) of the table ({shown}): "
            "give the statistics.npz written with this table by the same `quantlab calibrate` run")
    return {t: tensor_bins(calibration.tensors[t], table.ranges[t].amax) for t in calibration.tensors
            if t in table.ranges}


def _keys(item: Any, start: int, n: int) -> list[str]:
    given = None if isinstance(item, Mapping) else getattr(item, "keys", None)
    keys = list(given) if given is not None else []
    return keys if len(keys) == n else [f"sample {start + i}" for i in range(n)]


class _BatchScores:
    """Per-sample worst saturation of one batch, over its tensors."""

    def __init__(self, n: int) -> None:
        self.share = np.full(n, -np.inf)
        self.tensor = [""] * n
        self.saturating = np.zeros(n, dtype=np.int64)
        self.outside = np.zeros(n, dtype=np.int64)

    def add(self, name: str, rows: np.ndarray, bins: TensorBins) -> tuple[int, int]:
        sat = rows[:, bins.first_saturated:].sum(axis=1)
        out = rows[:, bins.first_outside]
        share = sat / np.maximum(rows.sum(axis=1), 1) - bins.calib_saturated  # beyond what calibration accepted
        for i in np.flatnonzero(share > self.share):
            self.share[i] = share[i]
            self.tensor[i] = name
        self.saturating += sat > 0
        self.outside += out > 0
        return int(np.count_nonzero(sat)), int(np.count_nonzero(out))


def coverage_pass(model: LoadedModel, batches: Iterable[Any], bins: Mapping[str, TensorBins], *,
                  backend: Backend, fine_bins: int, huge_threshold: float, worst_samples: int = 10,
                  max_blocks: int = MAX_BLOCKS, on_batch: Any = None, threads: int | None = None,
                  run_budget_bytes: int = DEFAULT_RUN_BUDGET) -> PassResult:
    """Run ``model`` over ``batches`` once and reduce every tensor of ``bins`` (see the module docstring).

    ``threads`` (default: all cores) reduce several tensors at once (the kernels
    release the GIL); a batch whose exposed activations exceed ``run_budget_bytes``
    runs through the model in slices (as the statistics pass does); the results
    depend on neither.
    """
    from ..data import DataFingerprint

    inputs = set(model.input_names)
    exposed = [t for t in bins if t not in inputs]
    tallies = {t: TensorTally(b, AbsHistogram(fine_bins, huge_threshold), BlockCounts(b.n_bins, max_blocks))
               for t, b in bins.items()}
    worst = WorstSamples(worst_samples)
    fingerprint = DataFingerprint()
    runner = backend.build(model.proto, outputs=exposed) if exposed else None
    workers = threads if threads is not None else (os.cpu_count() or 1)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="quantlab-coverage") if workers > 1 else None
    samples = n_batches = 0
    plan: RunRows | None = None
    layout: tuple[dict[str, int], dict[str, bool]] | None = None  # sample axes, carries the samples
    flattened: tuple[str, ...] = ()  # PassResult.one_at_a_time
    pooled: tuple[str, ...] = ()  # PassResult.pooled
    whole = _fixed_batch_above_1(model)  # Swin exported at batch 2: every run takes the whole batch
    try:
        for item in batches:
            fingerprint.update(item)
            if on_batch is not None:
                on_batch(item)
            feeds = batch_feeds(item)
            n = batch_size_of(item, feeds)
            batch_axes = batch_axes_of(item)
            layout = layout or (tensor_sample_axes(model, batch_axes, bins), carries_samples(model, batch_axes, bins))
            axes, carries = layout
            if plan is None:
                plan = RunRows(model, exposed, run_budget_bytes, feeds, n, resolved_sizes(model, exposed, feeds))
            run_rows = n if whole else 1 if flattened else plan(feeds, n, batch_axes)
            keys = _keys(item, samples, n)
            start = 0
            while start < n:  # a large batch runs in slices: memory flat in the batch size
                stop = min(start + run_rows, n)
                part = feeds if stop - start == n else sample_rows(feeds, batch_axes, start, stop)
                outputs = dict(runner.run(part, exposed)) if runner is not None else {}
                outputs.update({t: np.asarray(part[t]) for t in bins if t in inputs})
                shown = keys[start:stop]
                weights = sample_weights(outputs, len(shown), carries)
                outputs = {t: (a, _by_sample(a, axes.get(t, 0), len(shown), weights.get(t, 1)))
                           for t, a in outputs.items()}
                lost = [t for t, (_, rows) in outputs.items() if rows is None]
                if lost and len(shown) > 1 and not whole:  # nothing reduced yet: this slice again, one at a time
                    flattened, run_rows = tuple(lost), 1
                    continue
                for t in lost:  # no smaller run: a flatten of [N, ...] lays each sample's rows out together
                    a = outputs[t][0]
                    if a.ndim and a.shape[0] % len(shown) == 0:
                        outputs[t] = (a, a.reshape(len(shown), -1))
                pooled = tuple(dict.fromkeys((*pooled, *lost)))
                for score in _slice_scores(outputs, weights, tallies, huge_threshold, pool, shown):
                    worst.push(score)
                del outputs
                start = stop
            samples += n
            n_batches += 1
    finally:
        if pool is not None:
            pool.shutdown()
        if runner is not None:
            runner.close()
    if samples == 0:
        raise DataError("the data set yielded no samples; give it at least one")
    return PassResult(tallies=tallies, samples=samples, batches=n_batches, worst=tuple(worst.result()),
                      summary=fingerprint.summary(), one_at_a_time=flattened, pooled=pooled)


def _fixed_batch_above_1(model: LoadedModel) -> bool:
    """Whether an input fixes its first axis above 1 (a static export's batch: no run of fewer samples works)."""
    return any(s.shape and isinstance(s.shape[0], int) and s.shape[0] > 1 for s in model.inputs)


def _by_sample(array: np.ndarray, axis: int, samples: int, weight: int) -> np.ndarray | None:
    """``array`` with its samples on axis 0; a value shared by the run's samples (``weight`` > 1, see
    quantlab.stats.sample_weights) as one entry, which :func:`_reduce_one` counts for each of them (every sample
    saw it); None when the samples cannot be told apart (a flattened ``[N*S, H]``): it then feeds the histograms,
    not the per-sample scores."""
    if weight > 1:
        return np.asarray(array)[np.newaxis]
    return samples_on_axis0(array, axis, samples)


def _slice_scores(outputs: Mapping[str, tuple[np.ndarray, np.ndarray | None]], weights: Mapping[str, int],
                  tallies: Mapping[str, TensorTally], huge: float, pool: Any,
                  keys: Sequence[str]) -> list[SampleScore]:
    """Reduce one model run's outputs into the tallies; the saturation score of each of its samples.
    ``weights``: tensor -> samples its value stands for (quantlab.stats.sample_weights)."""
    scores = _BatchScores(len(keys))
    for name, rows in _reduced(outputs, weights, tallies, huge, pool):
        if rows is None:
            continue
        tally = tallies[name]
        tally.blocks.add(rows)
        sat, out = scores.add(name, rows, tally.bins)
        tally.saturated_samples += sat
        tally.outside_samples += out
    return [SampleScore(float(scores.share[i]), int(scores.saturating[i]), key, scores.tensor[i],
                        int(scores.outside[i])) for i, key in enumerate(keys)]


def _reduce_one(name: str, arrays: tuple[np.ndarray, np.ndarray | None], weight: int, tally: TensorTally,
                huge: float) -> tuple[str, np.ndarray | None]:
    """``arrays``: the tensor as the model gave it, and with its samples on axis 0 (None: not per sample)."""
    whole, by_sample = arrays
    tally.fine.update(whole, weight)
    if by_sample is None:
        return name, None
    rows = bin_per_sample(by_sample, tally.bins, huge)
    return name, np.repeat(rows, weight, axis=0) if weight > 1 else rows


def _reduced(outputs: Mapping[str, tuple[np.ndarray, np.ndarray | None]], weights: Mapping[str, int],
             tallies: Mapping[str, TensorTally], huge: float, pool: Any) -> list[tuple[str, np.ndarray | None]]:
    """Per tensor: fine histogram updated, per-sample coarse counts returned (in ``outputs`` order)."""
    if pool is None or len(outputs) < 2:
        return [_reduce_one(t, a, weights.get(t, 1), tallies[t], huge) for t, a in outputs.items()]
    futures = [pool.submit(_reduce_one, t, a, weights.get(t, 1), tallies[t], huge) for t, a in outputs.items()]
    return [f.result() for f in futures]


def pass_statistics(result: PassResult, model_sha256: str, fine_bins: int, huge_threshold: float,
                    backend: Mapping[str, Any]) -> Statistics:
    """The pass's fine histograms as :class:`Statistics`: mergeable with the calibration set's."""
    return Statistics(tensors={t: tally.fine.state() for t, tally in result.tallies.items()}, samples=result.samples,
                      batches=result.batches, model_sha256=model_sha256, bins=fine_bins,
                      huge_threshold=huge_threshold, passes=1, backend=dict(backend))


def check_names(tensors: Sequence[str], model: LoadedModel) -> None:
    """Every table tensor must be produced by the model (else the table belongs to another model)."""
    from ..graph import producer_map

    produced = set(producer_map(model.proto)) | set(model.input_names)
    unknown = [t for t in tensors if t not in produced]
    if unknown:
        shown = ", ".join(repr(t) for t in unknown[:5])
        raise CalibrationError(f"{model.label}: the calibration table names tensor(s) the model does not produce "
                               f"({shown}); give the table calibrated for this model")

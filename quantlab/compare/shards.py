"""Sharded validation: one comparison split into contiguous shards of whole batches, each a Ray task.

::

    driver (compare)                              Ray workers, one task per shard
    reference, candidates ──── ray.put once ───►  ┐
    the set's batches, as one pass reads them     │ Comparison over the shard's batches
    (label check, data fingerprint), shard by     │ (same plans, same per-batch task graph)
    shard ──── ray.put once per shard ─────────►  ┘ ─► ShardPartial
    merge in shard order ◄───────────────────────────  per-batch layer sums [batches, tensors, 9]
      the accumulators of one pass, fed the same        SampleRecords: per-sample scalars and
      per-batch sums in the same order                  per-batch end-to-end sums
      ─► the tables of one pass

Why the merged tables are byte-identical to one pass (no rounding bound is needed): shard
boundaries fall on multiples of ``batch_size``, so every batch holds the same samples as in
one pass and each session computes the same outputs from it; every figure is either per
sample (concatenated in sample order: means, minima, bootstrap intervals, McNemar counts) or
a float64 running sum over batches, and a shard returns its per-batch sums, not their total,
so the driver adds exactly the same numbers in exactly the same order as one pass does
(float addition is not associative: adding shard totals would differ in the last bits).
This assumes each worker's backend computes what the driver's would for the same batch: the
same ONNX Runtime build and CPU kernels; the driver's QUANTLAB_ORT_QDQ_FUSION / QUANTLAB_ORT_THREADS
go to every task. A cluster of mixed CPUs (e.g. with and without AVX-512 VNNI) gives each
shard the figures of its node's kernels, as two machines would.

Cost: 9 float64 per compared tensor per batch go back to the driver (10 000 samples in
batches of 8 with 120 compared tensors: about 11 MB). The driver reads the set once (as one
pass does) and holds one shard's batches at a time; the object store holds the shards until
their tasks finish. A worker that dies is retried by Ray (``MAX_RETRIES``); the retries are
counted and reported in the result's warnings and settings.

Limits: the driver reads and preprocesses every sample itself (the data fingerprint is one
hash over the samples in order), overlapped with the shards already sent: 4 s for the 160
augmented demo views here, which bounds the speed-up of a cheap comparison. A user metric
(``metric``) is loaded again on each worker: its file must exist there at the same path.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..backends.ort import FUSION_ENV, THREADS_ENV
from ..data import Batch, DataFingerprint, DataSet, DataSummary, Sample, take_samples
from ..errors import CompareError, QuantlabError
from ..graph import LoadedModel
from ..metrics import ErrorAccumulator, ErrorSums
from .cluster import AttemptCounter, maybe_kill_once, ray_session
from .end_to_end import SampleRecords
from .labels import LabelUse
from .options import CompareOptions

__all__ = ["ShardData", "ShardPartial", "PassTotals", "truncated_batches", "shard_ranges", "run_shards",
           "MAX_RETRIES", "KILL_ONCE"]

MAX_RETRIES = 3
"""Ray re-runs a shard whose worker died (not one that raised) up to this many times."""
KILL_ONCE = "QUANTLAB_COMPARE_KILL_ONCE"
"""Tests: ``SHARD:MARKER`` makes the first attempt of shard SHARD (its index) kill its worker."""

LayerKey = tuple[str, str, str]


def truncated_batches(dataset: DataSet, batch_size: int, limit: int) -> Iterator[Batch]:
    """The first ``limit`` samples, batched (the last batch sliced, each input along its own batch axis: an LSTM's
    state on axis 1 was cut on axis 0)."""
    seen = 0
    for batch in dataset.batches(batch_size):
        if seen >= limit:
            break
        n = len(batch)
        if seen + n > limit:
            keep = limit - seen
            batch = dataclasses.replace(
                batch, indices=tuple(batch.indices[:keep]), keys=tuple(batch.keys[:keep]),
                feeds={k: take_samples(v, (batch.batch_axes or {}).get(k, 0), slice(0, keep))
                       for k, v in batch.feeds.items()},
                labels=None if batch.labels is None else batch.labels[:keep],
            )
            n = keep
        seen += n
        yield batch


def shard_ranges(batches: int, shards: int) -> list[range]:
    """Contiguous, non-empty ranges of batch numbers, as even as can be; never more than ``batches``."""
    n = min(shards, batches)
    return [range(k * batches // n, (k + 1) * batches // n) for k in range(n)]


class ShardData(DataSet):
    """A shard's batches as a data set (what a worker compares): ``batches()`` yields them as they are."""

    def __init__(self, batches: Sequence[Batch], *, name: str, role: str, label_dtype: str | None,
                 input_names: tuple[str, ...], batch_axes: Mapping[str, int | None]) -> None:
        self.stored = list(batches)
        self.name, self.role, self.label_dtype, self.input_names = name, role, label_dtype, input_names
        self.batch_axes = dict(batch_axes)  # a state batched on axis 1 stays there in the workers
        self._n = sum(len(b) for b in self.stored)

    def __len__(self) -> int:
        return self._n

    def _load(self, i: int) -> Sample:
        for b in self.stored:
            if i < len(b):
                label = None if b.labels is None else np.asarray(b.labels)[i].item()
                feeds = {k: take_samples(v, self.batch_axes.get(k, 0), i) for k, v in b.feeds.items()}
                return Sample(index=b.indices[i], key=b.keys[i], feeds=feeds, label=label)
            i -= len(b)
        raise IndexError(i)

    def _iter_batches(self, batch_size: int) -> Iterator[Batch]:
        return iter(self.stored)

    def manifest_record(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "count": self._n, "settings": {"source": "shard"}}


@dataclass(frozen=True)
class ShardPartial:
    """What one shard's worker returns: its per-batch layer sums, per-sample records, segments, attempt."""

    layer_keys: tuple[LayerKey, ...]
    layer_sums: np.ndarray   # float64 [batches, len(layer_keys), 9]: ErrorSums.as_row per batch and tensor
    records: SampleRecords
    segments: Mapping[str, int]
    attempt: int = 1

    @classmethod
    def from_batches(cls, per_batch: Sequence[Sequence[tuple[LayerKey, ErrorSums]]], records: SampleRecords,
                     segments: Mapping[str, int]) -> ShardPartial:
        """Packs each batch's sorted sums (every batch of a comparison has the same keys)."""
        keys = tuple(k for k, _ in per_batch[0]) if per_batch else ()
        values = np.zeros((len(per_batch), len(keys), 9), dtype=np.float64)
        for b, sums in enumerate(per_batch):
            if tuple(k for k, _ in sums) != keys:
                raise CompareError(f"internal: batch {b} of a shard compared other tensors than its first batch")
            for j, (_, s) in enumerate(sums):
                values[b, j] = s.as_row()
        return cls(keys, values, records, dict(segments))


@dataclass
class PassTotals:
    """Everything the tables are made from, after one pass or after merging the shards."""

    acc: dict[LayerKey, ErrorAccumulator]
    records: SampleRecords
    summary: DataSummary
    segments: Mapping[str, int]
    warnings: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


def merged(partials: Sequence[ShardPartial], summary: DataSummary) -> PassTotals:
    """The shards' partials (in shard order) added up as one pass adds its batches."""
    acc: dict[LayerKey, ErrorAccumulator] = {}
    records = partials[0].records
    for k, p in enumerate(partials):
        if k:
            records.extend(p.records)
        for b in range(p.layer_sums.shape[0]):
            for j, key in enumerate(p.layer_keys):
                acc.setdefault(key, ErrorAccumulator()).add(ErrorSums.from_row(p.layer_sums[b, j]))
    return PassTotals(acc=acc, records=records, summary=summary, segments=partials[0].segments)


Worker = Callable[..., ShardPartial]
"""``worker(reference, candidates, data: ShardData, options) -> ShardPartial`` (``run.shard_worker``)."""


def _shard_task(worker: Worker, counter: Any, shard: int, reference: LoadedModel, candidates: Mapping[str, Any],
                data: ShardData, options: CompareOptions) -> ShardPartial:
    """A Ray task: the attempt counted, then the worker on the shard."""
    import ray

    attempt = ray.get(counter.attempt.remote(str(shard)))
    maybe_kill_once(KILL_ONCE, str(shard))
    return dataclasses.replace(worker(reference, candidates, data, options), attempt=attempt)


def batch_sizes(dataset: DataSet, batch_size: int, total: int) -> list[int]:
    """Samples in each batch of a pass over the first ``total`` samples. Batches by shape (text lines of
    several widths) leave a partial batch per shape, so that set is read once more just to count them;
    otherwise all batches are full but the last."""
    if getattr(dataset, "group_by_shape", False):
        return [len(b) for b in truncated_batches(dataset, batch_size, total)]
    return [min(batch_size, total - start) for start in range(0, total, batch_size)]


def _shards(dataset: DataSet, options: CompareOptions, total: int, labels: LabelUse,
            fingerprint: DataFingerprint) -> Iterator[tuple[range, ShardData]]:
    """The shards' batches read as one pass reads them (label check, fingerprint), one shard at a time;
    with each shard, its samples' positions in the pass."""
    sizes = batch_sizes(dataset, options.batch_size, total)
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    batches = truncated_batches(dataset, options.batch_size, total)
    meta = {"name": getattr(dataset, "name", "data"), "role": getattr(dataset, "role", "validation"),
            "label_dtype": getattr(dataset, "label_dtype", None),
            "input_names": tuple(getattr(dataset, "input_names", ())),
            "batch_axes": dict(getattr(dataset, "batch_axes", {}) or {})}
    for batch_range in shard_ranges(len(sizes), options.shards):
        held = []
        for _ in batch_range:
            batch = next(batches)
            labels.check(batch)
            fingerprint.update(batch)
            held.append(batch)
        if not meta["input_names"]:
            meta["input_names"] = tuple(held[0].feeds)
        yield range(int(starts[batch_range.start]), int(starts[batch_range.stop])), ShardData(held, **meta)


def run_shards(reference: LoadedModel, candidates: Mapping[str, Any], dataset: DataSet, options: CompareOptions,
               labels: LabelUse, total: int, worker: Worker, progress: bool) -> PassTotals:
    """The comparison as Ray tasks over contiguous shards, merged (see the module docstring)."""
    fingerprint = DataFingerprint()
    worker_options = dataclasses.replace(options, max_samples=None, shards=1, ray=None)
    bar = tqdm(total=total, unit="sample", desc="compare (shards)", dynamic_ncols=True) if progress else None
    with ray_session(options.ray or "auto", what="compare with shards / ray") as ray:
        counter = ray.remote(AttemptCounter).remote()
        ref_obj, cand_obj = ray.put(reference), ray.put(dict(candidates))   # once, read by every shard
        task = ray.remote(max_retries=MAX_RETRIES, num_cpus=1)(_shard_task)
        forced = {k: os.environ[k] for k in (FUSION_ENV, THREADS_ENV) if os.environ.get(k)}
        if forced:  # the driver's forced ORT kernels / threads hold on every node too
            task = task.options(runtime_env={"env_vars": forced})
        pending: dict[Any, tuple[int, range]] = {}
        try:
            for k, (samples, data) in enumerate(_shards(dataset, options, total, labels, fingerprint)):
                ref = task.remote(worker, counter, k, ref_obj, cand_obj, ray.put(data), worker_options)
                pending[ref] = (k, samples)
        except BaseException:  # bad data in a later shard: the shards already sent stop too
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        try:
            partials = _gathered(ray, pending, bar)
        finally:
            if bar is not None:
                bar.close()
    totals = merged(partials, fingerprint.summary())
    totals.settings = {"shards_run": len(partials), "shard_attempts": [p.attempt for p in partials]}
    totals.warnings = [f"shard {k} was retried by Ray after its worker died ({p.attempt} attempts); its "
                       "figures come from the attempt that finished" for k, p in enumerate(partials) if p.attempt > 1]
    return totals


def _gathered(ray: Any, pending: dict[Any, tuple[int, range]], bar: Any) -> list[ShardPartial]:
    """The shards' partials in shard order; the first failure cancels the rest and is raised."""
    out: dict[int, ShardPartial] = {}
    left = dict(pending)
    while left:
        done, _ = ray.wait(list(left), num_returns=1)
        k, samples = left.pop(done[0])
        try:
            out[k] = ray.get(done[0])
        except ray.exceptions.RayError as exc:
            for ref in left:
                ray.cancel(ref, force=True)
            raise _shard_error(ray, exc, k, samples) from None
        if bar is not None:
            bar.update(len(samples))
    return [out[k] for k in sorted(out)]


def _shard_error(ray: Any, exc: Exception, k: int, samples: range) -> Exception:
    """A worker's own error as it was raised (it names the sample or tensor); else a CompareError."""
    cause = getattr(exc, "cause", None)
    if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(cause, QuantlabError):
        return cause
    return CompareError(f"shard {k} (samples {samples.start}..{samples.stop - 1}) failed on Ray after up to "
                        f"{MAX_RETRIES} retries: {type(exc).__name__}: {exc}. Check the Ray workers' logs; "
                        "without --ray / shards the comparison runs in this process.")

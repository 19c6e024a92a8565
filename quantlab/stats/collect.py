"""Activation statistics in one streaming pass of the FP32 model (after NNCF's statistics collection).

The model is built once with every wanted tensor exposed as an extra output
(but the Relu / ``Clip(x, 0, h)`` outputs whose input is exposed: one reducer
bins ``x`` for both, quantlab.clipped and stats/pairs.py); each batch's outputs
go straight into per-tensor reducers (:class:`quantlab.histogram.AbsHistogram`)
and are dropped, so peak memory is two runs of activations plus a fixed 128 KiB
histogram per tensor, however many samples the set holds::

    batches() ──> feeds ──> runner(exposed outputs) ──> {tensor: array} ──> reducers (threads)
                     │                                        (dropped after each run; the model
                     │                                         computes run k+1 meanwhile)
                     └──> on_batch(item)   (first pass only: data fingerprint, NaN check)

The ONNX Runtime session is made with ``spinning=False``: its idle threads
sleep, so the reducers of run k get the cores ORT leaves free while it
computes run k+1 (ORT's busy-waiting threads took 40 % of its CPU time).
A batch whose exposed activations exceed ``run_budget_bytes`` (256 MiB, half per run) runs
through the model in slices of fewer samples: memory stays flat whatever the
batch size, and smaller runs are cheaper (fewer fresh pages, more cache hits).
The slices are sized for each batch's shapes (wider text lines, longer sentences:
:class:`quantlab.stats.budget.RunRows`). A tensor without a sample axis (a position
table's slice, a scalar input) holds one value for all the samples of a run: it counts
once per sample (quantlab.stats.reductions.sample_weights), so the statistics do not
depend on the batch size or the slicing either.
When even one slice of all exposed tensors would exceed ``memory_budget_bytes``,
tensors are split into groups and the data is run once per group; that is why
``batches`` is a factory that can be called again.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..backends.base import Backend
from ..binning import warm_up
from ..clipped import ClippedPair, NotDerivable
from ..data.batches import take_samples
from ..errors import CalibrationError, DataError
from ..graph import LoadedModel, activation_names, producer_map
from ..graph.samples import carries_samples
from ..histogram import DEFAULT_BINS, DEFAULT_HUGE_THRESHOLD, AbsHistogram
from .budget import (
    DEFAULT_MEMORY_BUDGET,
    DEFAULT_RUN_BUDGET,
    RunRows,
    plan_groups,
    resolved_sizes,
)
from .pairs import clipped_pairs
from .prefetch import prefetched
from .record import Statistics
from .reductions import Reductions, sample_weights

__all__ = ["collect_statistics", "value_sources", "batch_feeds", "batch_axes_of", "batch_size_of", "sample_rows"]


def batch_feeds(item: Any) -> Mapping[str, np.ndarray]:
    """The feed mapping of a batch item: the item itself, or its ``.feeds`` (a ``quantlab.data.Batch``)."""
    feeds = getattr(item, "feeds", item)
    if not isinstance(feeds, Mapping):
        raise DataError(
            f"a calibration batch must be a mapping of input name -> array or have .feeds; got {type(item).__name__}"
        )
    return feeds


def batch_axes_of(item: Any) -> Mapping[str, int | None]:
    """Each input's sample axis: a ``quantlab.data.Batch``'s ``batch_axes`` (state on axis 1, a scalar on
    none); axis 0 for a plain feed mapping."""
    return getattr(item, "batch_axes", None) or {}


def batch_size_of(item: Any, feeds: Mapping[str, np.ndarray]) -> int:
    """Samples in a batch: ``len(Batch)``, or axis 0 of a plain mapping's first input."""
    if hasattr(item, "indices"):
        return len(item.indices)
    for value in feeds.values():
        arr = np.asarray(value)
        return int(arr.shape[0]) if arr.ndim else 1
    return 0


def sample_rows(feeds: Mapping[str, np.ndarray], axes: Mapping[str, int | None], start: int,
                stop: int) -> dict[str, np.ndarray]:
    """Samples ``start:stop`` of every input, cut along its own sample axis (inputs without one whole)."""
    return {name: take_samples(value, axes.get(name, 0), slice(start, stop)) for name, value in feeds.items()}


_SAME_VALUES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})
"""Ops whose output holds their first input's values in the same (row-major) order: the same statistics."""


def value_sources(model: LoadedModel, tensors: Sequence[str]) -> dict[str, str]:
    """For each tensor, the tensor whose values it holds in the same order (itself, unless a Reshape,
    Flatten, Squeeze, Unsqueeze or Identity made it): statistics are gathered once per source.

    A transformer reshapes most of its activations (heads split and merged): those are not run out of
    the model a second time. Transpose changes the order, so it is not a source (the first zero decides a
    zero min's sign).
    """
    producers = producer_map(model.proto)
    inputs = set(model.input_names)

    def source(name: str) -> str:
        while name not in inputs:
            node = producers.get(name)
            if node is None or node.op_type not in _SAME_VALUES or not node.input or node.output[0] != name:
                break
            first = node.input[0]
            if first not in producers and first not in inputs:  # a constant reshaped: keep the tensor itself
                break
            name = first
        return name

    return {t: source(t) for t in tensors}


def _check_tensors(model: LoadedModel, tensors: Sequence[str]) -> None:
    produced = set(producer_map(model.proto)) | set(model.input_names)
    unknown = [t for t in tensors if t not in produced]
    if unknown:
        shown = ", ".join(repr(t) for t in unknown[:5])
        raise CalibrationError(
            f"{model.label}: no node or input produces tensor(s) {shown}; "
            "calibrate activations by the names of node outputs or graph inputs."
        )
    if len(set(tensors)) != len(tensors):
        raise CalibrationError(f"{model.label}: the tensor list names a tensor twice")


def _progress_bar(progress: bool, total: int | None, desc: str) -> Any:
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="sample", dynamic_ncols=True, leave=True)


@dataclass(frozen=True)
class _Setup:
    """What every pass shares: the model, the reducers, the backend, the kernel threads, samples per model run."""

    model: LoadedModel
    reducers: Mapping[str, AbsHistogram | ClippedPair]
    backend: Any
    pool: Any
    workers: int
    run_rows: RunRows  # samples per model run, for a batch's shapes
    layouts: set[str]  # how the runners returned the exposed tensors (for provenance)


def _run_pass(setup: _Setup, items: Iterator[Any], group: Sequence[str], on_batch: Callable[[Any], None] | None,
              bar: Any) -> tuple[int, int]:
    """Run every batch once, feeding the group's tensors into their reducers; (samples, batches).

    A batch larger than ``setup.run_rows`` allows for its shapes goes through the model in
    slices (the histograms do not depend on how the data is split). The
    outputs of one run are reduced on the pool while the model computes the
    next run (:class:`quantlab.stats.reductions.Reductions`).
    """
    input_names = set(setup.model.input_names)
    exposed = [t for t in group if t not in input_names]
    runner = setup.backend.build_values(setup.model.proto, exposed) if exposed else None
    if runner is not None:
        setup.layouts.add(str(getattr(runner, "layout", "onnx")))
    samples = batches = 0
    stream = prefetched(items, on_batch)
    reductions = Reductions(setup.reducers, setup.pool, setup.workers)
    carries: dict[tuple[tuple[str, int | None], ...], dict[str, bool]] = {}  # for each inputs' batch axes
    try:
        for item in stream:
            feeds = batch_feeds(item)
            axes = batch_axes_of(item)
            n = batch_size_of(item, feeds)
            for t in group:
                if t in input_names:  # an input without a sample axis stands for all n samples
                    setup.reducers[t].update(np.asarray(feeds[t]), 1 if axes.get(t, 0) is not None else max(n, 1))
            if runner is not None:
                key = tuple(sorted(axes.items()))
                if key not in carries:
                    carries[key] = carries_samples(setup.model, axes, exposed)
                step = setup.run_rows(feeds, n, axes)
                for start in range(0, n, step):
                    part = feeds if n <= step else sample_rows(feeds, axes, start, start + step)
                    outputs = runner.run(part, exposed)
                    reductions.submit(outputs, sample_weights(outputs, min(step, n - start), carries[key]))
            samples += n
            batches += 1
            if bar is not None:
                bar.update(n)
        reductions.wait()
    finally:
        reductions.drain()
        stream.close()
        if runner is not None:
            runner.close()
    return samples, batches


def _chain_first(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def collect_statistics(
    model: LoadedModel,
    batches: Callable[[], Iterable[Any]],
    *,
    tensors: Sequence[str] | None = None,
    backend: Backend | None = None,
    bins: int = DEFAULT_BINS,
    huge_threshold: float = DEFAULT_HUGE_THRESHOLD,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    on_batch: Callable[[Any], None] | None = None,
    progress: bool = False,
    total: int | None = None,
    threads: int | None = None,
    run_budget_bytes: int = DEFAULT_RUN_BUDGET,
    derive_clipped: bool = True,
) -> Statistics:
    """Histograms of |x| (plus min/max/counts) of ``tensors`` over every batch ``batches()`` yields.

    ``batches`` is a factory returning a fresh iterable of batch items: feed
    mappings (input name -> array batched on axis 0) or objects with a
    ``.feeds`` mapping (``quantlab.data.Batch``). It is called once per pass.
    ``tensors`` defaults to every float activation
    (:func:`quantlab.graph.activation_names`); ``backend`` to ONNX Runtime.
    ``on_batch(item)`` runs once on each item, before the model sees it
    (fingerprinting, NaN checks). ``total`` is the expected number of
    samples, for the progress bar. ``threads`` (default: all cores) reduce
    several tensors at once, while the model computes the next run;
    ``run_budget_bytes`` caps the exposed activations in memory (a larger batch
    runs in slices; with threads, two runs of half the budget each are in
    flight); results depend on neither. ``derive_clipped``: a Relu or
    ``Clip(x, 0, h)`` of a calibrated ``x`` is derived from ``x``'s values
    (quantlab.clipped), not exposed; the same results, unless the data holds
    values that make it ambiguous (NaN, inf, -0.0), and then the pass starts again
    with every tensor exposed.

    Raises DataError when the data is empty or a later pass sees different
    data, CalibrationError for a tensor name the model does not produce.
    """
    if backend is None:
        from ..backends import get_backend

        backend = get_backend("ort", spinning=False)  # idle ORT threads sleep: the kernels use the cores
    wanted = list(tensors) if tensors is not None else activation_names(model.proto)
    _check_tensors(model, wanted)
    options = _Options(bins, float(huge_threshold), memory_budget_bytes, run_budget_bytes,
                       threads if threads is not None else (os.cpu_count() or 1), progress, total)
    once = _OncePerItem(on_batch)
    if not derive_clipped:
        return _collect(model, batches, wanted, backend, options, once, derive=False)
    try:
        return _collect(model, batches, wanted, backend, options, once, derive=True)
    except NotDerivable as exc:
        once.rewind()  # items already seen are not passed to on_batch again
        again = _collect(model, batches, wanted, backend, options, once, derive=False)
        return replace(again, backend={**again.backend, "clipped_not_derived": str(exc)})


@dataclass(frozen=True)
class _Options:
    bins: int
    huge_threshold: float
    memory_budget_bytes: int
    run_budget_bytes: int
    workers: int
    progress: bool
    total: int | None


class _OncePerItem:
    """``on_batch`` for the items of the first pass, skipping those a pass that was started again already saw."""

    def __init__(self, on_batch: Callable[[Any], None] | None) -> None:
        self._on_batch = on_batch
        self._seen = 0
        self._skip = 0

    def __call__(self, item: Any) -> None:
        if self._skip:
            self._skip -= 1
            return
        if self._on_batch is not None:
            self._on_batch(item)
        self._seen += 1

    def rewind(self) -> None:
        self._skip = self._seen
        self._seen = 0


def _collect(model: LoadedModel, batches: Callable[[], Iterable[Any]], wanted: Sequence[str], backend: Any,
             options: _Options, on_batch: _OncePerItem, *, derive: bool) -> Statistics:
    sources = value_sources(model, wanted)
    names = list(dict.fromkeys(sources.values()))
    inputs = set(model.input_names)
    pairs = clipped_pairs(model, names, options.huge_threshold, [t for t in names if t not in inputs]) \
        if derive else {}
    derived = {y: x for x, (y, _) in pairs.items()}
    measured = [t for t in names if t not in derived]
    source = iter(batches())
    first = next(source, None)
    if first is None:
        raise DataError("the calibration data yielded no batches; give it at least one sample")
    run_rows, groups = _run_plan(model, measured, first, options.workers, options.memory_budget_bytes,
                                 options.run_budget_bytes)
    reducers: dict[str, Any] = {t: ClippedPair(pairs[t][1], options.bins, options.huge_threshold) if t in pairs
                                else AbsHistogram(options.bins, options.huge_threshold) for t in measured}
    pool = ThreadPoolExecutor(options.workers, thread_name_prefix="quantlab-stats") if options.workers > 1 else None
    if pool is not None:
        pool.submit(warm_up)  # loads the compiled kernels while the session is built
    try:
        setup = _Setup(model, reducers, backend, pool, options.workers, run_rows, set())
        samples, n_batches = _run_groups(setup, batches, _chain_first(first, source), groups, on_batch,
                                         options.progress, options.total)
    finally:
        if pool is not None:
            pool.shutdown()
    states = {t: reducers[t].state() for t in measured}
    states.update({y: reducers[x].clipped_state() for y, x in derived.items()})
    return Statistics(tensors={t: states[sources[t]] for t in wanted}, samples=samples, batches=n_batches,
                      model_sha256=model.sha256, bins=options.bins, huge_threshold=options.huge_threshold,
                      passes=len(groups),
                      backend={**(backend.describe().as_dict() if hasattr(backend, "describe") else {}),
                               "exposed_layout": sorted(setup.layouts), "derived_clipped": len(derived)})


def _run_plan(model: LoadedModel, names: Sequence[str], first: Any, workers: int, memory_budget_bytes: int,
              run_budget_bytes: int) -> tuple[RunRows, list[list[str]]]:
    """(samples per model run for each batch shape, tensor groups, one pass each) that keep the exposed
    activations in budget; the groups are planned on the first batch."""
    feeds = batch_feeds(first)
    sizes = resolved_sizes(model, names, feeds)
    rows = batch_size_of(first, feeds)
    in_flight = 2 if workers > 1 else 1  # outputs of the run being reduced and of the run being computed
    run_rows = RunRows(model, names, run_budget_bytes // in_flight, feeds, rows, sizes)
    first_rows = run_rows(feeds, rows, batch_axes_of(first))
    run_sizes = {t: None if v is None else v * first_rows // max(rows, 1) for t, v in sizes.items()}
    groups = plan_groups(run_sizes, memory_budget_bytes // in_flight) if names else [[]]
    return run_rows, [list(g) for g in groups]


def _run_groups(setup: _Setup, batches: Callable[[], Iterable[Any]], source: Iterator[Any],
                groups: Sequence[Sequence[str]], on_batch: Callable[[Any], None] | None, progress: bool,
                total: int | None) -> tuple[int, int]:
    """One pass per group of tensors; the first pass reuses the already-started iterator."""
    samples = n_batches = 0
    for index, group in enumerate(groups):
        desc = "statistics" if len(groups) == 1 else f"statistics pass {index + 1}/{len(groups)}"
        bar = _progress_bar(progress, total, desc)
        try:
            if index == 0:
                samples, n_batches = _run_pass(setup, source, group, on_batch, bar)
            else:
                again = _run_pass(setup, iter(batches()), group, None, bar)
                if again != (samples, n_batches):
                    raise DataError(
                        f"pass {index + 1} over the calibration data saw {again[0]} samples in {again[1]} "
                        f"batches, the first saw {samples} in {n_batches}: the batches() factory must "
                        "yield the same data every time"
                    )
        finally:
            if bar is not None:
                bar.close()
    return samples, n_batches

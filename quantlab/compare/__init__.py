"""Comparator: FP32 ONNX reference vs FP16/INT8 candidates, end to end and per layer.

INTERFACE (agreed in code; the search, experiments, report and CLI use exactly this):

    result = compare(reference, {"int8-entropy": written, "fp16": written16}, dataset,
                     CompareOptions(backend="ort"), progress=True)
    result.end_to_end   # DataFrame, one row per candidate x model output (columns below)
    result.per_layer    # DataFrame, long: one row per candidate x layer x mode ("accumulated" | "local")
    result.per_sample   # DataFrame, one row per candidate x sample (x output for multi-output models)
    result.check("top1_drop<=0.5")        # {candidate: ThresholdCheck}
    result.save(out_dir); load_comparison(out_dir)

end_to_end columns (NaN where not applicable): candidate, output, samples, cosine, sqnr_db,
max_abs, mean_abs, rel_l2, and for classifier outputs (2-D [N, C], C > 1): top1_agreement,
top1_agreement_ci_low/high; with labels: ref_top1, top1, top1_drop (percentage points,
reference minus candidate), top5 / ref_top5 / top5_drop, each with _ci_low/_ci_high
(bootstrap, options.bootstrap resamples, options.confidence), mcnemar_p
(exact McNemar between reference and candidate correctness), and one column per number a user
metric returns. nan_count counts NaN/inf elements in the candidate's outputs.

per_layer columns: candidate, mode, order (topological index of the node in the reference),
layer (reference node name), group (fusion group name), op_type, tensor (reference output
tensor compared), precision (the group's precision in the candidate), cosine, sqnr_db,
max_abs, mean_abs, rel_l2, nan_count.

Definitions (see :mod:`quantlab.metrics`): per layer, every figure is over all elements of
the tensor and all samples (float64 running sums). End to end, ``sqnr_db``, ``max_abs``,
``mean_abs`` and ``rel_l2`` are over all elements too, while ``cosine`` is the mean over
samples of each sample's cosine (``cosine_min``: the worst sample; ``cosine_ci_low/high``:
its bootstrap interval). Accuracy and agreement figures are percentages (0-100); the
``_drop`` columns are percentage points. Extra columns: ``cosine_min``, ``cosine_ci_*``,
``ref_only_correct`` / ``cand_only_correct`` (McNemar's discordant counts), ``nan_count``;
per layer also ``node`` (the reference node producing ``tensor``).

Which tensors are layers (``CompareOptions.layers``): ``"groups"`` (default) compares the
tensor each fusion group hands on (what exists in a TensorRT engine; ``layer`` and ``op_type``
are the group's anchor node, e.g. the Conv of Conv+BN+Relu, ``node`` the node producing the
tensor); ``"nodes"`` compares every float node output (``layer`` = ``node``).
Tensors are aligned only through the writer's provenance (``Provenance.tensor_map``:
original tensor -> written tensor carrying its value), never by guessing from names::

    accumulated: the candidate runs end to end; each layer's written counterpart is compared
                 with the reference's tensor (error of the layer + everything upstream)

        reference   x ──► [G1] ──► a ──► [G2] ──► b           compare a : a',  b : b'
        candidate   x ──► [G1'] ──► a' ──► [G2'] ──► b'

    local:       each int8/fp16 group (and any group the writer changed) runs alone, fed the
                 reference's values of its inputs: its own error, not the one it inherits

        reference   x ──► [G1] ──► a ──► [G2] ──► b
                                   │ (reference value of a, cast to the written dtype)
        island      ref/a ──► Q/DQ ──► [G2' as written: DQ(W), Conv, Add, Relu ...] ──► b''
                                                                compare b : b''

An island is the group's written nodes (``Provenance.node_map``: the node plus the Q/DQ/Cast
nodes feeding it) closed over inserted nodes, cut at the written tensors that carry original
tensors. The islands of a chunk of groups form "local models" (renamed ``local/<i>/...``,
inputs ``ref/<tensor>``; a node shared by two islands on the same inputs is computed once),
one per worker thread, each run once per batch.

Bounded memory (streaming): metrics are running sums per tensor, updated batch by batch; no
activation outlives its batch. Large models do not expose every tensor at once: layers are
split into chunks of at most ``layer_group_size`` tensors (and ``memory_budget_mb`` of
reference activations per batch), and each model is cut into consecutive segments, one per
chunk, so one pass over the data runs every node once and holds only one chunk's tensors
plus the tensors crossing the cut::

    chunk 0 ──────────────┐        chunk 1 ──────────────┐
    [segment 0: ancestors of chunk 0] ──► live cut ──► [segment 1: what chunk 1 adds] ──► ...
        ▲ fetch chunk 0, update sums, drop             ▲ fetch chunk 1, update sums, drop

With one chunk (the usual case) each model is a single session exposing its chunk; with
``per_layer=False`` the models run as they are, exposing nothing.

Each batch is a small task graph, run by ``CompareOptions.workers`` threads (two on ONNX
Runtime; its sessions then get ``cores / 2`` threads each)::

    R(b): reference ─┬─► L(b): local model + sums ──┐
    C(b): candidate ─┴─► A(b): accumulated sums ────┴─► release; end-to-end figures, in batch order

Model runs and the numba metric kernels release the GIL, so the reference and candidate
runs overlap, then the local model and the metric kernels; single-threaded sessions side by
side also use the cores better than one two-threaded session at a time. A group fed only
graph inputs (the first) reuses its accumulated figures as its local ones. Sums are merged
strictly in batch order: the same data and seed give the same tables whatever the timing.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import pandas as pd
from onnx import helper

from ..data import DataSet, DataSummary
from ..errors import CompareError, QuantlabError
from ..graph import LoadedModel, outer_names
from ..quantize import WrittenModel
from .candidates import Candidate, load_candidate
from .options import CompareOptions
from .alignment import plan_candidate
from .islands import Island, LocalModel
from .layers import Layer, analyse_reference, chunks, elements_per_sample, layers_per_group
from .segments import StagedModel
from .result import (
    CLASSIFIER_COLUMNS,
    COMPARE_FORMAT,
    END_TO_END_COLUMNS,
    LABEL_COLUMNS,
    PER_LAYER_COLUMNS,
    PER_SAMPLE_COLUMNS,
    CompareResult,
    load_comparison,
)

__all__ = ["CompareOptions", "CompareResult", "compare", "load_comparison", "load_candidate",
           "COMPARE_FORMAT", "END_TO_END_COLUMNS", "PER_LAYER_COLUMNS", "PER_SAMPLE_COLUMNS"]

_LIVE_MODES = ("accumulated", "local")
_WINDOW = 1
"""Batches in flight when several workers run. 2 overlaps a batch's local/metric work with the next
batch's runs (about 7 % faster on EfficientNet-Lite0) but makes the peak memory depend on thread
timing (it kept rising for ~30 batches on a loaded machine); 1 keeps it the same every batch."""


# --------------------------------------------------------------------------- scheduling


@dataclass
class _Task:
    key: tuple[Any, ...]
    fn: Callable[[], Any]
    deps: tuple[tuple[Any, ...], ...] = ()
    inline: bool = False     # run on the calling thread (cheap bookkeeping)


@dataclass(eq=False)
class _BatchState:
    """One batch in flight: its live tensors per model and the metric sums of its tasks."""

    batch: Any
    ref_live: dict[str, np.ndarray]
    cand_live: dict[str, dict[str, np.ndarray]]
    sums: dict[tuple[str, str, str], Any] = field(default_factory=dict)
    keys: set[tuple[Any, ...]] = field(default_factory=set)
    runs: set[tuple[Any, ...]] = field(default_factory=set)   # the model runs (R, C tasks)

    def sorted_sums(self) -> list[tuple[tuple[str, str, str], Any]]:
        """The batch's sums in insertion order of the keys' first appearance: deterministic merging."""
        return sorted(self.sums.items(), key=lambda kv: kv[0])


# --------------------------------------------------------------------------- end-to-end accumulation


@dataclass
class _OutputStats:
    """Running end-to-end statistics of one candidate output, plus per-sample scalars."""

    sums: Any = None
    cosine: list[np.ndarray] = field(default_factory=list)
    sqnr: list[np.ndarray] = field(default_factory=list)
    max_abs: list[np.ndarray] = field(default_factory=list)
    top1: list[np.ndarray] = field(default_factory=list)
    correct1: list[np.ndarray] = field(default_factory=list)
    correct5: list[np.ndarray] = field(default_factory=list)
    nonfinite: int = 0


def _load_metric(spec: str) -> Callable[..., Any]:
    """``--metric``: ``file.py:function``, ``module.py`` in the current folder, or an importable module."""
    from ..hooks import load_hook

    return load_hook(spec, Path.cwd(), CompareError, f"metric {spec!r}",
                     "Make it importable or give a file path, e.g. --metric my_metrics.py:score")


_RESERVED = set(END_TO_END_COLUMNS) | set(CLASSIFIER_COLUMNS) | set(LABEL_COLUMNS) | set(PER_SAMPLE_COLUMNS)


def _call_metric(func: Callable[..., Any], spec: str, ref: Mapping[str, np.ndarray], cand: Mapping[str, np.ndarray],
                 label: Any, candidate: str, index: int, key: str) -> dict[str, float]:
    try:
        got = func(ref, cand, label)
    except Exception as exc:  # noqa: BLE001 - any failure of user code is reported with the sample
        raise CompareError(f"metric {spec!r} raised {type(exc).__name__}: {exc} on sample {index} ({key!r}), "
                           f"candidate {candidate!r}. Fix the metric function or the data.") from None
    if not isinstance(got, Mapping):
        raise CompareError(f"metric {spec!r} returned {type(got).__name__} on sample {index} ({key!r}); it must "
                           "return a mapping of names to numbers, e.g. {'iou': 0.87}")
    out: dict[str, float] = {}
    for k, v in got.items():
        if str(k) in _RESERVED:
            raise CompareError(f"metric {spec!r} returns {k!r}, a name the comparator uses itself; rename it")
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            raise CompareError(f"metric {spec!r} returned {k!r} = {v!r} on sample {index} ({key!r}); values must "
                               "be numbers") from None
    return out


# --------------------------------------------------------------------------- compare


def _truncated(dataset: DataSet, batch_size: int, limit: int) -> Iterator[Any]:
    """The first ``limit`` samples, batched (the last batch sliced)."""
    seen = 0
    for batch in dataset.batches(batch_size):
        if seen >= limit:
            break
        n = len(batch)
        if seen + n > limit:
            keep = limit - seen
            batch = dataclasses.replace(
                batch, indices=tuple(batch.indices[:keep]), keys=tuple(batch.keys[:keep]),
                feeds={k: v[:keep] for k, v in batch.feeds.items()},
                labels=None if batch.labels is None else batch.labels[:keep],
            )
            n = keep
        seen += n
        yield batch


def compare(
    reference: LoadedModel,
    candidates: Mapping[str, Candidate],
    dataset: DataSet,
    options: CompareOptions = CompareOptions(),
    *,
    progress: bool = False,
    calibration: DataSummary | None = None,
) -> CompareResult:
    """Compare every candidate with ``reference`` on ``dataset`` (see the module docstring).

    ``calibration``: the calibration set's summary (``quantlab.summarize`` or a
    calibration run's ``data_summary.json``); a validation set sharing samples with
    it gets a warning. Raises CompareError for candidates that do not fit the
    reference, labels that do not fit the outputs, a failing user metric;
    InputMismatchError for data that does not fit the model.
    """
    return _Comparison(reference, candidates, dataset, options, calibration).run(progress)


class _Comparison:
    """One compare() call: the plan (chunks, segments, islands), the pass over the data, the tables."""

    def __init__(self, reference: LoadedModel, candidates: Mapping[str, Candidate], dataset: DataSet,
                 options: CompareOptions, calibration: DataSummary | None) -> None:
        from ..backends import get_backend
        from ..data import check_inputs

        if not isinstance(reference, LoadedModel):
            raise CompareError("the reference must be a LoadedModel (quantlab.load_model), got "
                               f"{type(reference).__name__}")
        if not candidates:
            raise CompareError("no candidates to compare; give at least one")
        self.reference = reference
        self.candidates = dict(candidates)
        self.dataset = dataset
        self.options = options
        self.calibration = calibration
        self.warnings: list[str] = []
        check_inputs(dataset, reference, batch_size=options.batch_size)
        self.total = len(dataset) if options.max_samples is None else min(len(dataset), options.max_samples)
        if self.total == 0:
            raise CompareError(f"the validation set {getattr(dataset, 'name', '')!r} is empty")
        is_ort = options.backend in ("ort", "onnxruntime")
        cores = os.cpu_count() or 1
        self.workers = options.workers if options.workers is not None else (2 if is_ort and cores >= 2 else 1)
        backend_options = dict(options.backend_options)
        if self.workers > 1 and is_ort and "threads" not in backend_options:
            backend_options["threads"] = max(1, cores // self.workers)
        try:
            self.backend = get_backend(options.backend, **backend_options)
        except TypeError as exc:
            raise CompareError(f"backend {options.backend!r} does not take options {dict(options.backend_options)}: "
                               f"{exc}") from None
        self.ref = analyse_reference(reference)
        per_group = layers_per_group(self.ref, options.layers) if options.per_layer else []
        self.all_layers = [x for g in per_group for x in g]
        self.plans = {name: plan_candidate(name, c, self.ref, self.all_layers, options)
                      for name, c in self.candidates.items()}
        for p in self.plans.values():
            self.warnings.extend(p.skipped)
            if p.written is None and options.per_layer:
                self.warnings.append(f"candidate {p.name!r} has no provenance (not written by quantlab): "
                                     "end-to-end comparison only")
        self.do_acc = options.per_layer and options.accumulated
        self.do_local = options.per_layer and options.local
        self.chunks = chunks(per_group, options) if (self.do_acc or self.do_local) else []
        self.metric_spec = options.metric
        self.metric = _load_metric(options.metric) if options.metric else None
        self._labels_setup()

    # -- labels ---------------------------------------------------------------------------------

    def _labels_setup(self) -> None:
        ds, opts = self.dataset, self.options
        has = bool(getattr(ds, "has_labels", False))
        if opts.labels is True and not has:
            raise CompareError(f"labels were asked for but the validation set {getattr(ds, 'name', '')!r} has none; "
                               "add a [labels] table to its manifest (see calib_sets/README.md)")
        self.use_labels = has and opts.labels is not False
        self.classifiers: dict[str, int] = {}
        for spec in self.reference.outputs:
            if spec.shape is not None and len(spec.shape) == 2 and isinstance(spec.shape[1], int) \
                    and spec.shape[1] > 1 and spec.is_float:
                self.classifiers[spec.name] = int(spec.shape[1])
        self.label_output: str | None = None
        integer = str(getattr(ds, "label_dtype", "") or "").startswith(("int", "uint"))
        if opts.label_output is not None:
            if opts.label_output not in self.classifiers:
                raise CompareError(f"label_output {opts.label_output!r} is not a classifier output ([N, C] float) of "
                                   f"the reference; classifier outputs: {sorted(self.classifiers) or 'none'}")
            self.label_output = opts.label_output
        elif self.classifiers:
            order = list(self.classifiers)
            self.label_output = max(order, key=lambda k: (self.classifiers[k], -order.index(k)))
        if self.use_labels and (not integer or self.label_output is None):
            why = ("the labels are not class indices (dtype " + str(getattr(ds, "label_dtype", None)) + ")"
                   if not integer else "the reference has no classifier output ([N, C] scores)")
            if self.metric is None:
                self.warnings.append(f"validation labels are not used for accuracy: {why}; only a user metric "
                                     "(--metric) receives them")
            self.accuracy = False
        else:
            self.accuracy = self.use_labels

    def _check_labels(self, batch: Any) -> None:
        if not self.accuracy or self.label_output is None:
            return
        c = self.classifiers[self.label_output]
        labels = np.asarray(batch.labels)
        bad = np.flatnonzero((labels < 0) | (labels >= c))
        if bad.size:
            i = int(bad[0])
            raise CompareError(
                f"sample {batch.indices[i]} ({batch.keys[i]!r}) has label {labels[i].item()}, which does not fit "
                f"output {self.label_output!r} with {c} classes (valid 0..{c - 1}). Fix the manifest's [labels] "
                "(regex/column) or choose the output with label_output / --label-output."
            )

    # -- setup of runners ---------------------------------------------------------------------------

    def _setup(self) -> None:
        layered = [p for p in self.plans.values() if p.written is not None and (p.carriers or p.islands)]
        self.layered = layered
        k_count = max(1, len(self.chunks))
        chunk_of_group: dict[str, int] = {}
        for k, chunk in enumerate(self.chunks):
            for x in chunk:
                chunk_of_group[x.group] = k
        # local models, per candidate and chunk: split in ``workers`` parts that run side by side
        self.local: dict[str, list[list[LocalModel]]] = {}
        ref_wants: list[list[str]] = [[] for _ in range(k_count)]
        for k, chunk in enumerate(self.chunks):
            ref_wants[k].extend(x.tensor for x in chunk)
        if self.do_local:
            graph_inputs = set(self.ref.graph_inputs)
            for p in layered:
                per_chunk: list[list[Island]] = [[] for _ in range(k_count)]
                for g, island in p.islands.items():
                    if self.do_acc and set(island.boundary) <= graph_inputs \
                            and all(t in p.carriers for t, _ in island.outputs):
                        # fed only graph inputs: the candidate's own run already gives its local error
                        p.mirrored.add(g)
                        continue
                    per_chunk[chunk_of_group[g]].append(island)
                models: list[list[LocalModel]] = []
                for k, islands in enumerate(per_chunk):
                    parts = [LocalModel(p.name, p.proto, part, self.backend) for part in self._split(islands)]
                    for lm in parts:
                        ref_wants[k].extend(lm.needs)
                    models.append(parts)
                self.local[p.name] = models
        ref_wants[-1].extend(self.ref.outputs)
        ref_wants = [list(dict.fromkeys(w)) for w in ref_wants]
        self.ref_staged = StagedModel(self.reference.proto, ref_wants, self.backend, f"reference {self.reference.label}")
        self.cand_staged: dict[str, StagedModel] = {}
        for name, p in self.plans.items():
            if self.do_acc and p in layered and p.carriers:
                wants: list[list[str]] = [[] for _ in range(k_count)]
                for k, chunk in enumerate(self.chunks):
                    wants[k].extend(p.carriers[x.tensor] for x in chunk if x.tensor in p.carriers)
                wants[-1].extend(self.ref.outputs)
                self.cand_staged[name] = StagedModel(p.proto, [list(dict.fromkeys(w)) for w in wants], self.backend,
                                                 f"candidate {name!r}")
            else:
                self.cand_staged[name] = StagedModel(p.proto, [list(self.ref.outputs)], self.backend,
                                                 f"candidate {name!r}")
        self.k_count = k_count

    # -- the pass ---------------------------------------------------------------------------------

    def run(self, progress: bool) -> CompareResult:
        from ..data import DataFingerprint, overlap
        from ..metrics import ErrorAccumulator

        self._setup()
        opts = self.options
        fingerprint = DataFingerprint()
        acc: dict[tuple[str, str, str], ErrorAccumulator] = {}
        e2e = {(c, o): _OutputStats() for c in self.plans for o in self.ref.outputs}
        ref_out = {o: _OutputStats() for o in self.ref.outputs}
        keys: list[str] = []
        indices: list[int] = []
        labels: list[Any] = []
        user: dict[str, list[dict[str, float]]] = {c: [] for c in self.plans}
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total, unit="sample", desc="compare", dynamic_ncols=True)

        def opened(batch: Any) -> None:
            self._check_labels(batch)
            fingerprint.update(batch)

        def finished(state: _BatchState) -> None:
            for key, sums in state.sorted_sums():
                acc.setdefault(key, ErrorAccumulator()).add(sums)
            self._end_to_end_batch(state.batch, state.ref_live, state.cand_live, e2e, ref_out, user)
            keys.extend(state.batch.keys)
            indices.extend(int(i) for i in state.batch.indices)
            if self.use_labels and state.batch.labels is not None:
                labels.extend(np.asarray(state.batch.labels).tolist())
            if bar is not None:
                bar.update(len(state.batch))

        try:
            self._pipeline(_truncated(self.dataset, opts.batch_size, self.total), opened, finished)
        finally:
            if bar is not None:
                bar.close()
            self._close()
        summary = fingerprint.summary()
        if self.calibration is not None:
            shared = overlap(summary, self.calibration)
            if shared:
                self.warnings.append(f"the validation set shares {shared} sample(s) (same content hash) with the "
                                     "calibration set: accuracy on those is optimistic; use disjoint sets")
        if getattr(self.dataset, "role", "validation") == "calibration":
            self.warnings.append(f"data set {getattr(self.dataset, 'name', '')!r} is marked role = \"calibration\"; "
                                 "compare on a validation set (role = \"validation\"), disjoint from calibration")
        if summary.duplicates:
            self.warnings.append(f"{len(summary.duplicates)} validation sample(s) repeat an earlier one (e.g. "
                                 f"{summary.duplicates[0][0]!r} = {summary.duplicates[0][1]!r}); they count twice")
        per_layer = self._per_layer_frame(acc)
        end_to_end, per_sample = self._end_to_end_frames(e2e, ref_out, keys, indices, labels, user)
        self._nan_warnings(per_layer, end_to_end)
        return CompareResult(
            end_to_end=end_to_end, per_layer=per_layer, per_sample=per_sample,
            settings=self._settings(), data=self._data_record(summary), models=self._models_record(),
            environment=self._environment(), warnings=tuple(dict.fromkeys(self.warnings)),
        )

    def _tasks(self, b: int, state: _BatchState) -> list[_Task]:
        """The work of one batch as a small graph: runs, metric sums, releases (see ``_pipeline``)."""
        tasks: list[_Task] = []
        for k in range(self.k_count):
            chunk = self.chunks[k] if k < len(self.chunks) else []
            # a session never runs twice at once (its memory arena would grow to hold both): each run
            # waits for the same run of the previous batch
            tasks.append(_Task(("R", b, k), partial(self.ref_staged.step, k, state.ref_live),
                               (("R", b, k - 1), ("R", b - 1, k))))
            chunk_tasks = [("R", b, k)] + ([("REL", b, k - 1)] if k else [])  # earlier chunks' readers first
            for name, p in self.plans.items():
                staged = self.cand_staged[name]
                if k < len(staged.steps):
                    tasks.append(_Task(("C", b, k, name), partial(staged.step, k, state.cand_live[name]),
                                       (("C", b, k - 1, name), ("C", b - 1, k, name))))
                    chunk_tasks.append(("C", b, k, name))
                if self.do_acc and p.carriers and chunk:
                    tasks.append(_Task(("MA", b, k, name), partial(self._accumulated_sums, state, name, chunk),
                                       (("R", b, k), ("C", b, k, name))))
                    chunk_tasks.append(("MA", b, k, name))
                for i, model in enumerate(self.local.get(name, [[]] * (k + 1))[k]):
                    tasks.append(_Task(("L", b, k, name, i), partial(self._local_sums, state, name, model),
                                       (("R", b, k), ("L", b - 1, k, name, i))))
                    chunk_tasks.append(("L", b, k, name, i))
            tasks.append(_Task(("REL", b, k), partial(self._release, state, k), tuple(chunk_tasks), inline=True))
        return tasks

    def _split(self, islands: list[Island]) -> list[list[Island]]:
        """Islands in ``workers`` parts of similar size (activation elements in and out), so the
        local models of one chunk run side by side; each part keeps topological order."""
        if not islands:
            return []
        parts: list[list[Island]] = [[] for _ in range(min(self.workers, len(islands)))]
        load = [0] * len(parts)

        def size(island: Island) -> int:
            tensors = list(island.boundary) + [t for t, _ in island.outputs]
            return sum(elements_per_sample(self.ref.specs.get(t)) or 0 for t in tensors) or 1

        for island in sorted(islands, key=lambda i: (-size(i), i.index)):
            j = load.index(min(load))
            parts[j].append(island)
            load[j] += size(island)
        return [sorted(part, key=lambda i: i.index) for part in parts if part]

    def _accumulated_sums(self, state: _BatchState, name: str, chunk: Sequence[Layer]) -> None:
        from ..metrics import error_sums

        p = self.plans[name]
        live = state.cand_live[name]
        for x in chunk:
            carrier = p.carriers.get(x.tensor)
            if carrier is not None:
                r, c = state.ref_live[x.tensor], live[carrier]
                self._check_shape(r, c, name, x.tensor, "accumulated")
                state.sums[(name, "accumulated", x.tensor)] = error_sums(r, c)

    def _local_sums(self, state: _BatchState, name: str, model: LocalModel) -> None:
        from ..metrics import error_sums

        got = model.run(state.ref_live)
        for tensor, value in got.items():
            r = state.ref_live[tensor]
            self._check_shape(r, value, name, tensor, "local")
            state.sums[(name, "local", tensor)] = error_sums(r, value)

    def _release(self, state: _BatchState, k: int) -> None:
        outputs = set(self.ref.outputs)
        for t in self.ref_staged.release[k]:
            if t not in outputs:
                state.ref_live.pop(t, None)
        for name, staged in self.cand_staged.items():
            if k < len(staged.release):
                for t in staged.release[k]:
                    if t not in outputs:
                        state.cand_live[name].pop(t, None)

    def _pipeline(self, batches: Iterator[Any], opened: Callable[[Any], None],
                  finished: Callable[[_BatchState], None]) -> None:
        """Run every batch's task graph on ``self.workers`` threads, ``_WINDOW`` batches in flight.

        Runs and metric kernels release the GIL, so two workers keep two cores busy
        (ONNX Runtime sessions then use ``cores / workers`` threads each); a session
        never runs twice at once. Results are merged by ``finished`` strictly in batch
        order, so the tables do not depend on which task ends first. One worker runs
        everything in order on this thread.
        """
        from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

        window = _WINDOW if self.workers > 1 else 1
        states: dict[int, _BatchState] = {}
        pending: list[_Task] = []
        known: set[tuple[Any, ...]] = set()
        done: set[tuple[Any, ...]] = set()
        running: dict[Future[Any], tuple[Any, ...]] = {}
        source = iter(batches)
        exhausted = False
        prefetched: Any = None
        next_batch = 0
        next_finish = 0
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="quantlab-compare") if self.workers > 1 else None

        def load() -> Any:
            nonlocal exhausted
            if exhausted:
                return None
            batch = next(source, None)
            if batch is None:
                exhausted = True
                return None
            opened(batch)
            return batch

        def ready(task: _Task) -> bool:
            return all(d in done or d not in known for d in task.deps)

        try:
            while True:
                retired: list[_BatchState] = []
                while next_finish in states and states[next_finish].keys <= done:
                    state = states.pop(next_finish)
                    done -= state.keys
                    known -= state.keys
                    retired.append(state)
                    next_finish += 1
                while len(states) < window and (not states or states[next_batch - 1].runs <= done):
                    # the next batch starts once this one's models ran (window > 1): its metric and local
                    # work then overlap the next batch's runs
                    batch, prefetched = (prefetched, None) if prefetched is not None else (load(), None)
                    if batch is None:
                        break
                    state = _BatchState(batch, dict(batch.feeds), {n: dict(batch.feeds) for n in self.plans})
                    states[next_batch] = state
                    tasks = self._tasks(next_batch, state)
                    state.keys = {t.key for t in tasks}
                    state.runs = {t.key for t in tasks if t.key[0] in ("R", "C")}
                    known |= state.keys
                    pending.extend(tasks)
                    next_batch += 1
                progressed = True
                while progressed:
                    progressed = False
                    for task in list(pending):
                        if not ready(task):
                            continue
                        if pool is None or task.inline:
                            pending.remove(task)
                            task.fn()
                            done.add(task.key)
                            progressed = True
                        elif len(running) < self.workers:
                            pending.remove(task)
                            running[pool.submit(task.fn)] = task.key
                # this thread's own work, while the workers run the models: end-to-end figures of the
                # batches done, and loading the next batch
                for state in retired:
                    finished(state)
                if pool is not None and prefetched is None:
                    prefetched = load()
                if not running:
                    if exhausted and prefetched is None and not states:
                        return
                    if not pending or any(ready(t) for t in pending) or retired:
                        continue
                    raise RuntimeError("internal error: the comparison's task graph is stuck")  # pragma: no cover
                finished_now, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in finished_now:
                    key = running.pop(fut)
                    fut.result()  # re-raises the task's error here
                    done.add(key)
        finally:
            if pool is not None:
                for fut in running:
                    fut.cancel()
                pool.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def _check_shape(r: np.ndarray, c: np.ndarray, name: str, tensor: str, mode: str) -> None:
        if r.shape != c.shape:
            raise CompareError(f"candidate {name!r}: tensor {tensor!r} ({mode}) has shape {list(c.shape)}, the "
                               f"reference's has {list(r.shape)}; the written model does not compute the same layer")

    def _end_to_end_batch(self, batch: Any, ref_live: Mapping[str, np.ndarray],
                          cand_live: Mapping[str, Mapping[str, np.ndarray]],
                          e2e: dict[tuple[str, str], _OutputStats], ref_out: dict[str, _OutputStats],
                          user: dict[str, list[dict[str, float]]]) -> None:
        from ..metrics import error_sums, per_sample_errors, per_sample_sums, topk

        labels = np.asarray(batch.labels) if (self.accuracy and batch.labels is not None) else None
        ref_top: dict[str, np.ndarray] = {}
        for o in self.ref.outputs:
            r = ref_live[o]
            st = ref_out[o]
            if o in self.classifiers:
                top5 = topk(r.reshape(r.shape[0], -1), 5)
                ref_top[o] = top5
                st.top1.append(top5[:, 0])
                if labels is not None and o == self.label_output:
                    st.correct1.append(top5[:, 0] == labels)
                    st.correct5.append((top5 == labels[:, None]).any(axis=1))
            bad = int(r.size - np.count_nonzero(np.isfinite(r))) if np.issubdtype(r.dtype, np.floating) else 0
            st.nonfinite += bad
        for name in self.plans:
            live = cand_live[name]
            for o in self.ref.outputs:
                r, c = ref_live[o], live[o]
                if r.shape != c.shape:
                    raise CompareError(f"candidate {name!r}: output {o!r} has shape {list(c.shape)}, the "
                                       f"reference's has {list(r.shape)}")
                st = e2e[(name, o)]
                s = error_sums(r, c)
                st.sums = s if st.sums is None else st.sums + s
                st.nonfinite += s.nonfinite
                rows = per_sample_errors(per_sample_sums(r, c))
                st.cosine.append(rows["cosine"])
                st.sqnr.append(rows["sqnr_db"])
                st.max_abs.append(rows["max_abs"])
                if o in self.classifiers:
                    scores = c.reshape(c.shape[0], -1)
                    top = topk(scores, 5 if labels is not None and o == self.label_output else 1)
                    st.top1.append(top[:, 0])
                    if labels is not None and o == self.label_output:
                        st.correct1.append(top[:, 0] == labels)
                        st.correct5.append((top == labels[:, None]).any(axis=1))
            if self.metric is not None:
                for i in range(len(batch)):
                    rs = {o: ref_live[o][i] for o in self.ref.outputs}
                    cs = {o: live[o][i] for o in self.ref.outputs}
                    label = None if batch.labels is None or not self.use_labels else np.asarray(batch.labels)[i].item()
                    user[name].append(_call_metric(self.metric, str(self.metric_spec), rs, cs, label, name,
                                                   int(batch.indices[i]), str(batch.keys[i])))

    def _close(self) -> None:
        for obj in [getattr(self, "ref_staged", None), *getattr(self, "cand_staged", {}).values()]:
            if obj is not None:
                obj.close()
        for models in getattr(self, "local", {}).values():
            for parts in models:
                for m in parts:
                    m.close()

    # -- tables -------------------------------------------------------------------------------------

    def _per_layer_frame(self, acc: Mapping[tuple[str, str, str], Any]) -> pd.DataFrame:
        rows = []
        for name, p in self.plans.items():
            for mode in _LIVE_MODES:
                for x in self.all_layers:
                    a = acc.get((name, mode, x.tensor))
                    if a is None and mode == "local" and x.group in p.mirrored:
                        a = acc.get((name, "accumulated", x.tensor))
                    if a is None:
                        continue
                    rows.append({
                        "candidate": name, "mode": mode, "order": x.order, "layer": x.layer, "group": x.group,
                        "op_type": x.op_type, "tensor": x.tensor, "precision": p.precision.get(x.group, "fp32"),
                        **a.result(), "node": x.node,
                    })
        frame = pd.DataFrame(rows, columns=list(PER_LAYER_COLUMNS))
        frame["order"] = frame["order"].astype("int64")
        frame["nan_count"] = frame["nan_count"].astype("int64")
        for c in ("cosine", "sqnr_db", "max_abs", "mean_abs", "rel_l2"):
            frame[c] = frame[c].astype("float64")
        return frame

    def _end_to_end_frames(self, e2e: Mapping[tuple[str, str], _OutputStats], ref_out: Mapping[str, _OutputStats],
                           keys: Sequence[str], indices: Sequence[int], labels: Sequence[Any],
                           user: Mapping[str, list[dict[str, float]]]) -> tuple[pd.DataFrame, pd.DataFrame]:
        from ..metrics import bootstrap_ci, errors_from_sums, mcnemar_exact_p

        opts = self.options
        n = len(keys)
        rows: list[dict[str, Any]] = []
        samples: list[pd.DataFrame] = []
        user_names = list(dict.fromkeys(k for c in user.values() for d in c for k in d))
        for o, st in ref_out.items():
            if st.nonfinite:
                self.warnings.append(f"the reference itself gives {st.nonfinite} NaN/inf value(s) in output {o!r}; "
                                     "its figures are NaN")
        for name in self.plans:
            user_cols = {k: np.array([d.get(k, math.nan) for d in user[name]], dtype=np.float64) for k in user_names}
            for o in self.ref.outputs:
                st = e2e[(name, o)]
                err = errors_from_sums(st.sums)
                cos = np.concatenate(st.cosine) if st.cosine else np.zeros(0)
                row: dict[str, Any] = {
                    "candidate": name, "output": o, "samples": n,
                    "cosine": float(cos.mean()) if cos.size else math.nan,
                    "cosine_min": float(cos.min()) if cos.size else math.nan,
                    "sqnr_db": err["sqnr_db"], "max_abs": err["max_abs"], "mean_abs": err["mean_abs"],
                    "rel_l2": err["rel_l2"], "nan_count": int(st.nonfinite),
                }
                columns: dict[str, np.ndarray] = {"cosine": cos}
                sample = {"candidate": name, "output": o, "sample": np.asarray(indices, dtype=np.int64),
                          "key": list(keys), "cosine": cos, "sqnr_db": np.concatenate(st.sqnr),
                          "max_abs": np.concatenate(st.max_abs)}
                if o in self.classifiers:
                    rt1 = np.concatenate(ref_out[o].top1)
                    ct1 = np.concatenate(st.top1)
                    agree = (rt1 == ct1).astype(np.float64) * 100.0
                    columns["top1_agreement"] = agree
                    row["classes"] = self.classifiers[o]
                    row["top1_agreement"] = float(agree.mean())
                    sample.update(ref_top1_class=rt1, top1_class=ct1, top1_agree=agree > 0)
                    if self.accuracy and o == self.label_output:
                        rc1 = np.concatenate(ref_out[o].correct1)
                        cc1 = np.concatenate(st.correct1)
                        rc5 = np.concatenate(ref_out[o].correct5)
                        cc5 = np.concatenate(st.correct5)
                        columns.update(ref_top1=rc1 * 100.0, top1=cc1 * 100.0, top1_drop=(rc1 * 1.0 - cc1) * 100.0)
                        has5 = self.classifiers[o] > 5
                        if has5:
                            columns.update(ref_top5=rc5 * 100.0, top5=cc5 * 100.0,
                                           top5_drop=(rc5 * 1.0 - cc5) * 100.0)
                        for k in ("ref_top1", "top1", "top1_drop", "ref_top5", "top5", "top5_drop"):
                            row[k] = float(columns[k].mean()) if k in columns else math.nan
                        b = int(np.count_nonzero(rc1 & ~cc1))
                        c = int(np.count_nonzero(~rc1 & cc1))
                        row.update(mcnemar_p=mcnemar_exact_p(b, c), ref_only_correct=b, cand_only_correct=c)
                        sample.update(label=list(labels), ref_correct=rc1, correct=cc1, ref_top5_correct=rc5,
                                      top5_correct=cc5)
                for k, v in user_cols.items():
                    row[k] = float(np.nanmean(v)) if v.size and not np.isnan(v).all() else math.nan
                    columns[k] = v
                    sample[k] = v
                cis = bootstrap_ci(columns, resamples=opts.bootstrap, confidence=opts.confidence, seed=opts.seed)
                for k, (lo, hi) in cis.items():
                    row[f"{k}_ci_low"], row[f"{k}_ci_high"] = lo, hi
                rows.append(row)
                samples.append(pd.DataFrame(sample))
        columns_order = list(END_TO_END_COLUMNS)
        if self.classifiers:
            columns_order += list(CLASSIFIER_COLUMNS)
        if self.accuracy:
            columns_order += list(LABEL_COLUMNS)
        for k in user_names:
            columns_order += [k, f"{k}_ci_low", f"{k}_ci_high"]
        frame = pd.DataFrame(rows)
        for c in columns_order:
            if c not in frame.columns:
                frame[c] = math.nan
        frame = frame[columns_order + [c for c in frame.columns if c not in columns_order]]
        frame["samples"] = frame["samples"].astype("int64")
        frame["nan_count"] = frame["nan_count"].astype("int64")
        per_sample = (pd.concat(samples, ignore_index=True) if samples
                      else pd.DataFrame(columns=list(PER_SAMPLE_COLUMNS)))
        return frame.reset_index(drop=True), per_sample

    def _nan_warnings(self, per_layer: pd.DataFrame, end_to_end: pd.DataFrame) -> None:
        for name in self.plans:
            rows = end_to_end[end_to_end["candidate"] == name]
            total = int(rows["nan_count"].sum())
            layered = per_layer[(per_layer["candidate"] == name) & (per_layer["nan_count"] > 0)]
            first = None
            for mode in _LIVE_MODES:
                sub = layered[layered["mode"] == mode].sort_values("order", kind="stable")
                if not sub.empty:
                    first = (mode, sub.iloc[0])
                    break
            if first is not None:
                mode, r = first
                self.warnings.append(
                    f"candidate {name!r}: NaN/inf first appears ({mode} mode, topological order) at layer "
                    f"{r['layer']!r} (tensor {r['tensor']!r}, group {r['group']!r}, {r['op_type']}, "
                    f"{r['precision']}, {int(r['nan_count'])} value(s))"
                    + (f"; its outputs hold {total} NaN/inf value(s)" if total else "")
                    + ". Pin that group to fp16/fp32 or check its calibration range.")
            elif total:
                self.warnings.append(f"candidate {name!r}: its outputs hold {total} NaN/inf value(s); run the "
                                     "per-layer comparison (with provenance) to find the first layer where they appear")

    # -- records -------------------------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        return {
            **self.options.as_dict(),
            "candidates": list(self.plans),
            "layer_tensors": len(self.all_layers),
            "chunks": len(self.chunks),
            "segments": {"reference": len(self.ref_staged.steps),
                         **{n: len(s.steps) for n, s in self.cand_staged.items()}},
            "local_groups": {n: len(p.islands) for n, p in self.plans.items() if self.do_local},
            "workers": self.workers,
            "labels_used": bool(self.accuracy),
            "label_output": self.label_output if self.accuracy else None,
        }

    def _data_record(self, summary: DataSummary) -> dict[str, Any]:
        try:
            manifest = self.dataset.manifest_record()
        except (NotImplementedError, AttributeError):
            manifest = {"name": getattr(self.dataset, "name", None)}
        doc = summary.as_dict()
        doc.pop("sample_hashes", None)
        doc["duplicates"] = len(summary.duplicates)
        return {
            "manifest": manifest, "name": getattr(self.dataset, "name", None),
            "role": getattr(self.dataset, "role", None), "count": summary.count, "sha256": summary.sha256,
            "available": len(self.dataset), "max_samples": self.options.max_samples,
            "labels": bool(self.use_labels), "summary": doc,
        }

    def _models_record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"reference": {"sha256": self.reference.sha256,
                                             "path": str(self.reference.path) if self.reference.path else None,
                                             "opset": self.reference.opset}}
        cands: dict[str, Any] = {}
        for name, cand in self.candidates.items():
            if isinstance(cand, WrittenModel):
                meta = dict(cand.provenance.meta)
                cands[name] = {
                    "kind": "written", "sha256": cand.sha256, "source_sha256": cand.source_sha256,
                    "plan_hash": cand.plan.plan_hash(), "int8_fraction": cand.plan.int8_fraction(),
                    "group_counts": cand.plan.counts(), "table_method": cand.table_method,
                    "options": cand.options.as_dict(), "source": meta.get("source"),
                    "table_model_sha256": meta.get("table_model_sha256"),
                }
            else:
                cands[name] = {"kind": "onnx", "sha256": cand.sha256, "path": str(cand.path) if cand.path else None}
        out["candidates"] = cands
        return out

    def _environment(self) -> dict[str, Any]:
        from ..fingerprint import tool_versions

        return {"versions": tool_versions(), "backend": self.backend.describe().as_dict()}

"""One compare() call: checks and plans (chunks, segments, islands), the streaming pass over the
data (here, or in shards on Ray workers), then the tables and the record.

::

    Comparison(...)     analyse_reference ─► layers_per_group ─► plan_candidate (per candidate) ─► chunks
    .local_pass()       Runners (sessions) ─► Pipeline over batches: per batch R, C, MA, L tasks (batch_tasks)
                        ─► finished(batch), in batch order: merge sums, EndToEnd.add ─► PassTotals
    (or shards.run_shards: each worker's .shard_partial(), merged in shard order ─► PassTotals)
    .tables(totals)     per_layer_frame, EndToEnd.frames, warnings, records ─► CompareResult

A group fed only graph inputs (the first) reuses its accumulated figures as its local ones.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from tqdm.auto import tqdm

from ..backends import Backend, get_backend, is_onnxruntime
from ..backends.coupling import BatchCoupling, measured_coupling
from ..backends.ort import environment_options
from ..data import Batch, DataFingerprint, DataSet, DataSummary, check_inputs, coupled_batch_note, samples_coupled
from ..errors import CompareError
from ..graph import LoadedModel, check_not_quantized
from ..graph.samples import data_sized
from ..graph.topology import holds_qdq
from ..metrics import ErrorAccumulator, ErrorSums
from ..sequence import SequenceData, sequence_carry, with_carry
from .alignment import plan_candidate
from .batch_tasks import BatchTasks
from .branches import branch_note, decided_conditions, decision_flips
from .candidates import Candidate, check_candidates, float16_on_ort_warnings, simulates_tensorrt
from .end_to_end import EndToEnd
from .free_running import free_running, free_running_note, with_free_running
from .labels import label_use
from .choices import (
    class_map_hints,
    ctc_outputs,
    exact_outputs,
    position_scorers,
    segmentation_maps,
    state_outputs,
)
from .probabilities import probability_outputs
from .layers import analyse_reference, chunks, layers_per_group, sized_by_first_batch
from .options import CompareOptions
from .padding import cross_attention_note, mask_input, padded_outputs
from .per_layer import data_sized_layers_note, nan_warnings, per_layer_frame
from .records import data_record, data_warnings, environment_record, models_record
from .deployed import deployed_notes
from .copied import copied_note, copied_prefixes
from .ctc_hints import ctc_hints
from .determinism import reference_noise, reference_noise_note
from .result import CompareResult
from .returned import as_returned, redeclared
from .selections import decided_selections, selection_note
from .runners import Runners, mirrored_groups
from .sample_axes import output_sample_axes
from .schedule import BatchState, Pipeline
from .shards import PassTotals, ShardData, ShardPartial, run_shards, truncated_batches
from .user_metric import load_metric, sample_metric

__all__ = ["compare", "shard_worker", "Comparison"]


def compare(
    reference: LoadedModel,
    candidates: Mapping[str, Candidate],
    dataset: DataSet,
    options: CompareOptions = CompareOptions(),
    *,
    progress: bool = False,
    calibration: DataSummary | None = None,
) -> CompareResult:
    """Compare every candidate with ``reference`` on ``dataset`` (see :mod:`quantlab.compare`).

    ``calibration``: the calibration set's summary (``quantlab.summarize`` or a
    calibration run's ``data_summary.json``); a validation set sharing samples with
    it gets a warning. With ``options.shards`` > 1 or ``options.ray`` set, the set is
    split into shards compared by Ray workers and merged into the same tables
    (:mod:`.shards`). Raises CompareError for candidates that do not fit the
    reference, labels that do not fit the outputs, a failing user metric;
    InputMismatchError for data that does not fit the model; BackendUnavailableError
    when Ray is asked for but not installed.
    """
    dataset = with_carry(dataset, reference, streams=options.batch_size)
    if options.on_ray and isinstance(dataset, SequenceData):
        raise CompareError("a [sequence] carry runs the data as one stream, which shards would cut: compare "
                           "without --shards/--ray")
    comparison = Comparison(reference, candidates, dataset, options, calibration)
    if options.on_ray:
        totals = run_shards(reference, comparison.candidates, dataset, options, comparison.labels,
                            comparison.total, shard_worker, progress)
    else:
        totals = comparison.local_pass(progress)
    return comparison.tables(totals, progress)


def shard_worker(reference: LoadedModel, candidates: Mapping[str, Candidate], data: ShardData,
                 options: CompareOptions) -> ShardPartial:
    """One shard on a Ray worker: the same plans and per-batch task graph, partial sums back."""
    return Comparison(reference, candidates, data, options, None).shard_partial()


def _backends(options: CompareOptions, workers: int, candidates: Mapping[str, Candidate]
              ) -> tuple[Backend, dict[str, Backend]]:
    """(the backend, the candidates that need their own): candidates written for TensorRT run their Q/DQ as written
    on ONNX Runtime (:func:`.candidates.simulates_tensorrt`) unless ``backend_options`` set ``qdq_fusion``: all of
    them on the one backend when no other candidate holds Q/DQ, else on a second one (beside an ORT-form
    candidate, a TensorRT-form one had read 31.43 dB instead of its 32.10 alone)."""
    if not is_onnxruntime(options.backend) or "qdq_fusion" in options.backend_options:
        return _backend(options, workers), {}
    if simulates_tensorrt(candidates.values()):
        return _backend(options, workers, qdq_fusion=False), {}
    trt_form = [n for n, c in candidates.items() if simulates_tensorrt([c])]
    if not trt_form:
        return _backend(options, workers), {}
    exact = _backend(options, workers, qdq_fusion=False)
    return _backend(options, workers), {n: exact for n in trt_form}


def _backend(options: CompareOptions, workers: int, **extra: Any) -> Backend:
    """The backend; with several workers on ONNX Runtime, each session gets ``cores / workers`` threads, and no
    session keeps a memory arena: a comparison holds one per segment and candidate (OrtBackend ``arena``)."""
    backend_options = {**options.backend_options, **extra}
    if is_onnxruntime(options.backend):
        backend_options.setdefault("arena", False)
    forced_threads = environment_options()[1]  # QUANTLAB_ORT_THREADS wins over the split
    if (workers > 1 and is_onnxruntime(options.backend) and "threads" not in backend_options
            and not forced_threads):
        backend_options["threads"] = max(1, (os.cpu_count() or 1) // workers)
    try:
        return get_backend(options.backend, **backend_options)
    except TypeError as exc:
        raise CompareError(f"backend {options.backend!r} does not take options {dict(options.backend_options)}: "
                           f"{exc}") from None


def _workers(options: CompareOptions) -> int:
    """``options.workers``, else 2 on ONNX Runtime with at least two cores, else 1."""
    if options.workers is not None:
        return options.workers
    return 2 if is_onnxruntime(options.backend) and (os.cpu_count() or 1) >= 2 else 1


class Comparison:
    """One compare() call: the plan (chunks, segments, islands), the pass over the data, the tables."""

    def __init__(self, reference: LoadedModel, candidates: Mapping[str, Candidate], dataset: DataSet,
                 options: CompareOptions, calibration: DataSummary | None) -> None:
        if not isinstance(reference, LoadedModel):
            raise CompareError("the reference must be a LoadedModel (quantlab.load_model), got "
                               f"{type(reference).__name__}")
        if not candidates:
            raise CompareError("no candidates to compare; give at least one")
        self.reference = reference
        self.data_sized = frozenset(data_sized(reference))  # tensors whose size the data decides (NMS boxes)
        self.candidates = dict(candidates)
        check_candidates(self.candidates)
        self.dataset = dataset
        self.options = options
        self.calibration = calibration
        self.warnings: list[str] = []
        check_not_quantized(reference)  # the reference is the float model (a quantized one may be a candidate)
        check_inputs(dataset, reference, batch_size=options.batch_size)
        self.total = len(dataset) if options.max_samples is None else min(len(dataset), options.max_samples)
        self.workers = _workers(options)
        self.backend, self.candidate_backends = _backends(options, self.workers, self.candidates)
        if self.total:  # outputs declared with another rank than they return: read as returned (ddddocr)
            fixed, notes = as_returned(reference, dataset, self._probe_backend(), min(options.batch_size, self.total))
            self.reference = reference = redeclared(reference, fixed)
            self.candidates = {n: redeclared(c, fixed) for n, c in self.candidates.items()}
            self.warnings.extend(notes)
        self.sample_axes = output_sample_axes(reference, getattr(dataset, "batch_axes", {}), sequence_carry(dataset))
        self.positions = position_scorers(reference, self.sample_axes, options.class_maps)  # OCR, tokens, pixels
        self.warnings.extend(class_map_hints(reference, self.positions))
        self.ctc = ([] if options.ctc_blank is None  # read as CTC text too
                    else ctc_outputs(reference, self.positions, options.ctc_blank))
        self.segmentation = segmentation_maps(reference, self.positions)  # maps among them: also miou
        self.exact = exact_outputs(reference)  # integer/bool outputs: equal or not
        self.states = state_outputs(reference, sequence_carry(dataset))  # an LSTM's hn: no detector's rows
        self.decided = probability_outputs(reference, taken={*self.positions, *self.exact})  # read as masks p > t
        self.padding = (mask_input(reference), padded_outputs(reference, self.sample_axes))  # compare.padding
        self.copied = copied_prefixes(reference, self.sample_axes)  # a cache's copy of its input: compare.copied
        self.warnings.extend(filter(None, [copied_note(self.copied)]))
        self.warnings.extend(filter(None, [cross_attention_note(reference)]))  # the padding note: output_warnings
        self.coupled = samples_coupled(reference, dataset) if options.batch_size > 1 else []
        if self.coupled:
            self.warnings.append(coupled_batch_note(reference.label, self.coupled, options.batch_size))
        self.declared = {spec.name: spec.shape for spec in reference.outputs}  # what the model says it returns
        if self.total == 0:
            raise CompareError(f"the validation set {getattr(dataset, 'name', '')!r} is empty")
        self.ref = analyse_reference(reference)
        others = [o.name for o in reference.proto.graph.output if o.name not in self.ref.outputs]
        if others and not self.ref.outputs:
            raise CompareError(f"{reference.label}: no output is a tensor ({', '.join(map(repr, others))} are sequences "
                               "or maps); expose the tensors they hold as graph outputs to compare them")
        self.warnings.extend(f"output {o!r} is a sequence or map of tensors, not a tensor: left out of the "
                             "comparison (expose the tensors it holds as graph outputs to compare them)"
                             for o in others)
        per_group = layers_per_group(self.ref, options.layers) if options.per_layer else []
        self.all_layers = [x for g in per_group for x in g]
        self.warnings.extend(filter(None, [data_sized_layers_note([x.tensor for x in self.all_layers],
                                                                  self.data_sized)]))
        self.plans = {name: plan_candidate(name, c, self.ref, self.all_layers, options)
                      for name, c in self.candidates.items()}
        for p in self.plans.values():
            self.warnings.extend(p.skipped)
            if p.written is None and options.per_layer:
                self.warnings.append(f"candidate {p.name!r} has no provenance (not written by quantlab): "
                                     "end-to-end comparison only")
        if is_onnxruntime(options.backend):
            self.warnings.extend(float16_on_ort_warnings(self.candidates))
        self.do_acc = options.per_layer and options.accumulated
        self.do_local = options.per_layer and options.local
        if self.do_acc or self.do_local:
            self.chunks = chunks(sized_by_first_batch(per_group, reference, dataset, options.batch_size), options)
        else:
            self.chunks = []
        if self.do_local:  # known here, not only once the sessions exist: a sharded run's driver has none
            for p in self.plans.values():
                p.mirrored.update(mirrored_groups(p, self.ref, self.do_acc))
        self.metric = load_metric(options.metric) if options.metric else None
        self.labels, warnings = label_use(reference, dataset, options, self.metric is not None)
        self.warnings.extend(warnings)

    def local_pass(self, progress: bool) -> PassTotals:
        """One pass over the data in this process: label checks, fingerprint, sums merged in batch order."""
        fingerprint = DataFingerprint()
        acc: dict[tuple[str, str, str], ErrorAccumulator] = {}
        e2e = self._end_to_end()
        bar = tqdm(total=self.total, unit="sample", desc="compare", dynamic_ncols=True) if progress else None

        def opened(batch: Batch) -> None:
            self.labels.check(batch)
            fingerprint.update(batch)

        def finished(state: BatchState) -> None:
            for key, sums in state.sorted_sums():
                acc.setdefault(key, ErrorAccumulator()).add(sums)
            e2e.add(state.batch, state.ref_live, state.cand_live)
            if bar is not None:
                bar.update(len(state.batch))

        try:
            segments = self._pass(truncated_batches(self.dataset, self.options.batch_size, self.total), opened,
                                  finished)
        finally:
            if bar is not None:
                bar.close()
        return PassTotals(acc=acc, records=e2e.records, summary=fingerprint.summary(), segments=segments)

    def shard_partial(self) -> ShardPartial:
        """The pass over this comparison's data (a shard), returning per-batch sums (see :mod:`.shards`)."""
        per_batch: list[list[tuple[tuple[str, str, str], ErrorSums]]] = []
        e2e = self._end_to_end()

        def finished(state: BatchState) -> None:
            per_batch.append(state.sorted_sums())
            e2e.add(state.batch, state.ref_live, state.cand_live)

        segments = self._pass(self.dataset.batches(self.options.batch_size), lambda batch: None, finished)
        return ShardPartial.from_batches(per_batch, e2e.records, segments)

    def _pass(self, batches: Iterable[Batch], opened: Callable[[Batch], None],
              finished: Callable[[BatchState], None]) -> dict[str, int]:
        """Runs the per-batch task graphs over ``batches``; returns the segments per model."""
        self.runners = Runners(self.reference, self.ref, self.plans, self.chunks, self.do_acc, self.do_local,
                               self.workers, self.backend, self.candidate_backends)
        self.warnings.extend(n for n in self.runners.notes if n not in self.warnings)
        try:
            graph = BatchTasks(self.runners, self.plans, self.chunks, self.do_acc, self.data_sized)
            Pipeline(self.workers, list(self.plans), graph.for_batch).run(batches, opened, finished)
        finally:
            self.runners.close()
        return self.runners.segments()

    def _end_to_end(self) -> EndToEnd:
        return EndToEnd(list(self.plans), self.ref.outputs, self.labels, self.metric, self.options.metric,
                        self.sample_axes, data_sized=self.data_sized, positions=self.positions,
                        exact=self.exact, declared=self.declared, padding=self.padding,
                        ctc=(self.options.ctc_blank, self.ctc),
                        decisions=(self.options.decision_threshold, self.decided),
                        segmentation=self.segmentation, states=self.states,
                        streams=bool(sequence_carry(self.dataset)), copied=self.copied)

    def tables(self, totals: PassTotals, progress: bool = False) -> CompareResult:
        """The result from the totals of one pass or of the merged shards (the same code either way); ``progress``:
        a bar for the pass over data-decided If branches, when the model has one."""
        self.warnings.extend(data_warnings(totals.summary, self.calibration, self.dataset))
        per_layer = per_layer_frame(self.plans, self.all_layers, totals.acc)
        e2e = self._end_to_end()
        e2e.extend(totals.records)
        self.warnings.extend(e2e.reference_warnings())
        counts = {o: sum(st.best_counts) for o, st in e2e.reference.items() if st.best_counts}
        self.warnings.extend(ctc_hints(self.reference, counts, self.options.ctc_blank))
        end_to_end, per_sample = e2e.frames(self.options)
        if (self.do_acc or self.do_local) and is_onnxruntime(self.options.backend):
            self.warnings.extend(self._deployed_notes(per_sample))
        self.warnings.extend(nan_warnings(list(self.plans), per_layer, end_to_end))
        self.warnings.extend(totals.warnings)
        settings = {**self._settings(totals.segments), **totals.settings}
        if isinstance(self.dataset, SequenceData) and self.options.free_running:
            settings["free_running"] = self._free_running(end_to_end)
            end_to_end = with_free_running(end_to_end, settings["free_running"])
        first = next(iter(truncated_batches(self.dataset, self.options.batch_size, self.total)), None)
        noise = {} if first is None else reference_noise(self.reference, self._probe_backend(), first,
                                                         list(self.ref.outputs))
        if noise:  # the verdicts read it: a threshold on these figures is not judged (compare --fail-if, run)
            settings["reference_noise"] = noise
            self.warnings.append(reference_noise_note(self.reference, noise))
        if self.options.batch_size > 1 and not self.coupled:
            coupled = BatchCoupling(measured=tuple(measured_coupling(  # what the graph analysis cannot see
                self._probe_backend(), self.reference, self.dataset, min(self.options.batch_size, self.total),
                self.sample_axes)))
            self.warnings.extend([coupled.note(self.reference.label, self.options.batch_size)] if coupled else [])
        branches, selections = self._decision_flips(progress) if self.options.branches else ([], [])
        if branches:
            settings["branch_flips"] = branches
            self.warnings.extend(filter(None, [branch_note(branches)]))
        if selections:
            settings["selection_flips"] = selections
            self.warnings.extend(filter(None, [selection_note(selections)]))
        return CompareResult(
            end_to_end=end_to_end, per_layer=per_layer, per_sample=per_sample,
            settings=settings,
            data=data_record(self.dataset, totals.summary, self.options.max_samples, self.labels.use_labels),
            models=models_record(self.reference, self.candidates),
            environment=environment_record(self.backend, self.candidate_backends), warnings=tuple(dict.fromkeys(self.warnings)),
            mask_examples=e2e.mask_examples(),
        )

    def _deployed_notes(self, per_sample: Any) -> list[str]:
        """:func:`.deployed.deployed_notes` for the candidates ONNX Runtime may fuse (Q/DQ not written for TensorRT)."""
        names = [n for n, c in self.candidates.items() if holds_qdq(c.proto) and not simulates_tensorrt([c])]
        batch = next(iter(truncated_batches(self.dataset, self.options.batch_size, self.total)), None) if names else None
        return [] if batch is None else deployed_notes(
            self.reference.proto, {n: self.candidates[n].proto for n in names}, self._probe_backend(),
            lambda n: self.candidate_backends.get(n, self.backend), batch,
            [o for o in self.ref.outputs if o not in self.data_sized], self.sample_axes, per_sample)

    def _probe_backend(self) -> Backend:
        """The comparison's backend when it is ONNX Runtime, else ONNX Runtime: a probe run of the FP32 reference
        (what an output returns, samples alone) must not build a TensorRT engine again."""
        return self.backend if is_onnxruntime(self.options.backend) else get_backend("ort")

    def _decision_flips(self, progress: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """:func:`.branches.decision_flips` over the comparison's batches, with a bar when there is a pass to run."""
        conditions, selections = decided_conditions(self.reference), decided_selections(self.reference)
        if not conditions and not selections:
            return [], []
        desc = "If branches" if not selections else "selections" if not conditions else "If branches, selections"
        bar = tqdm(total=self.total, unit="sample", desc=desc, dynamic_ncols=True) if progress else None

        def batches() -> Iterable[Batch]:
            for batch in truncated_batches(self.dataset, self.options.batch_size, self.total):
                yield batch
                if bar is not None:
                    bar.update(len(batch))

        try:
            return decision_flips(self.reference, self.candidates, batches(),
                                  lambda name: self.candidate_backends.get(name, self.backend),
                                  self.options.batch_size, conditions, selections)
        except Exception as exc:  # noqa: BLE001 - a diagnostic pass: its failure must not lose the comparison
            self.warnings.append(f"the check of which If branch (TopK/ArgMax selection) each candidate takes did not "
                                 f"run ({type(exc).__name__}: {exc}); the figures above are complete without it")
            return [], []
        finally:
            if bar is not None:
                bar.close()

    def _free_running(self, end_to_end: Any) -> list[dict[str, Any]]:
        """Each candidate over whole streams reading back its own state (:mod:`.free_running`), said in a warning
        beside the teacher-forced SQNR."""
        assert isinstance(self.dataset, SequenceData)
        rows = free_running(self.reference, self.candidates, self.dataset, self.options.batch_size,
                            lambda name: self.candidate_backends.get(name, self.backend), self.options.max_samples,
                            sample_metric(self.metric, str(self.options.metric), self.sample_axes,
                                          self.ref.outputs, self.labels.use_labels),
                            decisions=(self.options.decision_threshold, self.decided), copied=self.copied)
        forced = {(r.candidate, r.output): float(r.sqnr_db) for r in end_to_end.itertuples()}
        if rows:
            self.warnings.append(free_running_note(rows, forced))
        return rows

    def _settings(self, segments: Mapping[str, int]) -> dict[str, Any]:
        return {
            **self.options.as_dict(),
            "candidates": list(self.plans),
            "layer_tensors": len(self.all_layers),
            "chunks": len(self.chunks),
            "segments": dict(segments),
            "local_groups": {n: len(p.islands) for n, p in self.plans.items() if self.do_local},
            "workers": self.workers,
            "labels_used": bool(self.labels.accuracy),
            "label_output": self.labels.label_output if self.labels.accuracy else None,
        }


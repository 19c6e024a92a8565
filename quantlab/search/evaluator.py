"""The real :class:`~quantlab.search.evaluation.Evaluator`: write each plan, measure it with the comparator."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..backends import Backend, get_backend, is_onnxruntime
from ..compare import CompareOptions, compare
from ..compare.free_running import FREE_PREFIX
from ..compare.labels import classifier_outputs
from ..data import DataSet
from ..errors import SearchError
from ..graph import LoadedModel
from ..perf import measure_latency
from ..plan import ResolvedPlan
from ..quantize import BiasCorrection, WriteOptions, WrittenModel, write_model
from ..table import CalibrationTable
from ..threshold import Condition, parse_threshold
from .evaluation import Evaluation, plain_value
from .options import SearchOptions
from .suffix import plan_outputs


def write_options(options: SearchOptions, correction: BiasCorrection | None = None) -> WriteOptions:
    """How the search writes its deployable models (the evaluated ones add the fp16 simulation)."""
    return WriteOptions(target=options.target, per_channel_weights=options.per_channel_weights,  # type: ignore[arg-type]
                        bias_correction=correction, int8_bodies=options.int8_bodies)


class CompareEvaluator:
    """Writes each plan (:func:`quantlab.quantize.write_model`) and measures it with the comparator.

    Candidates are written with ``fp16_simulation`` when the options ask (ONNX Runtime),
    so their FP16 groups are rounded as a GPU would round them; latency is measured on the
    deployable form (no simulation) with :func:`quantlab.perf.measure_latency` on the first
    batch of the validation set.
    """

    def __init__(self, model: LoadedModel, table: CalibrationTable, dataset: DataSet, options: SearchOptions,
                 correction: BiasCorrection | None = None) -> None:
        self.model = model
        self.table = table
        self.dataset = dataset
        self.options = options
        self.deploy_options = write_options(options, correction)
        self.write_options = dataclasses.replace(self.deploy_options, fp16_simulation=options.simulate_fp16)
        self._size = len(dataset)
        self._feeds: dict[str, np.ndarray] | None = None
        self.subset: DataSet | None = None
        self.subset_indices: list[int] = []
        self._ref: _Reference | bool | None = None
        self._sample_feeds: dict[int, dict[str, np.ndarray]] = {}
        self._first_full: pd.DataFrame | None = None  # per-sample figures of the first full validation
        # a threshold on free-running figures (free_sqnr_db) needs that pass in every evaluation; else it is
        # skipped there, and runs for the final plan only
        self._free_running = any(m.startswith(FREE_PREFIX) for m in parse_threshold(options.threshold).metrics)

    @property
    def size(self) -> int:
        return self._size

    @property
    def streams_whole(self) -> bool:
        """Whether every evaluation runs the free-running pass (the threshold names a ``free_`` figure): then
        one on fewer samples than the set takes the first ones, not a ranking subset taken out of the streams."""
        return self._free_running

    def candidate_name(self, plan: ResolvedPlan) -> str:
        return f"plan-{plan.plan_hash()[:12]}"

    def write(self, plan: ResolvedPlan, *, deploy: bool = False) -> WrittenModel:
        return write_model(self.model, plan, self.table, self.deploy_options if deploy else self.write_options)

    def int8_body_groups(self, plan: ResolvedPlan) -> list[str]:
        """The Loop/Scan/If groups whose bodies ``plan`` writes in INT8 (``int8_bodies``): the search may pin them."""
        if not self.deploy_options.int8_bodies:
            return []
        written = self.write(plan, deploy=True)
        return sorted(g for g, p in written.provenance.body_precision.items() if p == "int8")

    def select_subset(self, n: int, *, fragile: bool, conditions: Sequence[Condition] = ()) -> list[int]:
        """Fix the ranking subset (used for every evaluation on fewer samples than the set).

        With ``fragile``: the ``n`` samples whose FP32 top-1 lead over the runner-up is smallest
        (relative to the logits' spread), the samples a discrete metric flips on. Else, once a full
        validation has run (the all-INT8 plan's): :func:`worst_and_spread` over its per-sample
        figures (:meth:`worst_order`), so a sample the all-INT8 model gets badly wrong is ranked on
        wherever it sits in the set; the first ``n`` only without per-sample figures (a ranking on
        them moved with the order of the files: 8 % or 67 % INT8 for the same set shuffled).
        """
        n = min(n, self._size)
        idx = list(range(n))
        if self.streams_whole:
            self.subset_indices = idx  # a free-running pass runs each stream from its start: the first samples
            return idx
        order = self.fragile_order() if fragile else self.worst_order(conditions)
        if order:
            idx = sorted(order[:n]) if fragile else worst_and_spread(order, n)
        self.subset = self.dataset.select(idx, name=f"{self.dataset.name}-ranking")
        self.subset_indices = idx
        return idx

    def worst_order(self, conditions: Sequence[Condition] = ()) -> list[int]:
        """Every sample index, worst first by the first full validation's per-sample figures: the threshold's
        metrics, then cosine and SQNR to break their ties (a 0/1 user metric is mostly ties, which the files'
        order had broken), each the worst over the outputs; samples without figures last. [] before any full
        validation or without figures."""
        per = self._first_full
        if per is None or per.empty or "sample" not in per.columns:
            return []
        keys = dict.fromkeys([*((c.metric, c.higher_is_better) for c in conditions), ("cosine", True),
                              ("sqnr_db", True)])
        keys = [(m, up) for m, up in keys if m in per.columns and pd.to_numeric(per[m], errors="coerce").notna().any()]
        if not keys:
            return []
        by_sample = per.groupby("sample")
        worst = pd.DataFrame({f"k{i}": (by_sample[m].min() if up else -by_sample[m].max())
                              for i, (m, up) in enumerate(keys)}).reindex(range(self._size))
        return [int(i) for i in worst.sort_values(list(worst.columns), kind="stable", na_position="last").index]

    def fragile_order(self) -> list[int]:
        """Every sample index, smallest FP32 relative top-1 lead first ([] when no output is a classifier)."""
        ref = self._reference()
        return [] if ref is None else [int(i) for i in np.argsort(ref.lead, kind="stable")]

    def _reference(self) -> _Reference | None:
        """The FP32 model's per-sample classifier figures (one pass over the set, kept)."""
        if self._ref is None:
            self._ref = _reference_pass(self.model, self.dataset, self.options)
        return self._ref or None

    def margins(self, plans: Sequence[ResolvedPlan], indices: Sequence[int]) -> np.ndarray:
        """[plan, sample]: each plan's logit of the FP32 top-1 class minus its best other logit,
        over the FP32 logits' std, on the validation samples ``indices`` (negative: flipped).

        The candidates run directly on the backend (no comparator: the reference's figures are
        kept from one FP32 pass), each only from where it differs from the all-INT8 model
        (:mod:`.suffix`).
        """
        ref = self._reference()
        if ref is None:
            raise SearchError("margins need a classifier output ([N, C] scores a linear layer computes, C >= 2); "
                              "this model has none: use a cosine or sqnr_db threshold")
        idx = [int(i) for i in indices]
        if not plans:
            return np.zeros((0, len(idx)))
        first = plans[0]
        anchor = first.with_pins({g.name: "int8" for g in first.groups
                                  if g.quantizable and first.precision[g.name] != "int8"})
        anchor_proto, protos = self.write(anchor).proto, [self.write(p).proto for p in plans]
        rows: list[list[np.ndarray]] = [[] for _ in plans]
        order: list[int] = []
        for positions, feeds, batch in self._feeds_by_shape(idx):  # images of several sizes: one stack per size
            outs = plan_outputs(self.exact_backend(), anchor_proto, protos, feeds, ref.output, batch)
            for k, z in enumerate(outs):
                rows[k].append(np.asarray(z, dtype=np.float64).reshape(len(z), -1))
            order.extend(positions)
        back = np.argsort(np.asarray(order), kind="stable")  # rows in the order of ``idx`` again
        logits = [np.concatenate(r)[back] for r in rows]
        return np.stack([logit_margins(z, ref.top1[idx]) / ref.scale[idx] for z in logits])

    def exact_backend(self) -> Backend:
        """A backend with the options the search's comparisons get (:func:`exact_backend`), for what runs
        outside them: the flip margins and the final plan's free-running pass."""
        return exact_backend(self.options)

    def _feeds_by_shape(self, idx: Sequence[int]) -> list[tuple[list[int], dict[str, np.ndarray], int]]:
        """(positions in ``idx``, their feeds, samples per run) for each distinct sample shape: stacked on axis 0.

        A set with an input batched on another axis (an LSTM's state on axis 1) or on none (a sample rate)
        runs each sample alone, its batch axis of size 1 put back where the model wants it: the anchor's cut
        tensors are then one sample's, whatever axis holds their samples.
        """
        names = self.dataset.input_names
        for i in idx:
            if i not in self._sample_feeds:
                self._sample_feeds[i] = dict(self.dataset.sample(i).feeds)
        axes = {k: self.dataset.batch_axis(k) for k in names}
        if any(a != 0 for a in axes.values()):
            return [([pos], {k: (self._sample_feeds[i][k] if axes[k] is None
                                 else np.expand_dims(self._sample_feeds[i][k], axes[k])) for k in names}, 1 << 30)
                    for pos, i in enumerate(idx)]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for pos, i in enumerate(idx):
            feeds = self._sample_feeds[i]
            groups.setdefault(tuple((k, feeds[k].shape) for k in names), []).append(pos)
        return [(positions, {k: np.stack([self._sample_feeds[idx[p]][k] for p in positions]) for k in names},
                 self.options.batch_size) for positions in groups.values()]

    def _data(self, samples: int) -> tuple[DataSet, int | None]:
        """The data set and max_samples of an evaluation on ``samples`` samples."""
        if samples >= self._size:
            return self.dataset, None
        if self.subset is not None and samples == len(self.subset):
            return self.subset, None  # samples taken out of their streams: no free-running figures
        return self.dataset, samples

    def evaluate(self, plan: ResolvedPlan, samples: int, *, local: bool = False) -> Evaluation:
        written = self.write(plan)
        data, max_samples = self._data(samples)
        opts = CompareOptions(backend=self.options.backend, batch_size=self.options.batch_size, per_layer=local,
                              local=local, accumulated=False, max_samples=max_samples,
                              metric=self.options.metric, seed=self.options.seed, ctc_blank=self.options.ctc_blank,
                              decision_threshold=self.options.decision_threshold, class_maps=self.options.class_maps,
                              backend_options=_backend_options(self.options), free_running=self._free_running,
                              branches=False, bootstrap=CompareOptions.bootstrap if samples >= self._size else 0,
                              shards=self.options.shards if samples >= self._size else 1,
                              ray=self.options.ray if samples >= self._size else None)
        result = compare(self.model, {self.candidate_name(plan): written}, data, opts)
        rows = tuple({k: plain_value(v) for k, v in r.items()} for r in result.end_to_end.to_dict("records"))
        local_map = _local_errors(result.per_layer) if local else None
        flipped = _flipped(result.per_sample) if samples >= self._size else None
        if samples >= self._size and self._first_full is None and result.per_sample is not None:
            self._first_full = result.per_sample
        return Evaluation(plan_hash=plan.plan_hash(), samples=min(samples, self._size), rows=rows, local=local_map,
                          comparison=result, flipped=flipped)

    def evaluate_many(self, plans: Sequence[ResolvedPlan], samples: int) -> list[Evaluation]:
        """Several plans on the first ``samples`` samples in one comparator pass (the reference
        runs once), end to end only and without bootstrap intervals: the ranking's batched pass."""
        written = {self.candidate_name(p): self.write(p) for p in plans}
        data, max_samples = self._data(samples)
        opts = CompareOptions(backend=self.options.backend, batch_size=self.options.batch_size, per_layer=False,
                              local=False, accumulated=False, max_samples=max_samples,
                              metric=self.options.metric, seed=self.options.seed, ctc_blank=self.options.ctc_blank,
                              decision_threshold=self.options.decision_threshold, class_maps=self.options.class_maps,
                              bootstrap=0, backend_options=_backend_options(self.options),
                              free_running=self._free_running, branches=False)
        result = compare(self.model, written, data, opts)
        out = []
        for p in plans:
            df = result.end_to_end[result.end_to_end["candidate"] == self.candidate_name(p)]
            rows = tuple({k: plain_value(v) for k, v in r.items()} for r in df.to_dict("records"))
            out.append(Evaluation(plan_hash=p.plan_hash(), samples=min(samples, self._size), rows=rows))
        return out

    def latency(self, plan: ResolvedPlan) -> float:
        written = self.write(plan, deploy=True)
        runner = get_backend(self.options.backend, **self.options.backend_options).build(written.proto)
        try:
            if self._feeds is None:
                batch = next(iter(self.dataset.batches(self.options.batch_size)))
                self._feeds = dict(batch.feeds)
            return measure_latency(runner, self._feeds, warmup=3, iterations=self.options.latency_iterations).mean_ms
        finally:
            runner.close()


def _backend_options(options: SearchOptions) -> dict[str, Any]:
    """On ONNX Runtime, Q/DQ run as written: the ONNX (and TensorRT) semantics on every CPU. ORT's
    fused integer kernels, which it would pick on a CPU with VNNI, round differently (about 0.3
    logits on EfficientNet-Lite0), enough to flip the samples a top-1 threshold counts; and a
    suffix (:mod:`.suffix`) then computes exactly what its whole model computes. On TensorRT: the
    engine shapes (``SearchOptions.backend_options``)."""
    exact = {"qdq_fusion": False} if is_onnxruntime(options.backend) else {}
    return {**options.backend_options, **exact}


def exact_backend(options: SearchOptions) -> Backend:
    """The backend of the search's comparisons (:func:`_backend_options`)."""
    return get_backend(options.backend, **_backend_options(options))


def _local_errors(per_layer: pd.DataFrame) -> dict[str, float]:
    """group -> the lowest local SQNR (dB) of its layers, from the comparator's per-layer table."""
    if per_layer is None or per_layer.empty or "group" not in per_layer.columns:
        return {}
    df = per_layer
    if "mode" in df.columns:
        df = df[df["mode"] == "local"]
    if "precision" in df.columns:
        df = df[df["precision"] == "int8"]
    df = df[df["group"].notna()]
    out = df.groupby("group", sort=False)["sqnr_db"].min()
    return {str(k): float(v) for k, v in out.items()}



@dataclass(frozen=True)
class _Reference:
    """The FP32 model on every validation sample: the classifier ``output``, its top-1 class,
    the top-1 lead over the runner-up relative to ``scale`` (the logits' std, per sample)."""

    output: str
    top1: np.ndarray
    lead: np.ndarray
    scale: np.ndarray


def logit_margins(z: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """Per row: ``z[cls]`` minus the largest other entry (negative when another class wins)."""
    rows = np.arange(len(z))
    own = z[rows, cls]
    other = z.copy()
    other[rows, cls] = -np.inf
    return own - other.max(axis=1)


def _reference_pass(model: LoadedModel, dataset: DataSet, options: SearchOptions) -> _Reference | bool:
    """One FP32 pass: the first classifier output (:func:`quantlab.compare.labels.classifier_outputs`; False when
    there is none)."""
    name = next(iter(classifier_outputs(model)), None)
    if name is None:
        return False
    runner = get_backend(options.backend, **options.backend_options).build(model.proto)
    parts: list[np.ndarray] = []
    indices: list[int] = []
    try:
        for batch in dataset.batches(options.batch_size):
            z = np.asarray(runner.run(batch.feeds, [name])[name], dtype=np.float64)
            parts.append(z.reshape(len(z), -1))  # [N, C, 1, 1] heads as [N, C]
            indices.extend(batch.indices)  # batched by shape, batches come out of data order
    finally:
        runner.close()
    z = np.concatenate(parts)[np.argsort(np.asarray(indices), kind="stable")]
    top1 = z.argmax(axis=1)
    scale = z.std(axis=1) + 1e-12
    return _Reference(output=name, top1=top1, lead=logit_margins(z, top1) / scale, scale=scale)


def worst_and_spread(order: Sequence[int], n: int) -> list[int]:
    """``n`` sample indices (sorted): the worst half of ``order`` (worst first), then samples evenly spaced
    along the rest of ``order``, so that the subset still sees the set's spread and, like ``order``, does not
    depend on the order of the files."""
    n = min(n, len(order))
    worst = list(order[:(n + 1) // 2])
    rest = list(order[len(worst):])
    k = n - len(worst)
    picked = [rest[int(j)] for j in np.unique(np.linspace(0, len(rest) - 1, k).round())] if k and rest else []
    return sorted(worst + picked)


def _flipped(per_sample: pd.DataFrame | None) -> tuple[int, ...] | None:
    """The samples whose top-1 class differs from the FP32 model's on any classifier output."""
    if per_sample is None or per_sample.empty or "top1_agree" not in per_sample.columns:
        return None
    rows = per_sample[per_sample["top1_agree"].notna()]
    if rows.empty:
        return None
    bad = rows.loc[~rows["top1_agree"].astype(bool), "sample"]
    return tuple(sorted({int(i) for i in bad}))

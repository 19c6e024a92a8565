"""The real :class:`~quantlab.search.evaluation.Evaluator`: write each plan, measure it with the comparator."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..backends import get_backend
from ..compare import CompareOptions, compare
from ..data import DataSet, from_arrays
from ..graph import LoadedModel
from ..perf import measure_latency
from ..plan import ResolvedPlan
from ..quantize import BiasCorrection, WriteOptions, WrittenModel, write_model
from ..table import CalibrationTable
from .evaluation import Evaluation, plain_value
from .options import SearchOptions


def write_options(options: SearchOptions, correction: BiasCorrection | None = None) -> WriteOptions:
    """How the search writes its deployable models (the evaluated ones add the fp16 simulation)."""
    return WriteOptions(target=options.target, per_channel_weights=options.per_channel_weights,  # type: ignore[arg-type]
                        bias_correction=correction)


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

    @property
    def size(self) -> int:
        return self._size

    def candidate_name(self, plan: ResolvedPlan) -> str:
        return f"plan-{plan.plan_hash()[:12]}"

    def write(self, plan: ResolvedPlan, *, deploy: bool = False) -> WrittenModel:
        return write_model(self.model, plan, self.table, self.deploy_options if deploy else self.write_options)

    def select_subset(self, n: int, *, fragile: bool) -> list[int]:
        """Fix the ranking subset (used for every evaluation on fewer samples than the set): the
        first ``n`` samples, or with ``fragile`` the ``n`` whose FP32 top-1 lead over the runner-up
        is smallest (relative to the logits' spread): the samples a discrete metric flips on."""
        n = min(n, self._size)
        idx = list(range(n))
        if fragile:
            margins = self._fp32_margins()
            if margins is not None:
                idx = sorted(int(i) for i in np.argsort(margins, kind="stable")[:n])
        samples = [self.dataset.sample(i) for i in idx]
        arrays = {k: np.stack([s.feeds[k] for s in samples]) for k in self.dataset.input_names}
        labels = [s.label for s in samples] if self.dataset.has_labels else None
        self.subset = from_arrays(arrays, labels=labels, role="validation", name=f"{self.dataset.name}-ranking")
        self.subset_indices = idx
        return idx

    def _fp32_margins(self) -> np.ndarray | None:
        """Per sample: (top-1 - top-2 logit) / std of the logits, of the first 2-D output with >= 2 classes."""
        runner = get_backend(self.options.backend, **self.options.backend_options).build(self.model.proto)
        margins: list[np.ndarray] = []
        try:
            for batch in self.dataset.batches(self.options.batch_size):
                outs = runner.run(batch.feeds)
                z = next((np.asarray(v, dtype=np.float64) for v in outs.values()
                          if np.ndim(v) == 2 and np.shape(v)[1] >= 2), None)
                if z is None:
                    return None
                top = np.sort(z, axis=1)
                margins.append((top[:, -1] - top[:, -2]) / (z.std(axis=1) + 1e-12))
        finally:
            runner.close()
        return np.concatenate(margins)

    def _data(self, samples: int) -> tuple[DataSet, int | None]:
        """The data set and max_samples of an evaluation on ``samples`` samples."""
        if samples >= self._size:
            return self.dataset, None
        if self.subset is not None and samples == len(self.subset):
            return self.subset, None
        return self.dataset, samples

    def evaluate(self, plan: ResolvedPlan, samples: int, *, local: bool = False) -> Evaluation:
        written = self.write(plan)
        data, max_samples = self._data(samples)
        opts = CompareOptions(backend=self.options.backend, backend_options=self.options.backend_options,
                              batch_size=self.options.batch_size, per_layer=local,
                              local=local, accumulated=False, max_samples=max_samples,
                              metric=self.options.metric, seed=self.options.seed,
                              bootstrap=CompareOptions.bootstrap if samples >= self._size else 0,
                              shards=self.options.shards if samples >= self._size else 1,
                              ray=self.options.ray if samples >= self._size else None)
        result = compare(self.model, {self.candidate_name(plan): written}, data, opts)
        rows = tuple({k: plain_value(v) for k, v in r.items()} for r in result.end_to_end.to_dict("records"))
        local_map = _local_errors(result.per_layer) if local else None
        return Evaluation(plan_hash=plan.plan_hash(), samples=min(samples, self._size), rows=rows, local=local_map,
                          comparison=result)

    def evaluate_many(self, plans: Sequence[ResolvedPlan], samples: int) -> list[Evaluation]:
        """Several plans on the first ``samples`` samples in one comparator pass (the reference
        runs once), end to end only and without bootstrap intervals: the ranking's batched pass."""
        written = {self.candidate_name(p): self.write(p) for p in plans}
        data, max_samples = self._data(samples)
        opts = CompareOptions(backend=self.options.backend, backend_options=self.options.backend_options,
                              batch_size=self.options.batch_size, per_layer=False,
                              local=False, accumulated=False, max_samples=max_samples,
                              metric=self.options.metric, seed=self.options.seed, bootstrap=0)
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


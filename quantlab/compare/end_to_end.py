"""End-to-end figures: running statistics of every candidate output, then the end-to-end and
per-sample tables (columns in :mod:`.result`).

Per batch only scalars per sample are kept (cosine, SQNR, max |d|, top-1 class, correctness,
user metric numbers) plus the running error sums; intervals are a paired bootstrap over
the samples at the end (:func:`quantlab.metrics.bootstrap_ci`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..data import Batch
from ..errors import CompareError
from ..metrics import (
    ErrorSums,
    bootstrap_ci,
    error_sums,
    errors_from_sums,
    mcnemar_exact_p,
    per_sample_errors,
    per_sample_sums,
    topk,
)
from .labels import LabelUse
from .options import CompareOptions
from .result import (
    CLASSIFIER_COLUMNS,
    END_TO_END_COLUMNS,
    LABEL_COLUMNS,
    PER_SAMPLE_COLUMNS,
)
from .user_metric import call_metric

__all__ = ["OutputStats", "EndToEnd"]


@dataclass
class OutputStats:
    """Running end-to-end statistics of one candidate output, plus per-sample scalars."""

    sums: ErrorSums | None = None
    cosine: list[np.ndarray] = field(default_factory=list)
    sqnr: list[np.ndarray] = field(default_factory=list)
    max_abs: list[np.ndarray] = field(default_factory=list)
    top1: list[np.ndarray] = field(default_factory=list)
    correct1: list[np.ndarray] = field(default_factory=list)
    correct5: list[np.ndarray] = field(default_factory=list)
    nonfinite: int = 0


class EndToEnd:
    """The end-to-end statistics of every candidate output, fed batch by batch in batch order."""

    def __init__(self, candidates: Sequence[str], outputs: Sequence[str], labels: LabelUse,
                 metric: Callable[..., Any] | None, metric_spec: str | None) -> None:
        self.candidates = list(candidates)
        self.outputs = list(outputs)
        self.labels = labels
        self.metric = metric
        self.metric_spec = metric_spec
        self.stats = {(c, o): OutputStats() for c in self.candidates for o in self.outputs}
        self.reference = {o: OutputStats() for o in self.outputs}
        self.keys: list[str] = []
        self.indices: list[int] = []
        self.sample_labels: list[Any] = []
        self.user: dict[str, list[dict[str, float]]] = {c: [] for c in self.candidates}

    def add(self, batch: Batch, ref_live: Mapping[str, np.ndarray],
            cand_live: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        labels = np.asarray(batch.labels) if (self.labels.accuracy and batch.labels is not None) else None
        self._add_reference(ref_live, labels)
        for name in self.candidates:
            self._add_candidate(name, ref_live, cand_live[name], labels)
            if self.metric is not None:
                self._add_user(name, batch, ref_live, cand_live[name])
        self.keys.extend(batch.keys)
        self.indices.extend(int(i) for i in batch.indices)
        if self.labels.use_labels and batch.labels is not None:
            self.sample_labels.extend(np.asarray(batch.labels).tolist())

    def _add_reference(self, ref_live: Mapping[str, np.ndarray], labels: np.ndarray | None) -> None:
        for o in self.outputs:
            r = ref_live[o]
            st = self.reference[o]
            if o in self.labels.classifiers:
                top5 = topk(r.reshape(r.shape[0], -1), 5)
                st.top1.append(top5[:, 0])
                if labels is not None and o == self.labels.label_output:
                    st.correct1.append(top5[:, 0] == labels)
                    st.correct5.append((top5 == labels[:, None]).any(axis=1))
            bad = int(r.size - np.count_nonzero(np.isfinite(r))) if np.issubdtype(r.dtype, np.floating) else 0
            st.nonfinite += bad

    def _add_candidate(self, name: str, ref_live: Mapping[str, np.ndarray], live: Mapping[str, np.ndarray],
                       labels: np.ndarray | None) -> None:
        for o in self.outputs:
            r, c = ref_live[o], live[o]
            if r.shape != c.shape:
                raise CompareError(f"candidate {name!r}: output {o!r} has shape {list(c.shape)}, the "
                                   f"reference's has {list(r.shape)}")
            st = self.stats[(name, o)]
            s = error_sums(r, c)
            st.sums = s if st.sums is None else st.sums + s
            st.nonfinite += s.nonfinite
            rows = per_sample_errors(per_sample_sums(r, c))
            st.cosine.append(rows["cosine"])
            st.sqnr.append(rows["sqnr_db"])
            st.max_abs.append(rows["max_abs"])
            if o in self.labels.classifiers:
                scores = c.reshape(c.shape[0], -1)
                top = topk(scores, 5 if labels is not None and o == self.labels.label_output else 1)
                st.top1.append(top[:, 0])
                if labels is not None and o == self.labels.label_output:
                    st.correct1.append(top[:, 0] == labels)
                    st.correct5.append((top == labels[:, None]).any(axis=1))

    def _add_user(self, name: str, batch: Batch, ref_live: Mapping[str, np.ndarray],
                  live: Mapping[str, np.ndarray]) -> None:
        assert self.metric is not None
        for i in range(len(batch)):
            rs = {o: ref_live[o][i] for o in self.outputs}
            cs = {o: live[o][i] for o in self.outputs}
            label = None if batch.labels is None or not self.labels.use_labels else np.asarray(batch.labels)[i].item()
            self.user[name].append(call_metric(self.metric, str(self.metric_spec), rs, cs, label, name,
                                               int(batch.indices[i]), str(batch.keys[i])))

    def reference_warnings(self) -> list[str]:
        return [f"the reference itself gives {st.nonfinite} NaN/inf value(s) in output {o!r}; its figures are NaN"
                for o, st in self.reference.items() if st.nonfinite]

    def frames(self, options: CompareOptions) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The end-to-end table (one row per candidate x output) and the per-sample table."""
        rows: list[dict[str, Any]] = []
        samples: list[pd.DataFrame] = []
        user_names = list(dict.fromkeys(k for c in self.user.values() for d in c for k in d))
        for name in self.candidates:
            user_cols = {k: np.array([d.get(k, math.nan) for d in self.user[name]], dtype=np.float64)
                         for k in user_names}
            for o in self.outputs:
                row, sample = self._row(name, o, user_cols, options)
                rows.append(row)
                samples.append(pd.DataFrame(sample))
        columns_order = list(END_TO_END_COLUMNS)
        if self.labels.classifiers:
            columns_order += list(CLASSIFIER_COLUMNS)
        if self.labels.accuracy:
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

    def _row(self, name: str, o: str, user_cols: Mapping[str, np.ndarray],
             options: CompareOptions) -> tuple[dict[str, Any], dict[str, Any]]:
        """One end-to-end row and the per-sample columns of one candidate output."""
        st = self.stats[(name, o)]
        assert st.sums is not None
        err = errors_from_sums(st.sums)
        cos = np.concatenate(st.cosine) if st.cosine else np.zeros(0)
        row: dict[str, Any] = {
            "candidate": name, "output": o, "samples": len(self.keys),
            "cosine": float(cos.mean()) if cos.size else math.nan,
            "cosine_min": float(cos.min()) if cos.size else math.nan,
            "sqnr_db": err["sqnr_db"], "max_abs": err["max_abs"], "mean_abs": err["mean_abs"],
            "rel_l2": err["rel_l2"], "nan_count": int(st.nonfinite),
        }
        columns: dict[str, np.ndarray] = {"cosine": cos}
        sample = {"candidate": name, "output": o, "sample": np.asarray(self.indices, dtype=np.int64),
                  "key": list(self.keys), "cosine": cos, "sqnr_db": np.concatenate(st.sqnr),
                  "max_abs": np.concatenate(st.max_abs)}
        if o in self.labels.classifiers:
            self._classifier(o, st, row, columns, sample)
        for k, v in user_cols.items():
            row[k] = float(np.nanmean(v)) if v.size and not np.isnan(v).all() else math.nan
            columns[k] = v
            sample[k] = v
        cis = bootstrap_ci(columns, resamples=options.bootstrap, confidence=options.confidence, seed=options.seed)
        for k, (lo, hi) in cis.items():
            row[f"{k}_ci_low"], row[f"{k}_ci_high"] = lo, hi
        return row, sample

    def _classifier(self, o: str, st: OutputStats, row: dict[str, Any], columns: dict[str, np.ndarray],
                    sample: dict[str, Any]) -> None:
        """Top-1 agreement and, on the labelled output, accuracy, drops and McNemar's test."""
        ref = self.reference[o]
        rt1 = np.concatenate(ref.top1)
        ct1 = np.concatenate(st.top1)
        agree = (rt1 == ct1).astype(np.float64) * 100.0
        columns["top1_agreement"] = agree
        row["classes"] = self.labels.classifiers[o]
        row["top1_agreement"] = float(agree.mean())
        sample.update(ref_top1_class=rt1, top1_class=ct1, top1_agree=agree > 0)
        if not (self.labels.accuracy and o == self.labels.label_output):
            return
        rc1 = np.concatenate(ref.correct1)
        cc1 = np.concatenate(st.correct1)
        rc5 = np.concatenate(ref.correct5)
        cc5 = np.concatenate(st.correct5)
        columns.update(ref_top1=rc1 * 100.0, top1=cc1 * 100.0, top1_drop=(rc1 * 1.0 - cc1) * 100.0)
        if self.labels.classifiers[o] > 5:
            columns.update(ref_top5=rc5 * 100.0, top5=cc5 * 100.0, top5_drop=(rc5 * 1.0 - cc5) * 100.0)
        for k in ("ref_top1", "top1", "top1_drop", "ref_top5", "top5", "top5_drop"):
            row[k] = float(columns[k].mean()) if k in columns else math.nan
        b = int(np.count_nonzero(rc1 & ~cc1))
        c = int(np.count_nonzero(~rc1 & cc1))
        row.update(mcnemar_p=mcnemar_exact_p(b, c), ref_only_correct=b, cand_only_correct=c)
        sample.update(label=list(self.sample_labels), ref_correct=rc1, correct=cc1, ref_top5_correct=rc5,
                      top5_correct=cc5)

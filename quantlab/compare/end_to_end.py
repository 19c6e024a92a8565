"""End-to-end figures: running statistics of every candidate output, fed batch by batch; the end-to-end and
per-sample tables are made from them once, in :mod:`.end_to_end_tables` (columns in :mod:`.result`).

Per batch only scalars per sample are kept (cosine, SQNR, max |d|, top-1 class, correctness,
choices agreed (:mod:`.choices`), user metric numbers) plus the batch's error sums (nine numbers per output, added in batch
order when the table is made, so shards' :class:`SampleRecords` concatenate into exactly
the figures of one pass); intervals are a paired bootstrap over the samples at the end
(:func:`quantlab.metrics.bootstrap_ci`), but exact binomial ones for agreement and accuracy, and
for drops with few discordant samples (:func:`.intervals.exact_intervals`: the bootstrap collapses there).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd

from ..data import Batch
from ..errors import CompareError
from ..metrics import (
    ErrorSums,
    varying_share,
    channel_spread,
    ctc_text_agreement,
    decision_mask,
    error_sums,
    marked_share,
    mask_iou,
    mean_and_spread,
    mean_class_iou,
    per_sample_errors,
    per_sample_sums,
    topk,
)
from .labels import LabelUse
from .mask_examples import MaskExample, mask_plane, worst_of
from .options import DECISION_THRESHOLD, CompareOptions
from .copied import CopiedPrefix, new_positions
from .choices import best_positions, decided_positions, part_agreement
from .end_to_end_tables import end_to_end_frames
from .sample_axes import samples_first
from .output_warnings import output_warnings
from .padding import valid_positions, without_padding
from .user_metric import metric_rows

__all__ = ["OutputStats", "SampleRecords", "EndToEnd"]


@dataclass
class OutputStats:
    """Running end-to-end statistics of one candidate output: per-batch error sums (folded in batch
    order when the table is made) and per-sample scalars; shards' stats concatenate exactly."""

    batch_sums: list[ErrorSums] = field(default_factory=list)
    cosine: list[np.ndarray] = field(default_factory=list)
    sqnr: list[np.ndarray] = field(default_factory=list)
    max_abs: list[np.ndarray] = field(default_factory=list)
    top1: list[np.ndarray] = field(default_factory=list)
    correct1: list[np.ndarray] = field(default_factory=list)
    correct5: list[np.ndarray] = field(default_factory=list)
    parts: list[np.ndarray] = field(default_factory=list)
    """Outputs read as choices (:mod:`.choices`): per sample, the % of parts (positions, elements) that agree."""
    wholes: list[np.ndarray] = field(default_factory=list)
    """... and whether every part agrees."""
    texts: list[np.ndarray] = field(default_factory=list)
    """CTC outputs (``CompareOptions.ctc_blank``): per sample, whether the greedy text is the reference's ..."""
    cer: list[np.ndarray] = field(default_factory=list)
    """... and its character error rate against it, % (NaN where the output's size differed)."""
    marked: list[np.ndarray] = field(default_factory=list)
    """The reference's probability outputs: per sample, the % of elements its mask marks (a threshold that marks
    all or nothing everywhere tells no candidate apart: :mod:`.output_warnings`)."""
    miou: list[np.ndarray] = field(default_factory=list)
    """Segmentation maps (:func:`.choices.segmentation_maps`): per sample, the mean over classes of the candidate's
    class map's overlap with the reference's, % (NaN where the output's size differed)."""
    iou: list[np.ndarray] = field(default_factory=list)
    """Probability outputs read as masks (:mod:`.probabilities`): per sample, the overlap of the candidate's mask
    with the reference's, % (NaN where neither holds anything, or the output's size differed)."""
    nonfinite: int = 0
    mismatched: int = 0
    """Samples whose output had another shape than the reference's (a size the data decides): left out."""
    widest: int = 0
    """The most values one sample's output held: 1 for a speech probability ``[N, 1]``, whose cosine is ±1."""
    spread: list[tuple[int, float, float]] = field(default_factory=list)
    """(axis, largest, median) per-index absmax along an axis whose indices differ in scale 100x or more, in a
    shard's first batch (:func:`quantlab.metrics.channel_spread`)."""
    offset: list[tuple[float, float]] = field(default_factory=list)
    """(mean, standard deviation) of the reference output's values in a shard's first batch: a depth map at 5.0 +-
    0.05 is mostly offset, which cosine and SQNR count as signal (:mod:`.output_warnings`)."""
    varying: list[float] = field(default_factory=list)
    """The share of the reference output's power that differs between the samples of a shard's first batch
    (:func:`quantlab.metrics.varying_share`): ~0 when every sample gives (nearly) the same output."""
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    """The reference output's shape in a shard's first batch, as the model returned it."""
    best_counts: list[np.ndarray] = field(default_factory=list)
    """The reference's best classes counted over the positions of a shard's first batch (``[N, T, C]`` scores):
    one class best at most positions is what a CTC blank looks like (:func:`.ctc_hints.ctc_hints`)."""
    padded: list[int] = field(default_factory=list)
    """Per batch, the positions the mask input marks as padding, left out of the figures (:mod:`.padding`)."""
    ref_energy: list[np.ndarray] = field(default_factory=list)
    """Per sample, the reference's sum of squares: near 0 (a text detector's map of an image without text), the
    sample's cosine measures noise."""

    def extend(self, later: OutputStats) -> None:
        """Appends the stats of the samples that follow (the next shard)."""
        for f in fields(self):
            if f.name in ("nonfinite", "mismatched"):
                setattr(self, f.name, getattr(self, f.name) + getattr(later, f.name))
            elif f.name == "widest":
                self.widest = max(self.widest, later.widest)
            else:
                getattr(self, f.name).extend(getattr(later, f.name))

    def sums(self) -> ErrorSums:
        """The batches' sums added in batch order, as a running sum would have (zero sums when none)."""
        return functools.reduce(operator.add, self.batch_sums) if self.batch_sums else ErrorSums()


@dataclass
class SampleRecords:
    """Everything :class:`EndToEnd` keeps per sample, in sample order: what a shard returns."""

    stats: dict[tuple[str, str], OutputStats]
    reference: dict[str, OutputStats]
    keys: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    sample_labels: list[Any] = field(default_factory=list)
    user: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    examples: dict[tuple[str, str], MaskExample] = field(default_factory=dict)
    """(candidate, output) -> the sample whose mask it changed most so far (:mod:`.mask_examples`)."""

    def extend(self, later: SampleRecords) -> None:
        """Appends the records of the samples that follow (the next shard, same candidates and outputs)."""
        for key, st in self.stats.items():
            st.extend(later.stats[key])
        for o, st in self.reference.items():
            st.extend(later.reference[o])
        self.keys.extend(later.keys)
        self.indices.extend(later.indices)
        self.sample_labels.extend(later.sample_labels)
        for name, rows in self.user.items():
            rows.extend(later.user[name])
        for key in dict.fromkeys([*self.examples, *later.examples]):
            worst = worst_of(self.examples.get(key), later.examples.get(key))
            if worst is not None:
                self.examples[key] = worst


class EndToEnd:
    """The end-to-end statistics of every candidate output, fed batch by batch in batch order."""

    def __init__(self, candidates: Sequence[str], outputs: Sequence[str], labels: LabelUse,
                 metric: Callable[..., Any] | None, metric_spec: str | None,
                 sample_axes: Mapping[str, int] | None = None, data_sized: frozenset[str] = frozenset(),
                 positions: Mapping[str, int] | None = None, exact: Sequence[str] = (),
                 declared: Mapping[str, tuple[int | str | None, ...] | None] | None = None,
                 padding: tuple[str | None, Sequence[str]] = (None, ()),
                 ctc: tuple[int | None, Sequence[str]] = (None, ()),
                 decisions: tuple[float, Sequence[str]] = (DECISION_THRESHOLD, ()),
                 segmentation: Sequence[str] = (), states: frozenset[str] = frozenset(),
                 streams: bool = False, copied: Mapping[str, CopiedPrefix] | None = None) -> None:
        self.candidates = list(candidates)
        self.copied = dict(copied or {})  # compare.copied: a cache's positions copied from its input
        self.streams = streams  # sequence mode: the first batch is every stream's first step
        self.states = states  # recurrent state outputs: their hidden units are no detector's rows (channel_spread)
        self.mask, self.padded = padding[0], list(padding[1])  # compare.padding: the mask input, its outputs
        self.outputs = list(outputs)
        self.data_sized = data_sized  # outputs whose size the data decides (graph.samples.data_sized)
        self.classifiers = dict(labels.classifiers)  # never a data-sized output (compare.labels)
        self.positions = dict(positions or {})  # output -> classes scored per position (compare.choices)
        self.segmentation = frozenset(segmentation)  # maps among them: also miou (compare.choices)
        self.decision_threshold, self.decided = float(decisions[0]), list(decisions[1])  # compare.probabilities
        self.choices = {**{o: "positions" for o in self.positions}, **{o: "values" for o in exact},
                        **{o: "decisions" for o in self.decided}}
        self.ctc_blank, self.ctc = ctc[0], frozenset(ctc[1])  # compare.choices.ctc_outputs: read as CTC text
        self.sample_axes = dict(sample_axes or {})
        self.declared = dict(declared or {})
        self.labels = labels
        self.metric = metric
        self.metric_spec = metric_spec
        self.records = SampleRecords(stats={(c, o): OutputStats() for c in self.candidates for o in self.outputs},
                                     reference={o: OutputStats() for o in self.outputs},
                                     user={c: [] for c in self.candidates})
        self.stats = self.records.stats
        self.reference = self.records.reference
        self.keys = self.records.keys
        self.indices = self.records.indices
        self.sample_labels = self.records.sample_labels
        self.user = self.records.user

    def extend(self, later: SampleRecords) -> None:
        """Appends a shard's records (the samples that follow those seen so far)."""
        self.records.extend(later)

    def add(self, batch: Batch, ref_live: Mapping[str, np.ndarray],
            cand_live: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """One batch's outputs, the next in batch order, their samples put on axis 0: padded positions
        (:mod:`.padding`) are left out of the error figures and the choices, not of what the user metric gets."""
        labels = np.asarray(batch.labels) if (self.labels.accuracy and batch.labels is not None) else None
        first = [o for o in self.outputs if not self.reference[o].shapes]
        for o in first:
            self.reference[o].shapes.append(tuple(np.shape(ref_live[o])))
        ref_live = self._samples_first(ref_live, len(batch))
        for o in first:
            # a classifier's or a mask's too (dead logits looked perfect); not in sequence mode, whose first batch
            # is every stream's first step (a decoder's BOS for all: the same logits, rightly)
            if not self.streams:
                self.reference[o].varying.extend(varying_share(ref_live[o]))
            if o not in self.classifiers and o not in self.choices and o not in self.states:
                self.reference[o].spread.extend(channel_spread(ref_live[o]))
                self.reference[o].offset.extend(mean_and_spread(ref_live[o]))
        cand_live = {name: self._samples_first(cand_live[name], len(batch)) for name in self.candidates}
        valid = self._valid_positions(batch, ref_live)
        for o, v in valid.items():  # how many positions the mask left out, for the padding note
            self.reference[o].padded.append(int(v.size - np.count_nonzero(v)))
        ref_seen = new_positions({o: without_padding(v, valid[o]) if o in valid else v for o, v in ref_live.items()},
                                 batch.feeds, self.copied, samples_first=True)
        self._add_reference(ref_seen, labels)
        ref_chosen = {o: self._chosen(o, ref_live[o]) for o in self.choices}
        for o in self.decided:
            self.reference[o].marked.append(marked_share(ref_chosen[o], valid.get(o)))
        for o in first:
            if self.choices.get(o) == "positions" and ref_chosen[o].ndim == 2:
                best = ref_chosen[o][valid[o]] if o in valid else ref_chosen[o]
                self.reference[o].best_counts.append(np.bincount(best.ravel(), minlength=self.positions[o]))
        for name in self.candidates:
            live = cand_live[name]
            seen = new_positions({o: without_padding(v, valid[o]) if o in valid and v.shape == ref_live[o].shape
                                  else v for o, v in live.items()}, batch.feeds, self.copied, samples_first=True)
            self._add_candidate(name, ref_seen, seen, labels)
            self._add_choices(name, ref_chosen, ref_live, live, valid, batch)
            if self.metric is not None:
                self._add_user(name, batch, ref_live, live)
        self.keys.extend(batch.keys)
        self.indices.extend(int(i) for i in batch.indices)
        if self.labels.use_labels and batch.labels is not None:
            self.sample_labels.extend(np.asarray(batch.labels).tolist())

    def _valid_positions(self, batch: Batch, ref_live: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Output -> bool [n, S] of its real positions, for the outputs the mask describes in this batch
        (:mod:`.padding`)."""
        if self.mask is None:
            return {}
        found = {o: valid_positions(batch, self.mask, ref_live[o]) for o in self.padded}
        return {o: v for o, v in found.items() if v is not None}

    def _samples_first(self, live: Mapping[str, np.ndarray], samples: int) -> dict[str, np.ndarray]:
        """The compared outputs with their samples on axis 0 (see :mod:`.sample_axes`)."""
        return {o: samples_first(live[o], self.sample_axes.get(o, 0), samples, o) for o in self.outputs}

    def _add_reference(self, ref_live: Mapping[str, np.ndarray], labels: np.ndarray | None) -> None:
        for o in self.outputs:
            r = ref_live[o]
            st = self.reference[o]
            if o in self.classifiers:
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
            if r.shape != c.shape and o in self.data_sized:
                self._add_mismatch(self.stats[(name, o)], r.shape[0])
                continue
            if r.shape != c.shape:
                raise CompareError(f"candidate {name!r}: output {o!r} has shape {list(c.shape)}, the "
                                   f"reference's has {list(r.shape)}, and nothing in the graph lets the data decide "
                                   "its size (NonMaxSuppression, NonZero, Unique, Compress): the candidate does not "
                                   "compute the same output")
            st = self.stats[(name, o)]
            s = error_sums(r, c)
            st.batch_sums.append(s)
            st.widest = max(st.widest, r.size // r.shape[0] if r.ndim and r.shape[0] else r.size)
            st.nonfinite += s.nonfinite
            sums = per_sample_sums(r, c)
            rows = per_sample_errors(sums)
            st.ref_energy.append(sums[:, 0].astype(np.float64))
            st.cosine.append(rows["cosine"])
            st.sqnr.append(rows["sqnr_db"])
            st.max_abs.append(rows["max_abs"])
            if o in self.classifiers:
                scores = c.reshape(c.shape[0], -1)
                top = topk(scores, 5 if labels is not None and o == self.labels.label_output else 1)
                st.top1.append(top[:, 0])
                if labels is not None and o == self.labels.label_output:
                    st.correct1.append(top[:, 0] == labels)
                    st.correct5.append((top == labels[:, None]).any(axis=1))

    def _chosen(self, o: str, value: np.ndarray) -> np.ndarray:
        """What a user reads off output ``o``: the best class at each position, the mask its probabilities mark,
        or the values themselves."""
        kind = self.choices[o]
        if kind == "positions":
            return best_positions(value)
        return decision_mask(value, self.decision_threshold) if kind == "decisions" else value

    def _add_choices(self, name: str, ref_chosen: Mapping[str, np.ndarray], ref_live: Mapping[str, np.ndarray],
                     live: Mapping[str, np.ndarray], valid: Mapping[str, np.ndarray], batch: Batch) -> None:
        for o, ref in ref_chosen.items():
            cand = self._chosen(o, live[o])
            n = ref.shape[0] if ref.ndim else 1
            mismatched = cand.shape != ref.shape and o in self.data_sized  # a while loop stopped elsewhere
            if mismatched:
                part, whole = np.full(n, np.nan), np.zeros(n, dtype=bool)
            else:
                counted = (decided_positions(ref_live[o], live[o], valid.get(o)) if self.choices[o] == "positions"
                           else valid.get(o))
                part, whole = part_agreement(ref, cand, counted)
            st = self.stats[(name, o)]
            st.parts.append(part)
            st.wholes.append(whole)
            if o in self.ctc:
                same, cer = ((np.zeros(n, dtype=bool), np.full(n, np.nan)) if mismatched
                             else ctc_text_agreement(ref, cand, int(self.ctc_blank), valid.get(o)))
                st.texts.append(same)
                st.cer.append(cer)
            if o in self.segmentation:
                st.miou.append(np.full(n, np.nan) if mismatched else mean_class_iou(ref, cand, self.positions[o]))
                self._keep_worst_mask(name, o, ref, cand, st.miou[-1], batch, classes=True)
            if self.choices[o] == "decisions":
                st.iou.append(np.full(n, np.nan) if mismatched else mask_iou(ref, cand, valid.get(o)))
                self._keep_worst_mask(name, o, ref, cand, st.iou[-1], batch)

    def _keep_worst_mask(self, name: str, o: str, ref: np.ndarray, cand: np.ndarray, iou: np.ndarray,
                         batch: Batch, classes: bool = False) -> None:
        """The batch's sample of lowest IoU (mIoU of ``classes`` maps), kept if it is lower than the one kept so
        far (maps only)."""
        if np.isnan(iou).all() or mask_plane(ref[0]) is None:
            return
        i = int(np.nanargmin(iou))
        found = MaskExample(candidate=name, output=o, sample=int(batch.indices[i]), key=str(batch.keys[i]),
                            iou=float(iou[i]), reference=mask_plane(ref[i]).copy(), changed=mask_plane(cand[i]).copy(),
                            classes=classes)
        worst = worst_of(self.records.examples.get((name, o)), found)
        if worst is not None:
            self.records.examples[(name, o)] = worst

    def mask_examples(self) -> tuple[MaskExample, ...]:
        """The kept examples, in candidate then output order."""
        return tuple(self.records.examples[(c, o)] for c in self.candidates for o in self.outputs
                     if (c, o) in self.records.examples)

    def _add_mismatch(self, st: OutputStats, samples: int) -> None:
        """A batch whose output sizes differ (NMS kept other boxes): NaN rows keep the per-sample tables aligned,
        the error sums leave it out, and its samples are counted."""
        st.mismatched += samples
        for column in (st.cosine, st.sqnr, st.max_abs):
            column.append(np.full(samples, np.nan))

    def _add_user(self, name: str, batch: Batch, ref_live: Mapping[str, np.ndarray],
                  live: Mapping[str, np.ndarray]) -> None:
        assert self.metric is not None
        self.user[name].extend(metric_rows(self.metric, str(self.metric_spec), batch,
                                           {o: ref_live[o] for o in self.outputs}, {o: live[o] for o in self.outputs},
                                           name, self.labels.use_labels))

    def reference_warnings(self) -> list[str]:
        """What the outputs themselves call for (:func:`.output_warnings.output_warnings`)."""
        return output_warnings(self)

    def frames(self, options: CompareOptions) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The end-to-end table (one row per candidate x output) and the per-sample table
        (:func:`.end_to_end_tables.end_to_end_frames`)."""
        return end_to_end_frames(self, options)

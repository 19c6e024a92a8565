"""Free-running figures of a sequence-mode comparison: every model reads back its own state.

Teacher forcing (:mod:`quantlab.sequence`) feeds every candidate the FP32 model's state, so the comparison's
figures are the error of one step. Deployed, a candidate reads back its own state, and its error can grow along
the stream: Silero VAD's INT8 model read 28.7 dB teacher-forced and 21.5 dB free-running. This pass runs the
reference and each candidate over the streams again, whole models, each carrying its own outputs into its
inputs, and compares their outputs over every element of every step::

    step k:  data_k + state_ref ──► FP32 ──► out_ref, state_ref' ─┐
             data_k + state_c   ──► cand ──► out_c,   state_c'   ──┴─► error sums per output

The first step feeds every model the data's own state. Figures are over all elements (``cosine`` too: one
cosine over the whole output, not a mean over samples). A user metric (``--metric``) is called on every sample of
every step, as in the teacher-forced pass, and its mean kept. Outputs read as masks (:mod:`.probabilities`: a
voice-activity probability) also get :data:`FREE_MASK_FIGURES`, over every element of every step: the % of
decisions that agree and the overlap of the two masks. The comparison's end-to-end table holds all of them
as ``free_<figure>`` columns (:func:`free_column`), so a threshold can judge deployed behaviour:
``free_sqnr_db>=20``, ``free_element_match>=95``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..backends.base import Backend
from ..graph import LoadedModel
from ..graph.samples import data_sized
from ..metrics import ErrorSums, decision_mask, error_sums, errors_from_sums
from ..sequence import SequenceData
from .candidates import REFERENCE_KEY
from .copied import CopiedPrefix, new_positions
from .options import DECISION_THRESHOLD
from .user_metric import SampleMetric

__all__ = ["FREE_MASK_FIGURES", "FREE_RUNNING_FIGURES", "FREE_PREFIX", "SampleMetric", "free_column", "free_running",
           "free_running_note", "with_free_running"]

FREE_RUNNING_FIGURES = ("cosine", "sqnr_db", "max_abs", "rel_l2")
"""What the free-running record keeps per candidate and output (:func:`quantlab.metrics.errors_from_sums`)."""

FREE_MASK_FIGURES = ("element_match", "mask_iou")
"""... and, for outputs read as masks, the % of elements whose decision agrees and the masks' IoU (%), pooled."""

FREE_PREFIX = "free_"
"""The end-to-end columns of the free-running figures: ``free_sqnr_db``, ``free_<user metric>``."""




def free_column(figure: str) -> str:
    """The end-to-end column of a free-running figure or user metric."""
    return FREE_PREFIX + figure


def free_running(reference: LoadedModel, candidates: Mapping[str, Any], data: SequenceData, batch_size: int,
                 backend_of: Callable[[str], Backend], max_samples: int | None = None,
                 metric: SampleMetric | None = None,
                 decisions: tuple[float, Sequence[str]] = (DECISION_THRESHOLD, ()),
                 copied: Mapping[str, CopiedPrefix] | None = None) -> list[dict[str, Any]]:
    """One row per candidate and compared output (:func:`compared_outputs`): its :data:`FREE_RUNNING_FIGURES`
    against the free-running FP32 model, over the first ``max_samples`` samples (all: None), streams of
    ``batch_size``; with ``metric``, also the mean of each of its numbers over every sample of every step (the
    same on every output row of a candidate, as the end-to-end table has them); ``decisions``: the threshold and
    the outputs read as masks, which also get :data:`FREE_MASK_FIGURES`; ``copied``: cache outputs whose copy of
    their input is left out of the figures (:mod:`.copied`: a Llama's free-running present read 46 dB over its whole
    cache, 40 over the new positions, no better than teacher-forced)."""
    outputs = compared_outputs(reference)
    protos = {REFERENCE_KEY: reference.proto, **{name: c.proto for name, c in candidates.items()}}
    runners = {name: backend_of(name).build(proto) for name, proto in protos.items()}
    states: dict[str, dict[str, np.ndarray]] = {name: {} for name in protos}
    sums: dict[tuple[str, str], ErrorSums] = {(n, o): ErrorSums() for n in candidates for o in outputs}
    user: dict[str, list[dict[str, float]]] = {n: [] for n in candidates}
    threshold, decided = decisions[0], [o for o in decisions[1] if o in outputs]
    masks = {(n, o): np.zeros(4, np.int64) for n in candidates for o in decided}  # agree, counted, both, either
    seen = 0
    try:
        for batch in data.dataset.batches(batch_size):
            if max_samples is not None and seen >= max_samples:
                break
            fed = {name: data.fed(batch, states[name]) for name in runners}
            got = {name: runner.run(fed[name], None) for name, runner in runners.items()}
            for name, out in got.items():
                states[name] = {inp: out[o] for o, inp in data.carry.items()}
            got = {name: new_positions(out, fed[name], copied, samples_first=False) for name, out in got.items()}
            for (name, o) in sums:
                sums[(name, o)] = sums[(name, o)] + error_sums(got[REFERENCE_KEY][o], got[name][o])
            for (name, o), counts in masks.items():
                counts += _mask_counts(got[REFERENCE_KEY][o], got[name][o], threshold)
            if metric is not None:
                for name in candidates:
                    user[name].extend(metric(name, batch, got[REFERENCE_KEY], got[name]))
            seen += len(batch)
    finally:
        for runner in runners.values():
            runner.close()
    means = {name: _means(rows) for name, rows in user.items()}
    return [{"candidate": name, "output": o, "samples": seen,
             **{k: v for k, v in errors_from_sums(s).items() if k in FREE_RUNNING_FIGURES},
             **(_mask_figures(masks[(name, o)]) if (name, o) in masks else {}), **means[name]}
            for (name, o), s in sums.items()]


def _mask_counts(reference: np.ndarray, candidate: np.ndarray, threshold: float) -> np.ndarray:
    """[elements whose decision agrees, elements, in both masks, in either] of one step."""
    r, c = decision_mask(reference, threshold), decision_mask(candidate, threshold)
    return np.array([np.count_nonzero(r == c), r.size, np.count_nonzero(r & c), np.count_nonzero(r | c)], np.int64)


def _mask_figures(counts: np.ndarray) -> dict[str, float]:
    agree, total, both, either = (int(x) for x in counts)
    return {"element_match": agree / total * 100.0 if total else float("nan"),
            "mask_iou": both / either * 100.0 if either else float("nan")}


def _means(rows: list[dict[str, float]]) -> dict[str, float]:
    """Each number's mean over the samples that report it (NaN where none does)."""
    keys = dict.fromkeys(k for r in rows for k in r)
    out = {}
    for k in keys:
        v = np.array([r.get(k, np.nan) for r in rows], dtype=np.float64)
        out[k] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
    return out


def compared_outputs(reference: LoadedModel) -> list[str]:
    """The float tensor outputs whose size the data does not decide: those an error sum can pair step by step."""
    sized = data_sized(reference)
    return [s.name for s in reference.outputs if s.is_float and s.name not in sized]


def free_running_note(rows: list[dict[str, Any]], teacher_forced: Mapping[tuple[str, str], float],
                      kept: str = "compare.json keeps them (settings.free_running)") -> str:
    """One line for the warnings: each candidate's free-running SQNR per output, beside its teacher-forced one;
    ``kept``: where the figures are kept."""
    parts = []
    for name in dict.fromkeys(r["candidate"] for r in rows):
        mine = [r for r in rows if r["candidate"] == name]
        figures = ", ".join(f"{r['output']} {r['sqnr_db']:.1f} dB (teacher-forced "
                            f"{teacher_forced.get((name, r['output']), float('nan')):.1f})" for r in mine)
        figures += "".join(f"; {r['output']} masks: {r['element_match']:.1f} % of decisions agree, IoU "
                           f"{r['mask_iou']:.1f} %" for r in mine if "element_match" in r)
        user = [f"{k} {v:.4g}" for k, v in mine[0].items()
                if k not in ("candidate", "output", "samples", *FREE_RUNNING_FIGURES, *FREE_MASK_FIGURES)]
        parts.append(f"{name}: {figures}" + (f"; metric {', '.join(user)}" if user else ""))
    return ("sequence mode, free-running over whole streams (each model reads back its own state, as deployed): "
            + "; ".join(parts) + f". {kept + '; ' if kept else ''}thresholds judge the teacher-forced figures, "
            f"unless they name the free-running ones ({', '.join(_named(rows))})")


def _named(rows: list[dict[str, Any]]) -> list[str]:
    """The free-running columns a threshold may name, as examples: SQNR, the masks' agreement, a user metric's."""
    masks = [free_column("element_match")] if any("element_match" in r for r in rows) else []
    return [free_column("sqnr_db"), *masks, free_column("<metric>")]


def with_free_running(end_to_end: pd.DataFrame, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """``end_to_end`` with each free-running figure of :func:`free_running`'s ``rows`` as a ``free_<figure>``
    column, on its candidate's and output's row (NaN on outputs the free-running pass does not pair)."""
    if not rows:
        return end_to_end
    frame = pd.DataFrame(rows).drop(columns=["samples"])
    frame = frame.rename(columns={c: free_column(c) for c in frame.columns if c not in ("candidate", "output")})
    return end_to_end.merge(frame, on=["candidate", "output"], how="left")

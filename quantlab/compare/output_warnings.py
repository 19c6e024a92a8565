"""Warnings on a comparison's outputs themselves, not on a candidate: a reference that holds NaN, an output with
one value per sample (no cosine), samples whose reference is near zero, outputs of another shape than the
reference's or than the model declares, probabilities whose threshold marks all or nothing, an output that is
mostly a constant offset, or constant, or nearly the same for every sample."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ..metrics import near_zero_count, offset_db
from .padding import padding_note

if TYPE_CHECKING:
    from .end_to_end import EndToEnd

__all__ = ["OFFSET_DB", "output_warnings"]

OFFSET_DB = 20.0
"""An output whose constant offset alone is worth this much SQNR (its mean 10x its standard deviation) is warned of:
the SQNR a candidate gets there is mostly the offset's."""


def output_warnings(e2e: EndToEnd) -> list[str]:
    """Every warning of the module docstring, for the outputs as compared so far."""
    out = [f"the reference itself gives {st.nonfinite} NaN/inf value(s) in output {o!r}; its figures are NaN"
           for o, st in e2e.reference.items() if st.nonfinite]
    padded = [o for o in e2e.padded if o in e2e.reference]
    left_out = max((sum(e2e.reference[o].padded) for o in padded), default=0)  # each output sees the same mask
    out += filter(None, [padding_note(e2e.mask, padded, left_out)])
    single = _one_value_outputs(e2e)
    out += [f"output {o!r} holds one value per sample: its cosine (the sign agreement, 1 whatever the error) "
            "is left out; read its sqnr_db and max_abs" for o in single]
    out += _near_zero_warnings(e2e, skip=single)
    out += _undeclared_rank_warnings(e2e)
    out += _uniform_mask_warnings(e2e)
    out += [f"output {o!r} holds rows of very different scales along axis {axis} (|x| up to {top:.3g} in some, "
            f"{low:.3g} in others: a detector's box coordinates beside its scores): cosine and SQNR weigh the large "
            "ones only; judge it by a task metric (--metric, e.g. detections matched to the reference's)"
            for o in e2e.outputs for axis, top, low in e2e.reference[o].spread[:1]]
    offsets = _offset_warnings(e2e)
    out += offsets.values()
    out += _invariant_warnings(e2e, set(offsets))
    out += [f"candidate {name!r}: output {o!r} (its size decided by the data, e.g. the boxes NMS keeps or the steps "
            f"a while loop takes) has another shape than the reference's on {st.mismatched} of {len(e2e.keys)} "
            "sample(s); " + ("its figures cover the others" if st.mismatched < len(e2e.keys) else
                             "it has no figures (NaN): judge it by a task metric (--metric)")
            for (name, o), st in e2e.stats.items() if st.mismatched]
    return out


def _undeclared_rank_warnings(e2e: EndToEnd) -> list[str]:
    """Outputs the model returns with another rank than it declares: which outputs are scores per position
    or classifiers is read from the declaration (ddddocr declares ``[1, seqlen]`` and returns ``[T, 1, C]``
    CTC scores: token agreement was missing without a word)."""
    out = []
    for o in e2e.outputs:
        shape, seen = e2e.declared.get(o), e2e.reference[o].shapes
        if shape is not None and seen and len(seen[0]) != len(shape):
            told = "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
            out.append(f"output {o!r} is declared {told} but the model returns shape {list(seen[0])}: the "
                       "figures that depend on what an output holds (top-1 agreement, token agreement) read "
                       "the declaration; correct the output's shape in the model (its value_info/output type, "
                       "or re-export) to get them")
    return out


def _uniform_mask_warnings(e2e: EndToEnd) -> list[str]:
    """Probability outputs whose reference marks every element of every sample, or none, at the decision
    threshold: a candidate near the reference marks the same, so its masks' figures read 100 whatever its error
    (a random-weight DBNet's map sat at 0.5-0.6 everywhere: mask_iou 100 at 0.3)."""
    out = []
    for o in e2e.decided:
        shares = np.concatenate(e2e.reference[o].marked) if e2e.reference[o].marked else np.zeros(0)
        shares = shares[~np.isnan(shares)]
        if shares.size and (np.all(shares == 0.0) or np.all(shares == 100.0)):
            what = "none of the elements" if shares[0] == 0.0 else "every element"
            out.append(f"output {o!r}: at decision threshold {e2e.decision_threshold:g} the reference marks {what} "
                       "of every sample, so its masks' figures (element_match, exact_match, mask_iou) tell little; "
                       "give the probability your application reads it at (--decision-threshold P, "
                       "decision_threshold = P in an experiment or sweep file)")
    return out


def _one_value_outputs(e2e: EndToEnd) -> list[str]:
    """Outputs with one value per sample (a probability ``[N, 1]``): compare leaves their cosine out."""
    return [o for o in e2e.outputs if e2e.choices.get(o) != "values"
            and {e2e.stats[(n, o)].widest for n in e2e.candidates if (n, o) in e2e.stats} == {1}]


def _near_zero_warnings(e2e: EndToEnd, skip: list[str]) -> list[str]:
    """Outputs some of whose samples the reference leaves near zero (norm under 1/1000 of the median): the
    per-sample cosine of those is noise, and the mean cosine reads low where SQNR does not. Not said of the
    ``skip`` outputs, whose cosine is left out anyway."""
    out = []
    for o in e2e.outputs:
        if o in skip:
            continue
        first = next((e2e.stats[(n, o)] for n in e2e.candidates if e2e.stats[(n, o)].ref_energy), None)
        if first is None or e2e.choices.get(o) == "values":
            continue
        energy = np.concatenate(first.ref_energy)
        near_zero = near_zero_count(energy)
        if near_zero:
            out.append(f"output {o!r}: {near_zero} of {energy.size} sample(s) have a reference close to zero "
                       "(norm under 1/1000 of the median: e.g. an image without text): their cosine measures "
                       "noise and pulls the mean cosine down; read sqnr_db (over all elements) instead")
    return out


DEAD_SHARE = 1e-8
"""An output whose power differs between samples by at most this share is the same for every sample (float32
rounding alone differs by ~1e-14 of the power; a dead MobileViT's logits by 1e-12)."""


def _invariant_warnings(e2e: EndToEnd, offsets: set[str]) -> list[str]:
    """Outputs whose power is nearly all the same for every sample of a shard's first batch
    (:func:`quantlab.metrics.varying_share`): cosine and SQNR count that part as signal. At most
    :data:`DEAD_SHARE` the model ignores its input (a dead MobileViT's logits of 1e-4 that differ by 1e-10: top-1
    agreement 100, and a search met sqnr_db>=38 at 103 dB by bias correction absorbing it); at most 1 %, what
    varies is a small part (a dead EfficientNet head: 0.03 +- 1e-4 per class read 32 dB where the INT8 error was
    larger than all that varied). ``offsets``: outputs :func:`_offset_warnings` named, whose one offset says it."""
    out = []
    for o in e2e.outputs:
        ref = e2e.reference[o]
        if not ref.varying or o in offsets or ref.varying[0] > 10 ** (-OFFSET_DB / 10):
            continue
        share = ref.varying[0]
        if share <= DEAD_SHARE:
            out.append(f"WARNING output {o!r}: the reference gives the same values for every sample of the first "
                       f"batch (what differs is {share:.1g} of its power): the model ignores its input (a dead "
                       "network, e.g. weights initialised too small, or data it does not expect: check layout and "
                       "scale), unless the output is meant to be (an anchor grid); its figures say nothing of how a "
                       "candidate treats the data")
        else:
            out.append(f"WARNING output {o!r} hardly changes with the input: only {100 * share:.2g} % of its power "
                       "differs between the samples of the first batch; the rest, the same for every sample, is "
                       f"worth {10 * math.log10(1 / share):.0f} dB of SQNR alone, and cosine and SQNR count it as "
                       "signal whatever a candidate does to what varies; read max_abs against that variation, or "
                       "judge it by a task metric (--metric)")
    return out


def _offset_warnings(e2e: EndToEnd) -> dict[str, str]:
    """Outputs whose values sit far from 0 with a small spread (GLPN's depth map: 5.0 +- 0.049, the offset alone
    worth 41 dB): cosine and SQNR count the offset as signal, so an ORT-form build that kept 16 dB of the depths'
    variation read 58 dB. Judged on a shard's first batch of the reference. Output -> its warning."""
    out = {}
    for o in e2e.outputs:
        if not e2e.reference[o].offset:
            continue
        mean, std = e2e.reference[o].offset[0]
        worth = offset_db(mean, std)
        if std == 0:  # an all-zero map, a dead head: any candidate that gives the same constant scores perfect
            out[o] = (f"output {o!r}: the reference gives {mean:.4g} at every element of the first batch: its "
                      "figures say nothing of quantization (a candidate giving the same constant scores perfect); "
                      "check that the data is what the model expects (layout, scale, an input left at zero), or "
                      "judge the model by its other outputs")
        elif worth >= OFFSET_DB and np.isfinite(worth):
            out[o] = (f"output {o!r} is mostly a constant offset (values {mean:.4g} +- {std:.3g}): the offset alone "
                      f"is worth {worth:.0f} dB of SQNR and a cosine near 1, whatever the error in its variation; "
                      "read max_abs against its spread, or judge it by a task metric (--metric)")
    return out

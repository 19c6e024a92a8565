"""Confidence intervals of the end-to-end figures: a paired bootstrap over the samples, exact where it collapses.

Agreement and accuracy columns hold 0/100 per sample (and so may a user metric's, or 0/1): their interval is
Clopper-Pearson (:func:`quantlab.metrics.binomial_ci`); a drop with fewer than 10 discordant samples gets the exact bounds of its
two kinds of disagreement. Everything else is the percentile bootstrap (:func:`quantlab.metrics.bootstrap_ci`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..metrics import binomial_ci, bootstrap_ci
from .options import CompareOptions

__all__ = ["exact_intervals", "intervals"]


def intervals(columns: Mapping[str, np.ndarray], options: CompareOptions) -> dict[str, tuple[float, float]]:
    """The paired bootstrap intervals of ``columns``, exact where the bootstrap collapses (:func:`exact_intervals`)."""
    cis = bootstrap_ci(columns, resamples=options.bootstrap, confidence=options.confidence, seed=options.seed)
    if options.bootstrap > 0:
        cis.update(exact_intervals(columns, options.confidence))
    return cis


_PROPORTIONS = ("top1_agreement", "ref_top1", "top1", "ref_top5", "top5", "sequence_agreement", "text_agreement",
                "exact_match")
"""Per-sample 0/100 columns: their interval is the exact binomial one (:func:`quantlab.metrics.binomial_ci`)."""

_CONTINUOUS = frozenset({"cosine", "token_agreement", "element_match", "cer", "mask_iou", "miou"})
"""Per-sample figures that are not one yes/no per sample, even where every sample reads 1 or 100."""


def _proportion_scale(name: str, values: np.ndarray | None) -> float | None:
    """100 for a column of :data:`_PROPORTIONS`, or any other (a user metric's) whose per-sample values are all
    0 or 100; 1 for one whose values are all 0 or 1; None otherwise. A user metric "agree at the masked positions"
    of 0/100 per sample read 100 [100, 100] on 192 words, so its ``_ci_low`` gate could not fail."""
    if values is None or not len(values) or name.endswith("_drop") or name in _CONTINUOUS:
        return None
    v = np.asarray(values, dtype=np.float64)
    if np.isnan(v).any():
        return None
    if name in _PROPORTIONS or np.isin(v, (0.0, 100.0)).all() and (v == 100.0).any():
        return 100.0
    return 1.0 if np.isin(v, (0.0, 1.0)).all() else None


_SHARES = ("token_agreement", "element_match", "mask_iou", "miou")
"""Per-sample shares in [0, 100] (of positions, elements, overlap): 100 at every sample gave the bootstrap's
"100 [100, 100]" (a decoder step's one-token logits: ``token_agreement_ci_low<99`` passed on 12 samples beside
``sequence_agreement`` 100 [73.5, 100] of the same output); their lower end is then the exact bound of the samples
at 100."""

_FEW_DISCORDANT = 10
"""Below this many samples where reference and candidate differ, a drop's interval is the exact bound below."""


def exact_intervals(columns: Mapping[str, np.ndarray], confidence: float) -> dict[str, tuple[float, float]]:
    """Intervals that do not collapse on small sets, in percent: Clopper-Pearson for agreement and accuracy; for
    ``top1_drop`` / ``top5_drop`` with fewer than 10 discordant samples, ``[-U(c), U(b)]`` (``b``: samples only
    the reference gets right, ``c``: only the candidate; ``U``: the exact upper bound of a proportion at
    ``1 - (1 - confidence) / 2``), since the drop lies between ``-c/n`` and ``b/n``.

    The percentile bootstrap gave "100 [100, 100]" and a drop of "0 [0, 0]" on 12 samples that all agree, so
    ``top1_drop_ci_high<=1`` passed on a dozen samples; the exact interval of 12 of 12 is [73.5, 100].
    """
    out: dict[str, tuple[float, float]] = {}
    for name, values in columns.items():
        scale = _proportion_scale(name, values)
        if scale is None:
            continue
        lo, hi = binomial_ci(int(np.count_nonzero(values > scale / 2)), len(values), confidence)
        out[name] = (scale * lo, scale * hi)
    for name in _SHARES:
        values = columns.get(name)
        if values is not None and len(values) and np.all(np.asarray(values) == 100.0):
            # each sample's share is at most 100, so the mean is at least 100 x the share of samples agreeing
            # everywhere: a bound that does not collapse where the bootstrap's does
            out[name] = (100.0 * binomial_ci(len(values), len(values), confidence)[0], 100.0)
    for name in ("top1_drop", "top5_drop"):
        values = columns.get(name)
        if values is None or not len(values) or np.isnan(values).any():
            continue
        b, c = int(np.count_nonzero(values > 50.0)), int(np.count_nonzero(values < -50.0))
        if b + c < _FEW_DISCORDANT:
            n = len(values)
            # the upper end of a two-sided interval is a one-sided bound at 1 - alpha/2: both ends hold at 1 - alpha
            out[name] = (-100.0 * binomial_ci(c, n, confidence)[1], 100.0 * binomial_ci(b, n, confidence)[1])
    return out


"""The flip model: per sample, how far the FP32 top-1 class leads in a candidate, and which groups move it.

A top-1 metric on N samples changes only when a sample's top-1 class flips, and at 99.5 %
agreement on 160 samples one flip fails the threshold: noise power (SQNR, KL) does not say
which groups cause the few flips. This module reads a continuous measure on the samples that
matter, the *critical* samples (those the all-INT8 plan flips, then those whose FP32 lead is
smallest)::

    margin m_s(plan) = (z_c - max_{j != c} z_j) / std(z_fp32)     c: the FP32 top-1 class of sample s
                                                                   negative: sample s flipped
    base      m_s(all-INT8)
    ceiling   m_s(every group at the fallback tier)                 (what pinning can reach)
    delta_g   m_s(all-INT8, g alone reverted) - base                one batched pass per chunk of groups

Quantization errors add nearly linearly at the logits, so ``base + sum(delta_g, g pinned)``
(+ ``offset``: the residual of the last plan measured on these samples) predicts the margins of
any plan. A sample is *fixable* when its ceiling margin is positive; its target is
``min(tau, ceiling_s / 2)`` with ``tau = TAU_FRACTION * rms(ceiling - base)`` (a safety margin
in the units of the all-INT8 shift, for what the additive model misses).

    greedy_add   pin, one at a time, the group whose reverting shrinks the summed shortfall
                 (sum of max(target_s - m_s, 0) over fixable samples) most, until at most
                 ``allowed`` fixable samples are below target
    prune        then return to INT8 every pinned group the prediction says is not needed,
                 least needed first
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..threshold import Threshold

TAU_FRACTION = 0.25
"""The safety margin, as a fraction of the rms all-INT8 margin shift on the critical samples."""

FLIP_METRICS: tuple[str, ...] = ("top1_agreement", "top1_drop")
"""Metrics whose value is a count of flipped samples: the flip model serves thresholds on them."""


def flip_threshold(threshold: Threshold) -> bool:
    """Every condition is on a top-1 count (agreement or drop, not its interval): the flip model applies."""
    return all(c.metric in FLIP_METRICS for c in threshold.conditions)


def allowed_flips(threshold: Threshold, n: int) -> int:
    """The most flipped samples out of ``n`` the threshold tolerates (each flip moves the metric
    by 100/n points; a drop counts as if every flip lost a correct answer)."""
    allowed = n
    for cond in threshold.conditions:
        # the comparator's figure: the mean over samples of 100 (agree) / 0, i.e. 100 * count / n
        value = (lambda k: 100.0 * (n - k) / n) if cond.metric == "top1_agreement" else (lambda k: 100.0 * k / n)
        k = 0
        while k <= n and cond.holds(value(k)):
            k += 1
        allowed = min(allowed, k - 1)
    return max(allowed, -1)


@dataclass
class MarginModel:
    """The margins of the critical samples and the additive prediction of any plan's (module docstring)."""

    indices: list[int]
    base: np.ndarray
    ceiling: np.ndarray
    delta: dict[str, np.ndarray]
    tau: float = 0.0
    offset: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        if self.offset.shape != self.base.shape:
            self.offset = np.zeros_like(self.base)
        if not self.tau:
            shift = self.ceiling - self.base
            self.tau = TAU_FRACTION * float(np.sqrt(np.mean(shift ** 2))) if shift.size else 0.0

    @property
    def fixable(self) -> np.ndarray:
        return self.ceiling > 0

    @property
    def unfixable(self) -> int:
        """Critical samples that flip even with every group pinned."""
        return int(np.count_nonzero(~self.fixable))

    def targets(self, tau: float | None = None) -> np.ndarray:
        t = self.tau if tau is None else tau
        return np.minimum(t, 0.5 * np.maximum(self.ceiling, 0.0))

    def predict(self, pins: Iterable[str]) -> np.ndarray:
        out = self.base + self.offset
        for g in pins:
            out = out + self.delta[g]
        return out

    def shortfall(self, m: np.ndarray, tau: float | None = None) -> float:
        return float(np.sum(np.maximum(self.targets(tau) - m, 0.0)[self.fixable]))

    def below(self, m: np.ndarray, tau: float | None = None) -> int:
        """Fixable samples whose margin is below their target."""
        return int(np.count_nonzero((m < self.targets(tau)) & self.fixable))

    def observe(self, pins: Iterable[str], measured: np.ndarray) -> None:
        """Take the residual of a measured plan as the offset of later predictions."""
        self.offset = np.zeros_like(self.base)
        self.offset = measured - self.predict(pins)

    def extend(self, indices: Sequence[int], base: np.ndarray, ceiling: np.ndarray,
               delta: Mapping[str, np.ndarray], offset: np.ndarray) -> None:
        """More critical samples (a full validation flipped samples the model did not hold)."""
        self.indices = [*self.indices, *indices]
        self.base = np.concatenate([self.base, base])
        self.ceiling = np.concatenate([self.ceiling, ceiling])
        self.delta = {g: np.concatenate([d, delta[g]]) for g, d in self.delta.items()}
        self.offset = np.concatenate([self.offset, offset])

    def gain(self, g: str, pins: Sequence[str], tau: float | None = None) -> float:
        """How much pinning ``g`` on top of ``pins`` shrinks the shortfall."""
        m = self.predict(pins)
        return self.shortfall(m, tau) - self.shortfall(m + self.delta[g], tau)

    def greedy_add(self, pins: Sequence[str], order: Sequence[str], allowed: int) -> list[str]:
        """``pins`` plus groups, largest shortfall reduction first, until at most ``allowed``
        fixable samples are below target (or no group helps); ties go to ``order``."""
        pins = list(pins)
        rank = {g: i for i, g in enumerate(order)}
        while self.below(self.predict(pins)) > allowed:
            free = [g for g in order if g not in pins]
            if not free:
                break
            best = max(free, key=lambda g: (round(self.gain(g, pins), 12), -rank[g]))
            if self.gain(best, pins) <= 0:
                break
            pins.append(best)
        return pins

    def prune(self, pins: Sequence[str], allowed: int, tau: float | None = None) -> list[str]:
        """``pins`` without every group whose return to INT8 keeps at most ``allowed`` fixable
        samples below target (with safety margin ``tau``), the least needed returned first."""
        pins = list(pins)
        while pins:
            ok = [g for g in pins if self.below(self.predict([p for p in pins if p != g]), tau) <= allowed]
            if not ok:
                break
            least = min(ok, key=lambda g: (self.shortfall(self.predict([p for p in pins if p != g]), tau),
                                           -pins.index(g)))
            pins.remove(least)
        return pins

    def impact(self, g: str) -> dict[str, float]:
        """What reverting ``g`` alone measured on the critical samples (the sensitivity columns)."""
        d = self.delta[g]
        fix = self.fixable
        base = self.base
        flipped = (base < 0) & fix
        return {
            "critical_samples": float(len(self.indices)),
            "margin_gain": self.shortfall(base) - self.shortfall(base + d),
            "worst_margin_gain": float(np.min((base + d)[fix]) - np.min(base[fix])) if fix.any() else math.nan,
            "flips_fixed": float(np.count_nonzero(flipped & (base + d >= 0))),
        }


def margin_sensitivity(model: MarginModel, groups: Sequence[str], pinned_order: Sequence[str],
                       describe: Mapping[str, tuple[str, str]], columns: Sequence[str]) -> pd.DataFrame:
    """One row per group: the final plan's pinned groups in the order the greedy pinned them,
    then the others by how much reverting each alone shrank the shortfall."""
    impacts = {g: model.impact(g) for g in groups if g in model.delta}
    rest = sorted((g for g in groups if g not in pinned_order),
                  key=lambda g: -impacts.get(g, {}).get("margin_gain", -math.inf))
    recs = []
    for rank, g in enumerate([*pinned_order, *rest], 1):
        anchor, nodes = describe[g]
        recs.append({"rank": rank, "group": g, "anchor_op": anchor, "nodes": nodes,
                     "pinned_step": float(pinned_order.index(g) + 1) if g in pinned_order else math.nan,
                     **impacts.get(g, {})})
    return pd.DataFrame(recs, columns=list(columns))

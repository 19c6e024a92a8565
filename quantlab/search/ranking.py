"""Which groups to pin first: each group's measured impact on the model's output, the sensitivity table.

Discrete metrics (top-1 agreement, accuracy) move in steps of 100/N points on a subset
of N samples and say nothing about one group among fifty; the ranking therefore reads a
continuous measure, the output's noise power relative to its signal (from the logits
SQNR, ``noise = 10 ** (-sqnr_db / 10)``), on the ranking subset (with a threshold on a
discrete metric, the evaluator's fragile samples: those whose FP32 top-1 lead is smallest,
where flips happen; else the first ``probe_samples``)::

    all-INT8 plan on the subset                  -> N_all  (noise of every group together)
    all-INT8 with group g alone at ``fallback``   -> N_-g   (one batched comparator pass per
                                                             ``batch`` of candidates)
    impact(g) = N_all - N_-g                          (noise power g alone accounts for)
    order     = impact, largest first (ties: topological order)

Quantization errors of different layers are nearly independent, so their noise powers
add: ``N_all - sum(impact of the pinned groups)`` predicts the noise of any plan, which
is what the search uses to choose where its full validations go
(:func:`predicted_noise`). ``impact_db`` in the table is the same measure as an output
SQNR gain: how many dB reverting the group alone bought.

When they do not add, the difference ``N_all - N_-g`` is the difference of two large,
interacting noises and says little: reverting one group alone made PP-OCRv5's recogniser
worse for 45 of its 54 groups (by up to 4.3 dB), and the search pinned all of them. When at
least :data:`WEAK_SHARE` of the measured impacts are not positive (and no group reverted alone
meets the threshold on the subset: VideoMAE's one such group ranked first anyway), the ranking
measures each group *isolated* as well, the one INT8 group of a plan with every other group at
``fallback``::

    isolated(g) = N_only-g                        (never a difference: no cancellation)
    order       = isolated, largest first
    impact(g)   = isolated(g) * N_all / sum(isolated)   (the additive model, scaled so
                                                         that pinning every group predicts 0)

When they add up to well more than ``N_all`` (:data:`OVER_ADDING`: an early layer's error amplified by the INT8
layers after it, so reverting it alone also removes what they added; MobileNetV2's summed to 3.8x), the order
stands but the additive model would predict that pinning a few groups removes all the noise (the search's first
guess pinned 2 groups where 20 were needed): the impacts are scaled to add up to ``N_all``, on each output too::

    impact(g)   = (N_all - N_-g) * N_all / sum(N_all - N_-h over the h that made it better)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ..plan import ResolvedPlan
from .ledger import Ledger, is_nan

SENSITIVITY_COLUMNS: tuple[str, ...] = (
    "rank", "group", "anchor_op", "nodes", "reverted_sqnr_db", "impact_db", "isolated_sqnr_db", "impact",
    "noise_share", "cumulative_share", "critical_samples", "margin_gain", "worst_margin_gain", "flips_fixed",
    "pinned_step",
)
"""The noise columns (``reverted_sqnr_db`` .. ``cumulative_share``; ``isolated_sqnr_db`` only for a weak
ranking, see the module docstring) come from the noise ranking, the
margin columns (``critical_samples`` .. ``pinned_step``) from the flip model of top-1 thresholds
(:mod:`.margins`); the other kind is NaN."""


WEAK_SHARE = 0.25
"""When at least this share of the groups made the output worse (or no better) reverted alone, the
reverted-alone ranking is weak: the ranking then measures every group isolated (module docstring)."""


OVER_ADDING = 1.5
"""When the positive reverted-alone impacts add up to more than this many times the all-INT8 noise, they are scaled
to add up to it (module docstring)."""


DISCRETE_MARKERS: tuple[str, ...] = ("top1", "top5", "agreement", "mcnemar")
"""Metric names holding one of these count flips: the ranking then measures the fragile samples."""


def output_sqnr(rows: Sequence[Mapping[str, Any]]) -> float:
    """The outputs' combined end-to-end SQNR (dB): ``-10 log10`` of their summed relative noise powers, NaN when
    none has one.

    A soft minimum: the worst output's SQNR when its noise dominates (one output: exactly its SQNR), but every
    output's noise counts. With the plain minimum, a decoder whose worst output is ``present.0.key`` (block 0's
    key projection alone) ranked every other group at exactly zero impact, and the search pinned all of them.
    """
    vals = [float(r["sqnr_db"]) for r in rows if r.get("sqnr_db") is not None and not is_nan(r.get("sqnr_db"))]
    if not vals:
        return math.nan
    total = sum(noise_power(v) for v in vals)
    return math.inf if total == 0.0 else -10.0 * math.log10(total)


def noise_power(sqnr_db: float) -> float:
    """Output noise power relative to the signal: 10^(-SQNR/10) (0 for an exact output, NaN unknown)."""
    if is_nan(sqnr_db):
        return math.nan
    return 0.0 if math.isinf(sqnr_db) and sqnr_db > 0 else 10.0 ** (-float(sqnr_db) / 10.0)


@dataclass(frozen=True)
class Ranking:
    """The quantizable groups, largest impact first (``order``), and the evidence behind it.

    ``base_noise``: the all-INT8 plan's relative noise power on the subset; ``impact``:
    group -> the noise power reverting it alone removed; ``reverted_sqnr``: group -> the
    subset SQNR (dB) with it reverted alone.
    """

    order: list[str] = field(default_factory=list)
    base_noise: float = math.nan
    impact: dict[str, float] = field(default_factory=dict)
    reverted_sqnr: dict[str, float] = field(default_factory=dict)
    output_base: dict[str, float] = field(default_factory=dict)
    """Each output's all-INT8 noise power (a model with several outputs)."""
    output_impact: dict[str, dict[str, float]] = field(default_factory=dict)
    """group -> output -> the noise power reverting it alone removed from that output."""
    isolated_sqnr: dict[str, float] = field(default_factory=dict)
    """group -> the subset SQNR (dB) with it the only INT8 group (a weak ranking only; then ``order`` and
    ``impact`` come from it)."""

    def share(self, g: str) -> float:
        """The fraction of the all-INT8 noise power ``g`` accounts for (NaN when unmeasured)."""
        if g not in self.impact or not self.base_noise > 0:
            return math.nan
        return self.impact[g] / self.base_noise

    def impact_db(self, g: str) -> float:
        """Output SQNR gain (dB) of reverting ``g`` alone."""
        if g not in self.reverted_sqnr or not self.base_noise > 0:
            return math.nan
        return self.reverted_sqnr[g] + 10.0 * math.log10(self.base_noise)

    def predicted_noise(self, pinned: Sequence[str]) -> float:
        """The all-INT8 noise minus the impacts of ``pinned`` (additive model), at least 0."""
        if not self.base_noise > 0:
            return math.nan
        return max(0.0, self.base_noise - sum(self.impact.get(g, 0.0) for g in pinned))

    def predicted_output_noise(self, pinned: Sequence[str]) -> dict[str, float]:
        """:meth:`predicted_noise` for each output ({} without per-output measurements)."""
        return {o: max(0.0, base - sum(self.output_impact.get(g, {}).get(o, 0.0) for g in pinned))
                for o, base in self.output_base.items()}

    def sensitivity(self, base: ResolvedPlan) -> pd.DataFrame:
        """One row per ranked group (:data:`SENSITIVITY_COLUMNS`), largest impact first."""
        groups = base.group_map
        recs = []
        cumulative = 0.0
        for rank, g in enumerate(self.order, 1):
            share = self.share(g)
            cumulative += 0.0 if is_nan(share) else share
            recs.append({
                "rank": rank, "group": g, "anchor_op": groups[g].anchor_op, "nodes": ", ".join(groups[g].nodes),
                "reverted_sqnr_db": self.reverted_sqnr.get(g, math.nan), "impact_db": self.impact_db(g),
                "isolated_sqnr_db": self.isolated_sqnr.get(g, math.nan), "impact": self.impact.get(g, math.nan),
                "noise_share": share,
                "cumulative_share": cumulative if self.impact else math.nan,
            })
        return pd.DataFrame(recs, columns=list(SENSITIVITY_COLUMNS))


def impact_notes(sensitivity: pd.DataFrame | None) -> dict[str, str]:
    """group -> one phrase saying what its measured impact was (for the report's plan table)."""
    if sensitivity is None or sensitivity.empty or "impact_db" not in sensitivity.columns:
        return {}
    notes = {}
    for r in sensitivity.to_dict("records"):
        if not is_nan(r.get("margin_gain")):
            notes[str(r["group"])] = _margin_note(r)
            continue
        if is_nan(r.get("impact_db")):
            notes[str(r["group"])] = f"rank {int(r['rank'])} (impact not measured)"
            continue
        if not is_nan(r.get("isolated_sqnr_db")):
            notes[str(r["group"])] = (f"rank {int(r['rank'])}: the only INT8 group, it gave an output SQNR of "
                                      f"{float(r['isolated_sqnr_db']):.2f} dB (reverting it alone: "
                                      f"{float(r['impact_db']):+.2f} dB)")
            continue
        notes[str(r["group"])] = (f"rank {int(r['rank'])}: reverting it alone raised the output SQNR by "
                                  f"{float(r['impact_db']):.2f} dB ({float(r['noise_share']):.1%} of the "
                                  "all-INT8 output noise)")
    return notes


def _margin_note(r: Mapping[str, Any]) -> str:
    """The flip model's evidence for one group: what reverting it alone did to the critical samples."""
    step = "" if is_nan(r.get("pinned_step")) else f", pinned at greedy step {int(r['pinned_step'])}"
    return (f"rank {int(r['rank'])}{step}: reverting it alone shrank the top-1 margin shortfall of the "
            f"{int(r['critical_samples'])} critical samples by {float(r['margin_gain']):.3g} "
            f"(worst margin {float(r['worst_margin_gain']):+.3g} logit std, "
            f"{int(r['flips_fixed'])} all-INT8 flip(s) undone)")


def rank_groups(ledger: Ledger) -> Ranking:
    """Measure every group's impact on the subset in batched passes (module docstring); log the table."""
    topo = sorted(ledger.groups, key=lambda g: ledger.topo[g])
    select = getattr(ledger.evaluator, "select_subset", None)
    if select is not None:
        fragile = any(m in c.metric for c in ledger.threshold.conditions for m in DISCRETE_MARKERS)
        idx = select(ledger.probe_n, fragile=fragile, conditions=ledger.threshold.conditions)
        if getattr(ledger.evaluator, "streams_whole", False):
            ledger.notes.append(f"ranking subset: the first {len(idx)} validation samples (a free-running threshold "
                                "runs each stream from its start)")
        elif fragile:
            ledger.notes.append(f"ranking subset: the {len(idx)} validation samples whose FP32 top-1 lead is "
                                "smallest (where a discrete metric flips)")
        elif idx != list(range(len(idx))):
            ledger.notes.append(f"ranking subset: the {(len(idx) + 1) // 2} validation samples the all-INT8 model "
                                f"gets worst, and {len(idx) // 2} spread over the rest")
    base = ledger.evaluate("rank", {}, full=False)
    if base is None:
        ledger.notes.append("the time budget ran out before the ranking: groups are in topological order")
        return Ranking(order=topo)
    base_noise = noise_power(output_sqnr(base.rows))
    if not base_noise > 0:
        ledger.notes.append(
            "the all-INT8 outputs equal the reference's on the ranking subset: groups are in topological order"
            if base_noise == 0 else
            "the all-INT8 outputs have no SQNR on the ranking subset (NaN: outputs of another shape than the "
            "reference's, a size the data decides, e.g. VITS's waveform whose length its INT8 durations changed, "
            "or NaN values): groups are in topological order; a task metric (--metric) that reads such outputs can "
            "rank them")
        return Ranking(order=topo, base_noise=base_noise)
    tier = ledger.options.fallback
    evs = ledger.evaluate_many("rank", [{g: tier} for g in topo])
    reverted = {g: output_sqnr(ev.rows) for g, ev in zip(topo, evs, strict=False) if ev is not None}
    if len(reverted) < len(topo):
        ledger.notes.append(f"the time budget ran out during the ranking: {len(topo) - len(reverted)} group(s) "
                            "unmeasured, ranked last in topological order")
    impact = {g: base_noise - noise_power(s) for g, s in reverted.items() if not is_nan(s)}
    output_base = _output_noise(base.rows)
    output_impact = {g: {o: output_base[o] - n for o, n in _output_noise(ev.rows).items() if o in output_base}
                     for g, ev in zip(topo, evs, strict=False) if ev is not None and g in impact}
    isolated: dict[str, float] = {}
    passing_alone = any(ev is not None and ledger.passed(ev) for ev in evs)  # a one-group fix the bisection finds
    if is_weak(impact.values()) and len(topo) > 1 and not passing_alone:
        isolated = _isolated(ledger, topo)
        if isolated:
            worse = sum(v <= 0 for v in impact.values() if not is_nan(v))
            ledger.notes.append(f"ranking: {worse} of {len(impact)} groups made the output no better reverted alone "
                                "(their INT8 errors interact), so the groups are ranked by the noise each makes as "
                                "the only INT8 group (isolated_sqnr_db)")
            impact = _scaled_isolated(isolated, base_noise)
            output_base = {}  # the additive model is only a first guess here: no per-output model
    elif _over_adding(impact.values(), base_noise):
        over = _gained(impact.values()) / base_noise
        ledger.notes.append(f"ranking: reverting the groups one at a time removed {over:.1f}x "
                            "the all-INT8 noise in sum (an early error grows in the INT8 layers after it), so the "
                            "impacts are scaled to add up to it for the search's predictions")
        impact = _scaled_down(impact, base_noise)
        output_impact = _scaled_outputs(output_impact, output_base)
    measured = sorted(impact, key=lambda g: (-impact[g], ledger.topo[g]))
    ranking = Ranking(order=measured + [g for g in topo if g not in impact], base_noise=base_noise,
                      impact=impact, reverted_sqnr=reverted,
                      output_base=output_base if len(output_base) > 1 else {},
                      output_impact=output_impact if len(output_base) > 1 else {}, isolated_sqnr=isolated)
    ledger.extra = [{"type": "sensitivity", "records": ranking.sensitivity(ledger.base).to_dict("records")}]
    ledger.write_log()
    return ranking


def _output_noise(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Output name -> its relative noise power, for the rows with an SQNR."""
    return {str(r["output"]): noise_power(float(r["sqnr_db"])) for r in rows
            if r.get("output") is not None and r.get("sqnr_db") is not None and not is_nan(r.get("sqnr_db"))}


def is_weak(impacts: Iterable[float]) -> bool:
    """Whether at least :data:`WEAK_SHARE` of the measured reverted-alone impacts are not positive."""
    vals = [v for v in impacts if not is_nan(v)]
    return bool(vals) and sum(v <= 0 for v in vals) >= WEAK_SHARE * len(vals)


def _gained(impacts: Iterable[float]) -> float:
    """The sum of the positive impacts (noise power removed)."""
    return sum(v for v in impacts if not is_nan(v) and v > 0)


def _over_adding(impacts: Iterable[float], base_noise: float) -> bool:
    """Whether the positive impacts add up to more than :data:`OVER_ADDING` times ``base_noise``."""
    return _gained(impacts) > OVER_ADDING * base_noise


def _scaled_down(impact: Mapping[str, float], base_noise: float) -> dict[str, float]:
    """``impact`` scaled so that its positive values add up to ``base_noise`` (module docstring)."""
    factor = base_noise / _gained(impact.values())
    return {g: v * factor for g, v in impact.items()}


def _scaled_outputs(output_impact: Mapping[str, Mapping[str, float]],
                    output_base: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """:func:`_scaled_down` for each output whose impacts over-add."""
    out = {g: dict(per) for g, per in output_impact.items()}
    for o, base in output_base.items():
        impacts = [per[o] for per in output_impact.values() if o in per]
        if base > 0 and _over_adding(impacts, base):
            factor = base / _gained(impacts)
            for per in out.values():
                if o in per:
                    per[o] *= factor
    return out


def _isolated(ledger: Ledger, topo: Sequence[str]) -> dict[str, float]:
    """group -> the subset SQNR (dB) with it the only INT8 group; {} (with a note) when the time ran out before
    every group was measured or no group made measurable noise."""
    tier = ledger.options.fallback
    evs = ledger.evaluate_many("rank-isolated", [{h: tier for h in topo if h != g} for g in topo])
    sqnr = {g: output_sqnr(ev.rows) for g, ev in zip(topo, evs, strict=True) if ev is not None}
    if len(sqnr) < len(topo) or not sum(noise_power(s) for s in sqnr.values() if not is_nan(s)) > 0:
        ledger.notes.append("the reverted-alone ranking is weak, and measuring the groups isolated did not finish "
                            "or found no noise: the ranking stays the reverted-alone one")
        return {}
    return sqnr


def _scaled_isolated(isolated: Mapping[str, float], base_noise: float) -> dict[str, float]:
    """The isolated noises scaled to add up to the all-INT8 noise (module docstring)."""
    noise = {g: noise_power(s) for g, s in isolated.items() if not is_nan(s)}
    total = sum(noise.values())
    return {g: n * base_noise / total for g, n in noise.items()}

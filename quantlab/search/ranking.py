"""Which groups to pin first: the local-error ranking, the single-group probes, the sensitivity table.

    all-INT8 plan on the probe subset, local mode --> group -> lowest local SQNR (dB)
          by_local: lowest local SQNR first (NaN last, then topological order)
                | the top ``probe_top`` pinned alone (at ``fallback``) on the subset
                v
    order = helped   (the threshold's margin rose, by more than noise)
          + raised   (only the output SQNR rose, by >= 0.1 dB)
          + unprobed (local order)
          + idle     (probed, no effect)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ..plan import ResolvedPlan
from .evaluation import Evaluation
from .ledger import Ledger, is_nan

SENSITIVITY_COLUMNS: tuple[str, ...] = (
    "rank", "group", "anchor_op", "nodes", "local_sqnr_db", "probe_value", "score", "probed",
    "probe_margin_gain",
)

_SQNR_EFFECT_DB = 0.1
"""An output-SQNR gain (dB) below this from pinning one group counts as no effect."""


@dataclass(frozen=True)
class Probe:
    """One group pinned alone on the probe subset: the binding metric's value and what it gained."""

    value: float
    margin_gain: float
    sqnr_gain: float
    passed: bool


@dataclass(frozen=True)
class Ranking:
    """The quantizable groups, most sensitive first (``order``), and the evidence behind it.

    ``effective``: the probed groups that measurably helped (they head ``order``).
    """

    order: list[str] = field(default_factory=list)
    local: dict[str, float] = field(default_factory=dict)
    probes: dict[str, Probe] = field(default_factory=dict)
    effective: set[str] = field(default_factory=set)

    def sensitivity(self, base: ResolvedPlan) -> pd.DataFrame:
        """One row per ranked group (:data:`SENSITIVITY_COLUMNS`), most sensitive first."""
        groups = base.group_map
        recs = []
        for rank, g in enumerate(self.order, 1):
            p = self.probes.get(g)
            recs.append({
                "rank": rank, "group": g, "anchor_op": groups[g].anchor_op, "nodes": ", ".join(groups[g].nodes),
                "local_sqnr_db": self.local.get(g, math.nan),
                "probe_value": p.value if p else math.nan, "score": p.sqnr_gain if p else math.nan,
                "probed": p is not None, "probe_margin_gain": p.margin_gain if p else math.nan,
            })
        return pd.DataFrame(recs, columns=list(SENSITIVITY_COLUMNS))


def output_sqnr(rows: Sequence[Mapping[str, Any]]) -> float:
    """The lowest end-to-end SQNR (dB) over the model's outputs, NaN when none has one."""
    vals = [float(r["sqnr_db"]) for r in rows if r.get("sqnr_db") is not None and not is_nan(r.get("sqnr_db"))]
    return min(vals) if vals else math.nan


def rank_groups(ledger: Ledger) -> Ranking:
    """Measure local errors and probe the top groups (see the module docstring); log the table."""
    sub = ledger.evaluate("probe", {}, full=False, local=True)
    if sub is None:
        ledger.notes.append("the time budget ran out before the ranking: groups are in topological order")
        return Ranking(order=sorted(ledger.groups, key=lambda g: ledger.topo[g]))
    reported = dict(sub.local or {})
    local = {g: float(reported[g]) for g in ledger.groups if g in reported}
    missing = [g for g in ledger.groups if g not in local]
    if len(missing) == len(ledger.groups):
        ledger.notes.append("the comparator reported no local per-layer error: the ranking rests on the "
                            "probes and the topological order")

    def local_key(g: str) -> tuple[float, int]:
        v = local.get(g, math.nan)
        return (math.inf if is_nan(v) else v, ledger.topo[g])

    by_local = sorted(ledger.groups, key=local_key)
    base_sqnr = output_sqnr(sub.rows)
    probes = _probe(ledger, by_local[: ledger.options.probe_top], sub, base_sqnr)

    # "helped": the threshold's margin rose, and (when the outputs have an SQNR) by more than noise
    def effect(p: Probe) -> bool:
        return p.sqnr_gain >= _SQNR_EFFECT_DB or not math.isfinite(base_sqnr)

    helped = [g for g, p in probes.items() if p.margin_gain > 0 and effect(p)]
    raised = [g for g, p in probes.items() if g not in helped and p.sqnr_gain >= _SQNR_EFFECT_DB]
    helped.sort(key=lambda g: (-probes[g].margin_gain, -probes[g].sqnr_gain, local_key(g)))
    raised.sort(key=lambda g: (-probes[g].sqnr_gain, local_key(g)))
    idle = [g for g in by_local if g in probes and g not in helped and g not in raised]
    rest = [g for g in by_local if g not in probes]
    ranking = Ranking(order=helped + raised + rest + idle, local=local, probes=probes,
                      effective=set(helped) | set(raised))
    ledger.extra = [{"type": "sensitivity", "records": ranking.sensitivity(ledger.base).to_dict("records")}]
    ledger.write_log()
    return ranking


def _probe(ledger: Ledger, groups: Sequence[str], sub: Evaluation, base_sqnr: float) -> dict[str, Probe]:
    """Pin each of ``groups`` alone at the fallback tier on the subset; stop when time runs out."""
    base_margin = ledger.check(sub).margin
    probes: dict[str, Probe] = {}
    for g in groups:
        ev = ledger.evaluate("probe", {g: ledger.options.fallback}, full=False)
        if ev is None:
            ledger.notes.append("the time budget ran out during the probes; the rest keep their local order")
            break
        _metric, value, _, _ = ledger.binding(ev)
        margin = ledger.check(ev).margin
        gain = margin - base_margin if math.isfinite(margin) and math.isfinite(base_margin) else 0.0
        s = output_sqnr(ev.rows)
        sgain = s - base_sqnr if math.isfinite(s) and math.isfinite(base_sqnr) else 0.0
        probes[g] = Probe(value=value, margin_gain=gain, sqnr_gain=sgain, passed=ledger.check(ev).passed)
    return probes

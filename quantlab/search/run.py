"""The search logic on any evaluator (:func:`run_search`): the phases in order, then the final choice.

    all-int8 --passes--> final
        | fails
        +-- top-1 threshold, margins measurable --> flip_search (flips.py) ------------------> final
        v
    rank_groups (ranking) --> bisect (strategy) --> fp16_tier --> return_int8 --> final

``final`` picks among the full validations (:func:`~quantlab.search.ledger.select_row`),
records it as the last trajectory row, closes the log and says what happened.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ..errors import SearchError
from ..plan import ResolvedPlan
from ..threshold import parse_threshold
from . import flips
from .evaluation import Evaluation, Evaluator, evaluation_key
from .ledger import (
    TRAJECTORY_COLUMNS,
    Ledger,
    StepEvent,
    format_number,
    is_nan,
    select_row,
)
from .log import SearchLog
from .options import SearchOptions
from .ranking import Ranking, is_weak, rank_groups
from .strategy import bisect, fp16_tier, return_int8


@dataclass(frozen=True)
class SearchOutcome:
    """What :func:`run_search` decided (no model written yet)."""

    met: bool
    plan: ResolvedPlan
    evaluation: Evaluation
    trajectory: pd.DataFrame
    sensitivity: pd.DataFrame
    evaluations: int
    bound: int
    budget: int
    message: str
    notes: tuple[str, ...]
    executed: int
    resumed: int


def run_search(
    base: ResolvedPlan,
    evaluator: Evaluator,
    options: SearchOptions,
    *,
    log: SearchLog | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
    progress: bool = False,
    save_comparisons: bool = True,
) -> SearchOutcome:
    """The search logic on any evaluator, from the all-INT8 ``base`` plan (see the package docstring)."""
    options.check()
    threshold = parse_threshold(options.threshold)
    ledger = Ledger(base, evaluator, options, threshold, log, on_step, progress, save_comparisons)
    try:
        return _finish(ledger, _phases(ledger))
    finally:
        ledger.close()


def _phases(ledger: Ledger) -> pd.DataFrame:
    """Run every phase the all-INT8 plan's result calls for; the sensitivity table they used:
    the flip search for top-1 thresholds (flips.py), else the noise ranking and bisection."""
    base_ev = ledger.evaluate("all-int8", {}, full=True)
    if base_ev is None:
        raise SearchError("the search could not run its first evaluation (the all-INT8 plan): "
                          "the time budget is already spent")
    if ledger.passed(base_ev):
        return Ranking().sensitivity(ledger.base)
    if flips.applies(ledger, base_ev):
        table = flips.flip_search(ledger, base_ev)
        return table if table is not None else Ranking().sensitivity(ledger.base)
    ranking = rank_groups(ledger)
    pins = bisect(ledger, ranking)
    if pins is not None:
        pins = fp16_tier(ledger, ranking, pins)
        return_int8(ledger, ranking, pins)
    return ranking.sensitivity(ledger.base)


def _finish(ledger: Ledger, sensitivity: pd.DataFrame) -> SearchOutcome:
    """Choose among the full validations, record the choice, close the log."""
    full = [r for r in ledger.rows if r["full"]]
    chosen = select_row(full, ledger.options.objective)
    key = evaluation_key(chosen["plan_hash"], ledger.n)
    ev = ledger.cache[key]
    plan = ledger.base.with_pins(_parse_pins(chosen["pins"])) if chosen["pins"] else ledger.base
    if plan.plan_hash() != chosen["plan_hash"]:  # pragma: no cover - internal consistency
        raise SearchError("internal error: the chosen plan does not reproduce its hash")
    ledger.record("final", plan, ev, full=True, cached=True, seconds=0.0)
    met = bool(chosen["passed"])
    unjudged = ledger.threshold.unjudged_note(list(ev.rows))
    ledger.notes.extend([unjudged] if unjudged else [])
    ledger.notes.extend(_weak_ranking_note(ledger.int8_fraction(plan), sensitivity))
    message = _message(ledger, met, chosen, plan)
    ledger.extra = [{"type": "sensitivity", "records": sensitivity.to_dict("records")},
                    {"type": "end", "met": met, "plan_hash": plan.plan_hash(), "message": message,
                     "notes": list(ledger.notes), "full_validations": len(ledger.full_used)}]
    ledger.write_log()
    trajectory = pd.DataFrame(ledger.rows, columns=list(TRAJECTORY_COLUMNS))
    log = ledger.log
    return SearchOutcome(met=met, plan=plan, evaluation=ev, trajectory=trajectory,
                         sensitivity=sensitivity, evaluations=len(ledger.full_used), bound=ledger.bound,
                         budget=ledger.budget, message=message, notes=tuple(ledger.notes),
                         executed=ledger.executed, resumed=log.resumed if log is not None else 0)


_FEW_INT8 = 0.25
"""Below this INT8 share of the quantizable groups, the search's end is worth explaining."""


def _weak_ranking_note(fraction: float, sensitivity: pd.DataFrame) -> list[str]:
    """A WARNING when the search kept few groups INT8 (``fraction``) and reverting groups alone did not add up
    (PP-OCRv4's recogniser: 31 of 55 groups made the output worse when reverted alone; 54 ended pinned, without a
    word)."""
    if fraction >= _FEW_INT8 or sensitivity.empty or "impact_db" not in sensitivity.columns:
        return []
    impacts = sensitivity["impact_db"].dropna()
    if not is_weak(impacts):
        return []
    worse = int((impacts <= 0).sum())
    isolated = "isolated_sqnr_db" in sensitivity.columns and sensitivity["isolated_sqnr_db"].notna().any()
    ranked = (", and ranking them by the noise each makes as the only INT8 group did not find a small set either"
              if isolated else "")
    return [f"WARNING the search kept INT8 on only {fraction:.0%} of the quantizable groups; {worse} of the "
            f"{len(impacts)} groups it measured made the output no better when reverted alone{ranked}: the ranking "
            "could not tell the groups apart. On a few "
            "samples a change of a few dB can be noise (PP-OCRv6's detector: 1/17 of a pixel step of input noise "
            "moved one sample's INT8 SQNR by 9.6 dB), or the INT8 errors interact and no small set of pins fixes "
            "them. Rank on more samples (--probe-samples, up to half the set), read the per-layer table of "
            "`quantlab compare` for the layers with the lowest local SQNR and pin those, or try another calibrator "
            "(mse, percentile) or equalization; quantization-aware training if none helps"]


def _message(ledger: Ledger, met: bool, chosen: Mapping[str, Any], plan: ResolvedPlan) -> str:
    """One sentence: what was pinned, what the binding metric reached, how much budget it took."""
    t = ledger.threshold.text
    figure = f"{chosen['metric']} = {format_number(chosen['value'])}"
    if not is_nan(chosen["ci_low"]):
        figure += f" [{format_number(chosen['ci_low'])}, {format_number(chosen['ci_high'])}]"
    used = f"{len(ledger.full_used)} full validation(s) of at most {ledger.budget}"
    if met and not chosen["pinned"]:
        return f"the all-INT8 plan meets {t!r} ({figure}); nothing pinned; {used}"
    pins = _parse_pins(chosen["pins"])
    tiers = ", ".join(f"{sum(v == p for v in pins.values())} at {p}" for p in ("fp16", "fp32")
                      if any(v == p for v in pins.values()))
    if met:
        return (f"pinned {len(pins)} of {len(ledger.groups)} quantizable groups ({tiers}: {chosen['pinned']}); "
                f"INT8 on {ledger.int8_fraction(plan):.0%} of them; {figure} meets {t!r}; {used}")
    every = any(r["full"] and r["n_pinned"] == len(ledger.groups) for r in ledger.rows)
    why = ("no plan meets it, not even with every quantizable group pinned (the threshold is tighter than "
           "the FP16/FP32 noise of this backend, or the metric cannot reach it)" if every else
           "the budget ran out before a plan met it")
    return (f"{t!r} is not met: {why}. Returning the best plan measured ({figure}, "
            f"{len(pins)} group(s) pinned, INT8 on {ledger.int8_fraction(plan):.0%}); {used}")


def _parse_pins(text: str) -> dict[str, str]:
    """``"a=fp16,b=fp32"`` (a trajectory row's pins) -> {"a": "fp16", "b": "fp32"}."""
    out = {}
    for part in text.split(","):
        if part:
            name, _, p = part.rpartition("=")
            out[name] = p
    return out

"""The search for top-1 thresholds: greedy pinning on the flip model, full validations only at decisions.

    all-int8 (full) --flipped samples F--> critical set S = F + the most fragile samples (``probe_samples``)
        |
        v
    margins on S: all-INT8, every group at fallback, each group reverted alone      (batched, subset)
        |
        v
    greedy_add, prune (margins.py) --> plan P --> P's margins on S --> some still flip? --> greedy on
        |                                           (the residual becomes the model's offset)
        v
    full validation of P --passes--> return-int8: prune with half, then a quarter of the safety
        | fails                       margin, then spending every flip the threshold allows; each
        |                             smaller plan checked on S, then validated (a failing batch is
        |                             halved); last, each pinned group returned alone is measured
        |                             on S at the passing plan and the harmless ones go back together
        v
    samples it flipped outside S join S (their margins measured for every group), greedy on
    from P, then prune; no new sample: the safety margin doubles

Full validations: all-INT8, then one per decision; the forward loop stops with one left for
pinning every group (the plan that cannot fail unless the fallback tier itself flips samples),
and the whole search stays within ``budget`` (default ceil(log2 G) + 5). Every full
validation that fails teaches the model the samples it flipped, so in practice one or two
suffice. Plans that passed are kept whatever comes later (non-monotone plans are harmless:
the final choice is among measured passes).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .evaluation import Evaluation
from .ledger import Ledger
from .margins import MarginModel, allowed_flips, flip_threshold, margin_sensitivity
from .ranking import SENSITIVITY_COLUMNS

SUBSET_CHECKS = 3
"""Plans checked on the critical samples before one full validation (each check refines the offset)."""

RETURN_STEPS: tuple[tuple[float, bool], ...] = ((0.5, False), (0.25, False), (0.25, True), (0.0, True))
"""The return-to-INT8 phase prunes with these fractions of the safety margin, first keeping half
the flips the threshold allows in reserve (False), then spending them all (True)."""


def applies(ledger: Ledger, base_ev: Evaluation) -> bool:
    """The flip search serves this threshold and evaluator (top-1 thresholds, margins measurable)."""
    return (flip_threshold(ledger.threshold) and callable(getattr(ledger.evaluator, "margins", None))
            and callable(getattr(ledger.evaluator, "fragile_order", None)) and base_ev.flipped is not None
            and allowed_flips(ledger.threshold, ledger.n) >= 0)


def critical_samples(ledger: Ledger, flipped: Sequence[int]) -> list[int]:
    """The all-INT8 plan's flipped samples (at most 2 x ``probe_samples``) and the most fragile
    others, ``probe_samples`` in all (at least a quarter of them fragile ones)."""
    n = ledger.probe_n
    flips = list(flipped)[: 2 * n]
    fragile = [i for i in ledger.evaluator.fragile_order() if i not in flips]
    return sorted(flips + fragile[: max(n - len(flips), n // 4)])


def measure_model(ledger: Ledger, indices: Sequence[int], groups: Sequence[str],
                  current: dict[str, str] | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray],
                                                                  np.ndarray | None] | None:
    """Margins on ``indices``: all-INT8, everything at fallback, each group alone reverted (and
    ``current`` when given); None once time is out."""
    tier = ledger.options.fallback
    plans: list[dict[str, str]] = [{}, {g: tier for g in groups}, *({g: tier} for g in groups)]
    if current:
        plans.append(current)
    m = ledger.margins("rank", plans, indices)
    if m is None:
        return None
    delta = {g: m[2 + k] - m[0] for k, g in enumerate(groups)}
    return m[0], m[1], delta, (m[-1] if current else None)


def flip_search(ledger: Ledger, base_ev: Evaluation) -> pd.DataFrame | None:
    """Run the phases (module docstring); the sensitivity table, or None when time ran out first."""
    groups = sorted(ledger.groups, key=lambda g: ledger.topo[g])
    allowed = allowed_flips(ledger.threshold, ledger.n)
    indices = critical_samples(ledger, base_ev.flipped or ())
    measured = measure_model(ledger, indices, groups)
    if measured is None:
        ledger.notes.append("the time budget ran out while measuring the flip model")
        return None
    base, ceiling, delta, _ = measured
    model = MarginModel(indices=list(indices), base=base, ceiling=ceiling, delta=delta)
    ledger.notes.append(f"flip model: {len(indices)} critical samples ({len(base_ev.flipped or ())} flipped by "
                        f"all-INT8), {model.unfixable} flip even with every group at {ledger.options.fallback}; "
                        f"the threshold allows {allowed} flipped sample(s) of {ledger.n}")
    target = max(0, allowed - model.unfixable) // 2
    order = sorted(groups, key=lambda g: -model.gain(g, []))
    pins, passed = _forward(ledger, model, order, target, allowed)
    if passed is not None:
        passed = _return_int8(ledger, model, passed, target, allowed)
    final = passed if passed is not None else pins
    describe = {g: (ledger.base.group_map[g].anchor_op, ", ".join(ledger.base.group_map[g].nodes)) for g in groups}
    table = margin_sensitivity(model, groups, final, describe, SENSITIVITY_COLUMNS)
    ledger.extra = [{"type": "sensitivity", "records": table.to_dict("records")}]
    ledger.write_log()
    return table


def _pins(ledger: Ledger, groups: Sequence[str]) -> dict[str, str]:
    return {g: ledger.options.fallback for g in groups}


def _checked(ledger: Ledger, model: MarginModel, pins: list[str], order: Sequence[str], target: int) -> list[str]:
    """``pins`` grown until its measured margins on the critical samples flip at most ``target``."""
    for _ in range(SUBSET_CHECKS):
        m = ledger.margins("check", [_pins(ledger, pins)], model.indices)
        if m is None:
            break
        model.observe(pins, m[0])
        if int(np.count_nonzero((m[0] < 0) & model.fixable)) <= target:
            break
        more = model.greedy_add(pins, order, target)
        if more == pins:
            break
        pins = more
    return pins


def _forward(ledger: Ledger, model: MarginModel, order: Sequence[str], target: int,
             allowed: int) -> tuple[list[str], list[str] | None]:
    """Greedy plans validated until one passes: (the last plan tried, the passing one or None)."""
    pins = model.prune(model.greedy_add([], order, target), target)
    while True:
        pins = _checked(ledger, model, pins, order, target)
        if len(ledger.full_used) >= ledger.budget - 1 and len(pins) < len(order):
            pins = list(order)  # the last full validation: every group pinned
        ev = ledger.evaluate("greedy", _pins(ledger, pins), full=True)
        if ev is None:
            ledger.notes.append(f"the budget ({ledger.budget} full validations) ran out before a greedy plan "
                                "passed")
            return pins, None
        if ledger.passed(ev):
            return pins, pins
        if len(pins) == len(order):
            ledger.notes.append(f"pinning every quantizable group at {ledger.options.fallback} does not meet "
                                "the threshold")
            return pins, None
        pins = _learn(ledger, model, ev, pins, order, target)


def _learn(ledger: Ledger, model: MarginModel, ev: Evaluation, pins: list[str], order: Sequence[str],
           target: int) -> list[str]:
    """After a failed full validation: its new flipped samples join the model (or, with none,
    the safety margin doubles); greedy on from ``pins``."""
    new = [i for i in (ev.flipped or ()) if i not in model.indices]
    if new:
        measured = measure_model(ledger, new, list(model.delta), _pins(ledger, pins))
        if measured is not None:
            base, ceiling, delta, current = measured
            assert current is not None
            offset = current - (base + sum((delta[g] for g in pins), np.zeros_like(base)))
            model.extend(new, base, ceiling, delta, offset)
            ledger.notes.append(f"a full validation flipped {len(new)} sample(s) outside the critical set: "
                                "added to it")
    else:
        model.tau *= 2.0
    more = model.prune(model.greedy_add(pins, order, target), target)
    tried, _ = ledger.known_full(_pins(ledger, more))
    if set(more) <= set(pins) or tried is not None:  # nothing new to fix: pin the next group by impact
        more = pins + [g for g in order if g not in pins][:1]
    return more


def _return_int8(ledger: Ledger, model: MarginModel, passed: list[str], target: int, allowed: int) -> list[str]:
    """Return batches of pinned groups to INT8 with a smaller safety margin while plans pass; when
    a batch fails its full validation, half of it (the least needed groups) is tried instead."""
    best = list(passed)
    for fraction, spend in RETURN_STEPS:
        limit = max(0, allowed - model.unfixable) if spend else target
        cand = model.prune(best, limit, tau=model.tau * fraction)
        batch = sorted((g for g in best if g not in cand),
                       key=lambda g: model.shortfall(model.predict([p for p in best if p != g])))
        if not batch:
            continue
        while batch:
            outcome = _try_return(ledger, model, best, batch, limit)
            if outcome is None:
                return best
            if outcome:
                best = [g for g in best if g not in batch]
                break
            batch = batch[: len(batch) // 2]
        else:
            return best  # even a single group failed: smaller safety margins will not pass either
    return _measured_return(ledger, model, best, max(0, allowed - model.unfixable))


def _measured_return(ledger: Ledger, model: MarginModel, best: list[str], limit: int) -> list[str]:
    """The last return to INT8, from measurements at the passing plan rather than at all-INT8:
    every pinned group returned alone, measured on the critical samples; the groups whose returns
    together still keep at most ``limit`` samples below a quarter of the safety margin (adding
    their measured margin losses) go back as one batch, halved while it fails."""
    if len(best) < 2:
        return best
    plans = [_pins(ledger, best), *(_pins(ledger, [p for p in best if p != g]) for g in best)]
    m = ledger.margins("return-int8", plans, model.indices)
    if m is None:
        return best
    loss = {g: m[0] - m[1 + k] for k, g in enumerate(best)}
    targets = np.where(model.fixable, model.targets(model.tau * 0.25), -np.inf)
    batch: list[str] = []
    for g in sorted(best, key=lambda g: float(np.sum(np.maximum(targets - (m[0] - loss[g]), 0.0)))):
        trial = m[0] - sum((loss[h] for h in [*batch, g]), np.zeros_like(m[0]))
        if int(np.count_nonzero(trial < targets)) <= limit:
            batch.append(g)
    while batch:
        outcome = _try_return(ledger, model, best, batch, limit)
        if outcome is None:
            break
        if outcome:
            return [g for g in best if g not in batch]
        batch = batch[: len(batch) // 2]
    return best


def _try_return(ledger: Ledger, model: MarginModel, best: list[str], batch: list[str], limit: int) -> bool | None:
    """``best`` without ``batch``: checked on the critical samples, then validated (None: out of budget)."""
    cand = [g for g in best if g not in batch]
    m = ledger.margins("return-int8", [_pins(ledger, cand)], model.indices)
    if m is None:
        return None
    if int(np.count_nonzero((m[0] < 0) & model.fixable)) > limit:
        return False
    ev = ledger.evaluate("return-int8", _pins(ledger, cand), full=True)
    if ev is None:
        ledger.notes.append("the budget ran out while returning pinned groups to INT8")
        return None
    return ledger.passed(ev)

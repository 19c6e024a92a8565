"""How many ranked groups to pin, and at which precision: the bisection, the FP16 tier, return to INT8.

    ranking: g1 g2 g3 ... gG (most sensitive first)
    bisect       pin g1..gk at ``fallback``: the smallest passing k (first guess, G, then halve the
                 gap between the largest failing and the smallest passing prefix); fp32 if fp16 fails
    fp16-tier    g1..gk all at fp16, else all but g1 at fp16          (only when the prefix is fp32)
    return-int8  gk, g(k-1), ... back to INT8 one at a time while the plan keeps passing

Every measurement goes through the :class:`~quantlab.search.ledger.Ledger` (cache, budgets);
a phase stops, with a note, when it returns None.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from .ledger import Ledger
from .ranking import Ranking


def bisect_prefix(
    passes: Callable[[int], bool | None],
    size: int,
    *,
    known: Mapping[int, bool] | None = None,
    first: int | None = None,
) -> tuple[int | None, dict[int, bool], list[tuple[int, int]]]:
    """The smallest prefix length ``k`` in 1..size for which ``passes(k)`` holds, by bisection.

    ``known`` holds prefixes already measured (0, the unpinned plan, is taken to fail);
    ``first`` is the first prefix to try (default ``size``). ``passes`` returns None when it
    cannot measure any more (budget): the search then stops with the smallest passing prefix
    measured so far. Returns (k or None when no measured prefix passed, every measurement,
    the non-monotone pairs (k_pass, k_fail) with k_pass < k_fail that were observed).

    Only prefixes strictly between the largest failing and the smallest passing one are
    tried, and the answer is always a measured pass whose predecessor is a measured fail.
    """
    seen: dict[int, bool] = {0: False, **(dict(known) if known else {})}
    k = first if first is not None and 0 < first <= size else size
    while True:
        if k not in seen:
            outcome = passes(k)
            if outcome is None:
                break
            seen[k] = bool(outcome)
        passing = [j for j, ok in seen.items() if ok]
        if not passing:
            if size in seen:
                break
            k = size
            continue
        hi = min(passing)
        lo = max(j for j, ok in seen.items() if not ok and j < hi)
        if hi - lo <= 1:
            break
        k = (lo + hi) // 2
    passing = [j for j, ok in seen.items() if ok]
    violations = sorted((a, b) for a, ok_a in seen.items() if ok_a for b, ok_b in seen.items() if not ok_b and b > a)
    return (min(passing) if passing else None), seen, violations


def prefix_pins(ranking: Ranking, k: int, tier: str) -> dict[str, str]:
    """The first ``k`` ranked groups pinned at ``tier``."""
    return {g: tier for g in ranking.order[:k]}


def bisect(ledger: Ledger, ranking: Ranking) -> dict[str, str] | None:
    """The pinned groups (group -> precision) of the smallest passing prefix, or None."""
    fallback = ledger.options.fallback
    tiers = [fallback] + (["fp32"] if fallback == "fp16" else [])
    size = len(ranking.order)
    for tier in tiers:
        budget_out = False

        def passes(k: int, tier: str = tier) -> bool | None:
            nonlocal budget_out
            ev = ledger.evaluate("bisect", prefix_pins(ranking, k, tier), full=True)
            if ev is None:
                budget_out = True
                return None
            return ledger.check(ev).passed

        first = first_guess(ranking, size) if tier == fallback else size
        k, _seen, violations = bisect_prefix(passes, size, first=first)
        for a, b in violations:
            ledger.notes.append(f"non-monotone at {tier}: pinning the first {a} ranked groups meets the threshold "
                                f"but the first {b} do not; only plans that passed a full validation are kept")
        if budget_out:
            ledger.notes.append(f"the budget ({ledger.budget} full validations) or the time budget ran out during "
                                f"the bisection at {tier}" + ("" if k is None else
                                                              f"; the smallest passing prefix measured is {k}"))
            return prefix_pins(ranking, k, tier) if k is not None else None
        if k is not None:
            return prefix_pins(ranking, k, tier)
        ledger.notes.append(f"pinning every quantizable group at {tier} does not meet the threshold")
    return None


def first_guess(ranking: Ranking, size: int) -> int:
    """The first prefix to validate: 1 when the top group alone passed its probe, else the
    probed groups that measurably helped (they head the ranking), else every group."""
    top = ranking.order[0] if ranking.order else None
    if top in ranking.probes and ranking.probes[top].passed:
        return 1
    effective = 0
    for g in ranking.order:
        if g not in ranking.effective:
            break
        effective += 1
    return effective if 0 < effective < size else size


def fp16_tier(ledger: Ledger, ranking: Ranking, pins: dict[str, str]) -> dict[str, str]:
    """When the prefix needed fp32: every pinned group at fp16, else all but the most sensitive."""
    if not pins or all(p == "fp16" for p in pins.values()):
        return pins
    order = [g for g in ranking.order if g in pins]
    candidates = [{g: "fp16" for g in order}]
    if len(order) > 1:
        candidates.append({g: ("fp32" if i == 0 else "fp16") for i, g in enumerate(order)})
    for cand in candidates:
        ev = ledger.evaluate("fp16-tier", cand, full=True)
        if ev is None:
            ledger.notes.append("the budget ran out before the FP16 tier was tried")
            break
        if ledger.passed(ev):
            return cand
    return pins


def return_int8(ledger: Ledger, ranking: Ranking, pins: dict[str, str]) -> None:
    """Pinned groups back to INT8 one at a time, least sensitive first, while the budget lasts
    (screened on the subset when the budget cannot try them all)."""
    current = dict(pins)
    order = [g for g in reversed(ranking.order) if g in current]
    for i, g in enumerate(order):
        cand = {k: v for k, v in current.items() if k != g}
        if not cand:
            continue  # the all-INT8 plan: already measured, and it failed
        left = ledger.budget - len(ledger.full_used)
        remaining = len(order) - i
        known, counted = ledger.known_full(cand)
        if known is not None and counted and not ledger.passed(known):
            continue  # measured in this search (e.g. a shorter prefix) and it failed
        if known is None and left <= 0:
            ledger.notes.append(f"the budget ({ledger.budget} full validations) ran out while returning pinned "
                                f"groups to INT8; {remaining} not tried")
            break
        if known is None and left < remaining:
            screen = ledger.evaluate("return-int8", cand, full=False)
            if screen is None:
                break
            if not ledger.passed(screen):
                continue
        ev = ledger.evaluate("return-int8", cand, full=True)
        if ev is None:
            break
        if ledger.passed(ev):
            current = cand

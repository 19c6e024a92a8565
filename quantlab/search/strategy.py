"""How many ranked groups to pin, and at which precision: the bisection, the FP16 tier, return to INT8.

    ranking: g1 g2 g3 ... gG (largest measured impact first, see ranking.py)
    bisect       pin g1..gk at ``fallback``: the smallest passing k. First guess: the shortest
                 prefix the additive noise model predicts to pass (N_all - sum of its impacts
                 below the noise the threshold allows, from the all-INT8 value and the metric's
                 small-noise law, times 0.8); then G when it fails, then halve the gap between
                 the largest failing and the smallest passing prefix: each halving returns the
                 lower-impact half of the pinned groups to INT8 in one batch, in ranked order.
                 fp32 if every group at fp16 fails
    fp16-tier    g1..gk all at fp16, else all but g1 at fp16          (only when the prefix is fp32)
    return-int8  gk, g(k-1), ... back to INT8 one at a time while the plan keeps passing, skipping
                 candidates the noise model says cannot beat a plan that already failed

Non-monotone prefixes (a pass below a fail) are noted and only plans that passed a full
validation themselves are kept. Every measurement goes through the
:class:`~quantlab.search.ledger.Ledger` (cache, budgets); a phase stops, with a note, when it
returns None.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

from .ledger import Ledger, is_nan
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

        first = first_guess(ledger, ranking, size) if tier == fallback else size
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


_GUESS_SAFETY = 0.8
"""The first guess aims at this fraction of the noise the threshold allows (the model is approximate)."""


def allowed_noise_fraction(metric: str, higher_is_better: bool, target: float, value: float) -> float | None:
    """How much of the all-INT8 output noise power a plan may keep to reach ``target`` from ``value``.

    Small-noise laws: cosine deficit and rel_l2**2 grow like the noise power, top-1
    disagreement and drops like its square root (a flip needs noise of the order of the
    gap between the two best logits), SQNR is the noise power in dB. None: no law known.
    """
    if "cosine" in metric and higher_is_better and value < 1.0 and target < 1.0:
        return (1.0 - target) / (1.0 - value)
    if "agreement" in metric and higher_is_better and value < 100.0 and target < 100.0:
        return ((100.0 - target) / (100.0 - value)) ** 2
    if ("drop" in metric or "rel_l2" in metric) and not higher_is_better and value > 0 and target > 0:
        return (target / value) ** 2
    if "sqnr" in metric and higher_is_better:
        return 10.0 ** (-(target - value) / 10.0)
    return None


def first_guess(ledger: Ledger, ranking: Ranking, size: int) -> int:
    """The first prefix to validate: the shortest one the additive noise model predicts to pass
    (every group when there is no model or it predicts none does)."""
    base = ledger.known_full({})[0]
    if base is None or not ranking.impact:
        return size
    check = ledger.check(base)
    fractions = []
    for cond in ledger.threshold.conditions:
        rows = [r for r in base.rows if not is_nan(r.get(cond.metric))]
        if not rows:
            return size
        worst = min(float(r[cond.metric]) for r in rows) if cond.higher_is_better else \
            max(float(r[cond.metric]) for r in rows)
        if check.margins.get(str(cond), -1.0) >= 0:
            continue
        f = allowed_noise_fraction(cond.metric, cond.higher_is_better, cond.value, worst)
        if f is None:
            return size
        fractions.append(f)
    if not fractions:
        return size
    target = min(fractions) * _GUESS_SAFETY * ranking.base_noise
    for k in range(1, size + 1):
        if ranking.predicted_noise(ranking.order[:k]) <= target:
            return k
    return size


def fp16_tier(ledger: Ledger, ranking: Ranking, pins: dict[str, str]) -> dict[str, str]:
    """When the prefix needed fp32: every pinned group at fp16, else all but the most sensitive."""
    if not pins or all(p == "fp16" for p in pins.values()):
        return pins
    order = [g for g in ranking.order if g in pins]
    candidates = [{g: "fp16" for g in order}]
    if len(order) > 1:
        candidates.append({g: ("fp32" if i == 0 else "fp16") for i, g in enumerate(order)})
    for i, cand in enumerate(candidates):
        ev = ledger.evaluate("fp16-tier", cand, full=True)
        if ev is None:
            ledger.notes.append("the budget ran out before the FP16 tier was tried" if i == 0 else
                                f"every pinned group at fp16 does not meet the threshold, and the budget ran out "
                                f"before the FP16 tier tried {order[0]!r} alone at fp32")
            break
        if ledger.passed(ev):
            return cand
    return pins


def return_int8(ledger: Ledger, ranking: Ranking, pins: dict[str, str]) -> None:
    """Pinned groups back to INT8 one at a time, least impact first, while the budget lasts.

    With measured impacts, a candidate whose predicted noise is no lower than that of a plan
    which failed its full validation is skipped without spending one (after the bisection
    that is every single return: the prefix one shorter failed), unless the ranking subset
    passed the all-INT8 plan that failed the whole set: the model fit on it is blind to what
    failed (a two-output model, 31.9 dB on the subset and 23.4 on the set, had every return
    predicted to fail and ended all FP16 where 60 % INT8 passed), so each return is validated
    while the budget lasts. The same when the ranking found the groups' errors interacting (it
    measured them isolated): the additive model is a guess there. Without impacts, the candidates
    are screened on the subset when the budget cannot try them all.
    """
    current = dict(pins)
    # the additive model, fit on the subset or on interacting errors, cannot be trusted
    blind = _subset_missed_the_failure(ledger) or bool(ranking.isolated_sqnr)
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
        if known is None and ranking.impact and not blind and _predicted_to_fail(ledger, ranking, list(cand)):
            continue
        if known is None and left <= 0:
            ledger.notes.append(f"the budget ({ledger.budget} full validations) ran out while returning pinned "
                                f"groups to INT8; {remaining} not tried")
            break
        if known is None and left < remaining and not ranking.impact:
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


def _subset_missed_the_failure(ledger: Ledger) -> bool:
    """Whether the all-INT8 plan passed on the ranking subset after failing its full validation."""
    subset = [r for r in ledger.rows if not r["full"] and not r["pinned"] and r["phase"] == "rank"]
    full = [r for r in ledger.rows if r["full"] and not r["pinned"]]
    return bool(subset and full) and subset[0]["passed"] and not full[0]["passed"]


def _predicted_to_fail(ledger: Ledger, ranking: Ranking, pinned: list[str]) -> bool:
    """The additive model predicts at least the noise of a plan that failed a full validation: on every output,
    when the model has several (which one failed is not known, and the threshold holds per output). Pooled, a
    group touching only an output that passed with room to spare looked worse than the failed plan's pins, and
    a two-headed model ended all FP16 where 60 % INT8 passed."""
    mine = ranking.predicted_noise(pinned)
    mine_by_output = ranking.predicted_output_noise(pinned)
    for row in ledger.rows:
        if row["full"] and not row["passed"] and row["phase"] != "final":
            theirs_pinned = [p for p in row["pinned"].split(",") if p]
            if mine_by_output:
                theirs = ranking.predicted_output_noise(theirs_pinned)
                if all(mine_by_output[o] >= theirs[o] for o in mine_by_output):
                    return True
            elif mine >= ranking.predicted_noise(theirs_pinned):
                return True
    return False

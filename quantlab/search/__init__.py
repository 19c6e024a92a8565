"""Sensitivity search: pin the most sensitive fusion groups to FP16/FP32 until a threshold holds.

INTERFACE (agreed in code; experiments, report and CLI use exactly this):

    result = search(model, table, val_set, SearchOptions(threshold="top1_drop<=0.5"),
                    workdir=Path("out/search"), progress=True)
    result.met          # bool: the final plan meets the threshold
    result.plan         # ResolvedPlan (save with quantlab.plan.save_plan(result.plan.to_plan(), ...))
    result.final        # WrittenModel of the final plan
    result.comparison   # CompareResult of the final candidate on the full validation set
    result.trajectory   # DataFrame, one row per evaluation (columns below)
    result.sensitivity  # DataFrame, one row per quantizable group, most sensitive first
    result.save(out_dir)

trajectory columns: step, phase ("all-int8" | "rank" | "rank-isolated" | "bisect" | "fp16-tier" | "greedy" | "check" |
"return-int8" | "final"), plan_hash, pinned (comma-joined groups), n_pinned, int8_fraction, metric, value,
ci_low, ci_high, passed, samples (the subset size for the ranking), full (bool: counts
against the bound of ceil(log2 G) + 5 full validations), latency_ms (mean, NaN when not
measured), cached (bool), seconds. Added: pins (group=precision, comma-joined), margin (the
threshold's smallest margin: negative when missed), only_int8 (a rank-isolated row's one INT8 group).

sensitivity columns (:data:`SENSITIVITY_COLUMNS`): rank, group, anchor_op, nodes,
reverted_sqnr_db (the output SQNR on the ranking subset with the group alone reverted to the
fallback tier), impact_db (the SQNR gain that bought), impact (the output noise power it
removed, relative to the signal), noise_share (its share of the all-INT8 noise) and
cumulative_share (down the ranking); isolated_sqnr_db (the output SQNR with the group the only INT8
one, measured when reverting alone did not add up: the ranking and impact then come from it);
for top-1 thresholds instead (the flip search):
critical_samples, margin_gain (how much reverting the group alone shrank the critical samples'
top-1 margin shortfall), worst_margin_gain, flips_fixed (all-INT8 flips it alone undid) and
pinned_step (when the greedy pinned it; NaN: not pinned).

Top-1 thresholds (``top1_agreement``, ``top1_drop``) with an evaluator that measures per-sample
margins (:class:`CompareEvaluator` does) take another path after the all-INT8 validation, the
flip search (``flips.py``, ``margins.py``): the samples all-INT8 flips plus the most fragile
ones are the critical samples; each group's effect on their top-1 margins is measured alone
(batched; each plan runs only from its first layer that differs from the all-INT8 model,
``suffix.py``), a greedy pins the groups that shrink the margin shortfall most, prunes the
ones not needed, and full validations decide; a failed one adds the samples it flipped to
the critical set. Full validations: all-INT8 and one per decision (usually 2-4), within the
same budget; the last one the budget allows pins every group.

The search, step by step (G = number of quantizable fusion groups)::

    all-int8     1 full validation; stop when it meets the threshold
    rank         on the ranking subset (``probe_samples``): the all-INT8 plan, then every group
                 reverted alone, in batched comparator passes (the reference runs once per
                 batch); groups ordered by the output noise power they account for (when a
                 quarter or more of them make it no better, by the noise each makes as the
                 only INT8 group: "rank-isolated", one more subset pass per group). Only this
                 continuous measure is read on the subset; discrete metrics (agreement,
                 accuracy) decide pass/fail on full validations only, with their intervals
    bisect       the smallest prefix of the ranking whose pinning (at ``fallback``) meets the
                 threshold: first the prefix the additive noise model predicts to pass (from
                 the all-INT8 value and the metric's small-noise law), G when that fails, then
                 bisection between the largest failing and the smallest passing prefix (each
                 step returns a batch of the least impactful pinned groups to INT8);
                 if pinning all G fails at fp16, the same at fp32; the answer is always a plan
                 that passed a full validation itself (non-monotone prefixes are noted)
    fp16-tier    when the prefix needed fp32: every pinned group at fp16, else all but the
                 most sensitive one
    return-int8  pinned groups back to INT8 one at a time, least impact first, while the
                 budget lasts, skipping those the noise model says cannot pass
    final        the passing plan with the most INT8 (``objective="int8"``) or the lowest
                 latency (``objective="latency"``); with none passing, the best margin

Full validations stay within ``budget`` (default ceil(log2 G) + 5): all-INT8, the guess, G and
the bisection cost at most ceil(log2 G) + 3 of them (ceil(log2 G) + 4 when fp16 is not enough
and the bisection runs at fp32), the rest goes to the FP16 tier and returning groups to INT8;
a new full validation never starts once the budget is spent. Every evaluation is cached by
plan hash and sample count, so no plan is evaluated twice; with a ``workdir`` the search log
(``search_log.jsonl``: a header with the settings, then every evaluation and every trajectory
row) is rewritten atomically after every step, and a rerun with the same workdir replays the
logged evaluations instead of running them again (the settings must match; the budgets may
differ, so a rerun with a larger ``budget`` continues where the last one stopped).

The search logic (:func:`run_search`) takes any :class:`Evaluator`; :func:`search` gives it
one that writes each plan with :func:`quantlab.quantize.write_model` and measures it with
:func:`quantlab.compare.compare` (and :mod:`quantlab.perf` for latency).

Layout (arrows: imports)::

    api.py         search(), search_settings()  the entry point on a model
      +-> evaluator.py  CompareEvaluator          writes a plan, measures it with the comparator
            +-> suffix.py   plans run from their first layer that differs (margins on few samples)
      +-> result.py     SearchResult              to_dict / save (plan, final model, tables)
      +-> run.py        run_search, SearchOutcome the phases in order, the final choice, the message
            +-> flips.py     the flip search for top-1 thresholds (greedy, validations at decisions)
            |     +-> margins.py   MarginModel: per-sample top-1 margins, greedy_add, prune
            +-> ranking.py   impact ranking (each group reverted alone, batched), the sensitivity table
            +-> strategy.py  bisect_prefix, bisection, FP16 tier, return to INT8
            +-> ledger.py    Ledger, StepEvent    the plan cache, budgets, trajectory rows, progress
                  +-> log.py     SearchLog        search_log.jsonl: settings, evaluations, resume
    evaluation.py  Evaluation, Evaluator, evaluation_key   one measured plan (used by all)
    options.py     SearchOptions, evaluation_bound          the settings, each default once
"""

from __future__ import annotations

from ..lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "search": "api",
    "search_settings": "api",
    "Evaluation": "evaluation",
    "Evaluator": "evaluation",
    "evaluation_key": "evaluation",
    "CompareEvaluator": "evaluator",
    "TRAJECTORY_COLUMNS": "ledger",
    "StepEvent": "ledger",
    "LOG_FILE": "log",
    "LOG_FORMAT": "log",
    "SearchLog": "log",
    "SearchOptions": "options",
    "evaluation_bound": "options",
    "SENSITIVITY_COLUMNS": "ranking",
    "impact_notes": "ranking",
    "RESULT_FORMAT": "result",
    "SearchResult": "result",
    "SearchOutcome": "run",
    "run_search": "run",
    "bisect_prefix": "strategy",
})


__all__ = [
    "SearchOptions",
    "SearchResult",
    "search",
    "Evaluation",
    "Evaluator",
    "StepEvent",
    "SearchOutcome",
    "SearchLog",
    "CompareEvaluator",
    "run_search",
    "evaluation_bound",
    "bisect_prefix",
    "TRAJECTORY_COLUMNS",
    "SENSITIVITY_COLUMNS",
    "impact_notes",
    "LOG_FILE",
    "LOG_FORMAT",
]

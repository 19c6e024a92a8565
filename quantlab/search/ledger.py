"""The bookkeeping of one search: every plan the phases try goes through the :class:`Ledger`.

    phase --evaluate(pins, full)--> Ledger --cached (plan hash @ samples)?--> Evaluation
                                      | not cached; budget and time left
                                      v
                       Evaluator.evaluate (+ latency) --> cache, SearchLog (+ saved comparison)
                                      |
                                      v
                 trajectory row --> log rewritten, progress bar, on_step(StepEvent)

The ledger also holds what every phase reads: the groups it may pin, the budgets, the
threshold checks, and the notes that end up in the search's message. The groups are the
quantizable ones and, under ``int8_bodies``, the Loop/Scan/If groups whose bodies the base
plan writes in INT8 (the evaluator's ``int8_body_groups``): pinned, such a group's bodies
are written in the pin's float precision; unpinned, it counts as INT8.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..errors import SearchError
from ..plan import ResolvedPlan
from ..threshold import Threshold, ThresholdCheck
from .evaluation import Evaluation, Evaluator, evaluation_key
from .log import SearchLog
from .options import SearchOptions, evaluation_bound

TRAJECTORY_COLUMNS: tuple[str, ...] = (
    "step", "phase", "plan_hash", "pinned", "n_pinned", "int8_fraction", "metric", "value", "ci_low",
    "ci_high", "passed", "samples", "full", "latency_ms", "cached", "seconds", "pins", "margin", "only_int8",
)
"""``only_int8``: on a ``rank-isolated`` row, the one quantizable group left INT8 (every other one pinned), else ""."""


@dataclass(frozen=True)
class StepEvent:
    """Sent to ``on_step`` after every step: the trajectory row and the best plan so far."""

    row: Mapping[str, Any]
    best: Mapping[str, Any] | None
    full_used: int
    budget: int


def is_nan(x: Any) -> bool:
    """True for NaN and for what is not a number at all (None, NA, text)."""
    try:
        return math.isnan(float(x))
    except (TypeError, ValueError):
        return True


def to_number(x: Any) -> float:
    """A float, NaN for None/NA/text."""
    return math.nan if is_nan(x) else float(x)


def format_number(x: float) -> str:
    """A trajectory figure for messages and the progress bar: 6 significant digits, nan, ±inf."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.6g}"


def select_row(rows: Sequence[Mapping[str, Any]], objective: str) -> dict[str, Any]:
    """The final choice among full validations (see the package docstring): the passing row with
    the most INT8 (``objective="int8"``) or the lowest latency; with none passing, the best margin."""
    passing = [r for r in rows if r["passed"]]
    if not passing:
        return dict(max(rows, key=lambda r: (r["margin"], r["int8_fraction"], -r["step"])))
    if objective == "latency":
        def key(r: Mapping[str, Any]) -> tuple[float, ...]:
            lat = r["latency_ms"]
            return (-(lat if not is_nan(lat) else math.inf), r["int8_fraction"], r["margin"], -r["step"])
    else:
        def key(r: Mapping[str, Any]) -> tuple[float, ...]:
            lat = r["latency_ms"]
            return (r["int8_fraction"], r["margin"], -(lat if not is_nan(lat) else math.inf), -r["step"])
    return dict(max(passing, key=key))


class Ledger:
    """Measures ``base + pins`` through the plan cache and the budgets, and records every step.

    ``cache``: evaluation key -> Evaluation (seeded from the log, so a rerun replays it);
    ``full_used``: the full validations this search counted against ``budget``; ``rows``: the
    trajectory; ``notes``: what the phases want said; ``extra``: the log's closing records.
    """

    def __init__(self, base: ResolvedPlan, evaluator: Evaluator, options: SearchOptions, threshold: Threshold,
                 log: SearchLog | None, on_step: Callable[[StepEvent], None] | None, progress: bool,
                 save_comparison: bool) -> None:
        self.base = base
        self.evaluator = evaluator
        self.options = options
        self.threshold = threshold
        self.log = log
        self.on_step = on_step
        self.save_comparison = save_comparison and log is not None
        bodies = getattr(evaluator, "int8_body_groups", None)
        self.body_groups = frozenset(bodies(base) if bodies is not None else ())
        self.groups = [g.name for g in base.groups if g.quantizable or g.name in self.body_groups]
        if not self.groups:
            raise SearchError("the model has no quantizable fusion group (no Conv/Gemm/MatMul with float "
                              "inputs, no pooling/Concat/Resize): there is nothing to search")
        self.topo = {g.name: g.topo_index for g in base.groups}
        self.bound = evaluation_bound(len(self.groups))
        self.budget = options.budget if options.budget is not None else self.bound
        self.n = int(evaluator.size)
        if self.n < 1:
            raise SearchError("the validation set is empty: the search needs samples to evaluate plans on")
        self.probe_n = max(1, min(options.probe_samples, self.n // 2)) if self.n > 1 else 1
        self.cache: dict[str, Evaluation] = dict(log.evaluations) if log is not None else {}
        self.margin_cache: dict[tuple[str, int], float] = {}
        for ev in self.cache.values():
            self._remember_margins(ev)
        self.checks: dict[str, ThresholdCheck] = {}
        self.full_used: list[str] = []
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.executed = 0
        self.start = time.perf_counter()
        self.extra: list[dict[str, Any]] = []
        self.bar = None
        if progress:
            self.bar = tqdm(total=self.budget, desc="search", unit="full eval", dynamic_ncols=True, leave=True)

    # ------------------------------------------------------------------ reading evaluations

    def time_left(self) -> bool:
        t = self.options.time_budget_s
        return t is None or time.perf_counter() - self.start < t

    def check(self, ev: Evaluation) -> ThresholdCheck:
        if ev.key not in self.checks:
            self.checks[ev.key] = self.threshold.check(list(ev.rows))
        return self.checks[ev.key]

    def passed(self, ev: Evaluation | None) -> bool:
        return ev is not None and self.check(ev).passed

    def binding(self, ev: Evaluation) -> tuple[str, float, float, float]:
        """(metric, worst value, its ci_low, ci_high) of the condition with the smallest margin."""
        check = self.check(ev)
        cond = min(self.threshold.conditions, key=lambda c: check.margins.get(str(c), math.inf))
        rows = [r for r in ev.rows if not is_nan(r.get(cond.metric))]
        if not rows:
            return cond.metric, math.nan, math.nan, math.nan
        worst = min(rows, key=lambda r: cond.margin(float(r[cond.metric])))
        return (cond.metric, to_number(worst[cond.metric]), to_number(worst.get(f"{cond.metric}_ci_low")),
                to_number(worst.get(f"{cond.metric}_ci_high")))

    def pins_of(self, plan: ResolvedPlan) -> dict[str, str]:
        return {g: plan.precision[g] for g in self.groups if self._pinned(plan, g)}

    def _pinned(self, plan: ResolvedPlan, group: str) -> bool:
        """A quantizable group not in INT8; a group with INT8 bodies that the plan no longer asks INT8 of."""
        return not plan.int8_asked(group) if group in self.body_groups else plan.precision[group] != "int8"

    def int8_fraction(self, plan: ResolvedPlan) -> float:
        """The share of :attr:`groups` left in INT8 (``ResolvedPlan.int8_fraction`` when no body is INT8)."""
        return sum(not self._pinned(plan, g) for g in self.groups) / len(self.groups)

    def known_full(self, pins: Mapping[str, str]) -> tuple[Evaluation | None, bool]:
        """The cached full validation of ``base + pins`` (None: never measured) and whether
        this search already counted it."""
        key = evaluation_key(self.base.with_pins(dict(pins)).plan_hash(), self.n)
        return self.cache.get(key), key in self.full_used

    def best_row(self) -> dict[str, Any] | None:
        full = [r for r in self.rows if r["full"]]
        return select_row(full, self.options.objective) if full else None

    def write_log(self) -> None:
        if self.log is not None:
            self.log.write(self.rows, self.extra)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    # ------------------------------------------------------------------ measuring

    def evaluate(self, phase: str, pins: Mapping[str, str], *, full: bool,
                 local: bool = False) -> Evaluation | None:
        """Measure ``base + pins`` (cached); None when the budget forbids a new full validation."""
        plan = self.base.with_pins(dict(pins)) if pins else self.base
        samples = self.n if full else self.probe_n
        key = evaluation_key(plan.plan_hash(), samples)
        cached = self.cache.get(key)
        if cached is not None and local and cached.local is None:
            cached = None
        t0 = time.perf_counter()
        if cached is None:
            if full and key not in self.full_used and len(self.full_used) >= self.budget:
                return None
            if not self.time_left():
                return None
            ev = self._measure(plan, samples, key, full=full, local=local, t0=t0)
            was_cached = False
        else:
            ev, was_cached = cached, True
        if full and key not in self.full_used:
            self.full_used.append(key)
            if self.bar is not None:
                self.bar.update(1)
        self.record(phase, plan, ev, full=full, cached=was_cached, seconds=time.perf_counter() - t0)
        return ev

    def evaluate_many(self, phase: str, pins: Sequence[Mapping[str, str]],
                      chunk: int = 8) -> list[Evaluation | None]:
        """``base + pins[i]`` on the ranking subset, uncached plans measured ``chunk`` at a time in
        one comparator pass each (``Evaluator.evaluate_many`` when it has one); rows recorded in
        the order asked; None for the plans not measured once time is out."""
        plans = [self.base.with_pins(dict(p)) if p else self.base for p in pins]
        keys = [evaluation_key(p.plan_hash(), self.probe_n) for p in plans]
        many = getattr(self.evaluator, "evaluate_many", None)
        chunk = chunk if many is not None else 1  # one at a time: each is logged as soon as measured
        pending: list[int] = []

        def flush() -> None:
            if not pending or not self.time_left():
                pending.clear()
                return
            t0 = time.perf_counter()
            if many is not None:
                evs = list(many([plans[i] for i in pending], self.probe_n))
            else:
                evs = [self.evaluator.evaluate(plans[i], self.probe_n) for i in pending]
            each = (time.perf_counter() - t0) / len(pending)
            for i, ev in zip(pending, evs, strict=True):
                self._store(dataclasses.replace(ev, seconds=each), keys[i], full=False)
                self.record(phase, plans[i], self.cache[keys[i]], full=False, cached=False, seconds=each)
            pending.clear()

        for i, key in enumerate(keys):
            if key in self.cache:
                flush()
                self.record(phase, plans[i], self.cache[key], full=False, cached=True, seconds=0.0)
            else:
                pending.append(i)
                if len(pending) >= chunk:
                    flush()
        flush()
        return [self.cache.get(k) for k in keys]

    def margins(self, phase: str, pins: Sequence[Mapping[str, str]], indices: Sequence[int],
                chunk: int = 8) -> np.ndarray | None:
        """[plan, sample] margins (``Evaluator.margins``) of ``base + pins[i]`` on the validation
        samples ``indices``: cached per plan and sample, the missing ones measured ``chunk`` plans at
        a time, each plan's measurement one subset row of the trajectory; None once time is out."""
        plans = [self.base.with_pins(dict(p)) if p else self.base for p in pins]
        idx = [int(i) for i in indices]
        hashes = [p.plan_hash() for p in plans]
        todo: dict[tuple[int, ...], list[int]] = {}  # the samples a plan lacks -> those plans
        for h in dict.fromkeys(hashes):
            missing = tuple(i for i in idx if (h, i) not in self.margin_cache)
            if missing:
                todo.setdefault(missing, []).append(hashes.index(h))
        for missing, which in todo.items():
            for a in range(0, len(which), chunk):
                part = which[a:a + chunk]
                if not self.time_left():
                    return None
                t0 = time.perf_counter()
                values = np.asarray(self.evaluator.margins([plans[j] for j in part], list(missing)))
                each = (time.perf_counter() - t0) / len(part)
                for j, row in zip(part, values, strict=True):
                    ev = Evaluation(plan_hash=hashes[j], samples=len(missing), rows=(self._margin_row(row),),
                                    seconds=each, indices=missing, margins=tuple(float(m) for m in row))
                    self._store(ev, ev.key, full=False)
                    self.record(phase, plans[j], ev, full=False, cached=False, seconds=each)
        return np.array([[self.margin_cache[(h, i)] for i in idx] for h in hashes], dtype=np.float64)

    def _margin_row(self, margins: np.ndarray) -> dict[str, Any]:
        """A margin measurement as a trajectory's row: top-1 agreement on those samples, the worst
        margin, and NaN for the threshold's other metrics (a subset never decides pass/fail)."""
        row: dict[str, Any] = {c.metric: math.nan for c in self.threshold.conditions}
        row.update({"candidate": "margins", "output": "margins", "samples": len(margins),
                    "top1_agreement": float(np.mean(margins >= 0) * 100.0) if len(margins) else math.nan,
                    "min_margin": float(np.min(margins)) if len(margins) else math.nan})
        return row

    def _remember_margins(self, ev: Evaluation) -> None:
        if ev.indices is not None and ev.margins is not None:
            for i, m in zip(ev.indices, ev.margins, strict=True):
                self.margin_cache[(ev.plan_hash, int(i))] = float(m)

    def _store(self, ev: Evaluation, key: str, *, full: bool) -> None:
        """Cache and log a new evaluation (with its saved comparison when full)."""
        self.executed += 1
        self.cache[key] = ev
        self._remember_margins(ev)
        if self.log is not None:
            cdir = None
            if full and self.save_comparison and ev.comparison is not None:
                target = self.log.comparison_dir(ev)
                ev.comparison.save(target)
                cdir = str(target.relative_to(self.log.workdir))
            self.log.add(ev, cdir)

    def _measure(self, plan: ResolvedPlan, samples: int, key: str, *, full: bool, local: bool,
                 t0: float) -> Evaluation:
        """Run the evaluator (and the latency for a full validation), cache and log the result."""
        ev = self.evaluator.evaluate(plan, samples, local=local)
        if full and self.options.measure_latency and is_nan(ev.latency_ms):
            ev = dataclasses.replace(ev, latency_ms=float(self.evaluator.latency(plan)))
        ev = dataclasses.replace(ev, seconds=time.perf_counter() - t0)
        self._store(ev, key, full=full)
        return ev

    def record(self, phase: str, plan: ResolvedPlan, ev: Evaluation, *, full: bool, cached: bool,
               seconds: float) -> None:
        """Append the trajectory row of ``ev``, rewrite the log, tell the progress bar and ``on_step``."""
        check = self.check(ev)
        metric, value, lo, hi = self.binding(ev)
        pins = self.pins_of(plan)
        order = sorted(pins, key=lambda g: self.topo[g])
        row = {
            "step": len(self.rows) + 1, "phase": phase, "plan_hash": ev.plan_hash,
            "pinned": ",".join(order), "n_pinned": len(order), "int8_fraction": self.int8_fraction(plan),
            "metric": metric, "value": value, "ci_low": lo, "ci_high": hi, "passed": bool(check.passed),
            "samples": ev.samples, "full": bool(full), "latency_ms": float(ev.latency_ms), "cached": cached,
            "seconds": round(seconds, 4), "pins": ",".join(f"{g}={pins[g]}" for g in order),
            "margin": float(check.margin),
            "only_int8": ",".join(g for g in self.groups if g not in pins) if phase == "rank-isolated" else "",
        }
        self.rows.append(row)
        self.write_log()
        best = self.best_row()
        if self.bar is not None:
            shown = format_number(best["value"]) if best else "-"
            self.bar.set_postfix_str(f"{phase} {metric}={format_number(value)} best={shown}")
        if self.on_step is not None:
            self.on_step(StepEvent(row=dict(row), best=best, full_used=len(self.full_used), budget=self.budget))

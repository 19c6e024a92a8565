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

trajectory columns: step, phase ("all-int8" | "probe" | "bisect" | "fp16-tier" | "return-int8" |
"final"), plan_hash, pinned (comma-joined groups), n_pinned, int8_fraction, metric, value,
ci_low, ci_high, passed, samples (the subset size: probes use fewer), full (bool: counts
against the bound of ceil(log2 G) + 5 full validations), latency_ms (mean, NaN when not
measured), cached (bool), seconds. Added: pins (group=precision, comma-joined), margin (the
threshold's smallest margin: negative when missed).

sensitivity columns: rank, group, anchor_op, nodes, local_sqnr_db (from the comparator's
local mode), probe_value (the metric with only this group pinned, NaN when not probed), score.
Added: probed, probe_margin_gain. ``score`` is the end-to-end SQNR gain in dB that pinning the
group alone bought on the probe subset (NaN when not probed).

The search, step by step (G = number of quantizable fusion groups)::

    all-int8     1 full validation; stop when it meets the threshold
    rank         1 subset compare of the all-INT8 plan with the comparator's local per-layer
                 errors: groups ordered by local SQNR (lowest first); then each of the top
                 ``probe_top`` is pinned alone and measured on the subset ("probe"): groups
                 whose pinning raised the threshold's margin come first, then those that
                 raised the output SQNR, then the unprobed ones in local order, then the
                 probed groups that made no difference
    bisect       the smallest prefix of the ranking whose pinning (at ``fallback``) meets the
                 threshold: a first guess (1 when the top group's probe passed, else the
                 number of probed groups that measurably helped, else G), G when the guess
                 fails, then bisection between the largest failing and the smallest passing
                 prefix;
                 if pinning all G fails at fp16, the same at fp32; a pass below a fail
                 (non-monotone) is recorded in the notes and the search keeps only plans
                 that passed a full validation themselves
    fp16-tier    when the prefix needed fp32: every pinned group at fp16, else all but the
                 most sensitive one
    return-int8  pinned groups back to INT8 one at a time, least sensitive first, while the
                 budget lasts (screened on the subset when the budget cannot try them all)
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
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd

from .compare import CompareResult
from .data import DataSet
from .errors import SearchError
from .graph import LoadedModel
from .plan import ResolvedPlan
from .quantize import WrittenModel
from .table import CalibrationTable
from .threshold import Threshold, ThresholdCheck, parse_threshold
from .version import __version__

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
    "LOG_FILE",
    "LOG_FORMAT",
]

LOG_FORMAT = "quantlab.search-log/1"
LOG_FILE = "search_log.jsonl"
RESULT_FORMAT = "quantlab.search/1"

TRAJECTORY_COLUMNS: tuple[str, ...] = (
    "step", "phase", "plan_hash", "pinned", "n_pinned", "int8_fraction", "metric", "value", "ci_low",
    "ci_high", "passed", "samples", "full", "latency_ms", "cached", "seconds", "pins", "margin",
)
SENSITIVITY_COLUMNS: tuple[str, ...] = (
    "rank", "group", "anchor_op", "nodes", "local_sqnr_db", "probe_value", "score", "probed",
    "probe_margin_gain",
)

_SQNR_EFFECT_DB = 0.1
"""An output-SQNR gain (dB) below this from pinning one group counts as no effect."""


@dataclass(frozen=True)
class SearchOptions:
    """Settings of one search; every default is defined here once.

    ``budget``: the most full validations (None: ceil(log2 G) + 5, G = quantizable groups).
    ``time_budget_s``: no new evaluation starts after this many seconds (this run).
    ``probe_samples``: the subset (first N samples, at most half the set) used for the
    ranking compare, the single-group probes and return-to-INT8 screening.
    ``fp16_simulation``: write evaluated candidates with fp16 tensors rounded in float32
    kernels (None: when the backend is ONNX Runtime, whose CPU kernels would not round a
    native fp16 model's activations); the final model is always written natively.
    ``latency``: measure each full validation's latency (None: with ``objective="latency"``).
    ``metric``: a ``module:function`` user metric for the comparator (thresholds may name it).
    """

    threshold: str
    backend: str = "ort"
    target: str = "tensorrt"                 # the writer's Q/DQ form (quantlab.quantize.Target)
    fallback: Literal["fp16", "fp32"] = "fp16"  # the tier tried first for pinned groups
    budget: int | None = None                # max full validations; None = ceil(log2 G) + 5
    time_budget_s: float | None = None
    objective: Literal["int8", "latency"] = "int8"
    probe_samples: int = 64                  # validation subset for single-group probes
    probe_top: int = 8                       # groups probed alone (the top of the local ranking)
    batch_size: int = 8
    seed: int = 0
    fp16_simulation: bool | None = None
    latency: bool | None = None
    latency_iterations: int = 20
    metric: str | None = None

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    @property
    def simulate_fp16(self) -> bool:
        return self.backend in ("ort", "onnxruntime") if self.fp16_simulation is None else self.fp16_simulation

    @property
    def measure_latency(self) -> bool:
        return self.objective == "latency" if self.latency is None else self.latency

    def check(self) -> None:
        """Raise SearchError on settings the search cannot use."""
        problems = []
        if self.fallback not in ("fp16", "fp32"):
            problems.append(f"fallback must be 'fp16' or 'fp32', got {self.fallback!r}")
        if self.objective not in ("int8", "latency"):
            problems.append(f"objective must be 'int8' or 'latency', got {self.objective!r}")
        if self.target not in ("tensorrt", "ort"):
            problems.append(f"target must be 'tensorrt' or 'ort', got {self.target!r}")
        if self.budget is not None and (not isinstance(self.budget, int) or self.budget < 1):
            problems.append(f"budget must be a whole number of full validations >= 1 (or None), got {self.budget!r}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            problems.append(f"time_budget_s must be > 0 seconds (or None), got {self.time_budget_s!r}")
        for key in ("probe_samples", "batch_size", "latency_iterations"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                problems.append(f"{key} must be a whole number >= 1, got {getattr(self, key)!r}")
        if not isinstance(self.probe_top, int) or self.probe_top < 0:
            problems.append(f"probe_top must be a whole number >= 0, got {self.probe_top!r}")
        if problems:
            raise SearchError("search options: " + "; ".join(problems))


def evaluation_bound(groups: int) -> int:
    """ceil(log2 G) + 5 full validations for G quantizable groups (5 when G <= 1)."""
    return (math.ceil(math.log2(groups)) if groups > 1 else 0) + 5


# --------------------------------------------------------------------------- evaluations


@dataclass(frozen=True)
class Evaluation:
    """One plan measured on the first ``samples`` samples of the validation set.

    ``rows``: the comparator's end-to-end rows (one per model output) as plain dicts, what
    the threshold is checked on. ``local``: group -> lowest local SQNR (dB) of its layers,
    only for the ranking evaluation. ``latency_ms``: mean latency of one batch (NaN when
    not measured). ``comparison``: the full CompareResult when in memory (not logged).
    """

    plan_hash: str
    samples: int
    rows: tuple[Mapping[str, Any], ...]
    local: Mapping[str, float] | None = None
    latency_ms: float = math.nan
    seconds: float = 0.0
    comparison: Any = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> str:
        return evaluation_key(self.plan_hash, self.samples)

    def to_record(self) -> dict[str, Any]:
        return {"plan_hash": self.plan_hash, "samples": self.samples, "rows": [dict(r) for r in self.rows],
                "local": None if self.local is None else dict(self.local), "latency_ms": self.latency_ms,
                "seconds": self.seconds}

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Evaluation:
        local = data.get("local")
        return cls(plan_hash=str(data["plan_hash"]), samples=int(data["samples"]),
                   rows=tuple(dict(r) for r in data["rows"]),
                   local=None if local is None else {str(k): float(v) for k, v in local.items()},
                   latency_ms=float(data.get("latency_ms", math.nan)), seconds=float(data.get("seconds", 0.0)))


def evaluation_key(plan_hash: str, samples: int) -> str:
    """The cache key of an evaluation: the plan and how many samples it saw."""
    return f"{plan_hash}@{samples}"


class Evaluator(Protocol):
    """What the search needs to measure a plan; :class:`CompareEvaluator` is the real one.

    ``size``: samples in the validation set (a full validation uses all of them).
    ``evaluate(plan, samples, local=...)``: the plan's end-to-end rows on the first
    ``samples`` samples; with ``local`` also each group's local SQNR.
    ``latency(plan)``: mean milliseconds of one batch of the plan's deployable model.
    """

    @property
    def size(self) -> int: ...

    def evaluate(self, plan: ResolvedPlan, samples: int, *, local: bool = False) -> Evaluation: ...

    def latency(self, plan: ResolvedPlan) -> float: ...


# --------------------------------------------------------------------------- the log


def _line(record: Mapping[str, Any]) -> str:
    from .atomic import json_default

    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=True, default=json_default)


def _normalise(obj: Any) -> Any:
    """What ``obj`` becomes after a JSON round trip (tuples -> lists...), for comparing settings."""
    return json.loads(_line({"v": obj}))["v"]


class SearchLog:
    """``workdir/search_log.jsonl``: settings, evaluations and trajectory, rewritten after every step.

    Opening an existing log checks that it was written with the same ``settings``
    (SearchError naming the differences otherwise) and loads its evaluations, which the
    search then reuses instead of measuring again. Full validations' comparator results
    are saved beside it (``evaluations/<plan>-<samples>/``) so a resumed search can still
    return the final candidate's comparison.
    """

    def __init__(self, workdir: str | Path, settings: Mapping[str, Any]) -> None:
        self.workdir = Path(workdir)
        self.path = self.workdir / LOG_FILE
        self.settings = _normalise(dict(settings))
        self.evaluations: dict[str, Evaluation] = {}
        self.comparison_dirs: dict[str, str] = {}
        self._order: list[str] = []
        self._resumed = 0
        if self.path.is_file():
            self._load()

    @property
    def resumed(self) -> int:
        """How many evaluations were read from an earlier run's log."""
        return self._resumed

    def _load(self) -> None:
        header: dict[str, Any] | None = None
        lines = self.path.read_text(encoding="utf-8").splitlines()
        for number, text in enumerate(lines, 1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except ValueError:
                raise SearchError(f"{self.path}:{number}: not a JSON line; the search log is damaged. Delete "
                                  f"{self.path} (or use another workdir) to start the search over.") from None
            kind = record.get("type")
            if header is None:
                if kind != "header" or record.get("format") != LOG_FORMAT:
                    raise SearchError(f"{self.path}: not a quantlab search log (first line is not a "
                                      f"{LOG_FORMAT!r} header); use another workdir")
                header = record
                self._check_settings(record.get("settings", {}))
            elif kind == "evaluation":
                ev = Evaluation.from_record(record)
                self.evaluations[ev.key] = ev
                self._order.append(ev.key)
                if record.get("comparison"):
                    self.comparison_dirs[ev.key] = str(record["comparison"])
        self._resumed = len(self.evaluations)

    def _check_settings(self, old: Mapping[str, Any]) -> None:
        was, now = _flatten(old), _flatten(self.settings)
        differ = [k for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
        if differ:
            shown = "; ".join(f"{k}: logged {_short(was.get(k))}, now {_short(now.get(k))}" for k in differ[:6])
            raise SearchError(
                f"{self.path} was written by a search with other settings ({shown}). Its evaluations "
                f"do not apply: use another workdir, or delete {self.path} to start over."
            )

    def add(self, ev: Evaluation, comparison_dir: str | None = None) -> None:
        if ev.key not in self.evaluations:
            self._order.append(ev.key)
        self.evaluations[ev.key] = ev
        if comparison_dir:
            self.comparison_dirs[ev.key] = comparison_dir

    def comparison_dir(self, ev: Evaluation) -> Path:
        return self.workdir / "evaluations" / f"{ev.plan_hash[:16]}-{ev.samples}"

    def write(self, rows: Sequence[Mapping[str, Any]], extra: Sequence[Mapping[str, Any]] = ()) -> Path:
        """Rewrite the whole log atomically: header, evaluations, then trajectory rows and ``extra``."""
        from .atomic import write_text

        lines = [_line({"type": "header", "format": LOG_FORMAT, "settings": self.settings})]
        for key in self._order:
            rec = {"type": "evaluation", **self.evaluations[key].to_record(),
                   "comparison": self.comparison_dirs.get(key)}
            lines.append(_line(rec))
        lines += [_line({"type": "step", **dict(r)}) for r in rows]
        lines += [_line(dict(r)) for r in extra]
        return write_text(self.path, "\n".join(lines) + "\n")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys, so a refusal names the exact setting that differs."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- bisection


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


# --------------------------------------------------------------------------- the search logic


@dataclass(frozen=True)
class StepEvent:
    """Sent to ``on_step`` after every step: the trajectory row and the best plan so far."""

    row: Mapping[str, Any]
    best: Mapping[str, Any] | None
    full_used: int
    budget: int


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


@dataclass
class _Probe:
    value: float
    margin_gain: float
    sqnr_gain: float
    passed: bool


def _sqnr(rows: Sequence[Mapping[str, Any]]) -> float:
    vals = [float(r["sqnr_db"]) for r in rows if r.get("sqnr_db") is not None and not _isnan(r.get("sqnr_db"))]
    return min(vals) if vals else math.nan


def _isnan(x: Any) -> bool:
    try:
        return math.isnan(float(x))
    except (TypeError, ValueError):
        return True


def _num(x: Any) -> float:
    """A float, NaN for None/NA/text."""
    return math.nan if _isnan(x) else float(x)


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.6g}"


class _Run:
    """One search over ``evaluator``; see the module docstring for the steps."""

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
        self.groups = [g.name for g in base.groups if g.quantizable]
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
        self.checks: dict[str, ThresholdCheck] = {}
        self.full_used: list[str] = []
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.executed = 0
        self.start = time.perf_counter()
        self.local: dict[str, float] = {}
        self.probes: dict[str, _Probe] = {}
        self.ranking: list[str] = []
        self.effective: set[str] = set()
        self.extra: list[dict[str, Any]] = []
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.budget, desc="search", unit="full eval", dynamic_ncols=True, leave=True)

    # ------------------------------------------------------------------ bookkeeping

    def _time_left(self) -> bool:
        t = self.options.time_budget_s
        return t is None or time.perf_counter() - self.start < t

    def _check(self, ev: Evaluation) -> ThresholdCheck:
        if ev.key not in self.checks:
            self.checks[ev.key] = self.threshold.check(list(ev.rows))
        return self.checks[ev.key]

    def _binding(self, ev: Evaluation) -> tuple[str, float, float, float]:
        """(metric, worst value, its ci_low, ci_high) of the condition with the smallest margin."""
        check = self._check(ev)
        cond = min(self.threshold.conditions, key=lambda c: check.margins.get(str(c), math.inf))
        rows = [r for r in ev.rows if not _isnan(r.get(cond.metric))]
        if not rows:
            return cond.metric, math.nan, math.nan, math.nan
        worst = min(rows, key=lambda r: cond.margin(float(r[cond.metric])))
        return (cond.metric, _num(worst[cond.metric]), _num(worst.get(f"{cond.metric}_ci_low")),
                _num(worst.get(f"{cond.metric}_ci_high")))

    def _pins_of(self, plan: ResolvedPlan) -> dict[str, str]:
        return {g: plan.precision[g] for g in self.groups if plan.precision[g] != "int8"}

    def _best_row(self) -> dict[str, Any] | None:
        full = [r for r in self.rows if r["full"]]
        return self._select(full) if full else None

    def _select(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The final choice among full validations (see the module docstring)."""
        passing = [r for r in rows if r["passed"]]
        if not passing:
            return dict(max(rows, key=lambda r: (r["margin"], r["int8_fraction"], -r["step"])))
        if self.options.objective == "latency":
            def key(r: Mapping[str, Any]) -> tuple[float, ...]:
                lat = r["latency_ms"]
                return (-(lat if not _isnan(lat) else math.inf), r["int8_fraction"], r["margin"], -r["step"])
        else:
            def key(r: Mapping[str, Any]) -> tuple[float, ...]:
                lat = r["latency_ms"]
                return (r["int8_fraction"], r["margin"], -(lat if not _isnan(lat) else math.inf), -r["step"])
        return dict(max(passing, key=key))

    def _write_log(self) -> None:
        if self.log is not None:
            self.log.write(self.rows, self.extra)

    # ------------------------------------------------------------------ evaluation

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
            if not self._time_left():
                return None
            ev = self.evaluator.evaluate(plan, samples, local=local)
            if full and self.options.measure_latency and _isnan(ev.latency_ms):
                ev = dataclasses.replace(ev, latency_ms=float(self.evaluator.latency(plan)))
            ev = dataclasses.replace(ev, seconds=time.perf_counter() - t0)
            self.executed += 1
            self.cache[key] = ev
            if self.log is not None:
                cdir = None
                if full and self.save_comparison and ev.comparison is not None:
                    target = self.log.comparison_dir(ev)
                    ev.comparison.save(target)
                    cdir = str(target.relative_to(self.log.workdir))
                self.log.add(ev, cdir)
            was_cached = False
        else:
            ev, was_cached = cached, True
        if full and key not in self.full_used:
            self.full_used.append(key)
            if self.bar is not None:
                self.bar.update(1)
        self._record(phase, plan, ev, full=full, cached=was_cached, seconds=time.perf_counter() - t0)
        return ev

    def _record(self, phase: str, plan: ResolvedPlan, ev: Evaluation, *, full: bool, cached: bool,
                seconds: float) -> None:
        check = self._check(ev)
        metric, value, lo, hi = self._binding(ev)
        pins = self._pins_of(plan)
        order = sorted(pins, key=lambda g: self.topo[g])
        row = {
            "step": len(self.rows) + 1, "phase": phase, "plan_hash": ev.plan_hash,
            "pinned": ",".join(order), "n_pinned": len(order), "int8_fraction": plan.int8_fraction(),
            "metric": metric, "value": value, "ci_low": lo, "ci_high": hi, "passed": bool(check.passed),
            "samples": ev.samples, "full": bool(full), "latency_ms": float(ev.latency_ms), "cached": cached,
            "seconds": round(seconds, 4), "pins": ",".join(f"{g}={pins[g]}" for g in order),
            "margin": float(check.margin),
        }
        self.rows.append(row)
        self._write_log()
        best = self._best_row()
        if self.bar is not None:
            self.bar.set_postfix_str(f"{phase} {metric}={_fmt(value)} best={_fmt(best['value']) if best else '-'}")
        if self.on_step is not None:
            self.on_step(StepEvent(row=dict(row), best=best, full_used=len(self.full_used), budget=self.budget))

    def passed(self, ev: Evaluation | None) -> bool:
        return ev is not None and self._check(ev).passed

    # ------------------------------------------------------------------ phases

    def run(self) -> SearchOutcome:
        try:
            base_ev = self.evaluate("all-int8", {}, full=True)
            if base_ev is None:
                raise SearchError("the search could not run its first evaluation (the all-INT8 plan): "
                                  "the time budget is already spent")
            if not self.passed(base_ev):
                self.rank()
                pins = self.bisect()
                if pins is not None:
                    pins = self.fp16_tier(pins)
                    self.return_int8(pins)
            return self.finish()
        finally:
            if self.bar is not None:
                self.bar.close()

    def rank(self) -> None:
        fallback = self.options.fallback
        sub = self.evaluate("probe", {}, full=False, local=True)
        if sub is None:
            self.notes.append("the time budget ran out before the ranking: groups are in topological order")
            self.ranking = sorted(self.groups, key=lambda g: self.topo[g])
            return
        local = dict(sub.local or {})
        self.local = {g: float(local[g]) for g in self.groups if g in local}
        missing = [g for g in self.groups if g not in self.local]
        if len(missing) == len(self.groups):
            self.notes.append("the comparator reported no local per-layer error: the ranking rests on the "
                              "probes and the topological order")

        def local_key(g: str) -> tuple[float, int]:
            v = self.local.get(g, math.nan)
            return (math.inf if _isnan(v) else v, self.topo[g])

        by_local = sorted(self.groups, key=local_key)
        base_margin = self._check(sub).margin
        base_sqnr = _sqnr(sub.rows)
        for g in by_local[: self.options.probe_top]:
            ev = self.evaluate("probe", {g: fallback}, full=False)
            if ev is None:
                self.notes.append("the time budget ran out during the probes; the rest keep their local order")
                break
            metric, value, _, _ = self._binding(ev)
            margin = self._check(ev).margin
            gain = margin - base_margin if math.isfinite(margin) and math.isfinite(base_margin) else 0.0
            s = _sqnr(ev.rows)
            sgain = s - base_sqnr if math.isfinite(s) and math.isfinite(base_sqnr) else 0.0
            self.probes[g] = _Probe(value=value, margin_gain=gain, sqnr_gain=sgain, passed=self._check(ev).passed)
        # "helped": the threshold's margin rose, and (when the outputs have an SQNR) by more than noise
        def effect(p: _Probe) -> bool:
            return p.sqnr_gain >= _SQNR_EFFECT_DB or not math.isfinite(base_sqnr)

        helped = [g for g, p in self.probes.items() if p.margin_gain > 0 and effect(p)]
        raised = [g for g, p in self.probes.items() if g not in helped and p.sqnr_gain >= _SQNR_EFFECT_DB]
        helped.sort(key=lambda g: (-self.probes[g].margin_gain, -self.probes[g].sqnr_gain, local_key(g)))
        raised.sort(key=lambda g: (-self.probes[g].sqnr_gain, local_key(g)))
        idle = [g for g in by_local if g in self.probes and g not in helped and g not in raised]
        rest = [g for g in by_local if g not in self.probes]
        self.ranking = helped + raised + rest + idle
        self.effective = set(helped) | set(raised)
        self.extra = [{"type": "sensitivity", "records": self.sensitivity().to_dict("records")}]
        self._write_log()

    def _prefix(self, k: int, tier: str) -> dict[str, str]:
        return {g: tier for g in self.ranking[:k]}

    def bisect(self) -> dict[str, str] | None:
        """The pinned groups (group -> precision) of the smallest passing prefix, or None."""
        tiers = [self.options.fallback] + (["fp32"] if self.options.fallback == "fp16" else [])
        size = len(self.ranking)
        for tier in tiers:
            budget_out = False

            def passes(k: int, tier: str = tier) -> bool | None:
                nonlocal budget_out
                ev = self.evaluate("bisect", self._prefix(k, tier), full=True)
                if ev is None:
                    budget_out = True
                    return None
                return self._check(ev).passed

            first = self._first_guess(size) if tier == self.options.fallback else size
            k, seen, violations = bisect_prefix(passes, size, first=first)
            for a, b in violations:
                self.notes.append(f"non-monotone at {tier}: pinning the first {a} ranked groups meets the threshold "
                                  f"but the first {b} do not; only plans that passed a full validation are kept")
            if budget_out:
                self.notes.append(f"the budget ({self.budget} full validations) or the time budget ran out during "
                                  f"the bisection at {tier}" + ("" if k is None else
                                                                f"; the smallest passing prefix measured is {k}"))
                return self._prefix(k, tier) if k is not None else None
            if k is not None:
                return self._prefix(k, tier)
            self.notes.append(f"pinning every quantizable group at {tier} does not meet the threshold")
        return None

    def _first_guess(self, size: int) -> int:
        """The first prefix to validate: 1 when the top group alone passed its probe, else the
        probed groups that measurably helped (they head the ranking), else every group."""
        top = self.ranking[0] if self.ranking else None
        if top in self.probes and self.probes[top].passed:
            return 1
        effective = 0
        for g in self.ranking:
            if g not in self.effective:
                break
            effective += 1
        return effective if 0 < effective < size else size

    def fp16_tier(self, pins: dict[str, str]) -> dict[str, str]:
        if not pins or all(p == "fp16" for p in pins.values()):
            return pins
        order = [g for g in self.ranking if g in pins]
        candidates = [{g: "fp16" for g in order}]
        if len(order) > 1:
            candidates.append({g: ("fp32" if i == 0 else "fp16") for i, g in enumerate(order)})
        for cand in candidates:
            ev = self.evaluate("fp16-tier", cand, full=True)
            if ev is None:
                self.notes.append("the budget ran out before the FP16 tier was tried")
                break
            if self.passed(ev):
                return cand
        return pins

    def return_int8(self, pins: dict[str, str]) -> None:
        current = dict(pins)
        order = [g for g in reversed(self.ranking) if g in current]
        for i, g in enumerate(order):
            cand = {k: v for k, v in current.items() if k != g}
            if not cand:
                continue  # the all-INT8 plan: already measured, and it failed
            left = self.budget - len(self.full_used)
            remaining = len(order) - i
            plan_hash = self.base.with_pins(cand).plan_hash()
            known = self.cache.get(evaluation_key(plan_hash, self.n))
            if known is not None and evaluation_key(plan_hash, self.n) in self.full_used and not self.passed(known):
                continue  # measured in this search (e.g. a shorter prefix) and it failed
            if known is None and left <= 0:
                self.notes.append(f"the budget ({self.budget} full validations) ran out while returning pinned "
                                  f"groups to INT8; {remaining} not tried")
                break
            if known is None and left < remaining:
                screen = self.evaluate("return-int8", cand, full=False)
                if screen is None:
                    break
                if not self.passed(screen):
                    continue
            ev = self.evaluate("return-int8", cand, full=True)
            if ev is None:
                break
            if self.passed(ev):
                current = cand

    # ------------------------------------------------------------------ result

    def sensitivity(self) -> pd.DataFrame:
        groups = self.base.group_map
        recs = []
        for rank, g in enumerate(self.ranking, 1):
            p = self.probes.get(g)
            recs.append({
                "rank": rank, "group": g, "anchor_op": groups[g].anchor_op, "nodes": ", ".join(groups[g].nodes),
                "local_sqnr_db": self.local.get(g, math.nan),
                "probe_value": p.value if p else math.nan, "score": p.sqnr_gain if p else math.nan,
                "probed": p is not None, "probe_margin_gain": p.margin_gain if p else math.nan,
            })
        return pd.DataFrame(recs, columns=list(SENSITIVITY_COLUMNS))

    def finish(self) -> SearchOutcome:
        full = [r for r in self.rows if r["full"]]
        chosen = self._select(full)
        key = evaluation_key(chosen["plan_hash"], self.n)
        ev = self.cache[key]
        plan = self.base.with_pins(_parse_pins(chosen["pins"])) if chosen["pins"] else self.base
        if plan.plan_hash() != chosen["plan_hash"]:  # pragma: no cover - internal consistency
            raise SearchError("internal error: the chosen plan does not reproduce its hash")
        self._record("final", plan, ev, full=True, cached=True, seconds=0.0)
        met = bool(chosen["passed"])
        message = self._message(met, chosen, plan)
        self.extra = [{"type": "sensitivity", "records": self.sensitivity().to_dict("records")},
                      {"type": "end", "met": met, "plan_hash": plan.plan_hash(), "message": message,
                       "notes": list(self.notes), "full_validations": len(self.full_used)}]
        self._write_log()
        trajectory = pd.DataFrame(self.rows, columns=list(TRAJECTORY_COLUMNS))
        return SearchOutcome(met=met, plan=plan, evaluation=ev, trajectory=trajectory,
                             sensitivity=self.sensitivity(), evaluations=len(self.full_used), bound=self.bound,
                             budget=self.budget, message=message, notes=tuple(self.notes),
                             executed=self.executed, resumed=self.log.resumed if self.log is not None else 0)

    def _message(self, met: bool, chosen: Mapping[str, Any], plan: ResolvedPlan) -> str:
        t = self.threshold.text
        figure = f"{chosen['metric']} = {_fmt(chosen['value'])}"
        if not _isnan(chosen["ci_low"]):
            figure += f" [{_fmt(chosen['ci_low'])}, {_fmt(chosen['ci_high'])}]"
        used = f"{len(self.full_used)} full validation(s) of at most {self.budget}"
        if met and not chosen["pinned"]:
            return f"the all-INT8 plan meets {t!r} ({figure}); nothing pinned; {used}"
        pins = _parse_pins(chosen["pins"])
        tiers = ", ".join(f"{sum(v == p for v in pins.values())} at {p}" for p in ("fp16", "fp32")
                          if any(v == p for v in pins.values()))
        if met:
            return (f"pinned {len(pins)} of {len(self.groups)} quantizable groups ({tiers}: {chosen['pinned']}); "
                    f"INT8 on {plan.int8_fraction():.0%} of them; {figure} meets {t!r}; {used}")
        every = any(r["full"] and r["n_pinned"] == len(self.groups) for r in self.rows)
        why = ("no plan meets it, not even with every quantizable group pinned (the threshold is tighter than "
               "the FP16/FP32 noise of this backend, or the metric cannot reach it)" if every else
               "the budget ran out before a plan met it")
        return (f"{t!r} is not met: {why}. Returning the best plan measured ({figure}, "
                f"{len(pins)} group(s) pinned, INT8 on {plan.int8_fraction():.0%}); {used}")


def _parse_pins(text: str) -> dict[str, str]:
    out = {}
    for part in text.split(","):
        if part:
            name, _, p = part.rpartition("=")
            out[name] = p
    return out


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
    """The search logic on any evaluator, from the all-INT8 ``base`` plan (see the module docstring)."""
    options.check()
    threshold = parse_threshold(options.threshold)
    return _Run(base, evaluator, options, threshold, log, on_step, progress, save_comparisons).run()


# --------------------------------------------------------------------------- the real evaluator


class CompareEvaluator:
    """Writes each plan (:func:`quantlab.quantize.write_model`) and measures it with the comparator.

    Candidates are written with ``fp16_simulation`` when the options ask (ONNX Runtime),
    so their FP16 groups are rounded as a GPU would round them; latency is measured on the
    deployable form (no simulation) with :func:`quantlab.perf.measure_latency` on the first
    batch of the validation set.
    """

    def __init__(self, model: LoadedModel, table: CalibrationTable, dataset: DataSet, options: SearchOptions) -> None:
        from .quantize import WriteOptions

        self.model = model
        self.table = table
        self.dataset = dataset
        self.options = options
        self.write_options = WriteOptions(target=options.target, fp16_simulation=options.simulate_fp16)  # type: ignore[arg-type]
        self.deploy_options = WriteOptions(target=options.target)  # type: ignore[arg-type]
        self._size = len(dataset)
        self._feeds: dict[str, np.ndarray] | None = None

    @property
    def size(self) -> int:
        return self._size

    def candidate_name(self, plan: ResolvedPlan) -> str:
        return f"plan-{plan.plan_hash()[:12]}"

    def write(self, plan: ResolvedPlan, *, deploy: bool = False) -> WrittenModel:
        from .quantize import write_model

        return write_model(self.model, plan, self.table, self.deploy_options if deploy else self.write_options)

    def evaluate(self, plan: ResolvedPlan, samples: int, *, local: bool = False) -> Evaluation:
        from .compare import CompareOptions, compare

        written = self.write(plan)
        opts = CompareOptions(backend=self.options.backend, batch_size=self.options.batch_size, per_layer=local,
                              local=local, accumulated=False, max_samples=None if samples >= self._size else samples,
                              metric=self.options.metric, seed=self.options.seed)
        result = compare(self.model, {self.candidate_name(plan): written}, self.dataset, opts)
        rows = tuple({k: _plain_value(v) for k, v in r.items()} for r in result.end_to_end.to_dict("records"))
        local_map = _local_errors(result.per_layer) if local else None
        return Evaluation(plan_hash=plan.plan_hash(), samples=min(samples, self._size), rows=rows, local=local_map,
                          comparison=result)

    def latency(self, plan: ResolvedPlan) -> float:
        from .backends import get_backend
        from .perf import measure_latency

        written = self.write(plan, deploy=True)
        runner = get_backend(self.options.backend).build(written.proto)
        try:
            if self._feeds is None:
                batch = next(iter(self.dataset.batches(self.options.batch_size)))
                self._feeds = dict(batch.feeds)
            return measure_latency(runner, self._feeds, warmup=3, iterations=self.options.latency_iterations).mean_ms
        finally:
            runner.close()


def _plain_value(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if v is pd.NA:
        return None
    return v


def _local_errors(per_layer: pd.DataFrame) -> dict[str, float]:
    """group -> the lowest local SQNR (dB) of its layers, from the comparator's per-layer table."""
    if per_layer is None or per_layer.empty or "group" not in per_layer.columns:
        return {}
    df = per_layer
    if "mode" in df.columns:
        df = df[df["mode"] == "local"]
    if "precision" in df.columns:
        df = df[df["precision"] == "int8"]
    df = df[df["group"].notna()]
    out = df.groupby("group", sort=False)["sqnr_db"].min()
    return {str(k): float(v) for k, v in out.items()}


# --------------------------------------------------------------------------- the API


@dataclass(frozen=True)
class SearchResult:
    met: bool
    plan: ResolvedPlan
    final: WrittenModel
    comparison: CompareResult
    trajectory: pd.DataFrame
    sensitivity: pd.DataFrame
    evaluations: int                          # full validations used
    bound: int                                # ceil(log2 G) + 5
    message: str = ""
    settings: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    budget: int = 0
    executed: int = 0                         # evaluations run by this call (the rest came from the log)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        counts = self.plan.counts()
        pins = {g.name: self.plan.precision[g.name] for g in self.plan.groups
                if g.quantizable and self.plan.precision[g.name] != "int8"}
        final_row = self.trajectory.iloc[-1].to_dict() if len(self.trajectory) else {}
        check = None
        try:
            checks = self.comparison.check(str(self.settings.get("threshold", "")))
            check = next(iter(checks.values())).as_dict() if checks else None
        except Exception:  # noqa: BLE001 - the record must be writable even when the check is not
            check = None
        return {
            "format": RESULT_FORMAT,
            "met": self.met,
            "message": self.message,
            "notes": list(self.notes),
            "threshold": self.settings.get("threshold"),
            "plan_hash": self.plan.plan_hash(),
            "int8_fraction": self.plan.int8_fraction(),
            "group_counts": counts,
            "quantizable_groups": sum(g.quantizable for g in self.plan.groups),
            "pinned": pins,
            "final": {k: _plain_value(final_row.get(k)) for k in ("metric", "value", "ci_low", "ci_high",
                                                                  "margin", "latency_ms", "samples")},
            "check": check,
            "evaluations": self.evaluations,
            "bound": self.bound,
            "budget": self.budget,
            "executed": self.executed,
            "seconds": round(self.seconds, 3),
            "model_sha256": self.final.source_sha256,
            "final_model_sha256": self.final.sha256,
            "settings": dict(self.settings),
            "trajectory": [{k: _plain_value(v) for k, v in r.items()} for r in self.trajectory.to_dict("records")],
            "sensitivity": [{k: _plain_value(v) for k, v in r.items()} for r in self.sensitivity.to_dict("records")],
        }

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """plan.json / plan.toml, final/ (model, provenance, plan), trajectory and sensitivity
        (.csv, .parquet), final_compare/ (the comparator's result) and search.json."""
        from .atomic import atomic_path, write_json
        from .plan import save_plan
        from .quantize import save_written

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        description = f"quantlab search for {self.settings.get('threshold', '')!r}: {self.message}"
        plan = self.plan.to_plan(description)
        paths = {
            "plan": save_plan(plan, out / "plan.json", groups=self.plan.groups),
            "plan_toml": save_plan(plan, out / "plan.toml", groups=self.plan.groups),
        }
        paths.update({f"final_{k}": v for k, v in save_written(self.final, out / "final").items()})
        for name, frame in (("trajectory", self.trajectory), ("sensitivity", self.sensitivity)):
            with atomic_path(out / f"{name}.csv") as tmp:
                frame.to_csv(tmp, index=False)
            paths[name] = out / f"{name}.csv"
            with atomic_path(out / f"{name}.parquet") as tmp:
                frame.to_parquet(tmp, index=False)
            paths[f"{name}_parquet"] = out / f"{name}.parquet"
        if self.comparison is not None:
            self.comparison.save(out / "final_compare")
            paths["final_compare"] = out / "final_compare"
        paths["search"] = write_json(out / "search.json", self.to_dict())
        return paths


def search_settings(model: LoadedModel, table: CalibrationTable, dataset: DataSet, options: SearchOptions,
                    *, data_sha256: str | None = None) -> dict[str, Any]:
    """What a search's evaluations depend on: a resumed search must match every key."""
    from .fingerprint import sha256_bytes, tool_versions
    from .table import table_to_dict

    opts = options.as_dict()
    for k in ("budget", "time_budget_s", "threshold"):  # a rerun may extend the budgets
        opts.pop(k, None)
    versions = tool_versions()
    versions.pop("platform", None)
    return {
        "quantlab": __version__,
        "threshold": options.threshold,
        "options": opts,
        "model_sha256": model.sha256,
        "table_sha256": sha256_bytes(_line(table_to_dict(table)).encode()),
        "table_method": table.method,
        "data": {"count": len(dataset), "sha256": data_sha256, "record": _normalise(dataset.manifest_record())},
        "versions": versions,
    }


def search(
    model: LoadedModel,
    table: CalibrationTable,
    dataset: DataSet,
    options: SearchOptions,
    *,
    workdir: str | Path | None = None,
    progress: bool = False,
    on_step: Callable[[StepEvent], None] | None = None,
) -> SearchResult:
    """Find the plan with the most INT8 that meets ``options.threshold`` (see the module docstring).

    ``workdir``: where the search log lives; a rerun with the same workdir resumes.
    ``on_step``: called after every step with a :class:`StepEvent` (the CLI prints it).
    Raises SearchError for unusable options or a log written with other settings.
    """
    from .data import check_inputs, summarize
    from .plan import resolve_plan, uniform_plan

    start = time.perf_counter()
    options.check()
    parse_threshold(options.threshold)
    check_inputs(dataset, model)
    base = resolve_plan(uniform_plan("int8"), model.proto)
    log = None
    data_sha = None
    if workdir is not None:
        data_sha = summarize(dataset, options.batch_size).sha256
        settings = search_settings(model, table, dataset, options, data_sha256=data_sha)
        log = SearchLog(workdir, settings)
    else:
        settings = search_settings(model, table, dataset, options)
    evaluator = CompareEvaluator(model, table, dataset, options)
    outcome = run_search(base, evaluator, options, log=log, on_step=on_step, progress=progress)
    comparison = outcome.evaluation.comparison
    if comparison is None and log is not None:
        comparison = _load_logged_comparison(log, outcome.evaluation)
    if comparison is None:  # the log lost it: measure the final plan again rather than return nothing
        comparison = evaluator.evaluate(outcome.plan, evaluator.size).comparison
    final = evaluator.write(outcome.plan, deploy=True)
    return SearchResult(
        met=outcome.met, plan=outcome.plan, final=final, comparison=comparison, trajectory=outcome.trajectory,
        sensitivity=outcome.sensitivity, evaluations=outcome.evaluations, bound=outcome.bound,
        message=outcome.message, settings={**settings, "workdir": None if workdir is None else str(workdir),
                                           "budget": outcome.budget, "time_budget_s": options.time_budget_s,
                                           "fp16_simulation": options.simulate_fp16,
                                           "probe_samples_used": min(options.probe_samples,
                                                                     max(1, len(dataset) // 2))},
        notes=outcome.notes, budget=outcome.budget, executed=outcome.executed,
        seconds=time.perf_counter() - start,
    )


def _load_logged_comparison(log: SearchLog, ev: Evaluation) -> CompareResult | None:
    rel = log.comparison_dirs.get(ev.key)
    if not rel or not (log.workdir / rel).is_dir():
        return None
    from .compare import load_comparison

    try:
        return load_comparison(log.workdir / rel)
    except Exception:  # noqa: BLE001 - a damaged saved comparison is measured again instead
        return None
